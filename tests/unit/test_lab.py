"""The lab's own parts: its simulated service reports a dead traffic loop, and its wait
ends as soon as a component fails rather than at the deadline."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from agent.errors import AgentError
from agent.lab import EXPERIMENTS, SimulatedService, all_set_or_failed, experiment
from agent.models import Target, utcnow
from handlers.fake_cluster import FakeCluster


async def test_a_service_whose_traffic_died_reports_it() -> None:
    cluster = FakeCluster()  # no checkout Deployment: the traffic loop cannot read its image
    service = SimulatedService(cluster, namespace="shop", name="checkout")
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


def checkout() -> tuple[FakeCluster, Target, SimulatedService]:
    """The lab's service: 3 replicas of checkout in shop, on an in-process cluster."""
    cluster = FakeCluster()
    cluster.create_deployment("shop", "checkout", image="checkout:v1", replicas=3, at=utcnow())
    target = Target(kind="Deployment", namespace="shop", name="checkout")
    return cluster, target, SimulatedService(cluster, namespace="shop", name="checkout")


async def test_a_crash_loop_lasts_until_the_deployment_is_restarted_after_it_began() -> None:
    cluster, target, service = checkout()
    before = await cluster.workload(target)
    assert not service.crash_looping(before) and service.error_share(before) == 0.0
    await cluster.restart(target, action_id="early", at=utcnow() - timedelta(seconds=1))
    experiment("crash-loop").inject(cluster, service)
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
    experiment("traffic-surge").inject(cluster, service)
    assert service.cpu_per_pod(w) == 1.0  # at its limit: the saturation the rules read
    assert service.error_share(w) == pytest.approx(0.3 / 3.3)
    await cluster.scale(target, action_id="up", replicas=4)
    w = await cluster.workload(target)
    assert service.cpu_per_pod(w) == pytest.approx(0.825)  # under the pattern's 0.9
    assert service.error_share(w) == 0.0


def test_experiments_are_named_and_an_unknown_one_is_refused() -> None:
    assert [e.name for e in EXPERIMENTS] == ["bad-rollout", "crash-loop", "traffic-surge"]
    assert experiment("crash-loop").remedy == "restart_workload"
    with pytest.raises(ValueError, match="unknown experiment 'oom'; known: bad-rollout, crash"):
        experiment("oom")
