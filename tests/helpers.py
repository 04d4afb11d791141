"""Helpers shared by integration and end-to-end tests (real Kafka, real Prometheus)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.codec import decode
from agent.errors import InvalidEvent
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.settings import Settings, load_settings, parse_settings
from streams.bus import Bus
from streams.partitioning import decode_anomalies, topic_partitions

T = TypeVar("T")


async def started_bus(settings: Settings) -> tuple[Bus, Metrics]:
    """A started bus with the agent's topics created, and the metrics it counts into."""
    metrics = Metrics()
    bus = Bus(settings.kafka, metrics=metrics)
    await bus.start()
    await bus.create_topics()
    return bus, metrics


def make_settings(
    kafka_bootstrap: str,
    topic_prefix: str,
    *,
    prometheus_url: str = "http://127.0.0.1:1",
    doc: dict[str, Any] | None = None,
) -> Settings:
    """Settings for one test: its own topics, its own ports, fast windows."""
    base: dict[str, Any] = {
        "agent": {"cluster": "test"},
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic_prefix": topic_prefix,
            "partitions": 2,
        },
        "monitoring": {"prometheus": {"url": prometheus_url, "timeout": "3s"}},
        "server": {"port": 0},
    }
    for section, values in (doc or {}).items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return parse_settings(base, env={})


PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # Debian's prometheus package


def promtool_test(doc: dict[str, Any], where: Path) -> str | None:
    """Run a `promtool test rules` file (Prometheus' own engine, on series written out
    step by step): None when every expectation held, else what promtool printed."""
    assert Path(PROMTOOL).exists(), "promtool comes with Debian's prometheus package"
    path = where / "promtool-test.yml"
    path.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    return None if run.returncode == 0 else run.stdout + run.stderr


# Verbatim excerpts of the design reference (golden-path-self-healing.md): its agent
# config (section 6), PrometheusRule and Grafana dashboard (section 9), the formats and
# metric names this agent must meet.
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"


def reference_file(name: str) -> str:
    """One of the reference excerpts: config.yaml, self-healing-rules.yaml, dashboard.json."""
    return (REFERENCE / name).read_text()


def exposition_series(registry: CollectorRegistry) -> list[dict[str, str]]:
    """``promtool test rules`` input series holding, for ten minutes, every sample of the
    registry's text exposition: what a Prometheus scraping the agent would store."""
    series = []
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(sample.labels.items()))
            series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value}x10"})
    return series


def lab_settings(kafka_bootstrap: str, topic_prefix: str, prometheus_url: str) -> Settings:
    s = load_settings("config/lab.yaml", env={})
    return replace(
        s,
        kafka=replace(s.kafka, bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix),
        monitoring=replace(
            s.monitoring, prometheus=replace(s.monitoring.prometheus, url=prometheus_url)
        ),
        server=replace(s.server, port=0),
    )


class TopicReader:
    """Reads a whole topic from the beginning (no group), decoding into ``cls``."""

    def __init__(self, bootstrap: str, topic: str, cls: type[Any] | None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.cls = cls
        self.items: list[Any] = []
        self.raw: list[bytes | None] = []
        self.invalid: list[InvalidEvent] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        c = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            # Only what producers committed: exactly-once output must not be seen early.
            isolation_level="read_committed",
        )
        await c.start()
        try:
            partitions = await topic_partitions(self.bootstrap, self.topic)
        except BaseException:
            await c.stop()
            raise
        c.assign([TopicPartition(self.topic, p) for p in partitions])
        await c.seek_to_beginning()
        self._consumer = c
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    self.raw.append(r.value)
                    if self.cls is Anomaly and r.value is not None:
                        # Publishers batch anomalies per partition (streams.bus).
                        try:
                            self.items.extend(decode_anomalies(r.value)[0])
                        except InvalidEvent as err:
                            self.invalid.append(err)
                    elif self.cls is not None and r.value is not None:
                        try:
                            self.items.append(decode(self.cls, r.value))
                        except InvalidEvent as err:
                            self.invalid.append(err)
                    elif self.cls is None:
                        self.items.append(r.value)
            if batches:
                self._changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def wait_for(
        self, predicate: Callable[[list[Any]], bool], timeout: float = 60.0, what: str = ""
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.items):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or 'condition'} on "
                    f"{self.topic}; have {len(self.items)} items, last: {self.items[-1:]!r:.600}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
        return self.items


@contextlib.asynccontextmanager
async def readers(
    bootstrap: str, specs: dict[str, tuple[str, type[Any] | None]]
) -> AsyncIterator[dict[str, TopicReader]]:
    out = {name: TopicReader(bootstrap, topic, cls) for name, (topic, cls) in specs.items()}
    try:
        for r in out.values():
            await r.start()
        yield out
    finally:
        for r in out.values():
            await r.stop()


async def eventually(
    probe: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def prometheus_query_api(
    check: Callable[[str], bool],
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local HTTP server speaking Prometheus' instant-query API (``/api/v1/query``): its
    URL, and the reply it gives, which the test fills in. ``check``: what every query
    asked must satisfy (a query the test did not expect fails the request's assertion)."""
    reply: dict[str, Any] = {}

    async def query(request: web.Request) -> web.Response:
        assert check(request.query["query"]), request.query["query"]
        return web.json_response(reply)

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", reply
    finally:
        await runner.cleanup()
