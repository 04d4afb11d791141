"""Replaying a topic by time on the real broker: how a restarted executor rebuilds the
actions of the policy's history window from action-results (record timestamps)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaProducer

from agent.codec import encode
from agent.models import ActionResult, Target, utcnow
from agent.settings import Settings
from streams.bus import Bus
from streams.replay import read_range, recent
from tests.helpers import make_settings, started_bus

pytestmark = pytest.mark.integration


def result(action_id: str) -> ActionResult:
    now = utcnow()
    return ActionResult(
        id=f"r-{action_id}",
        action_id=action_id,
        incident_id="i",
        incident_key="k",
        type="scale_up",
        target=Target(kind="Deployment", namespace="shop", name="checkout"),
        status="succeeded",
        outcome="unknown",
        message="scaled",
        started_at=now,
        finished_at=now,
        prior_state={"replicas": 2},
    )


async def topics_created(kafka_bootstrap: str, topic_prefix: str) -> tuple[Settings, Bus]:
    """Settings for a fresh prefix whose topics exist, and a (stopped) bus naming them."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    await bus.stop()
    return settings, bus


async def test_recent_reads_only_the_window(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings, bus = await topics_created(kafka_bootstrap, topic_prefix)
    topic = bus.topic("action-results")
    now_ms = int(time.time() * 1000)
    two_hours_ago = now_ms - 2 * 3600 * 1000
    old, new = result("old"), result("recent")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        # Partition 0 holds only an old action; partition 1 an old and a recent one.
        await producer.send_and_wait(topic, encode(old), partition=0, timestamp_ms=two_hours_ago)
        older = replace(old, id="r-old-2", action_id="old-2")
        await producer.send_and_wait(topic, encode(older), partition=1, timestamp_ms=two_hours_ago)
        await producer.send_and_wait(topic, encode(new), partition=1, timestamp_ms=now_ms)
    finally:
        await producer.stop()

    found = await recent(settings.kafka, topic, ActionResult, 3600)
    assert [e.value.action_id for e in found] == ["recent"]
    everything = await recent(settings.kafka, topic, ActionResult, 3 * 3600)
    assert sorted(e.value.action_id for e in everything) == ["old", "old-2", "recent"]


async def test_read_range_reads_one_partitions_offsets(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """How the correlator reads the records faust skipped (streams.delivery)."""
    settings, bus = await topics_created(kafka_bootstrap, topic_prefix)
    topic = bus.topic("anomalies")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, b"p0-%d" % i, partition=0)
        await producer.send_and_wait(topic, b"p1-0", partition=1)
    finally:
        await producer.stop()

    middle = await read_range(settings.kafka, topic, 0, range(3, 7))
    assert [(r.offset, r.value) for r in middle] == [(o, b"p0-%d" % o) for o in range(3, 7)]
    # A range past the end of the log stops at the end instead of waiting.
    tail = await read_range(settings.kafka, topic, 0, range(8, 20), wait_s=5)
    assert [r.offset for r in tail] == [8, 9]
    assert await read_range(settings.kafka, topic, 1, range(0)) == []
