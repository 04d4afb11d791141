"""The PromQL detector against a real Prometheus scraping a test exporter."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import web

from agent.detector import PromQLDetector
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.prom import PromClient
from agent.settings import Settings
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


def detector_settings(
    prometheus: Any, kafka_bootstrap: str, patterns: list[dict[str, Any]]
) -> Settings:
    """Settings with these patterns against the test Prometheus (no topics used)."""
    return make_settings(
        kafka_bootstrap, "unused.", prometheus_url=prometheus.url, doc={"patterns": patterns}
    )


class Recorder:
    """Collects what the detector publishes (the bus is tested on its own elsewhere)."""

    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)


class Exporter:
    def __init__(self, service: str) -> None:
        self.service = service
        self.value = 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Exporter:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            body = f'queue_depth{{service="{self.service}",namespace="ops"}} {self.value}\n'
            return web.Response(text=body)

        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_pattern_fires_after_for_and_resolves(prometheus: Any, kafka_bootstrap: str) -> None:
    service = f"svc{uuid.uuid4().hex[:6]}"
    settings = detector_settings(
        prometheus,
        kafka_bootstrap,
        [
            {
                "name": "queue-backlog",
                "severity": "warning",
                "for": "3s",
                "condition": f'queue_depth{{service="{service}"}} > 5',
            }
        ],
    )
    pattern = settings.patterns[0]
    rec, metrics = Recorder(), Metrics()
    prom = PromClient(prometheus.url, timeout=3)
    detector = PromQLDetector(settings, prom=prom, publish=rec, topic="t", metrics=metrics)
    loop = asyncio.get_running_loop()
    try:
        async with Exporter(service) as exp:
            prometheus.add_target(service, f"127.0.0.1:{exp.port}")
            await prometheus.wait_for_target_up_async(service, 30)
            exp.value = 10
            await prometheus.wait_for_query_async(f'queue_depth{{service="{service}"}} > 5', 30)
            first_seen = loop.time()
            assert await detector.evaluate_once(pattern) == []  # pending: for 3s not held yet
            while not rec.items:
                assert loop.time() - first_seen < 20, "never fired"
                await asyncio.sleep(0.5)
                await detector.evaluate_once(pattern)
            assert loop.time() - first_seen >= 3, "fired before `for` elapsed"
            fired = rec.items[0]
            assert (fired.status, fired.name, fired.severity) == (
                "firing",
                "queue-backlog",
                "warning",
            )
            assert fired.labels["service"] == service and fired.labels["cluster"] == "test"
            assert fired.value == 10
            exp.value = 0
            while rec.items[-1].status != "resolved":
                assert loop.time() - first_seen < 60, "never resolved"
                await asyncio.sleep(0.5)
                await detector.evaluate_once(pattern)
            fps = {a.fingerprint for a in rec.items}
            assert fps == {fired.fingerprint}  # one instance, one fingerprint throughout
            assert sum(a.status == "resolved" for a in rec.items) == 1
            await detector.evaluate_once(pattern)
            assert sum(a.status == "resolved" for a in rec.items) == 1  # resolved once only
    finally:
        prometheus.remove_target(service)
        await prom.close()


async def test_query_failures_are_counted_and_survived(
    prometheus: Any, kafka_bootstrap: str
) -> None:
    settings = detector_settings(
        prometheus, kafka_bootstrap, [{"name": "broken", "condition": "rate(up[5x])"}]
    )
    metrics, rec = Metrics(), Recorder()
    prom = PromClient(prometheus.url, timeout=2)
    down = PromClient("http://127.0.0.1:1", timeout=1)
    try:
        bad = PromQLDetector(settings, prom=prom, publish=rec, topic="t", metrics=metrics)
        assert await bad.evaluate_once(settings.patterns[0]) == []
        gone = PromQLDetector(settings, prom=down, publish=rec, topic="t", metrics=metrics)
        assert await gone.evaluate_once(settings.patterns[0]) == []
    finally:
        await prom.close()
        await down.close()
    value = metrics.registry.get_sample_value
    assert (
        value("sre_agent_detector_errors_total", {"pattern": "broken", "reason": "invalid_query"})
        == 1
    )
    assert (
        value("sre_agent_detector_errors_total", {"pattern": "broken", "reason": "unavailable"})
        == 1
    )
    assert rec.items == []


async def test_a_bug_in_one_evaluation_does_not_end_the_patterns_loop(
    prometheus: Any, kafka_bootstrap: str
) -> None:
    """An unexpected error (not an AgentError) used to end the pattern's loop for good: the
    pattern was never evaluated again, and nothing said so."""
    settings = detector_settings(
        prometheus,
        kafka_bootstrap,
        [{"name": "always", "interval": "1s", "condition": "vector(1) > 0"}],
    )

    class FlakyRecorder(Recorder):
        calls = 0

        async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise TypeError("injected: a bug in the publishing path")
            await super().publish_many(items)

    metrics, rec = Metrics(), FlakyRecorder()
    prom = PromClient(prometheus.url, timeout=3)
    detector = PromQLDetector(settings, prom=prom, publish=rec, topic="t", metrics=metrics)
    await detector.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not rec.items:
            assert loop.time() < deadline, "the pattern was not evaluated after the bug"
            await asyncio.sleep(0.2)
    finally:
        await detector.stop()
        await prom.close()
    assert rec.items[0].name == "always" and rec.items[0].status == "firing"
    errors = metrics.detector_errors.labels(pattern="always", reason="internal_error")
    assert errors._value.get() == 1
    assert detector.failure is None


async def test_a_pattern_loop_that_died_is_reported_and_stop_still_returns(
    prometheus: Any, kafka_bootstrap: str
) -> None:
    settings = detector_settings(
        prometheus,
        kafka_bootstrap,
        [
            {"name": "dies", "interval": "1s", "condition": "vector(1) > 0"},
            {"name": "lives", "interval": "1s", "condition": "vector(1) > 0"},
        ],
    )
    prom = PromClient(prometheus.url, timeout=3)
    detector = PromQLDetector(settings, prom=prom, publish=Recorder(), topic="t", metrics=Metrics())
    evaluate = detector._evaluate_logged

    async def outside_an_evaluation(pattern: Any, at: Any) -> None:
        if pattern.name == "dies":
            raise RuntimeError("injected: the loop itself broke")
        await evaluate(pattern, at)

    detector._evaluate_logged = outside_an_evaluation  # type: ignore[method-assign]
    await detector.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while detector.failure is None:
            assert loop.time() < deadline, "the dead loop was not reported"
            await asyncio.sleep(0.1)
        assert "the loop itself broke" in str(detector.failure)
    finally:
        await asyncio.wait_for(detector.stop(), 10)  # raised the loop's error before
        await prom.close()
