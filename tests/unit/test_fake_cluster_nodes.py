"""The in-process cluster's nodes, pods, ConfigMaps and budgets behave like the API does
for what the actions need (eviction, drain, cordon, config patch, undo, versions)."""

from __future__ import annotations

import pytest

from agent.errors import ActionFailed
from agent.models import Target
from handlers.cluster import (
    EVICTED_PODS_ANNOTATION,
    PartialFailure,
    evicted_uid,
    remember_eviction,
)
from handlers.fake_cluster import FakeCluster
from tests.unit.factories import at

NODE = Target(kind="Node", name="n1")
CM = Target(kind="ConfigMap", namespace="shop", name="flags")


def cluster() -> FakeCluster:
    c = FakeCluster()
    c.create_deployment("shop", "web", image="v1", replicas=3, at=at(0))
    c.add_node("n1")
    c.add_node("n2")
    c.add_pod("shop", "web-1", node="n1", workload="web")
    c.add_pod("shop", "web-2", node="n2", workload="web")
    c.add_pod("kube-system", "proxy-n1", node="n1", owner="DaemonSet")
    c.add_pod("kube-system", "etcd-n1", node="n1", owner="Node", mirror=True)
    c.create_config_map("shop", "flags", {"mode": "fast"})
    return c


async def test_drain_refuses_pods_without_a_controller_after_cordoning() -> None:
    c = cluster()
    c.add_pod("shop", "bare", node="n1", owner="")
    with pytest.raises(PartialFailure, match="without a controller would not be recreated") as e:
        await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    assert e.value.prior_state == {"unschedulable": False}
    assert c.node("n1").unschedulable
    assert c.pod("shop", "web-1") is not None


async def test_a_drain_asked_again_resumes_the_evictions_it_did_not_finish() -> None:
    c = cluster()
    c.add_budget("shop", "web", workload="web", disruptions_allowed=0)
    with pytest.raises(PartialFailure, match="blocked by PodDisruptionBudget shop/web"):
        await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    assert c.node("n1").unschedulable and c.pod("shop", "web-1") is not None
    c.add_budget("shop", "web", workload="web", disruptions_allowed=1)  # a replica is ready
    again = await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    assert again.applied, again.message
    assert "already cordoned by this action, resumed, evicted 1 pods (shop/web-1)" in again.message
    assert again.prior_state == {"unschedulable": False}  # what undo restores, still known
    assert c.pod("shop", "web-1") is None
    assert not (await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)).applied


async def test_a_drain_undone_is_not_resumed_by_its_redelivery() -> None:
    c = cluster()
    first = await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    await c.undo(NODE, action_id="u1", action_type="drain_node", prior=first.prior_state)
    c.add_pod("shop", "web-3", node="n1", workload="web")
    again = await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    assert not again.applied
    assert not c.node("n1").unschedulable and c.pod("shop", "web-3") is not None


async def test_a_statefulset_pod_recreated_under_its_name_is_not_restarted_again() -> None:
    c = cluster()
    old = c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    pod = Target(kind="Pod", namespace="shop", name="db-0")
    first = await c.restart_pod(pod, action_id="p1")
    assert first.applied and first.prior_state["uid"] == old.uid
    new = c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    again = await c.restart_pod(pod, action_id="p1")  # redelivered
    assert not again.applied and again.found_id
    assert again.prior_state == {"uid": old.uid}
    assert c.pod("shop", "db-0") == new
    assert (await c.observe(pod)).uid == new.uid
    assert (await c.restart_pod(pod, action_id="p2")).applied  # another action may


async def test_an_unready_pod_may_be_evicted_despite_a_full_budget() -> None:
    c = cluster()
    c.add_budget("shop", "web", workload="web", disruptions_allowed=0)
    with pytest.raises(ActionFailed, match="PodDisruptionBudget shop/web"):
        await c.restart_pod(Target(kind="Pod", namespace="shop", name="web-1"), action_id="r1")
    c.add_pod("shop", "web-3", node="n2", workload="web", ready=False)
    pod = Target(kind="Pod", namespace="shop", name="web-3")
    assert (await c.restart_pod(pod, action_id="r2")).applied
    assert not (await c.restart_pod(pod, action_id="r2")).applied  # already gone


async def test_footprints() -> None:
    c = cluster()
    c.add_budget("shop", "web", workload="web", disruptions_allowed=1)
    fp = await c.footprint(Target(kind="Pod", namespace="shop", name="web-1"))
    assert (fp.replicas, fp.disruption, fp.pdb_headroom, fp.pdbs) == (3, 1, 1, ("shop/web",))
    await c.cordon(Target(kind="Node", name="n2"), action_id="c1")
    assert (await c.footprint(NODE)).cordoned_nodes == ("n2",)
    assert (await c.footprint(Target(kind="Node", name="n2"))).cordoned_nodes == ()


async def test_observe_and_version() -> None:
    c = cluster()
    assert (await c.observe(NODE)).evictable == 1
    assert await c.version(NODE) == "unschedulable=False"
    await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10)
    o = await c.observe(NODE)
    assert (o.cordoned, o.evictable) == (True, 0)
    assert await c.version(NODE) == "unschedulable=True"
    assert c.pod("kube-system", "proxy-n1") is not None  # DaemonSet pod stays
    assert c.pod("kube-system", "etcd-n1") is not None  # mirror pod stays
    assert not (await c.observe(Target(kind="Pod", namespace="shop", name="web-1"))).exists


async def test_config_update_and_undo_of_a_new_key() -> None:
    c = cluster()
    effect = await c.update_config(CM, action_id="u1", key="extra", value="1")
    assert effect.prior_state == {"key": "extra", "value": "", "existed": False}
    assert await c.version(CM) == "resourceVersion=2"
    assert not (await c.update_config(CM, action_id="u1", key="extra", value="2")).applied
    await c.undo(CM, action_id="x1", action_type="update_config", prior=effect.prior_state)
    assert c.config_map("shop", "flags").data == {"mode": "fast"}
    with pytest.raises(ActionFailed, match="cannot be undone"):
        await c.undo(NODE, action_id="x2", action_type="restart_pod", prior={"uid": "u"})


async def test_a_drain_stops_evicting_once_asked_and_leaves_the_node_cordoned() -> None:
    c = cluster()
    c.add_pod("shop", "web-4", node="n1", workload="web")
    c.add_pod("shop", "web-5", node="n1", workload="web")
    asked: list[str] = []

    def stop() -> str | None:  # the kill switch turns on after the first eviction
        asked.append("?")
        return "the kill switch (file /run/kill exists)" if len(asked) > 1 else None

    with pytest.raises(PartialFailure, match="stopped by the kill switch") as e:
        await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=10, stop=stop)
    assert e.value.prior_state == {"unschedulable": False}
    assert "Evicted: shop/web-1" in str(e.value) and "The node is left cordoned" in str(e.value)
    assert c.node("n1").unschedulable
    left = [n for n in ("web-1", "web-4", "web-5") if c.pod("shop", n) is not None]
    assert left == ["web-4", "web-5"]


async def test_a_drained_pod_held_by_a_finalizer_stays_terminating_and_the_drain_waits() -> None:
    # As the API server: the eviction sets a deletionTimestamp and the finalizer keeps the
    # pod listed; the adapter waits for it to be gone, up to its timeout.
    c = cluster()
    c.add_finalizer("shop", "web-1", "example.com/hold")
    with pytest.raises(PartialFailure, match="evicted pods still terminating after 5s") as e:
        await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=5)
    assert "(shop/web-1); the node is left cordoned" in str(e.value)
    pod = Target(kind="Pod", namespace="shop", name="web-1")
    assert (await c.observe(pod)).settled is False
    assert await c.applied(NODE, action_id="d1", action_type="drain_node") is None
    left = await c.partly_applied(NODE, action_id="d1", action_type="drain_node")
    assert left == "node cordoned, 1 pods left (1 terminating): shop/web-1"
    assert c.reconcile("shop", "web")[-1].node == "n2"  # replaced at once, elsewhere
    c.remove_finalizer("shop", "web-1", "example.com/hold")
    assert await c.applied(NODE, action_id="d1", action_type="drain_node") is not None


async def test_a_drain_on_a_not_ready_node_counts_a_held_pod_as_gone() -> None:
    c = cluster()
    c.add_finalizer("shop", "web-1", "example.com/hold")
    c.set_node_conditions("n1", ["NotReady"])
    done = await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=5)
    assert done.applied
    assert "1 still terminating on the NotReady node" in done.message
    assert c.pod("shop", "web-1") is not None


async def test_each_eviction_spends_a_disruption_of_its_budget() -> None:
    # The API server decrements disruptionsAllowed with each eviction of a healthy pod: a
    # budget allowing one lets a drain evict one of two pods, the other gets 429.
    c = cluster()
    c.add_pod("shop", "web-3", node="n1", workload="web")
    c.add_budget("shop", "web", workload="web", disruptions_allowed=1)
    with pytest.raises(PartialFailure, match="stopped after 5s") as e:
        await c.drain(NODE, action_id="d1", grace_period=None, drain_timeout=5)
    assert (
        "pod shop/web-3 blocked by PodDisruptionBudget shop/web (no disruptions allowed)"
        ". Evicted: shop/web-1."
    ) in str(e.value)
    assert (await c.footprint(Target(kind="Pod", namespace="shop", name="web-2"))).pdb_headroom == 0
    with pytest.raises(ActionFailed, match="blocked by PodDisruptionBudget shop/web"):
        await c.restart_pod(Target(kind="Pod", namespace="shop", name="web-2"), action_id="r1")
    c.reconcile("shop", "web")  # the replacement is ready: the controller gives one back
    assert (
        await c.restart_pod(Target(kind="Pod", namespace="shop", name="web-2"), action_id="r1")
    ).applied


async def test_an_unready_pod_goes_only_while_its_counted_budget_is_healthy() -> None:
    # IfHealthyBudget, as the API server: web-1 unready leaves 1 healthy pod of 3 wanted
    # (minAvailable 2): the budget is unhealthy, so not even the unready pod may go.
    c = cluster()
    c.add_pod("shop", "web-3", node="n2", workload="web")
    c.set_ready("shop", "web-1", False)
    c.set_ready("shop", "web-2", False)
    c.add_budget("shop", "web", workload="web", min_available=2)
    web1 = Target(kind="Pod", namespace="shop", name="web-1")
    assert (await c.footprint(web1)).pdb_headroom == 0
    with pytest.raises(ActionFailed, match="blocked by PodDisruptionBudget shop/web"):
        await c.restart_pod(web1, action_id="r1")
    c.set_ready("shop", "web-2", True)  # 2 healthy of 2 wanted: healthy, none to spare
    assert (await c.footprint(web1)).pdb_headroom == 0
    assert (await c.restart_pod(web1, action_id="r1")).applied
    web2 = Target(kind="Pod", namespace="shop", name="web-2")
    with pytest.raises(ActionFailed, match="blocked by PodDisruptionBudget shop/web"):
        await c.restart_pod(web2, action_id="r2")  # a ready one: no disruption allowed


async def test_a_pod_deleted_outright_after_a_dead_deliverys_note_is_not_its_restart() -> None:
    # As the adapter: the note names the pod, but it goes by a plain delete (no eviction's
    # DisruptionTarget): someone else's doing, and the note is taken back.
    c = cluster()
    pod = c.pod("shop", "web-1")
    assert pod is not None
    web = Target(kind="Deployment", namespace="shop", name="web")
    c.annotate(web, EVICTED_PODS_ANNOTATION, remember_eviction({}, "r1", pod.uid))
    c.terminate("shop", "web-1")  # deleted outright, its end not yet confirmed
    target = Target(kind="Pod", namespace="shop", name="web-1")
    assert await c.applied(target, action_id="r1", action_type="restart_pod") is None
    again = await c.restart_pod(target, action_id="r1")
    assert not again.found_id and again.message == "Pod/shop/web-1 is already terminating"
    assert evicted_uid((await c.workload(web)).annotations, "r1") == ""
    c.remove_pod("shop", "web-1")
    gone = await c.restart_pod(target, action_id="r1")
    assert not gone.found_id and gone.message == "Pod/shop/web-1 is already gone"
    # An eviction's terminating pod is still this action's (its DisruptionTarget).
    c.add_finalizer("shop", "web-2", "example.com/hold")
    mine = Target(kind="Pod", namespace="shop", name="web-2")
    assert (await c.restart_pod(mine, action_id="r2")).applied
    assert (await c.restart_pod(mine, action_id="r2")).found_id
