"""External Kafka feeds written by a non-Python client (kcat, Debian's package): both
formats become anomalies on the anomalies topic; bad records become dead letters."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from hashlib import sha256
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agent.codec import encode
from agent.feeds import FeedNormaliser, feed_consumer
from agent.metrics import Metrics
from agent.models import Anomaly, DeadLetter, fingerprint
from streams.bus import Envelope
from streams.partitioning import MAX_REQUEST_BYTES
from tests.helpers import eventually, make_settings, readers, started_bus
from tests.unit.factories import anomaly as make_anomaly

pytestmark = pytest.mark.integration

KCAT = shutil.which("kcat") or "/usr/bin/kcat"


async def kcat_produce(bootstrap: str, topic: str, lines: Sequence[bytes]) -> None:
    proc = await asyncio.create_subprocess_exec(
        KCAT,
        "-P",
        "-b",
        bootstrap,
        "-t",
        topic,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"\n".join(lines) + b"\n"), 30)
    assert proc.returncode == 0, (out, err)


async def create(bootstrap: str, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 2, 1) for t in topics])
    finally:
        await admin.close()


def am_alert(name: str, service: str, status: str = "firing") -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": name, "namespace": "shop", "service": service},
        "annotations": {"description": "from a feed"},
        "startsAt": "2024-05-01T12:00:00Z",
    }


async def test_kcat_feeds_become_anomalies_and_garbage_dead_letters(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    # A missing kcat is a set-up error (scripts/system-deps.sh installs it), never a skip.
    assert shutil.which("kcat"), "kcat (Debian package) is required: run scripts/system-deps.sh"
    am_topic, an_topic = f"{topic_prefix}ext.alerts", f"{topic_prefix}ext.anomalies"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "detectors": {
                "feeds": [
                    {"topic": am_topic, "format": "alertmanager"},
                    {"topic": an_topic, "format": "anomaly"},
                ]
            }
        },
    )
    bus, _ = await started_bus(settings)
    await create(kafka_bootstrap, am_topic, an_topic)
    own = make_anomaly("queue-backlog", labels={"namespace": "ops", "service": "billing"})
    consumer = feed_consumer(settings, bus=bus, metrics=bus.metrics, from_beginning=True)
    assert consumer is not None
    try:
        async with (
            readers(
                kafka_bootstrap,
                {
                    "an": (bus.topic("anomalies"), Anomaly),
                    "dl": (bus.topic("dead-letter"), DeadLetter),
                },
            ) as r,
            consumer,
        ):
            webhook = {"version": "4", "alerts": [am_alert("DiskFull", "db")]}
            await kcat_produce(
                kafka_bootstrap,
                am_topic,
                [
                    orjson.dumps(webhook),
                    orjson.dumps(am_alert("Latency", "cart", "resolved")),
                    b"this is not json {",
                ],
            )
            await kcat_produce(
                kafka_bootstrap,
                an_topic,
                [
                    encode(own),
                    b'{"source": "prometheus", "name": "x"}',
                ],
            )
            await r["an"].wait_for(lambda xs: len(xs) >= 3, 30, "3 anomalies")
            await r["dl"].wait_for(lambda xs: len(xs) >= 2, 30, "2 dead letters")
            anomalies, letters = r["an"].items, r["dl"].items
    finally:
        await bus.stop()

    by_name = {a.name: a for a in anomalies}
    assert set(by_name) == {"DiskFull", "Latency", "queue-backlog"}
    disk = by_name["DiskFull"]
    assert (disk.source, disk.status, disk.labels["cluster"]) == ("feed", "firing", "test")
    assert disk.fingerprint == fingerprint("alertmanager", "DiskFull", disk.labels)
    assert by_name["Latency"].status == "resolved"
    billing = by_name["queue-backlog"]
    assert billing.fingerprint == own.fingerprint and billing.id == own.id
    assert billing.labels == {**own.labels, "cluster": "test"}  # normalised like any source
    by_topic = {d.source_topic: d for d in letters}
    assert set(by_topic) == {am_topic, an_topic}
    assert "not valid JSON" in by_topic[am_topic].error
    assert by_topic[am_topic].raw == "this is not json {"
    assert "fingerprint: Field required" in by_topic[an_topic].error
    assert all(d.consumer == "feeds" for d in letters)


async def test_a_feed_record_too_large_to_republish_is_dead_lettered_by_name(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A feed topic that takes 3 MB records (its owner raised max.message.bytes): an anomaly
    over the producer's 1 MiB is dead-lettered naming it, cut to fit; the records around it
    are republished."""
    feed = f"{topic_prefix}ext.big"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"detectors": {"feeds": [{"topic": feed, "format": "anomaly"}]}},
    )
    bus, _ = await started_bus(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        big_topic = NewTopic(feed, 1, 1, topic_configs={"max.message.bytes": "3000000"})
        await admin.create_topics([big_topic])
    finally:
        await admin.close()
    notes = {f"n{i:04}": "x" * 4000 for i in range(300)}  # 1.2 MB
    huge = replace(make_anomaly("huge"), annotations=notes)
    before, after = make_anomaly("before", t=1), make_anomaly("after", t=2)
    consumer = feed_consumer(settings, bus=bus, metrics=bus.metrics, from_beginning=True)
    assert consumer is not None
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=3_000_000)
    await producer.start()
    try:
        for a in (before, huge, after):
            await producer.send_and_wait(feed, encode(a))
    finally:
        await producer.stop()
    try:
        async with (
            readers(
                kafka_bootstrap,
                {
                    "an": (bus.topic("anomalies"), Anomaly),
                    "dl": (bus.topic("dead-letter"), DeadLetter),
                },
            ) as r,
            consumer,
        ):
            await r["an"].wait_for(lambda xs: len(xs) >= 2, 30, "2 anomalies")
            [letter] = await r["dl"].wait_for(lambda xs: len(xs) >= 1, 30, "the letter")
    finally:
        await bus.stop()
    assert [a.name for a in r["an"].items] == ["before", "after"]
    assert (letter.source_topic, letter.offset, letter.consumer) == (feed, 1, "feeds")
    assert "[0].<root>: the anomaly is " in letter.error
    assert letter.error.endswith(
        f"bytes as a Kafka record, over the limit of {MAX_REQUEST_BYTES} (name huge)"
    )
    assert letter.raw_dropped > 0 and letter.raw_sha256 == sha256(encode(huge)).hexdigest()


async def test_normaliser_publishes_keyed_by_the_correlation_key() -> None:
    settings = make_settings("127.0.0.1:1", "unused.")
    published: list[tuple[str, Any, str | None]] = []

    class Rec:
        async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
            published.extend(items)

    n = FeedNormaliser(settings, publish=Rec(), topic="anoms", metrics=Metrics())
    a = make_anomaly(labels={"cluster": "c1", "namespace": "shop", "service": "cart"})
    await n.handle([Envelope("feed", 0, 0, None, [a, a]), Envelope("feed", 0, 1, None, None)])
    assert published == [("anoms", a, "c1/shop/cart"), ("anoms", a, "c1/shop/cart")]


async def test_a_feeds_own_agent_alerts_and_heartbeat_are_counted_never_republished(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's own SREAgent* alerts on an Alertmanager-format feed became anomalies it
    might act on ("heal" itself, page about its own paging), and the heartbeat, which the
    webhook never publishes, opened an incident of its own."""
    feed = f"{topic_prefix}ext.own"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "detectors": {
                "feeds": [{"topic": feed, "format": "alertmanager"}],
                "alertmanager": {"heartbeat": {"alertname": "Watchdog"}},
            }
        },
    )
    bus, _ = await started_bus(settings)
    await create(kafka_bootstrap, feed)
    consumer = feed_consumer(settings, bus=bus, metrics=bus.metrics, from_beginning=True)
    assert consumer is not None
    caplog.set_level(logging.INFO, logger="agent.alerts")
    own = am_alert("SREAgentConsumerStuck", "sre-agent")
    try:
        async with (
            readers(kafka_bootstrap, {"an": (bus.topic("anomalies"), Anomaly)}) as r,
            consumer,
        ):
            first = {"alerts": [own, am_alert("Watchdog", "x"), am_alert("DiskFull", "db")]}
            await kcat_produce(
                kafka_bootstrap,
                feed,
                [orjson.dumps(first), orjson.dumps(own), orjson.dumps(am_alert("Last", "db"))],
            )
            await r["an"].wait_for(lambda xs: {"DiskFull", "Last"} <= {a.name for a in xs}, 30)
            value = bus.metrics.registry.get_sample_value

            def ignored(reason: str, name: str) -> float | None:
                labels = {"source": "feed", "reason": reason, "name": name}
                return value("sre_agent_ignored_alerts_total", labels)

            await eventually(lambda: ignored("own", "SREAgentConsumerStuck") == 2, 30)
            names = sorted(a.name for a in r["an"].items)
    finally:
        await bus.stop()
    assert names == ["DiskFull", "Last"]
    assert ignored("heartbeat", "Watchdog") == 1
    logged = [r.getMessage() for r in caplog.records if "ignoring alert" in r.getMessage()]
    assert len(logged) == 2, logged  # once per name
    assert any(m.startswith("feed: ignoring alert 'SREAgentConsumerStuck'") for m in logged)
