"""The lab's own parts: its simulated service reports a dead traffic loop, and its wait
ends as soon as a component fails rather than at the deadline."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import AgentError
from agent.lab import SimulatedService, all_set_or_failed
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
