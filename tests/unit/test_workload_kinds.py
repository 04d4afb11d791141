"""A workload target is of the kind of the pods' real owner, never a same-named Deployment."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.ai_answer import ProposedAction, ProposedTarget, incident_scope, vet_actions
from agent.analyzer import ConfigChange, Context, Rollout, analyze, workload_target
from agent.codec import from_obj
from agent.context import ContextGatherer
from agent.errors import ActionFailed, TransientError
from agent.kube_signals import pod_labels
from agent.models import Member, Target, fingerprint
from agent.policy import Switches, decide, kind_problem
from agent.settings import DEFAULT_CONFIG, RunbookSpec, Settings, load_settings
from handlers.cluster import ACTION_IDS_ANNOTATION, PRIOR_STATE_ANNOTATION, rolled_back_from
from handlers.fake_cluster import FakeCluster
from handlers.kube import (
    controller_history,
    desired_pods,
    ready_pods,
    revision_rollback,
    rollout_disruption,
)
from tests.fakes.incidents import OPENED, ai_settings, incident
from tests.unit.factories import action, settings

SETTINGS = load_settings(DEFAULT_CONFIG, env={})
DB = Target(kind="StatefulSet", namespace="shop", name="db")
AGENT = Target(kind="DaemonSet", namespace="shop", name="agent")


def sts_pod(*owners: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "db-0",
            "namespace": "shop",
            "labels": {"app": "db"},
            "ownerReferences": list(owners),
        },
        "spec": {"nodeName": "n1"},
    }


def test_a_pods_labels_name_its_controller_not_the_first_owner_reference() -> None:
    # A garbage-collection parent listed first is not what manages the pod.
    labels = pod_labels(
        sts_pod(
            {"kind": "ConfigMap", "name": "db-seed"},
            {"kind": "StatefulSet", "name": "db", "controller": True},
        ),
        "c1",
    )
    assert (labels["owner"], labels["workload"]) == ("StatefulSet/db", "db")
    assert workload_target(labels) == DB


@pytest.mark.parametrize(
    ("labels", "target"),
    [
        ({"owner": "StatefulSet/db", "workload": "db", "service": "db"}, DB),
        (
            {"owner": "DaemonSet/agent", "workload": "agent", "service": "agent"},
            Target(kind="DaemonSet", namespace="shop", name="agent"),
        ),
        (
            {"owner": "Deployment/api", "workload": "api", "service": "web"},
            Target(kind="Deployment", namespace="shop", name="api"),
        ),
        # kube-state-metrics series, before or without agent.labels.normalise
        ({"statefulset": "db", "service": "db"}, DB),
        (
            {"daemonset": "agent"},
            Target(kind="DaemonSet", namespace="shop", name="agent"),
        ),
        # Nothing shows the owner: a service's workload is taken to be its Deployment.
        ({"service": "web"}, Target(kind="Deployment", namespace="shop", name="web")),
        # An owner the agent does not act on: no workload, not Deployment "migrate".
        ({"owner": "Job/migrate", "workload": "migrate", "service": "migrate"}, None),
        ({"owner": "ReplicaSet/bare", "workload": "bare", "service": "bare"}, None),
    ],
)
def test_the_workload_target_is_of_the_kind_its_owner_shows(
    labels: dict[str, str], target: Target | None
) -> None:
    got = workload_target({"namespace": "shop", **labels})
    if target is None:
        assert got.name == ""
    else:
        assert got == target


def kube_member(name: str, labels: dict[str, str]) -> Member:
    lab = {"cluster": "c1", "namespace": "shop", **labels}
    return Member(
        fingerprint=fingerprint("kubernetes", name, lab),
        name=name,
        source="kubernetes",
        severity="critical",
        status="firing",
        labels=lab,
        first_seen=OPENED,
        last_seen=OPENED,
    )


DB_POD = {"pod": "db-0", "owner": "StatefulSet/db", "workload": "db", "service": "db"}


def with_steps(*steps: str) -> Settings:
    doc = {"name": "db", "alert": "DbDown", "source": "kubernetes", "actions": list(steps)}
    return replace(SETTINGS, runbooks=(from_obj(RunbookSpec, doc),))


def test_the_rules_restart_the_statefulset_a_crash_looping_pod_belongs_to() -> None:
    inc = incident(kube_member("DbDown", DB_POD))
    an = analyze(inc, Context(crash_looping=("db",)), with_steps("restart_workload"), OPENED)
    assert [(a.type, a.target) for a in an.actions] == [("restart_workload", DB)]


def test_the_rules_roll_back_the_statefulset_its_rollout_names() -> None:
    rollout = Rollout(
        namespace="shop",
        workload="db",
        revision=2,
        image="db:v2",
        at=OPENED,
        previous_image="db:v1",
    )
    settings = with_steps("auto_rollback_if_deployment_recent")
    an = analyze(
        incident(kube_member("DbDown", DB_POD)), Context(rollouts=(rollout,)), settings, OPENED
    )
    assert [(a.type, a.target) for a in an.actions] == [("rollback", DB)]


def test_the_rules_never_scale_a_daemonset_and_go_on_to_the_next_step() -> None:
    ds_pod = {"pod": "agent-x2x4z", "owner": "DaemonSet/agent", "workload": "agent"}
    ctx = Context(cpu_saturation={"agent": 0.99}, crash_looping=("agent",))
    settings = with_steps("scale_up_if_cpu_high", "restart_if_crash_looping")
    an = analyze(incident(kube_member("DbDown", ds_pod)), ctx, settings, OPENED)
    assert [(a.type, a.target) for a in an.actions] == [("restart_workload", AGENT)]
    assert any("no replica count to scale" in line for line in an.evidence)


def test_a_job_pods_runbook_acts_on_no_deployment_of_the_jobs_name() -> None:
    job = {"pod": "migrate-x2x4z", "owner": "Job/migrate", "workload": "migrate"}
    an = analyze(
        incident(kube_member("DbDown", job)),
        Context(crash_looping=("migrate",)),
        with_steps("restart_workload"),
        OPENED,
    )
    assert an.actions == ()
    assert any("owner Job/migrate is none the agent acts on" in e for e in an.evidence)


def proposed(type: str, kind: str, name: str) -> ProposedAction:
    return ProposedAction(
        type=type,
        target=ProposedTarget(kind=kind, name=name, namespace="shop"),
        expected_impact="x",
        rollback_plan="undo",
    )


def test_the_llm_may_name_only_the_kind_the_evidence_shows() -> None:
    ds_pod = {"pod": "agent-x2x4z", "owner": "DaemonSet/agent", "workload": "agent"}
    # The incident's own labels name service db alone: a guess the pod's owner overrides.
    inc = incident(
        kube_member("DbDown", DB_POD),
        kube_member("AgentDown", ds_pod),
        labels={"cluster": "c1", "namespace": "shop", "service": "db"},
    )
    scope = incident_scope(inc, Context(), ai_settings())
    accepted, rejected = vet_actions(
        [
            proposed("restart_workload", "Deployment", "db"),
            proposed("restart_workload", "StatefulSet", "db"),
            proposed("scale_up", "StatefulSet", "db"),
            proposed("restart_workload", "DaemonSet", "agent"),
            proposed("scale_up", "DaemonSet", "agent"),
            proposed("rollback", "StatefulSet", "db"),
            proposed("rollback", "DaemonSet", "db"),
            proposed("restart_workload", "StatefulSet", "agent"),
        ],
        scope,
    )
    assert [(a.type, a.target.key) for a in accepted] == [
        ("restart_workload", "StatefulSet/shop/db"),
        ("scale_up", "StatefulSet/shop/db"),
        ("restart_workload", "DaemonSet/shop/agent"),
        ("rollback", "StatefulSet/shop/db"),
    ]
    assert [(r.action, r.reason) for r in rejected] == [
        ("restart_workload Deployment/shop/db", "out_of_scope"),
        ("scale_up DaemonSet/shop/agent", "wrong_kind"),
        ("rollback DaemonSet/shop/db", "out_of_scope"),
        ("restart_workload StatefulSet/shop/agent", "out_of_scope"),
    ]


@pytest.mark.parametrize(
    ("type", "kind", "allowed"),
    [
        ("scale_up", "StatefulSet", True),
        ("scale_down", "StatefulSet", True),
        ("restart_workload", "StatefulSet", True),
        ("restart_workload", "DaemonSet", True),
        ("scale_up", "DaemonSet", False),
        ("scale_down", "DaemonSet", False),
        ("rollback", "StatefulSet", True),
        ("rollback", "DaemonSet", True),
        ("restart_workload", "Pod", False),
        ("cordon_node", "Deployment", False),
    ],
)
def test_the_policy_denies_an_action_on_a_kind_it_does_not_apply_to(
    type: str, kind: str, allowed: bool
) -> None:
    s = settings({"agent": {"mode": "autonomous"}, "remediation": {"enabled": True}})
    v = decide(action(type, kind=kind), s, (), Switches(), OPENED)  # type: ignore[arg-type]
    assert (v.rule == "target_kind") is not allowed, v
    if not allowed:
        assert v.kind == "deny" and v.reason == f"{kind}/shop/checkout: " + str(
            kind_problem(type, kind)
        )


def test_a_denial_by_kind_says_why() -> None:
    assert "no replica count to scale" in str(kind_problem("scale_up", "DaemonSet"))
    assert "acts on a Node only" in str(kind_problem("drain_node", "DaemonSet"))


# --- the in-process cluster acts on the kind named, as the real adapter does ---------------


def cluster() -> FakeCluster:
    """StatefulSet shop/db beside an unrelated Deployment of the same name; DaemonSet agent."""
    c = FakeCluster()
    for kind, name in (("StatefulSet", "db"), ("Deployment", "db"), ("DaemonSet", "agent")):
        c.create_workload(kind, "shop", name, image="v1", replicas=2, at=OPENED)  # type: ignore[arg-type]
    return c


SAME_NAME = Target(kind="Deployment", namespace="shop", name="db")


async def test_a_statefulset_is_scaled_and_restarted_never_its_namesake_deployment() -> None:
    c = cluster()
    untouched = await c.workload(SAME_NAME)
    up = await c.scale(DB, action_id="a1", replicas=3, direction="up")
    restarted = await c.restart(DB, action_id="a2", at=OPENED)
    assert up.applied and restarted.applied
    w = await c.workload(DB)
    assert (w.replicas, w.restarted_at, w.applied_action_ids) == (3, OPENED, ("a1", "a2"))
    assert await c.workload(SAME_NAME) == untouched


async def test_a_daemonset_restarts_and_rolls_back_but_is_not_scaled() -> None:
    c = cluster()
    assert (await c.restart(AGENT, action_id="a1", at=OPENED)).applied
    before = await c.workload(AGENT)
    with pytest.raises(ActionFailed, match="no replica count to scale"):
        await c.scale(AGENT, action_id="a2", replicas=3, direction="up")
    assert await c.workload(AGENT) == before
    c.rollout("shop", "agent", image="v2", at=OPENED, kind="DaemonSet")
    back = await c.rollback(AGENT, action_id="a3")
    assert back.applied and back.prior_state == {"revision": 2, "image": "v2"}
    assert (await c.workload(AGENT)).image == "v1"


async def test_the_fake_reads_config_changes_through_a_workload_of_the_kind_named() -> None:
    """As the adapter: a change Deployment db uses is none of StatefulSet db's business
    where no StatefulSet db exists to reference it."""
    c = FakeCluster()
    c.create_workload("Deployment", "shop", "db", image="v1", replicas=1, at=OPENED)
    c.add_config_change(ConfigChange("shop", "db-config", OPENED, used_by=("db",)))
    inc = incident(kube_member("DbDown", DB_POD))
    ctx = await ContextGatherer(SETTINGS, cluster=c, source=c).gather(inc)
    assert ctx.config_changes == ()
    c.create_workload("StatefulSet", "shop", "db", image="v1", replicas=1, at=OPENED)
    ctx = await ContextGatherer(SETTINGS, cluster=c, source=c).gather(inc)
    assert [x.name for x in ctx.config_changes] == ["db-config"]


STS = {"metadata": {"uid": "u1", "resourceVersion": "7", "annotations": {"a": "b"}}}


def revision(number: int, image: str) -> dict[str, Any]:
    """A ControllerRevision as the StatefulSet controller writes it."""
    template = {"spec": {"containers": [{"name": "db", "image": image}]}, "$patch": "replace"}
    return {"revision": number, "data": {"spec": {"template": template}}}


def running(image: str) -> dict[str, Any]:
    return {**STS, "spec": {"template": {"spec": {"containers": [{"name": "db", "image": image}]}}}}


def test_a_statefulset_rolls_back_to_its_previous_controller_revision() -> None:
    history = [revision(1, "db:v1"), revision(3, "db:v3"), revision(2, "db:v2")]
    write = revision_rollback(DB, running("db:v3"), history, "act-1", None)
    assert write.effect.prior_state == {"revision": 3, "image": "db:v3"}
    assert "from revision 3 (db:v3) to the template of revision 2 (db:v2)" in write.effect.message
    assert write.body == [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": "7"},
        {
            "op": "replace",
            "path": "/spec/template",
            "value": {"spec": {"containers": [{"name": "db", "image": "db:v2"}]}},
        },
        {
            "op": "add",
            "path": "/metadata/annotations",
            "value": {
                "a": "b",
                ACTION_IDS_ANNOTATION: "act-1",
                # What a redelivery reports, should this delivery die before its result.
                PRIOR_STATE_ANNOTATION: '{"act-1":{"revision":3,"image":"db:v3"}}',
            },
        },
    ]
    # Undo names the revision it left; the one it runs counts as current, not the newest.
    undo = revision_rollback(DB, running("db:v2"), history, "act-2", 3)
    assert undo.effect.prior_state == {"revision": 2, "image": "db:v2"}
    with pytest.raises(ActionFailed, match="revision 9 not found among previous revisions"):
        revision_rollback(DB, running("db:v3"), history, "act-3", 9)
    with pytest.raises(ActionFailed, match="no previous revision"):
        revision_rollback(DB, running("db:v1"), history[:1], "act-4", None)
    with pytest.raises(ActionFailed, match="no rollout history"):
        revision_rollback(DB, running("db:v1"), [], "act-5", None)


@pytest.mark.parametrize("to_revision", [None, 2, 1])
def test_a_rollback_waits_for_the_controller_to_record_the_running_template(
    to_revision: int | None,
) -> None:
    """Revisions 1 (v1) and 2 (v2) recorded, v3 already running: v3 has no number yet, so
    no rollback is decided on a guess (calling v3 revision 2 skipped v2 and noted an undo
    back to v2); a transient error retries it once the controller has recorded v3."""
    history = [revision(1, "db:v1"), revision(2, "db:v2")]
    with pytest.raises(TransientError, match="has not recorded the running template"):
        revision_rollback(DB, running("db:v3"), history, "act-1", to_revision)
    recorded = [*history, revision(3, "db:v3")]
    write = revision_rollback(DB, running("db:v3"), recorded, "act-1", to_revision)
    assert write.effect.prior_state == {"revision": 3, "image": "db:v3"}
    assert f"(db:v{to_revision or 2})" in write.effect.message


async def test_the_fake_refuses_a_rollback_before_the_controller_records_the_change() -> None:
    c = cluster()
    c.rollout("shop", "db", image="v2", at=OPENED, kind="StatefulSet")
    c.rollout("shop", "db", image="v3", at=OPENED, kind="StatefulSet", recorded=False)
    before = await c.workload(DB)
    # As the adapter's read of the same history (controller_history): v3 is the next number.
    assert before.revision == 3 and before.current().image == "v3"
    with pytest.raises(TransientError, match="has not recorded the running template"):
        await c.rollback(DB, action_id="a1")
    with pytest.raises(TransientError, match="has not recorded the running template"):
        await c.rollback(DB, action_id="a1", to_revision=2)
    assert await c.workload(DB) == before
    c.record_revision(DB, at=OPENED)
    back = await c.rollback(DB, action_id="a1")
    assert back.prior_state == {"revision": 3, "image": "v3"}
    assert (await c.workload(DB)).image == "v2"


def dated(rev: dict[str, Any], minute: int) -> dict[str, Any]:
    return {**rev, "metadata": {"creationTimestamp": f"2024-05-01T11:{minute:02d}:00Z"}}


def test_a_statefulsets_rollout_history_is_its_controller_revisions() -> None:
    history = [dated(revision(3, "db:v1"), 50), dated(revision(2, "db:v2"), 40)]
    history += [{"revision": 0, "data": {}}, {"revision": 4, "data": {"spec": {}}}]  # no template
    current, revisions = controller_history(running("db:v1"), history)
    # Ordered by number, each with its image and the time it was recorded.
    assert current == 3
    assert [(r.number, r.image, r.at.minute) for r in revisions] == [
        (2, "db:v2", 40),
        (3, "db:v1", 50),
    ]
    # A template the controller has not recorded yet is the next revision, never recent.
    created = {**running("db:v9"), "metadata": {"creationTimestamp": "2024-05-01T09:00:00Z"}}
    current, revisions = controller_history(created, history)
    assert (current, revisions[-1].image, revisions[-1].at.hour) == (4, "db:v9", 9)


def test_a_renumbered_controller_revision_is_dated_when_its_number_was_set() -> None:
    """v1 (11:00), v2 (11:10), back to v1 at 11:20: the controller renumbers v1's
    ControllerRevision 3 with an Update (its managedFields time), keeping its creation."""

    def numbered(rev: dict[str, Any], minute: int) -> dict[str, Any]:
        entry = {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "time": f"2024-05-01T11:{minute:02d}:00Z",
            "fieldsV1": {"f:revision": {}, "f:metadata": {"f:ownerReferences": {}}},
        }
        return {**rev, "metadata": {**rev["metadata"], "managedFields": [entry]}}

    v1 = numbered(dated(revision(3, "db:v1"), 0), 20)
    v2 = numbered(dated(revision(2, "db:v2"), 10), 10)
    current, revisions = controller_history(running("db:v1"), [v1, v2])
    assert current == 3
    assert [(r.number, r.image, r.at.minute) for r in revisions] == [
        (2, "db:v2", 10),
        (3, "db:v1", 20),
    ]
    # Created before the revision it replaced: re-activated, and it left v2 at 11:20.
    assert [r.restored for r in revisions] == [False, True]
    assert [(image, t.minute) for image, t in rolled_back_from(revisions)] == [("db:v2", 20)]


async def test_the_fake_keeps_a_statefulsets_history_as_its_controller_does() -> None:
    """The same history the control plane gives (tests/integration/test_kube_actions.py):
    a bad rollout is proposed for rollback, and the restored revision takes the next
    number."""
    c = cluster()
    c.rollout("shop", "db", image="v2", at=OPENED, kind="StatefulSet")
    ctx = await ContextGatherer(SETTINGS, cluster=c, source=c).gather(
        incident(kube_member("DbDown", DB_POD))
    )
    assert [(r.revision, r.image, r.previous_image) for r in ctx.rollouts] == [
        (1, "v1", None),
        (2, "v2", "v1"),
    ]
    settings = with_steps("auto_rollback_if_deployment_recent")
    an = analyze(incident(kube_member("DbDown", DB_POD)), ctx, settings, OPENED)
    assert [(a.type, a.target) for a in an.actions] == [("rollback", DB)]
    await c.rollback(DB, action_id="a1")
    w = await c.workload(DB)
    assert ([(r.number, r.image) for r in w.revisions], w.revision) == ([(2, "v2"), (3, "v1")], 3)


def test_the_adapter_reads_a_daemonsets_pods_from_its_status() -> None:
    ds = {
        "kind": "DaemonSet",
        "spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "50%"}}},
        "status": {"desiredNumberScheduled": 3, "numberReady": 3},
    }
    assert (desired_pods(ds), ready_pods(ds)) == (3, 3)
    assert rollout_disruption(ds) == 2  # 50% of 3, rounded up as the controller does
    on_delete = {**ds, "spec": {"updateStrategy": {"type": "OnDelete"}}}
    assert rollout_disruption(on_delete) == 0
