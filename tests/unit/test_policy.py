"""Remediation policy: one test per rule, in the module docstring's order, plus properties.

Each rule's test also sets up conditions that later rules would act on, so it shows that
the rule wins (first match wins).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.models import ACTION_TYPES, ActionRequest, Outcome, Target
from agent.policy import (
    Executed,
    Facts,
    PriorState,
    Switches,
    Verdict,
    decide,
    drain_params,
    revision_param,
    scope_for,
    unearned_approval,
)
from agent.settings import PolicyOverrideSection, Settings
from tests.unit.factories import action, at
from tests.unit.factories import settings as make_settings

NOW = at(10_000)
BASE = make_settings(
    {
        "agent": {"mode": "autonomous"},
        "remediation": {
            "enabled": True,
            "confidence_threshold": 0.8,
            "require_approval": ["rollback", "configuration_change"],
            "cooldown": "5m",
            "max_actions_per_hour": 3,
            "denied_namespaces": ["kube-system"],
        },
    }
)
OFF = Switches()
PARAM_VALUES = st.one_of(
    st.booleans(),
    st.integers(-10, 10_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["30", "1e3", "inf", "-5", " 60 "]),
)


def cfg(**changes: Any) -> Settings:
    """BASE with ``agent_*`` / ``remediation_*`` fields changed."""
    agent = {k[6:]: v for k, v in changes.items() if k.startswith("agent_")}
    rem = {k[12:]: v for k, v in changes.items() if k.startswith("remediation_")}
    assert len(agent) + len(rem) == len(changes), changes
    return replace(
        BASE, agent=replace(BASE.agent, **agent), remediation=replace(BASE.remediation, **rem)
    )


def done(target_key: str = "Deployment/shop/checkout", ago: float = 60.0) -> Executed:
    return Executed(target_key=target_key, namespace="shop", at=NOW - timedelta(seconds=ago))


def ran(
    outcome: Outcome, ago: float, type: str = "restart_workload", target: str = "checkout"
) -> Executed:
    """An earlier run, beyond the cooldown and the hourly budget, verified as ``outcome``."""
    return Executed(
        target_key=f"Deployment/shop/{target}",
        namespace="shop",
        at=NOW - timedelta(seconds=ago),
        action_id=f"earlier-{ago}",
        type=type,
        outcome=outcome,
    )


def verdict(
    act: ActionRequest | None = None,
    s: Settings = BASE,
    history: tuple[Executed, ...] = (),
    switches: Switches = OFF,
) -> Verdict:
    return decide(act or action(), s, history, switches, NOW)


def rule(v: Verdict) -> tuple[str, str]:
    return v.kind, v.rule


# 1
def test_remediation_disabled_denies_before_anything_else() -> None:
    s = cfg(remediation_enabled=False, agent_kill_switch=True)
    v = verdict(action(approved_by="alice"), s, switches=Switches(kill_switch=True))
    assert rule(v) == ("deny", "remediation.enabled")


# 2
def test_kill_switch_in_settings_denies() -> None:
    v = verdict(action("scale_up", namespace="kube-system"), cfg(agent_kill_switch=True))
    assert rule(v) == ("deny", "kill_switch")


def test_kill_switch_at_run_time_denies_even_approved_actions() -> None:
    v = verdict(action(approved_by="alice"), switches=Switches(kill_switch=True))
    assert rule(v) == ("deny", "kill_switch")


# 3
def test_denied_namespace_denies() -> None:
    v = verdict(action(namespace="kube-system", approved_by="alice"), cfg(agent_mode="manual"))
    assert rule(v) == ("deny", "denied_namespaces")
    assert "kube-system" in v.reason


def test_namespace_outside_allowed_list_denies() -> None:
    s = cfg(remediation_allowed_namespaces=("shop",), agent_mode="manual")
    assert rule(verdict(action(namespace="billing"), s)) == ("deny", "allowed_namespaces")
    assert rule(verdict(action(namespace="shop"), s)) == ("deny", "mode.manual")


def test_cluster_scoped_targets_skip_namespace_rules() -> None:
    node = replace(action("cordon_node"), target=Target(kind="Node", name="n1"))
    s = cfg(remediation_allowed_namespaces=("shop",))
    assert rule(verdict(node, s)) == ("execute", "autonomous")


# 4
def test_manual_mode_only_recommends() -> None:
    v = verdict(action(approved_by="alice"), cfg(agent_mode="manual"), history=(done(ago=1),))
    assert rule(v) == ("deny", "mode.manual")


# 4a
def drain(**params: Any) -> ActionRequest:
    node = Target(kind="Node", name="n1")
    return replace(action("drain_node", params=params, approved_by="alice"), target=node)


@pytest.mark.parametrize(
    ("act", "named"),
    [
        (drain(timeout=121), "params.timeout: 121s is outside (0, remediation.drain_timeout=120s]"),
        (drain(timeout=0), "params.timeout"),
        (drain(timeout="nan"), "params.timeout: expected a finite number"),
        (drain(timeout="soon"), "params.timeout: expected a number of seconds, got 'soon'"),
        (drain(timeout=True), "params.timeout"),
        (drain(grace_period=0), "params.grace_period: 0s is outside [1, timeout=120s]"),
        (
            drain(timeout=30, grace_period=31),
            "params.grace_period: 31s is outside [1, timeout=30s]",
        ),
        (action("rollback", params={"revision": "-1"}), "params.revision"),
        (action("rollback", params={"revision": "2; rm"}), "params.revision"),
        (action("scale_up", params={"replicas": "lots"}), "params.replicas"),
        (action("update_config", params={"value": "x"}), "params.key"),
        (action("update_config", params={"key": "k"}), "params.value"),
    ],
)
def test_params_out_of_bounds_deny_naming_the_param_even_when_approved(
    act: ActionRequest, named: str
) -> None:
    # History that rule 5 would deny on: params are judged first.
    v = verdict(act, history=(done(act.target.key, 1),))
    assert rule(v) == ("deny", "params")
    assert named in v.reason


def test_params_within_bounds_pass_and_a_drain_may_only_lower_the_timeout() -> None:
    ok = [
        drain(),
        drain(timeout=120, grace_period=120),
        drain(timeout="30", grace_period=1.5),
        action("rollback", params={"revision": 3}),
        action("scale_up", params={"replicas": "+2"}),
        action("update_config", params={"key": "k", "value": 0}),
        # An undo carries the prior state recorded by the action it undoes, as it was.
        drain(timeout=10_000, undo_of="act-0"),
    ]
    for act in ok:
        passed = {
            ("execute", "autonomous"),
            ("execute", "approved"),
            ("approve", "require_approval"),
        }
        assert rule(verdict(act)) in passed, act.params
    assert drain_params({}, BASE.remediation) == (None, 120.0)
    assert drain_params({"timeout": 5}, BASE.remediation) == (None, 5.0)


def test_revision_0_is_the_previous_revision_as_in_the_reference() -> None:
    # The reference's rollback defaults revision to 0, "the previous one" (Kubernetes'
    # rollbackTo): a runbook or a model writing it asks for the plain rollback.
    assert revision_param({"revision": 0}) is None
    assert revision_param({"revision": " 0 "}) is None
    assert revision_param({"revision": "7"}) == 7
    v = verdict(action("rollback", params={"revision": 0}))
    assert rule(v) == ("approve", "require_approval"), v
    for bad in (-1, "00", "01", True):
        with pytest.raises(ValueError, match=r"params\.revision"):
            revision_param({"revision": bad})


@given(st.dictionaries(st.sampled_from(["timeout", "grace_period"]), PARAM_VALUES))
def test_an_allowed_drain_never_outlasts_the_configured_timeout(params: dict[str, Any]) -> None:
    act = drain(**params)
    rem = BASE.remediation
    if verdict(act).rule == "params":
        with pytest.raises(ValueError, match=r"params\.(timeout|grace_period)"):
            drain_params(act.params, rem)
        return
    grace, timeout = drain_params(act.params, rem)
    assert 0 < timeout <= rem.drain_timeout
    assert grace is None or 1 <= grace <= timeout


# 5
def test_cooldown_denies_a_recently_touched_target() -> None:
    history = (done(ago=299), done("Deployment/shop/a", 10), done("Deployment/shop/b", 10))
    v = verdict(action(approved_by="alice"), history=history)
    assert rule(v) == ("deny", "cooldown")
    assert "Deployment/shop/checkout" in v.reason


def test_the_cooldown_ends_early_for_the_next_step_after_a_verified_failure() -> None:
    failed = ran("not_healed", 120)  # a restart two minutes ago, verified not healed
    rollback = action("rollback", confidence=0.99, approved_by="alice")
    assert rule(verdict(rollback, history=(failed,))) == ("execute", "approved")
    # Not for the same action again, nor while an action is still unverified.
    again = action("restart_workload", confidence=0.99)
    assert rule(verdict(again, history=(failed,))) == ("deny", "cooldown")
    pending = ran("unknown", 60, type="scale_up")
    assert rule(verdict(rollback, history=(failed, pending))) == ("deny", "cooldown")
    assert rule(verdict(rollback, history=(ran("healed", 120),))) == ("deny", "cooldown")


def test_cooldown_is_per_target_and_ends() -> None:
    assert rule(verdict(history=(done(ago=300),))) == ("execute", "autonomous")
    assert rule(verdict(history=(done("Deployment/shop/cart", 1),))) == ("execute", "autonomous")
    other_kind = done("StatefulSet/shop/checkout", 1)
    assert rule(verdict(history=(other_kind,))) == ("execute", "autonomous")


# 6
def test_hourly_budget_denies_once_spent() -> None:
    history = tuple(done(f"Deployment/shop/w{i}", 600 + i) for i in range(3))
    v = verdict(action(approved_by="alice"), history=history)
    assert rule(v) == ("deny", "max_actions_per_hour")
    assert v.reason.startswith("3 actions")


def test_hourly_budget_counts_only_the_last_hour() -> None:
    history = (*(done(f"Deployment/shop/w{i}", 3600 + i) for i in range(5)), done("x", 600))
    assert rule(verdict(history=history)) == ("execute", "autonomous")


def test_zero_budget_denies_everything() -> None:
    assert rule(verdict(s=cfg(remediation_max_actions_per_hour=0))) == (
        "deny",
        "max_actions_per_hour",
    )


# 7
def test_human_approval_executes_what_would_otherwise_need_approval() -> None:
    act = action("rollback", confidence=0.1, approved_by="alice")
    v = verdict(act, cfg(agent_mode="supervised"))
    assert rule(v) == ("execute", "approved")
    assert "alice" in v.reason


# 7a
def test_an_undo_of_no_known_prior_state_goes_to_a_person() -> None:
    undo = action("scale_up", params={"replicas": 2, "undo_of": "s9"}, confidence=1.0)
    why = "undo of action s9, which records no prior state known here"
    v = decide(undo, BASE, (), OFF, NOW, unknown_undo=why)
    assert rule(v) == ("approve", "unknown_undo") and why in v.reason
    assert rule(verdict(undo)) == ("execute", "autonomous")  # a known one is the undo asked for


# 7b
RESTART = action("restart_workload", confidence=0.99)


def test_an_action_verified_ineffective_twice_goes_to_a_person() -> None:
    history = (ran("not_healed", 4000), ran("worse", 9000))
    v = verdict(RESTART, history=history)
    assert rule(v) == ("approve", "repeat")
    assert v.reason.startswith(
        "restart_workload on Deployment/shop/checkout was verified ineffective 2 times "
        "in the last 6h"
    )
    # A person may try again: their approval executes it.
    assert rule(verdict(replace(RESTART, approved_by="alice"), history=history)) == (
        "execute",
        "approved",
    )


@pytest.mark.parametrize(
    "history",
    [
        (ran("not_healed", 4000),),  # once is not a pattern
        (ran("not_healed", 4000), ran("healed", 9000)),
        (ran("not_healed", 4000), ran("not_healed", 21_700)),  # beyond the 6h window
        (ran("not_healed", 4000), ran("not_healed", 9000, type="rollback")),  # another action
        (ran("not_healed", 4000), ran("not_healed", 9000, target="cart")),  # another target
        (ran("not_healed", 4000), ran("unknown", 9000)),  # not verified (yet)
    ],
)
def test_what_does_not_make_an_action_ineffective(history: tuple[Executed, ...]) -> None:
    assert rule(verdict(RESTART, history=history)) == ("execute", "autonomous")


def test_an_action_that_keeps_healing_a_recurring_fault_goes_to_a_person() -> None:
    history = (ran("healed", 4000), ran("healed", 9000), ran("unknown", 14_000))
    v = verdict(RESTART, history=history)
    assert rule(v) == ("approve", "repeat")
    assert "ran 3 times in the last 6h: it keeps masking a cause" in v.reason
    assert rule(verdict(RESTART, history=history[:2])) == ("execute", "autonomous")


def test_repeat_rules_can_be_turned_off_and_spare_an_undo() -> None:
    twice = (ran("not_healed", 4000), ran("not_healed", 9000), ran("healed", 14_000))
    off = cfg(remediation_ineffective_after=0, remediation_max_repeats=0)
    assert rule(verdict(RESTART, off, history=twice)) == ("execute", "autonomous")
    only_repeats = cfg(remediation_ineffective_after=0)
    assert rule(verdict(RESTART, only_repeats, history=twice))[1] == "repeat"
    undo = replace(RESTART, params={"undo_of": "earlier-4000"})
    assert rule(verdict(undo, history=twice)) == ("execute", "autonomous")
    # A re-request of the very action that ran is not its own repeat.
    again = tuple(replace(h, action_id=RESTART.id) for h in twice)
    assert rule(verdict(RESTART, history=again)) == ("execute", "autonomous")


# 8
def test_supervised_mode_asks_for_approval() -> None:
    v = verdict(action("scale_up", confidence=0.99), cfg(agent_mode="supervised"))
    assert rule(v) == ("approve", "mode.supervised")


# 9
def test_listed_action_types_require_approval() -> None:
    assert rule(verdict(action("rollback", confidence=0.99))) == ("approve", "require_approval")
    # "configuration_change" in the file is the update_config action.
    config = {"key": "pool_size", "value": "20"}
    v = verdict(action("update_config", confidence=0.1, params=config))
    assert rule(v) == ("approve", "require_approval")


# 10
def test_low_confidence_asks_for_approval() -> None:
    v = verdict(action("scale_up", confidence=0.79))
    assert rule(v) == ("approve", "confidence_threshold")
    assert "0.79" in v.reason and "0.80" in v.reason


# 11
def test_confident_unlisted_action_executes() -> None:
    assert rule(verdict(action("scale_up", confidence=0.8))) == ("execute", "autonomous")
    assert rule(verdict(action("restart_workload", confidence=1.0))) == ("execute", "autonomous")


# dry run
def test_dry_run_in_settings_turns_execute_into_dry_run() -> None:
    s = cfg(agent_dry_run=True)
    assert rule(verdict(action("scale_up"), s)) == ("dry_run", "autonomous")
    assert rule(verdict(action("rollback", approved_by="alice"), s)) == ("dry_run", "approved")


def test_dry_run_switch_turns_execute_into_dry_run() -> None:
    assert rule(verdict(switches=Switches(dry_run=True))) == ("dry_run", "autonomous")


def test_dry_run_leaves_approvals_and_denials_alone() -> None:
    dry = Switches(dry_run=True)
    assert rule(verdict(action("rollback"), switches=dry)) == ("approve", "require_approval")
    assert rule(verdict(history=(done(ago=1),), switches=dry)) == ("deny", "cooldown")


# --- per-namespace policy ------------------------------------------------------------------------

OVERRIDES = (
    PolicyOverrideSection(namespaces=("prod-*", "payments"), mode="supervised"),
    PolicyOverrideSection(
        namespaces=("staging-*",), confidence_threshold=0.5, require_approval=("scale_down",)
    ),
    PolicyOverrideSection(namespaces=("staging-*", "trial"), dry_run=True),  # never reached
    PolicyOverrideSection(namespaces=("trial",), dry_run=True),
)


def test_a_namespace_gets_the_first_override_matching_it() -> None:
    s = cfg(remediation_overrides=OVERRIDES)
    rollback = action("rollback", confidence=0.6)
    # Globally: a rollback needs approval, and 0.6 is under the 0.8 threshold.
    assert rule(verdict(rollback, s)) == ("approve", "require_approval")
    # staging-*: approvals only for scale_down, threshold 0.5: it runs.
    staging = replace(rollback, target=Target(kind="Deployment", namespace="staging-2", name="x"))
    v = verdict(staging, s)
    assert rule(v) == ("execute", "autonomous")
    assert v.reason == "confidence 0.60 meets the threshold (remediation.overrides[1])"
    # prod-*: supervised, whatever the confidence; the reason names the override.
    prod = replace(staging, confidence=0.99, target=replace(staging.target, namespace="prod-eu"))
    v = verdict(prod, s)
    assert rule(v) == ("approve", "mode.supervised") and "remediation.overrides[0]" in v.reason
    # trial: shadow mode there only; the global kill switch still stops it.
    trial = replace(staging, confidence=0.99, type="scale_up")
    trial = replace(trial, target=replace(staging.target, namespace="trial"))
    assert rule(verdict(trial, s)) == ("dry_run", "autonomous")
    assert verdict(trial, s, switches=Switches(kill_switch=True)).kind == "deny"
    # A node has no namespace: the global policy.
    assert scope_for("", s).source == "" and scope_for("prod-x", s).mode == "supervised"


def test_an_override_never_lifts_global_shadow_mode() -> None:
    s = cfg(
        agent_dry_run=True,
        remediation_overrides=(PolicyOverrideSection(namespaces=("*",), dry_run=False),),
    )
    assert verdict(action("scale_up", confidence=0.99), s).kind == "dry_run"


def test_an_override_names_its_bad_field() -> None:
    bad = {"remediation": {"overrides": [{"namespaces": ["Prod_*"], "mode": "supervised"}]}}
    with pytest.raises(ConfigError, match=r"remediation\.overrides\[0\]\.namespaces\[0\]"):
        make_settings(bad)
    with pytest.raises(ConfigError, match=r"remediation\.overrides\[0\]\.namespaces"):
        make_settings({"remediation": {"overrides": [{"namespaces": [], "mode": "manual"}]}})


# --- properties ----------------------------------------------------------------------------------

_namespaces = st.sampled_from(["shop", "kube-system", "billing", ""])
_settings = st.builds(
    cfg,
    agent_mode=st.sampled_from(["autonomous", "supervised", "manual"]),
    agent_dry_run=st.booleans(),
    agent_kill_switch=st.booleans(),
    remediation_enabled=st.booleans(),
    remediation_confidence_threshold=st.floats(min_value=0, max_value=1),
    remediation_require_approval=st.lists(st.sampled_from(ACTION_TYPES), unique=True).map(tuple),
    remediation_allowed_namespaces=st.sampled_from([(), ("shop",), ("shop", "billing")]),
    remediation_cooldown=st.sampled_from([0.0, 60.0, 300.0]),
    remediation_max_actions_per_hour=st.integers(min_value=0, max_value=5),
    remediation_overrides=st.sampled_from(
        [
            (),
            (PolicyOverrideSection(namespaces=("shop",), mode="supervised"),),
            (PolicyOverrideSection(namespaces=("sh?p",), mode="manual"),),
            (
                PolicyOverrideSection(
                    namespaces=("bill*",),
                    mode="autonomous",
                    confidence_threshold=0.1,
                    require_approval=(),
                ),
                PolicyOverrideSection(namespaces=("*",), dry_run=True),
            ),
        ]
    ),
)
_actions = st.builds(
    action,
    st.sampled_from(ACTION_TYPES),
    namespace=_namespaces,
    name=st.sampled_from(["checkout", "cart"]),
    confidence=st.floats(min_value=0, max_value=1),
    approved_by=st.none() | st.just("alice"),
)
_history = st.lists(
    st.builds(
        done,
        st.sampled_from(["Deployment/shop/checkout", "Deployment/shop/cart", "Node//n1"]),
        st.floats(min_value=0, max_value=7200),
    ),
    max_size=6,
).map(tuple)
_switches = st.builds(Switches, kill_switch=st.booleans(), dry_run=st.booleans())


@settings(max_examples=150, deadline=None)
@given(_actions, _settings, _history, _switches)
def test_with_the_kill_switch_on_nothing_executes(
    act: ActionRequest, s: Settings, history: tuple[Executed, ...], sw: Switches
) -> None:
    on = replace(sw, kill_switch=True)
    assert decide(act, s, history, on, NOW).kind == "deny"
    on_in_file = replace(s, agent=replace(s.agent, kill_switch=True))
    assert decide(act, on_in_file, history, sw, NOW).kind == "deny"


@settings(max_examples=150, deadline=None)
@given(_actions, _settings, _history, _switches)
def test_in_dry_run_nothing_executes(
    act: ActionRequest, s: Settings, history: tuple[Executed, ...], sw: Switches
) -> None:
    assert decide(act, s, history, replace(sw, dry_run=True), NOW).kind != "execute"
    in_file = replace(s, agent=replace(s.agent, dry_run=True))
    assert decide(act, in_file, history, sw, NOW).kind != "execute"


@settings(max_examples=150, deadline=None)
@given(_actions, _settings, _history, _switches)
def test_low_confidence_never_executes_without_a_human(
    act: ActionRequest, s: Settings, history: tuple[Executed, ...], sw: Switches
) -> None:
    v = decide(replace(act, approved_by=None), s, history, sw, NOW)
    if act.confidence < scope_for(act.target.namespace, s).confidence_threshold:
        assert v.kind in ("approve", "deny")


@settings(max_examples=150, deadline=None)
@given(_actions, _settings, _history, _switches)
def test_verdicts_are_consistent(
    act: ActionRequest, s: Settings, history: tuple[Executed, ...], sw: Switches
) -> None:
    v = decide(act, s, history, sw, NOW)
    assert v == decide(act, s, history, sw, NOW)  # pure
    scope = scope_for(act.target.namespace, s)
    if v.kind in ("execute", "dry_run"):
        assert s.remediation.enabled and scope.mode != "manual"
        assert act.target.namespace not in s.remediation.denied_namespaces or not (
            act.target.namespace
        )
        assert v.rule in ("approved", "autonomous")
        assert (v.kind == "dry_run") == (sw.dry_run or scope.dry_run)
        assert scope.dry_run >= s.agent.dry_run  # an override never lifts shadow mode
    if v.kind == "approve":
        assert not act.approved_by


_facts = st.builds(
    Facts,
    replicas=st.none() | st.integers(0, 60),
    target_replicas=st.none() | st.integers(0, 60),
    pods_disrupted=st.integers(0, 10),
    pdb_headroom=st.none() | st.integers(0, 3),
    cordoned_nodes=st.lists(st.sampled_from(["n2", "n3"]), unique=True).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    _actions,
    _settings,
    _history,
    _switches,
    _facts,
    st.none() | st.just("no prior state known"),
    st.floats(min_value=0, max_value=7200),
)
def test_an_applied_action_is_never_judged_again_and_any_other_always_is(
    act: ActionRequest,
    s: Settings,
    history: tuple[Executed, ...],
    sw: Switches,
    facts: Facts,
    unknown: str | None,
    own_at: float,
) -> None:
    # Its own id on the target: whatever the switches, limits and state (its own run in
    # the history among them), it is recorded as the earlier delivery's success.
    own = (*history, replace(done(act.target.key, own_at), action_id=act.id))
    for h in (history, own):
        v = decide(act, s, h, sw, NOW, facts, unknown, applied=True)
        assert (v.kind, v.rule) == ("applied", "already_applied")
        # Not there: every rule as before, and nothing is taken for applied.
        judged = decide(act, s, h, sw, NOW, facts, unknown, applied=False)
        assert judged == decide(act, s, h, sw, NOW, facts, unknown_undo=unknown)
        assert judged.kind != "applied"
        if sw.kill_switch or s.agent.kill_switch:
            assert judged.kind == "deny"
        if sw.dry_run or s.agent.dry_run:
            assert judged.kind != "execute"


def test_history_from_results_counts_actions_that_changed_the_cluster_once() -> None:
    from agent.models import ActionResult, Target
    from agent.policy import history_window, learned

    def result(action_id: str, status: str, prior: dict[str, int] | None = None) -> ActionResult:
        return ActionResult(
            id=f"r-{action_id}-{status}",
            action_id=action_id,
            incident_id="i",
            incident_key="k",
            type="scale_up",
            target=Target(kind="Deployment", namespace="shop", name=action_id),
            status=status,  # type: ignore[arg-type]
            outcome="unknown",
            message="",
            started_at=at(action_id.__len__()),
            finished_at=at(10),
            prior_state=prior or {},
        )

    def executed_from(results: list[ActionResult]) -> list[Executed]:
        seen: dict[str, Executed] = {}
        for r in results:
            h = learned(seen.get(r.action_id), r)
            if h is not None:
                seen[r.action_id] = h
        return list(seen.values())

    history = executed_from(
        [
            result("ok", "succeeded", {"replicas": 2}),
            result("ok", "succeeded", {"replicas": 2}),  # its verification
            result("half", "failed", {"replicas": 2}),  # failed half-way: it changed things
            result("clean-fail", "failed"),
            result("no", "denied"),
            result("shadow", "dry_run"),
            result("again", "duplicate"),
        ]
    )
    assert [h.target_key for h in history] == ["Deployment/shop/ok", "Deployment/shop/half"]
    assert [h.outcome for h in history] == ["unknown", "unknown"]
    verified = replace(result("ok", "succeeded", {"replicas": 2}), outcome="not_healed")
    history = executed_from([result("ok", "succeeded", {"replicas": 2}), verified])
    assert [(h.type, h.outcome, h.ineffective) for h in history] == [
        ("scale_up", "not_healed", True)
    ]
    rem = BASE.remediation
    assert history_window(rem) == 6 * 3600  # the repeat window is the longest
    # Rule 7c (rollback_flip) looks at the repeat window whatever the repeat checks.
    assert history_window(replace(rem, ineffective_after=0, max_repeats=0)) == 6 * 3600
    assert history_window(replace(rem, repeat_window=600.0)) == 3600
    assert history_window(replace(rem, cooldown=7 * 3600.0)) == 7 * 3600


def test_a_switch_is_on_when_any_source_turns_it_on() -> None:
    from agent.policy import merged

    file = Switches(kill_switch=True, why="file /k exists")
    topic = Switches(kill_switch=True, dry_run=True, why="turned on by alice")
    assert merged(Switches(), Switches()) == Switches()
    assert merged(file, Switches(dry_run=True)) == Switches(True, True, "file /k exists")
    both = merged(file, topic)
    assert both.kill_switch and both.dry_run and both.why == "file /k exists; turned on by alice"
    v = verdict(s=BASE, switches=topic)
    assert v.reason == "the kill switch is on (turned on by alice): no action executes"


def test_a_namespace_switch_holds_its_namespace_and_a_cluster_switch_holds_all() -> None:
    from agent.models import SwitchChange
    from agent.policy import switches_for

    def change(name: Any, on: bool, namespace: str = "") -> SwitchChange:
        return SwitchChange(
            id="c", name=name, on=on, by="carol", reason="", at=NOW, namespace=namespace
        )

    frozen = [change("kill_switch", True, "shop"), change("dry_run", True, "web")]
    assert switches_for(frozen, "shop").kill_switch
    assert not switches_for(frozen, "shop").dry_run
    web = frozen[1].describe()  # who turned it on, for a drain it stops
    assert switches_for(frozen, "web") == Switches(dry_run=True, dry_run_why=web)
    assert switches_for(frozen, "") == Switches()  # a node: cluster-wide switches only
    everywhere = [*frozen, change("kill_switch", True)]
    assert switches_for(everywhere, "").kill_switch and switches_for(everywhere, "web").kill_switch
    assert switches_for([change("kill_switch", False)], "shop") == Switches()


# --- approved_by on a request read from the actions topic ---------------------------------------

SCALED = PriorState(type="scale_up", target_key="Deployment/shop/checkout", params={"replicas": 4})


def undo_of(original: str = "s1", **params: Any) -> ActionRequest:
    p = {"replicas": 4, **params, "undo_of": original}
    return action("scale_up", params=p, approved_by="bob", action_id=f"undo-{original}")


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (action(), None),  # nothing claimed
        (action(approved_by="mallory"), "approvals topic, never in the request"),
        (undo_of(), None),  # restores what s1 recorded
        (undo_of("s9"), "undo of action s9, which records no prior state known here"),
        (undo_of(replicas=400), "does not restore the prior state action s1 recorded"),
        (undo_of(extra="x"), "does not restore the prior state action s1 recorded"),
        (
            replace(undo_of(), target=Target(kind="Deployment", namespace="shop", name="db")),
            "does not restore",
        ),
        (replace(undo_of(), type="scale_down"), "does not restore"),
    ],
)
def test_an_approval_in_a_request_stands_only_for_an_undo_of_a_recorded_prior_state(
    request_: ActionRequest, why: str | None
) -> None:
    found = unearned_approval(request_, {"s1": (SCALED,)})
    assert found == why if why is None else why in (found or "")


@given(
    approved_by=st.text(min_size=1, max_size=8),
    params=st.dictionaries(st.sampled_from(["replicas", "key", "undo_of"]), PARAM_VALUES),
)
def test_only_an_undo_of_a_recorded_prior_state_keeps_its_approval(
    approved_by: str, params: dict[str, Any]
) -> None:
    act = replace(action("scale_up", params=params), approved_by=approved_by)
    earned = unearned_approval(act, {"s1": (SCALED,)}) is None
    assert earned == (params == {"replicas": 4, "undo_of": "s1"})


def test_a_drain_in_progress_halts_for_the_kill_switch_or_shadow_mode_from_any_source() -> None:
    from agent.models import SwitchChange
    from agent.policy import Switches, halt_reason, merged, switches_for

    plain = make_settings({})
    assert halt_reason(Switches(), plain, "") is None
    change = SwitchChange(id="sw", name="dry_run", on=True, by="bob", reason="freeze", at=at(5))
    topic = merged(Switches(), switches_for([change], ""))
    assert halt_reason(topic, plain, "") == (f"shadow mode (dry run: {change.describe()})")
    # The kill switch says more than shadow mode: it is named first.
    both = merged(topic, Switches(kill_switch=True, why="file /run/kill exists"))
    assert halt_reason(both, plain, "") == "the kill switch (file /run/kill exists)"
    assert halt_reason(Switches(), make_settings({"agent": {"dry_run": True}}), "") == (
        "shadow mode (dry run: agent.dry_run)"
    )
    shadowed = make_settings(
        {"remediation": {"overrides": [{"namespaces": ["shop"], "dry_run": True}]}}
    )
    assert halt_reason(Switches(), shadowed, "shop") == (
        "shadow mode (dry run: remediation.overrides[0])"
    )
    assert halt_reason(Switches(), shadowed, "") is None  # a node gets the global policy
    # A namespace's switch holds only its targets.
    scoped = replace(change, namespace="shop")
    assert halt_reason(switches_for([scoped], "web"), plain, "web") is None
    assert halt_reason(switches_for([scoped], "shop"), plain, "shop") is not None


@given(
    default=st.floats(min_value=1, max_value=120),
    timeout=st.one_of(st.none(), st.floats(min_value=0.01, max_value=120)),
)
def test_the_configured_grace_period_gives_way_to_a_shorter_action_timeout(
    default: float, timeout: float | None
) -> None:
    """remediation.drain_grace_period is a default: an action's shorter timeout clamps it,
    as an explicit grace_period is bounded by that timeout; under 1s none fits."""
    rem = make_settings({"remediation": {"drain_grace_period": default}}).remediation
    params = {} if timeout is None else {"timeout": timeout}
    effective = rem.drain_timeout if timeout is None else timeout
    if default > effective and effective < 1:
        with pytest.raises(ValueError, match=r"^params\.timeout: .*drain_grace_period"):
            drain_params(params, rem)
        return
    grace, got = drain_params(params, rem)
    assert got == effective
    assert grace == min(default, effective)
    assert grace is not None and 1 <= grace <= got


def test_a_drain_timeout_below_the_default_grace_runs_with_the_timeout_as_its_grace() -> None:
    rem = make_settings({"remediation": {"drain_grace_period": "90s"}}).remediation
    assert drain_params({"timeout": 30}, rem) == (30.0, 30.0)
    assert drain_params({"timeout": 30, "grace_period": 10}, rem) == (10.0, 30.0)
    assert drain_params({}, rem) == (90.0, 120.0)
    with pytest.raises(ValueError, match=r"params\.timeout: 0\.5s is below 1s"):
        drain_params({"timeout": 0.5}, rem)


@pytest.mark.parametrize("grace", [0, 0.5, 121])
def test_a_default_grace_period_outside_1s_to_the_drain_timeout_is_refused_at_load(
    grace: float,
) -> None:
    with pytest.raises(
        ConfigError, match=r"remediation: .*drain_grace_period: .*drain_timeout=120s"
    ):
        make_settings({"remediation": {"drain_grace_period": grace}})
