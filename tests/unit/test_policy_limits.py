"""The policy's blast-radius rules (6a-6e) and the undo exemption, one test per rule, and
properties over random facts: human approval never lifts a limit; the kill switch and
dry-run still hold whatever the facts say."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.models import ACTION_TYPES, ActionRequest, Target
from agent.policy import (
    DISRUPTIVE_ACTIONS,
    MAX_SCALE_STEP,
    NODE_ACTIONS,
    Executed,
    Facts,
    Switches,
    Verdict,
    bounded_replicas,
    decide,
    restart_limit,
)
from agent.settings import Settings
from tests.unit.factories import action, at
from tests.unit.factories import settings as make_settings

NOW = at(10_000)
BASE = make_settings(
    {
        "agent": {"mode": "autonomous"},
        "remediation": {
            "confidence_threshold": 0.8,
            "require_approval": ["update_config"],
            "cooldown": "5m",
            "max_actions_per_hour": 10,
            "max_actions_per_namespace_per_hour": 2,
            "min_replicas": 2,
            "max_replicas": 6,
            "max_restart_fraction": 0.5,
            "max_nodes_cordoned": 1,
        },
    }
)
NODE = Target(kind="Node", name="n1")
OFF = Switches()


def cfg(**rem: Any) -> Settings:
    return replace(BASE, remediation=replace(BASE.remediation, **rem))


def verdict(
    act: ActionRequest,
    facts: Facts | None = None,
    s: Settings = BASE,
    history: tuple[Executed, ...] = (),
    switches: Switches = OFF,
) -> Verdict:
    return decide(act, s, history, switches, NOW, facts)


def rule(v: Verdict) -> tuple[str, str]:
    return v.kind, v.rule


def done(key: str, namespace: str = "shop", ago: float = 600) -> Executed:
    return Executed(target_key=key, namespace=namespace, at=NOW - timedelta(seconds=ago))


def node_action(type_: str = "drain_node", **kw: Any) -> ActionRequest:
    return replace(action(type_, **kw), target=NODE)  # type: ignore[arg-type]


# 6a
def test_namespace_budget_denies_once_the_namespace_spent_it() -> None:
    history = (done("Deployment/shop/a"), done("Deployment/shop/b"))
    v = verdict(action(approved_by="alice"), history=history)
    assert rule(v) == ("deny", "max_actions_per_namespace_per_hour")
    assert "'shop'" in v.reason
    # other namespaces and older actions do not count
    other = (done("Deployment/billing/a", "billing"), done("Deployment/shop/b", ago=3700))
    assert rule(verdict(action(), history=other)) == ("execute", "autonomous")


def test_namespace_budget_does_not_apply_to_nodes() -> None:
    history = (done("Node//n2", ""), done("Node//n3", ""))
    assert rule(verdict(node_action(), history=history)) == ("execute", "autonomous")


# 6b
def test_scale_clamped_to_where_it_is_is_denied() -> None:
    f = Facts(replicas=6, target_replicas=9)
    v = verdict(action("scale_up", approved_by="alice"), f)
    assert rule(v) == ("deny", "replica_bounds")
    assert "2..6" in v.reason
    assert rule(verdict(action("scale_down"), Facts(replicas=2, target_replicas=1))) == (
        "deny",
        "replica_bounds",
    )
    assert rule(verdict(action("scale_up"), Facts(replicas=5, target_replicas=9))) == (
        "execute",
        "autonomous",
    )


def test_a_scale_clamped_across_the_current_count_is_denied() -> None:
    # Above max_replicas (6), a scale_up clamped to 6 would cut capacity: 80 -> 6.
    v = verdict(action("scale_up", approved_by="alice"), Facts(replicas=80, target_replicas=81))
    assert rule(v) == ("deny", "replica_bounds")
    assert "80 replicas now" in v.reason and "2..6" in v.reason and "not up" in v.reason
    # Below min_replicas (2), a scale_down clamped to 2 would scale up.
    v = verdict(action("scale_down", approved_by="alice"), Facts(replicas=1, target_replicas=0))
    assert rule(v) == ("deny", "replica_bounds")
    assert "not down" in v.reason
    # Clamped, still the right way: runs.
    assert rule(verdict(action("scale_up"), Facts(replicas=5, target_replicas=7))) == (
        "execute",
        "autonomous",
    )


def test_a_scale_moves_its_own_way_by_at_most_the_step_whatever_the_count_asked() -> None:
    # An absolute count is a target: "1" on a scale_up of 20 replicas would cut 19,
    # "6" on a scale_up of 0 (after a scale to zero) would add six at once.
    cases = [
        ("scale_up", 20, 1, "not up by 1..5"),
        ("scale_up", 0, 6, "not up by 1..5"),
        ("scale_down", 3, 3, "not down by 1..5"),
        ("scale_down", 9, 2, "not down by 1..5"),
    ]
    for kind, now, asked, why in cases:
        act = action(kind, approved_by="alice")  # type: ignore[arg-type]
        v = verdict(act, Facts(replicas=now, target_replicas=asked), cfg(max_replicas=50))
        assert rule(v) == ("deny", "replica_bounds"), (kind, now, asked)
        assert f"{now} replicas now" in v.reason and why in v.reason
    v = verdict(action("scale_up"), Facts(replicas=0, target_replicas=5), cfg(max_replicas=50))
    assert rule(v) == ("execute", "autonomous")


def test_a_relative_scale_the_wrong_way_or_too_far_is_denied_as_params() -> None:
    for kind, raw in [
        ("scale_up", "-1"),
        ("scale_up", "+0"),
        ("scale_up", "+6"),
        ("scale_up", "0"),
        ("scale_down", "+1"),
        ("scale_down", "-0"),
        ("scale_down", "+0"),
        ("scale_down", "-6"),
    ]:
        v = verdict(action(kind, params={"replicas": raw}, approved_by="alice"))  # type: ignore[arg-type]
        assert rule(v) == ("deny", "params"), (kind, raw)
        assert "params.replicas" in v.reason
    assert rule(verdict(action("scale_up", params={"replicas": "+5"}))) == ("execute", "autonomous")


def test_bounded_replicas_clamps() -> None:
    rem = BASE.remediation
    assert [bounded_replicas(n, rem) for n in (0, 2, 4, 6, 60)] == [2, 2, 4, 6, 6]


# 6c
def test_restart_taking_down_too_many_pods_is_denied_even_when_approved() -> None:
    f = Facts(replicas=4, pods_disrupted=3)
    v = verdict(action("restart_workload", approved_by="alice"), f)
    assert rule(v) == ("deny", "max_restart_fraction")
    assert "3 of 4" in v.reason and "at most 2" in v.reason
    assert rule(verdict(action("rollback", approved_by="a"), f)) == ("deny", "max_restart_fraction")
    assert rule(verdict(action("restart_workload"), Facts(replicas=4, pods_disrupted=2))) == (
        "execute",
        "autonomous",
    )


def test_one_pod_may_always_be_restarted() -> None:
    assert restart_limit(1, BASE.remediation) == 1
    f = Facts(replicas=1, pods_disrupted=1)
    assert rule(verdict(action("restart_pod"), f)) == ("execute", "autonomous")


# 6d
def test_restart_below_a_disruption_budget_is_denied() -> None:
    f = Facts(replicas=10, pods_disrupted=2, pdb_headroom=1, pdbs=("shop/checkout",))
    v = verdict(action("restart_workload", approved_by="alice"), f)
    assert rule(v) == ("deny", "pod_disruption_budget")
    assert "shop/checkout allows 1" in v.reason


def test_restarting_an_unready_pod_never_breaks_a_budget() -> None:
    f = Facts(replicas=3, pods_disrupted=0, pdb_headroom=0, pdbs=("shop/checkout",))
    assert rule(verdict(action("restart_pod"), f)) == ("execute", "autonomous")


# 6e
def test_nodes_cordoned_at_once_are_bounded() -> None:
    f = Facts(cordoned_nodes=("n2",))
    for t in ("drain_node", "cordon_node"):
        v = verdict(node_action(t, approved_by="alice"), f)
        assert rule(v) == ("deny", "max_nodes_cordoned")
        assert "n2" in v.reason
    # the target itself being cordoned already does not count
    assert rule(verdict(node_action(), Facts(cordoned_nodes=("n1",)))) == ("execute", "autonomous")
    assert rule(verdict(node_action(), f, cfg(max_nodes_cordoned=2))) == ("execute", "autonomous")


# cooldown exemption
def test_an_undo_is_exempt_from_the_cooldown() -> None:
    history = (done("Deployment/shop/checkout", ago=10),)
    undo = action("scale_up", params={"undo_of": "act-0", "replicas": 3}, approved_by="alice")
    assert rule(verdict(undo, history=history)) == ("execute", "approved")
    assert rule(verdict(action(approved_by="alice"), history=history)) == ("deny", "cooldown")


def test_without_facts_the_limits_do_not_apply() -> None:
    assert rule(verdict(action("restart_workload"))) == ("execute", "autonomous")
    assert rule(verdict(node_action())) == ("execute", "autonomous")


# --- properties ----------------------------------------------------------------------------------

_facts = st.builds(
    Facts,
    replicas=st.none() | st.integers(min_value=0, max_value=20),
    target_replicas=st.none() | st.integers(min_value=0, max_value=30),
    pods_disrupted=st.integers(min_value=0, max_value=20),
    pdb_headroom=st.none() | st.integers(min_value=0, max_value=5),
    pdbs=st.just(("shop/pdb",)),
    cordoned_nodes=st.lists(st.sampled_from(["n1", "n2", "n3"]), unique=True).map(tuple),
)
_acts = st.builds(
    lambda t, conf, approved: (
        node_action(t, confidence=conf, approved_by=approved)
        if t in NODE_ACTIONS
        else action(t, confidence=conf, approved_by=approved)
    ),
    st.sampled_from(ACTION_TYPES),
    st.floats(min_value=0, max_value=1),
    st.none() | st.just("alice"),
)
_switches = st.builds(Switches, kill_switch=st.booleans(), dry_run=st.booleans())


@settings(max_examples=200, deadline=None)
@given(_acts, _facts, _switches)
def test_approval_never_lifts_a_limit(act: ActionRequest, f: Facts, sw: Switches) -> None:
    unapproved = decide(replace(act, approved_by=None), BASE, (), sw, NOW, f)
    approved = decide(replace(act, approved_by="alice"), BASE, (), sw, NOW, f)
    if unapproved.kind == "deny":
        assert approved == unapproved


@settings(max_examples=200, deadline=None)
@given(_acts, _facts, _switches)
def test_limits_hold_whenever_something_would_run(
    act: ActionRequest, f: Facts, sw: Switches
) -> None:
    v = decide(act, BASE, (), sw, NOW, f)
    if v.kind not in ("execute", "dry_run", "approve"):
        return
    rem = BASE.remediation
    if act.type in DISRUPTIVE_ACTIONS and f.replicas:
        assert f.pods_disrupted <= restart_limit(f.replicas, rem)
    if act.type in DISRUPTIVE_ACTIONS and f.pdb_headroom is not None:
        assert f.pods_disrupted <= f.pdb_headroom
    if act.type in NODE_ACTIONS:
        assert len([n for n in f.cordoned_nodes if n != act.target.name]) < rem.max_nodes_cordoned
    if act.type in ("scale_up", "scale_down") and None not in (f.replicas, f.target_replicas):
        moved = bounded_replicas(f.target_replicas or 0, rem) - (f.replicas or 0)
        asked = (f.target_replicas or 0) - (f.replicas or 0)
        if act.type == "scale_down":
            moved, asked = -moved, -asked
        assert moved > 0 and 1 <= asked <= MAX_SCALE_STEP


@settings(max_examples=200, deadline=None)
@given(_acts, _facts, _switches)
def test_kill_switch_and_dry_run_hold_whatever_the_facts(
    act: ActionRequest, f: Facts, sw: Switches
) -> None:
    assert decide(act, BASE, (), replace(sw, kill_switch=True), NOW, f).kind == "deny"
    assert decide(act, BASE, (), replace(sw, dry_run=True), NOW, f).kind != "execute"


# --- undo: exempt from each limit it cannot worsen -----------------------------------------------


def _undo(type_: str, **prior: Any) -> ActionRequest:
    params = {"undo_of": "a0", **prior}
    if type_ in NODE_ACTIONS:
        return node_action(type_, params=params, approved_by="alice")
    return action(type_, params=params, approved_by="alice")  # type: ignore[arg-type]


def test_an_undo_that_uncordons_is_not_held_back_by_the_nodes_cordoned_elsewhere() -> None:
    # An uncordon never adds a cordoned node: n2 and n3 cordoned is no reason to keep n1 so.
    f = Facts(cordoned_nodes=("n2", "n3"))
    for t in sorted(NODE_ACTIONS):
        assert rule(verdict(_undo(t, unschedulable=False), f)) == ("execute", "approved")
        assert rule(verdict(_undo(t), f)) == ("execute", "approved")  # no prior: uncordons
        # The undo of a cordon of a node that was cordoned before it restores a cordon: if
        # the node was uncordoned since, it cordons it again, so the limit holds.
        assert rule(verdict(_undo(t, unschedulable=True), f)) == ("deny", "max_nodes_cordoned")


def test_an_undo_of_a_scale_restores_its_count_whatever_the_step_or_bounds() -> None:
    # 20 replicas now, the recorded count 3: a step of 17, below min_replicas... restored.
    f = Facts(replicas=20, target_replicas=3)
    assert rule(verdict(_undo("scale_up", replicas=3), f)) == ("execute", "approved")
    assert rule(verdict(action("scale_down", approved_by="alice"), f)) == (
        "deny",
        "replica_bounds",
    )


# The limits an undo restoring a recorded prior state cannot worsen: its params are that
# state, it repairs the last act (cooldown), it restores the recorded count, it uncordons.
UNWORSENED = frozenset({"params", "cooldown", "replica_bounds", "max_nodes_cordoned"})
_restoring = st.one_of(
    st.builds(
        lambda t, prior: _undo(t, **prior),
        st.sampled_from(sorted(NODE_ACTIONS)),
        st.sampled_from([{}, {"unschedulable": False}]),
    ),
    st.builds(
        lambda t, n: _undo(t, replicas=n),
        st.sampled_from(["scale_up", "scale_down"]),
        st.integers(min_value=0, max_value=50),
    ),
)
_recent = st.lists(st.integers(min_value=0, max_value=299), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_restoring, _facts, _recent, st.booleans())
def test_an_undo_is_never_denied_by_a_limit_it_cannot_worsen(
    undo: ActionRequest, f: Facts, recent: list[int], approved: bool
) -> None:
    """Whatever the facts (other nodes cordoned, a count far from the recorded one) and
    however recently its target was acted on, an undo restoring a recorded prior state is
    denied by none of the limits it cannot make worse; only by the switches, the
    namespaces and the hourly budgets (it is an action within the hour)."""
    undo = undo if approved else replace(undo, approved_by=None)
    history = tuple(done(undo.target.key, undo.target.namespace, ago) for ago in recent)
    v = decide(undo, BASE, history, OFF, NOW, f)
    assert v.rule not in UNWORSENED, v


# --- an undo restoring no recorded prior state: no exemption, approved or not -------------------

UNKNOWN = "undo of action a0, which records no prior state known here"


def test_an_undo_of_a_rollback_to_revision_0_names_no_revision_and_is_denied() -> None:
    # 0 is "the previous revision" for a rollback, which an undo never restores: it
    # restores the one it recorded, so it must name it.
    v = decide(_undo("rollback", revision=0), BASE, (), OFF, NOW, Facts(), unknown_undo=UNKNOWN)
    assert rule(v) == ("deny", "params") and "names the revision it restores" in v.reason, v


def test_a_forged_undo_is_held_to_the_replica_bounds_however_approved() -> None:
    # A writer of the actions topic asks to "undo" to 500 replicas: a person approving it
    # does not lift max_replicas, and no undo of a recorded count is vouched for here.
    forged = _undo("scale_up", replicas=500)
    v = decide(forged, BASE, (), OFF, NOW, Facts(replicas=4), unknown_undo=UNKNOWN)
    assert rule(v) == ("deny", "params") and "2..6" in v.reason, v
    # In bounds but further than MAX_SCALE_STEP from the count now, in either direction.
    far = Facts(replicas=20)
    v = decide(_undo("scale_down", replicas=6), BASE, (), OFF, NOW, far, unknown_undo=UNKNOWN)
    assert rule(v) == ("deny", "replica_bounds") and "more than 5" in v.reason, v
    # The step's direction is relaxed (an undo of a scale_up scales down), not its size.
    back = decide(_undo("scale_up", replicas=3), BASE, (), OFF, NOW, Facts(replicas=5), None, False)
    assert rule(back) == ("execute", "approved")
    v = decide(_undo("scale_up", replicas=3), BASE, (), OFF, NOW, Facts(replicas=5), UNKNOWN)
    assert rule(v) == ("execute", "approved"), v
    # The cooldown holds too; an HPA's bounds are restored only from a recorded state.
    v = decide(
        _undo("scale_up", replicas=3),
        BASE,
        (done(action().target.key, ago=10),),
        OFF,
        NOW,
        Facts(replicas=5),
        UNKNOWN,
    )
    assert rule(v) == ("deny", "cooldown"), v
    hpa = _undo("scale_up", hpa="checkout", hpa_min_replicas=1, hpa_max_replicas=900)
    assert rule(decide(hpa, BASE, (), OFF, NOW, None, UNKNOWN)) == ("deny", "params")


_unknown_undos = st.builds(
    lambda t, params: _undo(t, **params),
    st.sampled_from(sorted(ACTION_TYPES)),
    st.fixed_dictionaries(
        {},
        optional={
            "replicas": st.integers(-3, 600) | st.sampled_from(["+3", "-1", "7", "x", True]),
            "revision": st.integers(-1, 5) | st.just("r"),
            "unschedulable": st.booleans() | st.just("false"),
            "hpa": st.just("checkout"),
            "hpa_max_replicas": st.integers(0, 900),
            "key": st.just("mode"),
            "value": st.just("x"),
        },
    ),
)


@settings(max_examples=400, deadline=None)
@given(_unknown_undos, _facts, _recent, st.booleans(), st.booleans())
def test_an_undo_restoring_no_recorded_state_never_executes_outside_the_hard_bounds(
    undo: ActionRequest, f: Facts, recent: list[int], approved: bool, shadow: bool
) -> None:
    """Whatever its params, the facts and the target's recent history, an undo restoring no
    recorded prior state, approved by a person or not, executes (or would, in dry run)
    only within the params' bounds, the cooldown, the replica bounds and MAX_SCALE_STEP of
    the count now, and max_nodes_cordoned when it cordons."""
    undo = undo if approved else replace(undo, approved_by=None)
    history = tuple(done(undo.target.key, undo.target.namespace, ago) for ago in recent)
    v = decide(undo, BASE, history, Switches(dry_run=shadow), NOW, f, UNKNOWN)
    if v.kind not in ("execute", "dry_run"):
        return
    rem = BASE.remediation
    p = undo.params
    assert approved, v  # unapproved, a person decides (rule 7a)
    assert not recent, v  # every entry is within the 5m cooldown
    assert set(p) - {"undo_of"} <= {"replicas", "revision", "unschedulable", "key", "value"}
    if undo.type in {"scale_up", "scale_down"}:
        assert not isinstance(p["replicas"], bool) and str(p["replicas"]).isdigit(), v
        n = int(str(p["replicas"]))
        assert rem.min_replicas <= n <= rem.max_replicas, v
        if f.replicas is not None:
            assert abs(n - f.replicas) <= MAX_SCALE_STEP, v
    elif undo.type == "rollback":
        assert isinstance(p["revision"], int) and p["revision"] >= 1, v
    elif undo.type in NODE_ACTIONS:
        assert isinstance(p.get("unschedulable", False), bool), v
        if p.get("unschedulable"):
            others = set(f.cordoned_nodes) - {undo.target.name}
            assert len(others) < rem.max_nodes_cordoned, v
    else:
        assert undo.type == "update_config", v
