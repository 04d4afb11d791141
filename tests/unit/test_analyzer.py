"""The rule-based analyzer: evidence in the context decides the recommended action."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from agent.analysis_stage import action_requests, no_remedy_escalation
from agent.analyzer import Context, Rollout, analyze, workload_target
from agent.codec import decode, encode, from_obj
from agent.models import ActionRequest, Incident, Member, Target, fingerprint, stable_id
from agent.settings import DEFAULT_CONFIG, RunbookSpec, Settings, load_settings
from tests.unit.factories import SHOP, T0, at

SETTINGS = load_settings(DEFAULT_CONFIG, env={})  # rollout_window 30m, threshold 0.85
THRESHOLD = SETTINGS.remediation.confidence_threshold
OPENED = at(3600)
CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")


def member(name: str = "high-error-rate", status: str = "firing", **labels: str) -> Member:
    lab = {**SHOP, **labels}
    return Member(
        fingerprint=fingerprint("prometheus", name, lab),
        name=name,
        source="prometheus",
        severity="critical",
        status=status,
        labels=lab,
        first_seen=OPENED,
        last_seen=OPENED,
        value=0.2,
    )


def incident(*members: Member, revision: int = 1) -> Incident:
    return Incident(
        id="inc-1",
        key="c1/shop/checkout",
        status="open",
        severity="critical",
        labels=dict(SHOP),
        members=members or (member(),),
        opened_at=OPENED,
        updated_at=OPENED,
        revision=revision,
    )


def rollout(minutes_before: float, *, workload: str = "checkout", ns: str = "shop") -> Rollout:
    return Rollout(
        namespace=ns,
        workload=workload,
        revision=7,
        image="shop/checkout:v7",
        at=OPENED - timedelta(minutes=minutes_before),
        previous_image="shop/checkout:v6",
    )


@pytest.mark.parametrize("minutes", [0.5, 5, 15])
def test_recent_rollout_is_rolled_back(minutes: float) -> None:
    an = analyze(incident(), Context(rollouts=(rollout(minutes),)), SETTINGS, at(3700))
    assert an.root_cause_class == "bad_rollout"
    assert an.confidence >= THRESHOLD
    assert an.confidence == 0.92
    (act,) = an.actions
    assert act.type == "rollback"
    assert act.target == CHECKOUT
    assert "v6" in act.expected_impact
    assert "revision 7" in act.rollback_plan
    assert "revision 7" in an.root_cause
    assert an.analyzer == "rules"
    assert an.incident_id == "inc-1"
    assert an.incident_key == "c1/shop/checkout"
    assert an.created_at == at(3700)


def test_a_workload_created_just_now_is_not_rolled_back_to_nothing() -> None:
    created = replace(rollout(1), revision=1, previous_image=None)
    an = analyze(incident(), Context(rollouts=(created,)), SETTINGS, OPENED)
    assert an.root_cause_class != "bad_rollout"
    assert "rollback" not in [a.type for a in an.actions]


def test_older_rollout_within_the_window_is_a_weaker_suspect() -> None:
    an = analyze(incident(), Context(rollouts=(rollout(20),)), SETTINGS, OPENED)
    assert an.root_cause_class == "bad_rollout"
    assert an.confidence == 0.8
    assert [a.type for a in an.actions] == ["rollback"]


def test_the_latest_qualifying_rollout_is_the_suspect() -> None:
    older = replace(rollout(10), revision=5)
    an = analyze(incident(), Context(rollouts=(older, rollout(2))), SETTINGS, OPENED)
    assert "revision 7" in an.root_cause


def test_of_rollouts_dated_alike_the_higher_revision_is_the_suspect() -> None:
    """A re-activated revision superseded since is dated no later than the next one
    (handlers.kube.revision_times): the next one is the later rollout."""
    superseded = replace(rollout(2), revision=6, image="shop/checkout:v5")
    an = analyze(incident(), Context(rollouts=(superseded, rollout(2))), SETTINGS, OPENED)
    assert "revision 7" in an.root_cause


def test_rollout_just_after_the_incident_opened_still_counts() -> None:
    an = analyze(incident(), Context(rollouts=(rollout(-0.5),)), SETTINGS, OPENED)
    assert an.root_cause_class == "bad_rollout"


@pytest.mark.parametrize(
    "r",
    [
        rollout(31),  # before the 30 minute window
        rollout(-2),  # well after the incident opened
        rollout(5, workload="cart"),  # another workload
        rollout(5, ns="staging"),  # same name, another namespace
    ],
    ids=["too-old", "after", "other-workload", "other-namespace"],
)
def test_unrelated_rollout_recommends_nothing(r: Rollout) -> None:
    an = analyze(incident(), Context(rollouts=(r,), notes=("logs unavailable",)), SETTINGS, OPENED)
    assert an.actions == ()
    assert an.root_cause_class == "unknown"
    assert an.confidence < THRESHOLD
    assert "high-error-rate" in an.root_cause
    assert "logs unavailable" in an.evidence


def test_rollout_window_comes_from_settings() -> None:
    narrow = replace(SETTINGS, remediation=replace(SETTINGS.remediation, rollout_window=120.0))
    an = analyze(incident(), Context(rollouts=(rollout(5),)), narrow, OPENED)
    assert an.root_cause_class == "unknown"


def test_cpu_saturation_scales_up() -> None:
    inc = incident(member("high-latency"))
    an = analyze(inc, Context(cpu_saturation={"checkout": 0.93}), SETTINGS, OPENED)
    assert an.root_cause_class == "saturation"
    assert an.confidence >= THRESHOLD
    (act,) = an.actions
    assert (act.type, act.target, dict(act.params)) == ("scale_up", CHECKOUT, {"replicas": "+1"})
    assert "93%" in an.root_cause


@pytest.mark.parametrize("saturation", [{"checkout": 0.79}, {"cart": 0.99}, {}])
def test_without_cpu_saturation_of_the_workload_nothing_scales(
    saturation: dict[str, float],
) -> None:
    an = analyze(
        incident(member("high-latency")), Context(cpu_saturation=saturation), SETTINGS, OPENED
    )
    assert an.actions == ()
    assert an.root_cause_class == "unknown"


def test_unconfigured_pattern_and_resolved_members_give_no_action() -> None:
    inc = incident(member("not-a-pattern"), member("high-latency", status="resolved"))
    an = analyze(inc, Context(cpu_saturation={"checkout": 0.99}), SETTINGS, OPENED)
    assert an.actions == ()
    assert an.root_cause.startswith("not-a-pattern firing")


def test_best_finding_leads_and_all_actions_are_kept() -> None:
    inc = incident(member("high-latency"), member("high-error-rate"))
    ctx = Context(rollouts=(rollout(5),), cpu_saturation={"checkout": 0.95})
    an = analyze(inc, ctx, SETTINGS, OPENED)
    assert an.root_cause_class == "bad_rollout"
    assert an.confidence == 0.92
    assert [a.type for a in an.actions] == ["rollback", "scale_up"]


def test_deployment_label_names_the_target() -> None:
    inc = incident(member(deployment="checkout-v2"))
    r = rollout(5, workload="checkout-v2")
    an = analyze(inc, Context(rollouts=(r,)), SETTINGS, OPENED)
    assert an.actions[0].target == Target(kind="Deployment", namespace="shop", name="checkout-v2")


def test_workload_target_defaults() -> None:
    assert workload_target({"service": "a"}) == Target("Deployment", "a", "default")
    assert workload_target({"workload": "w", "service": "a", "namespace": "n"}).name == "w"


def test_analysis_id_is_deterministic_per_incident_revision() -> None:
    ctx = Context(rollouts=(rollout(5),))
    first = analyze(incident(), ctx, SETTINGS, OPENED)
    again = analyze(incident(), ctx, SETTINGS, OPENED + timedelta(hours=1))
    assert first.id == again.id == stable_id("analysis", "inc-1", "1", "rules")
    assert analyze(incident(revision=2), ctx, SETTINGS, OPENED).id != first.id
    assert first == replace(again, created_at=first.created_at)


def test_analysis_does_not_depend_on_now() -> None:
    a = analyze(incident(), Context(), SETTINGS, T0)
    b = analyze(incident(), Context(), SETTINGS, T0 + timedelta(days=3))
    assert replace(a, created_at=b.created_at) == b


def alert(name: str, source: str = "alertmanager") -> Member:
    """A signal the agent does not evaluate itself, e.g. an Alertmanager alert."""
    return replace(member(name), source=source, fingerprint=fingerprint(source, name, SHOP))


def with_runbook(**book: object) -> Settings:
    steps = ["check_recent_deployments", "auto_rollback_if_deployment_recent"]
    doc = {"name": "orders", "alert": "CheckoutErrors", "actions": steps, **book}
    return replace(SETTINGS, runbooks=(from_obj(RunbookSpec, doc),))


def test_an_alert_is_healed_by_its_runbook() -> None:
    ctx = Context(rollouts=(rollout(2),))
    inc = incident(alert("CheckoutErrors"))
    # No pattern or runbook for it: a diagnosis at most, never an action.
    assert analyze(inc, ctx, SETTINGS, OPENED).actions == ()
    an = analyze(inc, ctx, with_runbook(), OPENED)
    assert an.root_cause_class == "bad_rollout"
    assert [(a.type, a.target) for a in an.actions] == [("rollback", CHECKOUT)]


def test_a_runbook_for_one_source_ignores_the_same_name_from_another() -> None:
    ctx = Context(rollouts=(rollout(2),))
    settings = with_runbook(source="kubernetes")
    assert analyze(incident(alert("CheckoutErrors")), ctx, settings, OPENED).actions == ()
    inc = incident(alert("CheckoutErrors", source="kubernetes"))
    assert [a.type for a in analyze(inc, ctx, settings, OPENED).actions] == ["rollback"]


def test_a_pattern_answers_for_its_name_unless_a_runbook_takes_that_source_over() -> None:
    ctx = Context(rollouts=(rollout(2),))
    # A runbook for any source gives way to the pattern of its name: a rollback.
    settings = with_runbook(alert="high-error-rate", actions=["scale_up"])
    for source in ("prometheus", "alertmanager"):
        an = analyze(incident(alert("high-error-rate", source=source)), ctx, settings, OPENED)
        assert [a.type for a in an.actions] == ["rollback"], source
    # One written for Alertmanager takes its alert over; the pattern keeps its own anomaly.
    settings = with_runbook(alert="high-error-rate", source="alertmanager", actions=["scale_up"])
    an = analyze(incident(alert("high-error-rate")), ctx, settings, OPENED)
    assert [a.type for a in an.actions] == ["scale_up"]
    an = analyze(incident(member("high-error-rate")), ctx, settings, OPENED)
    assert [a.type for a in an.actions] == ["rollback"]


def test_a_kubernetes_runbook_is_not_hidden_by_the_library_pattern_of_its_name() -> None:
    # The watcher emits crash-looping; the shipped library has a Prometheus crash-looping.
    assert SETTINGS.pattern("crash-looping") is not None
    steps = ["restart_if_crash_looping"]
    settings = with_runbook(alert="crash-looping", source="kubernetes", actions=steps)
    assert settings.steps_for("crash-looping", "kubernetes") == ("runbook orders", tuple(steps))
    inc = incident(alert("crash-looping", source="kubernetes"))
    an = analyze(inc, Context(crash_looping=("checkout",)), settings, OPENED)
    assert [(a.type, a.target) for a in an.actions] == [("restart_workload", CHECKOUT)]
    pattern = SETTINGS.pattern("crash-looping")
    assert pattern is not None
    assert settings.steps_for("crash-looping", "prometheus") == (
        "pattern crash-looping",
        pattern.actions,
    )


def _labelled(name: str, **labels: str) -> Member:
    m = alert(name)
    return replace(m, labels={"cluster": "c1", **labels})


@pytest.mark.parametrize(
    ("step", "labels", "target"),
    [
        ("cordon_node", {"node": "worker-3"}, Target(kind="Node", name="worker-3")),
        ("drain_node", {"node": "worker-3"}, Target(kind="Node", name="worker-3")),
        (
            "restart_pod",
            {"namespace": "shop", "pod": "checkout-7d9f-abcde"},
            Target(kind="Pod", namespace="shop", name="checkout-7d9f-abcde"),
        ),
        ("restart_workload", dict(SHOP), CHECKOUT),
    ],
)
def test_a_runbooks_plain_step_acts_on_the_target_its_labels_name(
    step: str, labels: dict[str, str], target: Target
) -> None:
    settings = with_runbook(actions=["check_node_conditions", step])
    inc = incident(_labelled("CheckoutErrors", **labels))
    an = analyze(inc, Context(), settings, OPENED)
    assert [(a.type, a.target) for a in an.actions] == [(step, target)]
    # ... and the request is valid on the wire, not dead-lettered by the executor.
    for req in action_requests(an, inc):
        assert decode(ActionRequest, encode(req)) == req


@pytest.mark.parametrize(
    ("step", "labels", "needs"),
    [
        ("cordon_node", {"namespace": "shop", "service": "checkout"}, "a node"),
        ("restart_pod", {"node": "worker-3", "namespace": "shop"}, "a pod"),
        ("rollback", {"node": "worker-3"}, "a workload"),
        ("update_config", dict(SHOP), "a ConfigMap"),
    ],
)
def test_a_plain_step_whose_target_the_labels_do_not_name_is_a_finding_that_pages(
    step: str, labels: dict[str, str], needs: str
) -> None:
    settings = with_runbook(actions=[step])
    inc = incident(_labelled("CheckoutErrors", **labels))
    an = analyze(inc, Context(), settings, OPENED)
    assert an.actions == ()
    assert f"runbook orders prescribes {step}, but CheckoutErrors names no target" in (
        an.root_cause
    )
    assert any(needs in line for line in an.evidence)
    page = no_remedy_escalation(inc, an, ("critical",))
    assert page is not None and step in page.summary


def test_an_untargeted_step_does_not_hide_the_diagnosis_or_the_next_step() -> None:
    settings = with_runbook(actions=["cordon_node", "auto_rollback_if_deployment_recent"])
    an = analyze(
        incident(alert("CheckoutErrors")), Context(rollouts=(rollout(2),)), settings, OPENED
    )
    assert [(a.type, a.target) for a in an.actions] == [("rollback", CHECKOUT)]
    assert any("cordon_node" in line and "a node" in line for line in an.evidence)


def test_a_runbook_escalates_past_a_remedy_verified_ineffective() -> None:
    steps = ["restart_if_crash_looping", "auto_rollback_if_deployment_recent", "notify_oncall"]
    settings = with_runbook(actions=steps)
    ctx = Context(rollouts=(rollout(2),), crash_looping=("checkout",))
    inc = incident(alert("CheckoutErrors"))
    first = analyze(inc, ctx, settings, OPENED)
    assert [a.type for a in first.actions] == ["restart_workload"]
    # The restart was verified not healed: the next step, saying why.
    tried = replace(ctx, ineffective=(("restart_workload", CHECKOUT.key),))
    second = analyze(inc, tried, settings, OPENED)
    assert [(a.type, a.target) for a in second.actions] == [("rollback", CHECKOUT)]
    assert f"already tried without effect: restart_workload {CHECKOUT.key}" in second.evidence
    # Both tried: nothing left to do alone; the evidence says what was tried.
    both = replace(tried, ineffective=(*tried.ineffective, ("rollback", CHECKOUT.key)))
    third = analyze(inc, both, settings, OPENED)
    assert third.actions == ()
    assert "every remedy runbook orders prescribes was tried without effect" in third.root_cause
    # A remedy tried on another target does not count for this one.
    elsewhere = replace(ctx, ineffective=(("restart_workload", "Deployment/shop/cart"),))
    assert [a.type for a in analyze(inc, elsewhere, settings, OPENED).actions] == [
        "restart_workload"
    ]
