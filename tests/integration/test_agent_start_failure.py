"""An agent that cannot start releases everything it opened (no leaked clients), one
whose processing dies stops instead of lingering, and one whose correlator is stuck fails
its liveness probe."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from agent.errors import ComponentFailed, DependencyUnavailable
from agent.models import group_key
from agent.runtime import Agent, run_until_signalled
from handlers.fake_cluster import FakeCluster
from streams.bus import BatchConsumer
from tests.helpers import eventually, make_settings
from tests.integration.test_correlator import anomaly
from tests.unit.factories import action

pytestmark = pytest.mark.integration


class CountingCluster(FakeCluster):
    closed = 0

    async def close(self) -> None:
        CountingCluster.closed += 1
        await super().close()


async def test_start_failure_closes_what_was_opened() -> None:
    # Nothing listens on port 1: Kafka is unreachable, so start fails at the bus.
    settings = make_settings("127.0.0.1:1", "nowhere.", doc={"server": {"port": 0}})
    with pytest.raises(DependencyUnavailable, match="kafka"):
        async with Agent(settings, roles=["all"], cluster=CountingCluster()):
            pytest.fail("the agent must not start without Kafka")
    assert CountingCluster.closed == 1


async def test_a_dead_correlator_stops_the_agent_and_loses_nothing(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A failure inside the correlator's folding used to leave a live process that folded
    nothing, held its partitions, and hung in stop(). Now the agent stops and raises, and
    the next worker folds what the failed batch held (it was never committed)."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    agent = Agent(settings, roles=["correlator"], cluster=FakeCluster(), serve_http=False)
    corr = agent.correlator
    assert corr is not None

    async def broken(events: Iterable[Any]) -> None:
        raise RuntimeError("injected: the fold broke")

    corr.process = broken  # type: ignore[method-assign]
    a = anomaly("cart", "high-error-rate")
    key = group_key(a.labels, settings.correlation.group_by)
    run = asyncio.create_task(run_until_signalled(agent))
    await eventually(lambda: corr._started, 60, what="started")
    await agent.bus.publish_many([(agent.bus.topic("anomalies"), a, key)])
    with pytest.raises(ComponentFailed, match="injected: the fold broke"):
        await asyncio.wait_for(run, 60)  # stop() used to hang here
    assert isinstance(corr.failure, RuntimeError)

    again = Agent(settings, roles=["correlator"], cluster=FakeCluster(), serve_http=False)
    assert again.correlator is not None
    async with again:
        await eventually(lambda: again.correlator.processed >= 1, 60, what="refolded")
        assert list(again.correlator.table.data) == [key.encode()]


async def test_a_dead_consumer_loop_stops_the_agent(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The analyzer's consumers cannot dead-letter an unreadable incident (Kafka refuses the
    write): the first loop to meet it dies, and the agent stops with the reason instead of
    idling on. (Its group's consumer and its watch both read the incidents topic.)"""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    agent = Agent(settings, roles=["analyzer"], cluster=FakeCluster(), serve_http=False)

    async def refused(**_: Any) -> None:
        raise DependencyUnavailable("kafka: the dead-letter write was refused")

    agent.bus.dead_letter = refused  # type: ignore[method-assign]
    (consumer,) = [
        c for c in agent.components if isinstance(c, BatchConsumer) and c.name == "analyzer"
    ]
    run = asyncio.create_task(run_until_signalled(agent))
    await asyncio.wait_for(consumer.assigned.wait(), 60)
    await agent.bus.producer.send_and_wait(agent.bus.topic("incidents"), b"not json", b"k")
    with pytest.raises(ComponentFailed, match=r"analyzer(-watch)? failed: DependencyUnavailable"):
        await asyncio.wait_for(run, 60)


async def test_a_dead_silence_view_is_a_correlator_failure(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A correlator whose view of silences stopped following its topic would fold with
    stale silences forever; it reports the failure, so the agent restarts it."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    agent = Agent(settings, roles=["correlator"], cluster=FakeCluster(), serve_http=False)
    corr = agent.correlator
    assert corr is not None
    async with agent:
        assert corr.failure is None and agent.failure() is None
        view = corr.silences._consumer
        assert view is not None

        async def broken(**_: Any) -> Any:
            raise RuntimeError("injected: the silences fetch broke")

        view.getmany = broken  # type: ignore[method-assign]
        await eventually(lambda: corr.failure is not None, 30, what="the failure seen")
        failed = agent.failure()
        assert failed is not None and "the silences fetch broke" in str(failed)


async def test_a_stuck_correlator_fails_the_agents_liveness(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The correlator's own verdict (tests/integration/test_correlator.py) reaches the
    probe Kubernetes restarts the pod on, not the readiness probe (Kafka answers)."""
    import aiohttp

    settings = make_settings(kafka_bootstrap, topic_prefix, doc={"server": {"port": 0}})
    agent = Agent(settings, roles=["correlator"], cluster=FakeCluster())
    corr = agent.correlator
    assert corr is not None and agent.server is not None
    verdict: list[str | None] = [None]
    corr.stuck = lambda: verdict[0]  # type: ignore[method-assign]
    async with agent, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{agent.server.bound_port}/health/live"
        async with http.get(url) as r:
            assert r.status == 200
        verdict[0] = "folding of anomalies[0]: 7 records waiting"
        async with http.get(url) as r:
            assert r.status == 503
            body = await r.json()
        assert body["failures"] == {"correlator": verdict[0]}
        ready = url.replace("/health/live", "/health/ready")
        async with http.get(ready) as r:
            assert r.status == 200  # its dependencies answer: only a restart helps


async def test_a_consumer_stuck_in_its_handler_fails_the_agents_liveness(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The executor's consumer waits on a handler that never returns (as a call to a
    dependency with no timeout would): /health/live names it; it recovers once released."""
    import aiohttp

    doc = {"agent": {"stuck_after": "2s"}, "remediation": {"drain_timeout": "1s"}}
    settings = make_settings(kafka_bootstrap, topic_prefix, doc=doc)
    agent = Agent(settings, roles=["executor"], cluster=FakeCluster())
    assert agent.server is not None
    (consumer,) = [
        c for c in agent.components if isinstance(c, BatchConsumer) and c.name == "executor"
    ]
    release = asyncio.Event()

    async def hang(batch: list[Any]) -> None:
        await release.wait()

    consumer.handler = hang
    async with agent, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{agent.server.bound_port}/health/live"

        async def live() -> tuple[int, Any]:
            async with http.get(url) as r:
                return r.status, await r.json()

        assert (await live())[0] == 200
        await agent.bus.publish(agent.bus.topic("actions"), action())

        async def failing() -> bool:
            return (await live())[0] == 503

        await eventually(failing, 30, what="/health/live failing")
        status, body = await live()
        reason = body["failures"]["executor"]
        assert status == 503 and f"handling {agent.bus.topic('actions')}[" in reason, reason
        release.set()
        await eventually(lambda: consumer.stuck() is None, 15, what="unstuck")
        assert (await live())[0] == 200
