"""The in-process cluster follows the Kubernetes semantics the executor relies on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.analyzer import recent_rollout
from agent.context import rollouts_of
from agent.errors import ActionFailed
from agent.models import Target
from handlers.cluster import (
    ACTION_IDS_ANNOTATION,
    EVICTED_PODS_ANNOTATION,
    MAX_PRIOR_STATE_BYTES,
    MAX_PRIOR_STATE_NOTES,
    MAX_REMEMBERED_IDS,
    PRIOR_STATE_ANNOTATION,
    RESTARTED_AT_ANNOTATION,
    PartialFailure,
    evicted_uid,
    forget_eviction,
    note_prior_state,
    noted_prior_state,
    remember_eviction,
)
from handlers.fake_cluster import FakeCluster
from tests.unit.factories import at

CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")
MISSING = Target(kind="Deployment", namespace="shop", name="missing")


def cluster_with_revisions(*images: str) -> FakeCluster:
    """checkout at revision len(images), one rollout per extra image."""
    c = FakeCluster()
    c.create_deployment("shop", "checkout", image=images[0], replicas=2, at=at(0))
    for i, image in enumerate(images[1:], start=1):
        c.rollout("shop", "checkout", image=image, at=at(i * 60))
    return c


async def test_create_and_rollout_number_revisions() -> None:
    c = cluster_with_revisions("v1", "v2", "v3")
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image, w.generation) == (3, "v3", 3)
    assert [(r.number, r.image) for r in w.revisions] == [(1, "v1"), (2, "v2"), (3, "v3")]
    assert w.current().image == "v3"
    assert (w.replicas, w.ready_replicas) == (2, 2)


async def test_creating_twice_fails() -> None:
    c = cluster_with_revisions("v1")
    with pytest.raises(ActionFailed):
        c.create_deployment("shop", "checkout", image="v1", replicas=1, at=at(0))


async def test_rollback_goes_to_the_previous_revision_under_a_new_number() -> None:
    c = cluster_with_revisions("v1", "v2", "v3")
    effect = await c.rollback(CHECKOUT, action_id="a1")
    assert effect.applied
    assert effect.prior_state == {"revision": 3, "image": "v3"}
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image) == (4, "v2")
    # Revision 2's template is re-activated as revision 4: the old number disappears.
    assert sorted((r.number, r.image) for r in w.revisions) == [(1, "v1"), (3, "v3"), (4, "v2")]
    assert w.current().image == "v2"
    assert w.generation == 4
    assert "a1" in w.applied_action_ids


async def test_repeated_rollbacks_alternate_like_kubectl_rollout_undo() -> None:
    c = cluster_with_revisions("v1", "v2")
    await c.rollback(CHECKOUT, action_id="a1")
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image) == (3, "v1")
    await c.rollback(CHECKOUT, action_id="a2")
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image) == (4, "v2")
    assert sorted(r.number for r in w.revisions) == [3, 4]


async def test_rollback_to_a_named_revision() -> None:
    c = cluster_with_revisions("v1", "v2", "v3")
    await c.rollback(CHECKOUT, action_id="a1", to_revision=1)
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image) == (4, "v1")
    assert sorted((r.number, r.image) for r in w.revisions) == [(2, "v2"), (3, "v3"), (4, "v1")]


async def test_a_rolled_back_template_is_dated_when_it_became_current_again() -> None:
    """v1, v2 a minute later, rolled back at minute 10: the re-activated v1 is revision 3 as
    of the rollback (the cluster's clock), so the rules see a recent rollout, of v1."""
    c = FakeCluster(clock=lambda: at(600))
    c.create_deployment("shop", "checkout", image="v1", replicas=2, at=at(0))
    c.rollout("shop", "checkout", image="v2", at=at(60))
    await c.rollback(CHECKOUT, action_id="a1")
    w = await c.workload(CHECKOUT)
    assert [(r.number, r.image, r.at) for r in w.revisions] == [
        (2, "v2", at(60)),
        (3, "v1", at(600)),
    ]
    rollouts, _ = await rollouts_of(c, [CHECKOUT])
    latest = recent_rollout(tuple(rollouts), CHECKOUT, at(660), window=300)
    assert latest is not None
    assert (latest.revision, latest.image, latest.previous_image) == (3, "v1", "v2")


async def test_a_rollout_back_to_an_old_template_renumbers_it() -> None:
    """As the Deployment controller does on a patch back to v1: v1's revision is renumbered
    and dated by the rollout, not by its first creation."""
    c = cluster_with_revisions("v1", "v2", "v1")
    w = await c.workload(CHECKOUT)
    assert (w.revision, w.image) == (3, "v1")
    assert [(r.number, r.image, r.at) for r in w.revisions] == [
        (2, "v2", at(60)),
        (3, "v1", at(120)),
    ]


@pytest.mark.parametrize("revision", [3, 9])
async def test_rollback_to_current_or_unknown_revision_fails(revision: int) -> None:
    c = cluster_with_revisions("v1", "v2", "v3")
    before = await c.workload(CHECKOUT)
    with pytest.raises(ActionFailed, match=f"revision {revision} not found"):
        await c.rollback(CHECKOUT, action_id="a1", to_revision=revision)
    assert await c.workload(CHECKOUT) == before


async def test_rollback_without_a_previous_revision_fails() -> None:
    c = cluster_with_revisions("v1")
    with pytest.raises(ActionFailed, match="no previous revision"):
        await c.rollback(CHECKOUT, action_id="a1")
    assert (await c.workload(CHECKOUT)).applied_action_ids == ()


async def test_same_action_id_twice_applies_once() -> None:
    c = cluster_with_revisions("v1", "v2")
    first = await c.rollback(CHECKOUT, action_id="a1")
    after_first = await c.workload(CHECKOUT)
    second = await c.rollback(CHECKOUT, action_id="a1")
    assert first.applied
    assert not second.applied
    assert "a1" in second.message
    w = await c.workload(CHECKOUT)
    assert w == after_first
    assert w.generation == 3  # create, rollout, one rollback
    assert w.applied_action_ids == ("a1",)


async def test_action_ids_are_shared_across_action_kinds() -> None:
    c = cluster_with_revisions("v1", "v2")
    assert (await c.scale(CHECKOUT, action_id="a1", replicas=5)).applied
    assert not (await c.restart(CHECKOUT, action_id="a1", at=at(10))).applied
    assert not (await c.rollback(CHECKOUT, action_id="a1")).applied
    assert (await c.workload(CHECKOUT)).generation == 3


async def test_scale_sets_replicas_and_bumps_generation() -> None:
    c = cluster_with_revisions("v1")
    effect = await c.scale(CHECKOUT, action_id="s1", replicas=5)
    assert effect.applied
    assert effect.prior_state == {"replicas": 2}
    w = await c.workload(CHECKOUT)
    assert (w.replicas, w.ready_replicas, w.generation) == (5, 5, 2)
    assert (await c.scale(CHECKOUT, action_id="s2", replicas=0)).applied
    assert (await c.workload(CHECKOUT)).replicas == 0


async def test_scale_twice_with_one_id_moves_generation_once() -> None:
    c = cluster_with_revisions("v1")
    await c.scale(CHECKOUT, action_id="s1", replicas=4)
    again = await c.scale(CHECKOUT, action_id="s1", replicas=9)
    assert not again.applied
    w = await c.workload(CHECKOUT)
    assert (w.replicas, w.generation) == (4, 2)


async def test_scale_negative_fails_without_change() -> None:
    c = cluster_with_revisions("v1")
    with pytest.raises(ActionFailed, match="replicas must be >= 0"):
        await c.scale(CHECKOUT, action_id="s1", replicas=-1)
    w = await c.workload(CHECKOUT)
    assert (w.replicas, w.generation, w.applied_action_ids) == (2, 1, ())


async def test_a_directed_scale_never_moves_the_other_way() -> None:
    c = cluster_with_revisions("v1")  # 2 replicas
    for replicas, direction in ((1, "up"), (2, "up"), (3, "down"), (2, "down")):
        with pytest.raises(ActionFailed, match=f"has 2 replicas: scaling {direction}"):
            await c.scale(CHECKOUT, action_id="s1", replicas=replicas, direction=direction)
    w = await c.workload(CHECKOUT)
    assert (w.replicas, w.generation, w.applied_action_ids) == (2, 1, ())
    assert (await c.scale(CHECKOUT, action_id="s2", replicas=3, direction="up")).applied
    assert (await c.scale(CHECKOUT, action_id="s3", replicas=1, direction="down")).applied
    assert (await c.workload(CHECKOUT)).replicas == 1


async def test_restart_records_when_and_keeps_the_template() -> None:
    c = cluster_with_revisions("v1")
    effect = await c.restart(CHECKOUT, action_id="r1", at=at(42))
    assert effect.applied
    assert effect.prior_state == {"generation": 1}
    w = await c.workload(CHECKOUT)
    assert w.restarted_at == at(42)
    assert RESTARTED_AT_ANNOTATION not in w.annotations  # the template's, as on a real API
    assert w.annotations[ACTION_IDS_ANNOTATION] == "r1"
    assert (w.revision, w.image, w.generation) == (1, "v1", 2)


async def test_unknown_target_fails_for_every_operation() -> None:
    c = cluster_with_revisions("v1")
    with pytest.raises(ActionFailed, match="not found"):
        await c.workload(MISSING)
    with pytest.raises(ActionFailed, match="not found"):
        await c.rollback(MISSING, action_id="a")
    with pytest.raises(ActionFailed, match="not found"):
        await c.scale(MISSING, action_id="a", replicas=1)
    with pytest.raises(ActionFailed, match="not found"):
        await c.restart(MISSING, action_id="a", at=at(0))
    with pytest.raises(ActionFailed, match="not found"):
        c.rollout("shop", "missing", image="v2", at=at(0))


async def test_a_target_is_identified_by_kind_too() -> None:
    c = cluster_with_revisions("v1")
    with pytest.raises(ActionFailed):
        await c.workload(Target(kind="StatefulSet", namespace="shop", name="checkout"))


async def test_writes_signal_changed() -> None:
    c = cluster_with_revisions("v1")
    c.changed.clear()
    await c.scale(CHECKOUT, action_id="s1", replicas=3)
    assert c.changed.is_set()
    c.changed.clear()
    await c.scale(CHECKOUT, action_id="s1", replicas=3)
    assert not c.changed.is_set()


async def test_remembered_ids_are_bounded() -> None:
    c = cluster_with_revisions("v1")
    for i in range(MAX_REMEMBERED_IDS + 5):
        await c.scale(CHECKOUT, action_id=f"s{i}", replicas=1)
    ids = (await c.workload(CHECKOUT)).applied_action_ids
    assert len(ids) == MAX_REMEMBERED_IDS
    assert ids[-1] == f"s{MAX_REMEMBERED_IDS + 4}"
    assert "s0" not in ids


def test_an_eviction_note_names_the_latest_pod_and_a_refused_one_is_taken_back() -> None:
    ann = {EVICTED_PODS_ANNOTATION: remember_eviction({}, "r0", "u0")}
    ann[EVICTED_PODS_ANNOTATION] = remember_eviction(ann, "r1", "u1")
    ann[EVICTED_PODS_ANNOTATION] = remember_eviction(ann, "r1", "u2")  # tried again, new pod
    assert (evicted_uid(ann, "r0"), evicted_uid(ann, "r1")) == ("u0", "u2")
    # Only the entry of that action and that pod goes: another attempt's stays.
    assert forget_eviction(ann, "r1", "u1") == ann[EVICTED_PODS_ANNOTATION]
    assert forget_eviction(ann, "r1", "u2") == "r0=u0"


def test_a_prior_state_note_is_read_back_by_its_own_action_only() -> None:
    ann = {PRIOR_STATE_ANNOTATION: note_prior_state({}, "a1", {"replicas": 2})}
    ann[PRIOR_STATE_ANNOTATION] = note_prior_state(ann, "a2", {"key": "k", "existed": False})
    assert noted_prior_state(ann, "a1") == {"replicas": 2}
    assert noted_prior_state(ann, "a2") == {"key": "k", "existed": False}
    assert noted_prior_state(ann, "a3") == {}


@pytest.mark.parametrize(
    "raw", ["", "not json", "[1]", '{"a1": 2}', '{"a1": {"replicas": [2]}}', '{"a1": {}}']
)
def test_a_prior_state_note_not_as_written_is_no_prior_state(raw: str) -> None:
    assert noted_prior_state({PRIOR_STATE_ANNOTATION: raw}, "a1") == {}


async def test_a_redelivery_reports_no_prior_state_its_write_could_not_have_noted() -> None:
    # Anyone who can patch the Deployment can rewrite the notes; an undo restores what the
    # redelivery reports, and the undo of a scale writes the HPA a note names.
    c = cluster_with_revisions("v1")
    await c.scale(CHECKOUT, action_id="s1", replicas=3)
    forged = {"replicas": 2, "hpa": "payments", "hpa_min_replicas": 1, "hpa_max_replicas": 1}
    c.annotate(CHECKOUT, PRIOR_STATE_ANNOTATION, note_prior_state({}, "s1", forged))
    assert (await c.scale(CHECKOUT, action_id="s1", replicas=3)).prior_state == {}
    for wrong in ({"replicas": "1000000000"}, {"replicas": True}, {"revision": 1, "image": "x"}):
        c.annotate(CHECKOUT, PRIOR_STATE_ANNOTATION, note_prior_state({}, "s1", wrong))
        assert (await c.scale(CHECKOUT, action_id="s1", replicas=3)).prior_state == {}
    # As written, it is reported.
    c.annotate(CHECKOUT, PRIOR_STATE_ANNOTATION, note_prior_state({}, "s1", {"replicas": 2}))
    assert (await c.scale(CHECKOUT, action_id="s1", replicas=3)).prior_state == {"replicas": 2}
    # A config change reports the old value of the key it set only, not another key's.
    cm = Target(kind="ConfigMap", namespace="shop", name="cfg")
    c.create_config_map("shop", "cfg", {"a": "1", "b": "2"})
    await c.update_config(cm, action_id="u1", key="a", value="9")
    other = {"key": "b", "value": "evil", "existed": True}
    c.annotate(cm, PRIOR_STATE_ANNOTATION, note_prior_state({}, "u1", other))
    assert (await c.update_config(cm, action_id="u1", key="a", value="9")).prior_state == {}


def test_prior_state_notes_are_bounded_in_number_and_size() -> None:
    ann: dict[str, str] = {}
    for i in range(MAX_PRIOR_STATE_NOTES + 3):
        ann[PRIOR_STATE_ANNOTATION] = note_prior_state(ann, f"a{i}", {"replicas": i})
    kept = [i for i in range(MAX_PRIOR_STATE_NOTES + 3) if noted_prior_state(ann, f"a{i}")]
    assert kept == list(range(3, MAX_PRIOR_STATE_NOTES + 3))  # the latest
    # A value too large to note is left out, and the notes of the others stay.
    huge = {"key": "k", "value": "x" * MAX_PRIOR_STATE_BYTES, "existed": True}
    ann[PRIOR_STATE_ANNOTATION] = note_prior_state(ann, "big", huge)
    assert noted_prior_state(ann, "big") == {}
    assert noted_prior_state(ann, f"a{MAX_PRIOR_STATE_NOTES + 2}")
    # Large ones that each fit push the oldest out, never past the bound.
    for i in range(4):
        half = {"value": "y" * (MAX_PRIOR_STATE_BYTES // 3)}
        ann[PRIOR_STATE_ANNOTATION] = note_prior_state(ann, f"h{i}", half)
        assert len(ann[PRIOR_STATE_ANNOTATION].encode()) <= MAX_PRIOR_STATE_BYTES
        assert noted_prior_state(ann, f"h{i}") == half


async def test_container_restarts_are_counted_per_workload_and_a_rollout_starts_afresh() -> None:
    c = cluster_with_revisions("v1", "v2")
    c.add_node("n1")
    for name in ("checkout-0", "checkout-1"):
        c.add_pod("shop", name, node="n1", workload="checkout")
    c.add_pod("shop", "cart-0", node="n1", workload="cart")
    c.crash("shop", "checkout-0", 3)
    c.crash("shop", "cart-0")
    assert (await c.observe(CHECKOUT)).restarts == 3
    uids = {p.uid for p in c.pods_of("shop", "checkout")}
    await c.restart(CHECKOUT, action_id="r1", at=at(100))
    assert (await c.observe(CHECKOUT)).restarts == 0
    assert uids.isdisjoint(p.uid for p in c.pods_of("shop", "checkout"))  # new pods
    c.crash("shop", "checkout-1")
    await c.rollback(CHECKOUT, action_id="b1")
    assert (await c.observe(CHECKOUT)).restarts == 0
    assert c.pod("shop", "cart-0") is not None and c.pod("shop", "cart-0").restarts == 1  # type: ignore[union-attr]


async def test_applied_reports_what_a_repeat_would_find_and_nothing_else() -> None:
    # What the policy's rule 0 reads: a repeat of the action would do nothing more.
    c = cluster_with_revisions("v1")
    c.add_node("n1")
    c.create_config_map("shop", "flags", {"mode": "fast"})
    node, cm = (
        Target(kind="Node", name="n1"),
        Target(kind="ConfigMap", namespace="shop", name="flags"),
    )
    await c.scale(CHECKOUT, action_id="s1", replicas=4, direction="up")
    await c.cordon(node, action_id="c1")
    await c.update_config(cm, action_id="u1", key="mode", value="safe")
    for target, action_id, type_, prior in [
        (CHECKOUT, "s1", "scale_up", {"replicas": 2}),
        (node, "c1", "cordon_node", {"unschedulable": False}),
        (cm, "u1", "update_config", {"key": "mode", "value": "fast", "existed": True}),
    ]:
        found = await c.applied(target, action_id=action_id, action_type=type_)
        assert found is not None and found.found_id and not found.applied
        assert found.prior_state == prior
        assert await c.applied(target, action_id="other", action_type=type_) is None
    # A drain with nothing left to evict: done, with the cordon c1 had made before it.
    await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    drained = await c.applied(node, action_id="d1", action_type="drain_node")
    assert drained is not None and drained.prior_state == {"unschedulable": True}
    assert await c.applied(MISSING, action_id="s1", action_type="scale_up") is None
    # A StatefulSet pod: gone, then replaced, after this action evicted it.
    c.create_workload("StatefulSet", "shop", "db", image="v1", replicas=1, at=at(0))
    c.add_pod("shop", "db-0", node="n1", workload="db", owner="StatefulSet")
    pod = Target(kind="Pod", namespace="shop", name="db-0")
    assert await c.applied(pod, action_id="p1", action_type="restart_pod") is None
    evicted = await c.restart_pod(pod, action_id="p1")
    gone = await c.applied(pod, action_id="p1", action_type="restart_pod")
    assert gone is not None and gone.prior_state == {"uid": evicted.prior_state["uid"]}
    c.add_pod("shop", "db-0", node="n1", workload="db", owner="StatefulSet")
    replaced = await c.applied(pod, action_id="p1", action_type="restart_pod")
    assert replaced is not None and replaced.found_id


async def test_the_applied_read_reports_no_prior_state_its_write_could_not_have_noted() -> None:
    # The executor's read before the policy (rule 0) reports the same prior state as the
    # action's own repeat: a forged note is none there either.
    c = cluster_with_revisions("v1")
    await c.scale(CHECKOUT, action_id="s1", replicas=3)
    forged = {"replicas": 2, "hpa": "payments", "hpa_min_replicas": 1, "hpa_max_replicas": 1}
    c.annotate(CHECKOUT, PRIOR_STATE_ANNOTATION, note_prior_state({}, "s1", forged))
    found = await c.applied(CHECKOUT, action_id="s1", action_type="scale_up")
    assert found is not None and found.found_id and found.prior_state == {}
    c.annotate(CHECKOUT, PRIOR_STATE_ANNOTATION, note_prior_state({}, "s1", {"replicas": 2}))
    found = await c.applied(CHECKOUT, action_id="s1", action_type="scale_up")
    assert found is not None and found.prior_state == {"replicas": 2}
    cm = Target(kind="ConfigMap", namespace="shop", name="cfg")
    c.create_config_map("shop", "cfg", {"a": "1", "b": "2"})
    await c.update_config(cm, action_id="u1", key="a", value="9")
    other = {"key": "b", "value": "evil", "existed": True}
    c.annotate(cm, PRIOR_STATE_ANNOTATION, note_prior_state({}, "u1", other))
    found = await c.applied(cm, action_id="u1", action_type="update_config", must={"key": "a"})
    assert found is not None and found.prior_state == {}


def _stop_after(evictions: int) -> Callable[[], str | None]:
    """A drain's stop check that halts it after ``evictions``: its executor died there."""
    calls = iter(range(evictions + 1))
    return lambda: None if next(calls, evictions) < evictions else "a dead executor"


async def test_a_drain_cut_half_way_is_not_applied_until_its_repeat_finishes_it() -> None:
    # Rule 0's read: a drain's id lands with the cordon, before any eviction, so the id on
    # the node says the drain started, not that it ended.
    c, node = FakeCluster(), Target(kind="Node", name="n1")
    c.add_node("n1")
    for name in ("web-a", "web-b"):
        c.add_pod("shop", name, node="n1", workload="web")
    c.add_pod("shop", "agent-x", node="n1", owner="DaemonSet")
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            node, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    assert c.node("n1").unschedulable and (await c.observe(node)).evictable == 1
    assert await c.applied(node, action_id="d1", action_type="drain_node") is None
    resumed = await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    assert resumed.applied and "resumed, evicted 1 pods" in resumed.message
    done = await c.applied(node, action_id="d1", action_type="drain_node")
    assert done is not None and done.found_id and done.prior_state == {"unschedulable": False}
    # A pod bound to the node since (no scheduler in between): a repeat would evict it.
    c.add_pod("shop", "web-c", node="n1", workload="web")
    assert await c.applied(node, action_id="d1", action_type="drain_node") is None
    # Its undo's own id is its undo's, whatever is left on the node.
    undo = await c.undo(node, action_id="d1-undo", action_type="drain_node", prior=done.prior_state)
    assert undo.applied and not c.node("n1").unschedulable
    again = await c.applied(node, action_id="d1-undo", action_type="drain_node", undo=True)
    assert again is not None and again.found_id


async def test_a_drain_resumed_while_pods_still_terminate_is_not_applied_until_they_are_gone() -> (
    None
):
    # The first delivery evicted web-a, sent web-b's eviction and died: web-b terminates
    # (its kubelet has not confirmed its end). The drain waits for it as the first delivery
    # would have, so the node is not drained yet, though nothing is left to evict.
    c, node = FakeCluster(), Target(kind="Node", name="n1")
    c.add_node("n1")
    for name in ("web-a", "web-b"):
        c.add_pod("shop", name, node="n1", workload="web")
    c.add_pod("shop", "agent-x", node="n1", owner="DaemonSet")
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            node, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    c.terminate("shop", "web-b")
    c.terminate("shop", "agent-x")  # a DaemonSet's pod: a drain never waits for it
    assert (await c.observe(node)).evictable == 0
    assert await c.applied(node, action_id="d1", action_type="drain_node") is None
    with pytest.raises(PartialFailure, match="terminating since before it: shop/web-b"):
        await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    c.remove_pod("shop", "web-b")
    done = await c.applied(node, action_id="d1", action_type="drain_node")
    assert done is not None and done.prior_state == {"unschedulable": False}


async def test_on_a_not_ready_node_a_terminating_pod_counts_as_gone_for_every_delivery() -> None:
    # No kubelet confirms its end: the first delivery counts it gone, and so do the read
    # of rule 0 and a resumed delivery.
    c, node = FakeCluster(), Target(kind="Node", name="n1")
    c.add_node("n1")
    c.add_pod("shop", "web-a", node="n1", workload="web")
    c.set_node_conditions("n1", ["NotReady"])
    c.terminate("shop", "web-a")
    first = await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    assert first.applied and "1 still terminating on the NotReady node" in first.message
    done = await c.applied(node, action_id="d1", action_type="drain_node")
    assert done is not None and done.found_id
    again = await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    assert again.found_id and not again.applied


# Pods on the node: a controller kind, "mirror" (a static pod's), "" (none: a drain refuses),
# or a ReplicaSet's or DaemonSet's pod already terminating (an earlier delivery's eviction).
POD_KINDS = st.sampled_from(
    ["ReplicaSet", "StatefulSet", "DaemonSet", "mirror", "", "terminating", "terminating-ds"]
)


@settings(max_examples=80)
@given(
    before=st.lists(POD_KINDS, max_size=5),
    evictions=st.integers(0, 6),
    uncordoned=st.booleans(),
    since=st.lists(POD_KINDS, max_size=2),
    down=st.booleans(),
)
def test_a_drain_is_applied_exactly_when_its_repeat_would_do_nothing(
    before: list[str], evictions: int, uncordoned: bool, since: list[str], down: bool
) -> None:
    """Whatever the first delivery got through (``evictions`` before its executor died) and
    whatever happened since (an operator's uncordon, pods bound to the node, pods still
    terminating, the node NotReady), rule 0's read finds the drain applied exactly when its
    repeat would evict nothing, wait for nothing, and report the id, and then with the same
    prior state; on a node still cordoned, none is left to evict."""
    asyncio.run(_drain_applied(before, evictions, uncordoned, since, down))


async def _drain_applied(
    before: list[str], evictions: int, uncordoned: bool, since: list[str], down: bool
) -> None:
    c, node = FakeCluster(), Target(kind="Node", name="n1")
    c.add_node("n1")
    if down:
        c.set_node_conditions("n1", ["NotReady"])

    def add(kinds: list[str], prefix: str) -> None:
        for i, kind in enumerate(kinds):
            owner = {"mirror": "Node", "terminating": "ReplicaSet", "terminating-ds": "DaemonSet"}
            c.add_pod(
                "shop",
                f"{prefix}-{i}",
                node="n1",
                owner=owner.get(kind, kind),
                mirror=kind == "mirror",
            )
            if kind.startswith("terminating"):
                c.terminate("shop", f"{prefix}-{i}")

    add(before, "p")
    # Died half way, or refused pods without a controller: the node stays cordoned.
    with contextlib.suppress(PartialFailure):
        await c.drain(
            node, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(evictions)
        )
    if uncordoned:
        await c.undo(node, action_id="op", action_type="cordon_node", prior={})
    add(since, "q")
    found = await c.applied(node, action_id="d1", action_type="drain_node")
    observed = await c.observe(node)
    names = [f"{x}-{i}" for x in "pq" for i in range(6)]
    pods = [c.pod("shop", p) for p in names]
    try:
        repeat = await c.drain(node, action_id="d1", grace_period=None, drain_timeout=60)
    except PartialFailure:
        repeat = None
    untouched = pods == [c.pod("shop", p) for p in names]
    nothing_more = repeat is not None and repeat.found_id and not repeat.applied and untouched
    assert (found is not None) == nothing_more
    if found is not None and repeat is not None:
        assert found.prior_state == repeat.prior_state == {"unschedulable": False}
        assert not observed.cordoned or observed.evictable == 0


async def test_a_statefulsets_eviction_notes_are_its_own_annotations_as_in_the_api() -> None:
    # They were kept beside the StatefulSet: a read of it, a rollback of it, or a note a
    # person wrote on it (kubectl annotate) saw another world than the restarts did.
    c = FakeCluster()
    c.add_node("n1")
    db = Target(kind="StatefulSet", namespace="shop", name="db")
    c.create_workload("StatefulSet", "shop", "db", image="v1", replicas=1, at=at(0))
    c.rollout("shop", "db", image="v2", at=at(60), kind="StatefulSet")
    old = c.add_pod("shop", "db-0", node="n1", workload="db", owner="StatefulSet")
    pod = Target(kind="Pod", namespace="shop", name="db-0")
    assert (await c.restart_pod(pod, action_id="p1")).applied
    notes = (await c.workload(db)).annotations
    assert evicted_uid(notes, "p1") == old.uid
    assert (await c.rollback(db, action_id="rb1")).applied
    assert evicted_uid((await c.workload(db)).annotations, "p1") == old.uid  # kept
    again = await c.restart_pod(pod, action_id="p1")
    assert again.found_id and again.prior_state == {"uid": old.uid}
    # A note written on the StatefulSet is what the next redelivery reads.
    c.add_pod("shop", "db-1", node="n1", workload="db", owner="StatefulSet")
    c.annotate(db, EVICTED_PODS_ANNOTATION, remember_eviction({}, "p2", "uid-gone"))
    found = await c.restart_pod(Target(kind="Pod", namespace="shop", name="db-1"), action_id="p2")
    assert found.found_id and found.prior_state == {"uid": "uid-gone"}


async def test_a_statefulset_pod_comes_with_its_statefulset() -> None:
    c = FakeCluster()
    c.add_node("n1")
    c.add_pod("shop", "db-0", node="n1", workload="db", owner="StatefulSet")
    db = Target(kind="StatefulSet", namespace="shop", name="db")
    assert (await c.observe(db)).exists
    assert (
        await c.restart_pod(Target(kind="Pod", namespace="shop", name="db-0"), action_id="p1")
    ).applied
    assert evicted_uid((await c.workload(db)).annotations, "p1") == "uid-1"
