"""The lab's own parts: its simulated service reports a dead traffic loop, its faults behave
as injected until their remedy, its pods follow their Deployment and nodes, and its wait
ends as soon as a component fails rather than at the deadline."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from agent.errors import AgentError, DependencyUnavailable
from agent.lab import (
    EXPERIMENTS,
    SimulatedService,
    all_set_or_failed,
    await_quiet,
    experiment,
    shortfall,
    until_restored,
)
from agent.lab_clusters import LAB_NODES, InProcessLab
from agent.lab_kube import lab_deployment, ready_pods, serving_pods, takes_pods
from agent.models import Target, utcnow
from agent.prom import Sample
from handlers.fake_cluster import FakeCluster


async def test_a_service_whose_traffic_died_reports_it() -> None:
    # No checkout Deployment: the traffic loop cannot read its image.
    service = SimulatedService(InProcessLab(), namespace="shop", name="checkout")
    await service.start()
    try:
        for _ in range(100):
            if service.failure is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(service.failure, AgentError)
    finally:
        await service.stop()  # and stops cleanly all the same
    assert service.failure is None


async def test_the_wait_ends_at_a_failure_or_when_all_are_set() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    boom = RuntimeError("a component died")
    failures: list[BaseException | None] = [None, None, boom]
    got = await all_set_or_failed((a, b), 5, lambda: failures.pop(0), poll=0.01)
    assert got is boom
    a.set()
    b.set()
    assert await all_set_or_failed((a, b), 5, lambda: boom, poll=0.01) is None
    with pytest.raises(TimeoutError):
        await all_set_or_failed((asyncio.Event(),), 0.05, lambda: None, poll=0.01)


class LingeringSeries:
    """A Prometheus whose window still holds an earlier run's series for ``polls`` queries."""

    url = "http://prom.test:9090"

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.queries: list[str] = []

    async def query(self, expr: str) -> list[Sample]:
        self.queries.append(expr)
        return [Sample({}, 4.0)] if len(self.queries) <= self.polls else []


async def test_a_run_waits_until_an_earlier_runs_series_left_the_windows() -> None:
    prom = LingeringSeries(polls=3)
    waited = await await_quiet(prom, "shop", "checkout", poll=0.01)  # type: ignore[arg-type]
    assert len(prom.queries) == 4 and waited > 0
    assert prom.queries[0] == (
        'count(count_over_time(http_requests_total{namespace="shop",service="checkout"}[25s]))'
    )
    with pytest.raises(DependencyUnavailable, match="still receives series of shop/checkout"):
        await await_quiet(LingeringSeries(polls=1000), "shop", "checkout", limit=0.05, poll=0.01)  # type: ignore[arg-type]


def checkout(
    cluster: FakeCluster | None = None, replicas: int = 3, **service: Any
) -> tuple[FakeCluster, Target, SimulatedService]:
    """The lab's service: ``replicas`` of checkout in shop, on an in-process cluster
    (``service``: more of SimulatedService's settings)."""
    cluster = cluster if cluster is not None else FakeCluster()
    for node in LAB_NODES:
        cluster.add_node(node)
    cluster.create_deployment(
        "shop", "checkout", image="checkout:v1", replicas=replicas, at=utcnow()
    )
    target = Target(kind="Deployment", namespace="shop", name="checkout")
    lab = InProcessLab(cluster)
    return cluster, target, SimulatedService(lab, namespace="shop", name="checkout", **service)


class SlowCluster(FakeCluster):
    """A control plane slow to answer: each of the traffic loop's reads takes ``delay``."""

    def __init__(self, delay: float = 0.2) -> None:
        super().__init__()
        self.delay = delay
        self.reads = 0

    async def workload(self, target: Target) -> Any:
        self.reads += 1
        await asyncio.sleep(self.delay)
        return await super().workload(target)


async def test_the_traffic_reads_the_deployment_twice_a_second_not_at_every_tick() -> None:
    cluster = SlowCluster(delay=0.0)
    cluster.create_deployment("shop", "checkout", image="checkout:v1", replicas=1, at=utcnow())
    service = SimulatedService(InProcessLab(cluster), namespace="shop", name="checkout")
    await service.start()
    await asyncio.sleep(1.2)
    await service.stop()
    assert 1 <= cluster.reads <= 4  # at most one each 0.5 s; ticks: ~12


def busy_checkout(replicas: int) -> tuple[SlowCluster, SimulatedService]:
    """checkout on a busy machine: the Deployment is read at every tick and each read takes
    0.2 s, so a tick takes 0.3 s, not 0.1 s."""
    cluster = SlowCluster(delay=0.2)
    _, _, service = checkout(cluster, replicas, rps=50, workload_refresh=0.0)
    return cluster, service


async def run_for(service: SimulatedService, seconds: float) -> float:
    """Runs the service's traffic for ``seconds``; returns how long it ran."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await service.start()
    await asyncio.sleep(seconds)
    await service.stop()
    return loop.time() - start


async def test_a_busy_machines_long_ticks_still_serve_the_requests_per_second() -> None:
    _, service = busy_checkout(replicas=3)
    took = await run_for(service, 1.5)
    served = sum(service.counts.values())
    # A tick is 0.3 s here, not 0.1 s: 5 requests a tick would have served 25, not ~75.
    assert 50 * (took - 0.7) <= served <= 50 * took
    per_pod = [
        sum(v for (p, _, _), v in service.counts.items() if p == pod)
        for pod in ("checkout-0", "checkout-1", "checkout-2")
    ]
    assert max(per_pod) - min(per_pod) <= 1  # in turn, as a Service spreads them


async def test_a_crash_loop_restarts_a_container_a_second_however_long_the_ticks() -> None:
    cluster, service = busy_checkout(replicas=1)
    await experiment("crash-loop").inject(service.lab, service)
    took = await run_for(service, 2.6)
    # One every 10 ticks would be none in 2.6 s of 0.3 s ticks.
    assert took - 1.3 <= service.restarts <= took
    pod = cluster.pod("shop", "checkout-0")
    assert pod is not None and pod.restarts == service.restarts


async def test_a_pod_that_replaced_a_crashing_one_never_takes_its_crash() -> None:
    """The Deployment is read seldom (here: never again on its own), the pods at every
    tick: after the remedy's restart, the new checkout-0 is the pod a crash would hit."""
    cluster, target, service = checkout(replicas=1, workload_refresh=3600.0)
    await experiment("crash-loop").inject(service.lab, service)
    await service.start()
    try:
        await asyncio.sleep(1.3)
        crashed = cluster.pod("shop", "checkout-0")
        assert crashed is not None and crashed.restarts >= 1
        await cluster.restart(target, action_id="remedy", at=utcnow())
        await asyncio.sleep(2.2)
    finally:
        await service.stop()
    replaced = cluster.pod("shop", "checkout-0")
    assert replaced is not None and replaced.uid != crashed.uid
    assert replaced.restarts == 0


async def test_a_crash_loop_lasts_until_the_deployment_is_restarted_after_it_began() -> None:
    cluster, target, service = checkout()
    before = await cluster.workload(target)
    assert not service.crash_looping(before) and service.error_share(before) == 0.0
    await cluster.restart(target, action_id="early", at=utcnow() - timedelta(seconds=1))
    await experiment("crash-loop").inject(service.lab, service)
    crashing = await cluster.workload(target)
    assert service.crash_looping(crashing) and service.error_share(crashing) == 0.2
    events = await cluster.events("shop", ["checkout"], limit=10)
    assert [(e.kind, e.name, e.reason) for e in events] == [("Pod", "checkout-0", "BackOff")]
    await cluster.restart(target, action_id="remedy", at=utcnow())
    assert not service.crash_looping(await cluster.workload(target))


async def test_a_traffic_surge_saturates_three_replicas_and_four_absorb_it() -> None:
    cluster, target, service = checkout()
    w = await cluster.workload(target)
    assert (service.cpu_per_pod(w), service.error_share(w)) == (0.5, 0.0)
    await experiment("traffic-surge").inject(service.lab, service)
    assert service.cpu_per_pod(w) == 1.0  # at its limit: the saturation the rules read
    assert service.error_share(w) == pytest.approx(0.3 / 3.3)
    await cluster.scale(target, action_id="up", replicas=4)
    w = await cluster.workload(target)
    assert service.cpu_per_pod(w) == pytest.approx(0.825)  # under the pattern's 0.9
    assert service.error_share(w) == 0.0


async def test_a_node_failure_fails_its_pod_until_a_drain_moves_it() -> None:
    cluster, target, service = checkout()
    pods = cluster.reconcile("shop", "checkout")
    assert [(p.name, p.node) for p in pods] == [
        ("checkout-0", "lab-node-1"),
        ("checkout-1", "lab-node-2"),
        ("checkout-2", "lab-node-3"),
    ]
    w = await cluster.workload(target)
    await experiment("node-failure").inject(service.lab, service)
    down = (await service.lab.serving("shop", "checkout")).down
    assert down == {"lab-node-1"}
    assert [service.pod_error_share(w, p.node, down) for p in pods] == [1.0, 0.0, 0.0]
    (event,) = await cluster.events("", ["lab-node-1"], limit=10)
    assert (event.kind, event.reason) == ("Node", "NodeNotReady")
    # Nothing moves by itself: the pod waits on its broken node (the 5 min toleration).
    assert cluster.reconcile("shop", "checkout") == pods
    node = Target(kind="Node", name="lab-node-1")
    await cluster.drain(node, action_id="d", grace_period=None, drain_timeout=60)
    moved = cluster.reconcile("shop", "checkout")
    assert [p.name for p in moved] == ["checkout-0", "checkout-1", "checkout-2"]
    assert moved[0].node in ("lab-node-2", "lab-node-3")
    assert [service.pod_error_share(w, p.node, down) for p in moved] == [0.0, 0.0, 0.0]


async def test_the_service_is_back_only_when_every_requested_pod_runs_ready() -> None:
    cluster, _, service = checkout()
    lab = service.lab
    cluster.reconcile("shop", "checkout")
    await experiment("node-failure").inject(lab, service)
    # Its alert may clear (the pod's series end), but a pod on the down node is not back.
    ready = await until_restored(lab, "shop", "checkout", 3, limit=0)
    assert ready == (("checkout-1", "lab-node-2"), ("checkout-2", "lab-node-3"))
    assert shortfall(3, ready) == (
        "2 of 3 pods run ready on healthy nodes "
        "(checkout-1 on lab-node-2, checkout-2 on lab-node-3)"
    )
    node = Target(kind="Node", name="lab-node-1")
    await cluster.drain(node, action_id="d", grace_period=None, drain_timeout=60)
    ready = await until_restored(lab, "shop", "checkout", 3, limit=0)
    assert len(ready) == 3 and "lab-node-1" not in {n for _, n in ready}
    assert shortfall(3, ready) is None
    # A scale up is back only once the added pod runs too.
    assert shortfall(4, ready) is not None


def test_on_a_real_control_plane_only_ready_pods_count_as_back() -> None:
    def pod(name: str, ready: str, deleting: bool = False) -> Any:
        meta: dict[str, Any] = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]},
        }

    pending = {"metadata": {"name": "d"}, "spec": {}, "status": {"phase": "Pending"}}
    pods = [pod("a", "True"), pod("b", "False"), pod("c", "True", deleting=True), pending]
    assert ready_pods(pods) == [("a", "n1")]


async def test_reconcile_follows_scaling_and_leaves_a_pod_pending_without_a_node() -> None:
    cluster, target, _ = checkout()
    cluster.reconcile("shop", "checkout")
    await cluster.scale(target, action_id="up", replicas=12)
    pods = cluster.reconcile("shop", "checkout")
    assert len(pods) == 12
    assert {cluster.node(n).name: sum(p.node == n for p in pods) for n in LAB_NODES} == {
        n: 4 for n in LAB_NODES
    }
    await cluster.scale(target, action_id="down", replicas=2)
    assert [p.name for p in cluster.reconcile("shop", "checkout")] == ["checkout-0", "checkout-1"]
    for n in LAB_NODES:
        cluster.set_node_conditions(n, ["NotReady"])
    await cluster.scale(target, action_id="up-again", replicas=3)
    assert len(cluster.reconcile("shop", "checkout")) == 2  # Pending: no node to run on


async def scraped(service: SimulatedService) -> str:
    """The service's /metrics once it has served some traffic."""
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{service.port}/metrics") as r:
                    assert r.status == 200
                    text = await r.text()
                if 'status="200"} ' in text:
                    return text
                await asyncio.sleep(0.05)
    finally:
        await service.stop()
    raise AssertionError(f"no traffic counted: {text}")


async def test_requests_are_counted_per_pod_and_node() -> None:
    _, _, service = checkout()
    text = await scraped(service)
    assert 'pod="checkout-0",node="lab-node-1",status="200"}' in text
    assert 'status="500"' not in text


def test_on_a_real_control_plane_only_running_pods_not_being_deleted_serve() -> None:
    def pod(name: str, node: str, phase: str = "Running", deleting: bool = False) -> Any:
        meta: dict[str, Any] = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "spec": {"nodeName": node}, "status": {"phase": phase}}

    pods = [
        pod("checkout-b", "n2"),
        pod("checkout-a", "n1"),
        pod("checkout-c", "", phase="Pending"),  # not scheduled yet
        pod("checkout-d", "n1", deleting=True),  # evicted: out of the endpoints
    ]
    assert serving_pods(pods) == [("checkout-a", "n1"), ("checkout-b", "n2")]


def test_the_lab_deployment_spreads_over_the_runs_own_nodes() -> None:
    doc = lab_deployment("shop", "checkout", image="c:v1", replicas=3, run="r1")
    spec = doc["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"sre-agent.io/lab": "r1"}
    (spread,) = spec["topologySpreadConstraints"]
    assert (spread["maxSkew"], spread["whenUnsatisfiable"]) == (1, "DoNotSchedule")
    # A cordoned, NotReady node is no domain: otherwise, with no pod and maxSkew 1, the
    # replacement of its pod fits on no healthy node and stays Pending.
    assert (spread["nodeTaintsPolicy"], spread["nodeAffinityPolicy"]) == ("Honor", "Honor")
    assert (
        "nodeSelector"
        not in lab_deployment("s", "c", image="c", replicas=1, run=None)["spec"]["template"]["spec"]
    )


def test_the_deployment_waits_for_nodes_that_take_pods() -> None:
    ready = {"type": "Ready", "status": "True"}
    not_ready = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
    # With the spread honouring taints, a Deployment created before a new node lost its
    # not-ready taint would put every pod on the other nodes.
    assert takes_pods({"status": {"conditions": [ready]}})
    assert not takes_pods({"spec": {"taints": [not_ready]}, "status": {"conditions": [ready]}})
    assert not takes_pods({"status": {"conditions": [{**ready, "status": "False"}]}})
    assert not takes_pods({"spec": {"unschedulable": True}, "status": {"conditions": [ready]}})
    prefer = {"key": "x", "effect": "PreferNoSchedule"}
    assert takes_pods({"spec": {"taints": [prefer]}, "status": {"conditions": [ready]}})


def test_experiments_are_named_and_an_unknown_one_is_refused() -> None:
    assert [e.name for e in EXPERIMENTS] == [
        "bad-rollout",
        "crash-loop",
        "traffic-surge",
        "node-failure",
    ]
    assert experiment("crash-loop").remedy == "restart_workload"
    with pytest.raises(ValueError, match="unknown experiment 'oom'; known: bad-rollout, crash"):
        experiment("oom")


def test_a_lab_run_deletes_its_own_topics_only() -> None:
    from streams.bus import topics_of

    topics = ["sre.20260101.incidents", "sre.20260101.anomalies", "sre.2026.x", "other"]
    assert topics_of(topics, "sre.20260101.") == [
        "sre.20260101.anomalies",
        "sre.20260101.incidents",
    ]
    assert topics_of(topics, "") == []  # never every topic of the cluster
