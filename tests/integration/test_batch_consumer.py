"""BatchConsumer retries on the real broker: after a failure mid-batch, only the events
from the failing one on are retried, so earlier ones are not handled (and their results
published) twice; a permanent failure is dead-lettered and the rest go on."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agent.codec import decode, encode, to_dict
from agent.errors import DependencyUnavailable, PermanentError
from agent.models import DeadLetter, Matcher, Silence, utcnow
from streams.bus import BatchConsumer, Bus, Envelope, Handler, handle_each
from streams.partitioning import MAX_REQUEST_BYTES, record_bytes
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration


def silence(i: int) -> Silence:
    now = utcnow()
    return Silence(
        id=f"s{i}",
        matchers=(Matcher("service", f"svc-{i}"),),
        starts_at=now,
        ends_at=now + timedelta(hours=1),
        created_by="test",
        comment="",
        created_at=now,
    )


def silences_consumer(
    bus: Bus, prefix: str, name: str, handler: Handler, **options: Any
) -> BatchConsumer:
    """A consumer of the silences topic, which has one partition: batches keep its order."""
    topics = {bus.topic("silences"): Silence}
    return BatchConsumer(
        bus, name=name, group_id=f"{prefix}{name}", topics=topics, handler=handler, **options
    )


async def test_a_failure_mid_batch_retries_only_the_rest(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")  # one partition: the batch keeps its order
    handled: list[str] = []
    failed_once: set[str] = set()

    async def one(env: Envelope) -> None:
        sid = env.value.id
        if sid == "s2" and sid not in failed_once:
            failed_once.add(sid)
            raise DependencyUnavailable("the cluster did not answer", retry_after=0.05)
        if sid == "s4":
            raise PermanentError("no such target")
        handled.append(sid)

    async def handler(batch: list[Envelope]) -> None:
        await handle_each(batch, one)

    for i in range(6):
        await bus.publish(topic, silence(i), key=f"s{i}")
    consumer = silences_consumer(bus, topic_prefix, "test", handler)
    try:
        async with (
            readers(kafka_bootstrap, {"dlq": (bus.topic("dead-letter"), DeadLetter)}) as r,
            consumer,
        ):
            await eventually(lambda: len(handled) >= 5, 60, what="the batch handled")
            letters = await r["dlq"].wait_for(lambda xs: len(xs) >= 1, 30, "a dead letter")
    finally:
        await bus.stop()
    # Each event took effect once: s0, s1 were not repeated after s2 failed; s2 was
    # retried and succeeded; s4 was dead-lettered; s5 went on.
    assert handled == ["s0", "s1", "s2", "s3", "s5"]
    assert len(letters) == 1 and "PermanentError: no such target" in letters[0].error


async def test_a_retry_after_of_an_hour_waits_at_most_max_retry_wait(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    attempts: list[float] = []

    async def handler(batch: list[Envelope]) -> None:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) <= 2:  # the batch, then the event alone
            raise DependencyUnavailable("429 Too Many Requests", retry_after=3600)

    consumer = silences_consumer(bus, topic_prefix, "patient", handler)
    consumer.max_retry_wait = 0.5
    await bus.publish(topic, silence(1), key="s1")
    try:
        async with consumer:
            await eventually(lambda: len(attempts) >= 3, 30, what="the retry")
    finally:
        await bus.stop()
    # The event alone failed with Retry-After: 3600; its retry came max_retry_wait later.
    assert 0.4 < attempts[2] - attempts[1] < 5, attempts


def stuck_gauge(bus: Bus, name: str) -> float | None:
    return bus.metrics.registry.get_sample_value("sre_agent_consumer_stuck", {"consumer": name})


async def test_a_handler_that_never_returns_is_stuck_and_a_slow_batch_is_not(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Liveness: a consumer is stuck when it has neither fetched nor finished an event for
    stuck_after; idling, and a batch longer than that of events each shorter, are not."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    release = asyncio.Event()
    sizes: list[int] = []
    verdicts: list[str | None] = []

    async def one(env: Envelope) -> None:
        if env.value.id == "hang":
            await release.wait()
        else:
            await asyncio.sleep(0.5)

    async def handler(batch: list[Envelope]) -> None:
        sizes.append(len(batch))
        await handle_each(batch, one)

    consumer = silences_consumer(bus, topic_prefix, "slow", handler, stuck_after=1.5)
    try:
        async with consumer:
            await asyncio.sleep(2.0)  # idle past stuck_after: fetching is progress
            assert consumer.stuck() is None and stuck_gauge(bus, "slow") == 0.0
            # One batch of 2.5 s: an event finishes every 0.5 s.
            await bus.publish_many([(topic, silence(i), f"s{i}") for i in range(5)])
            for _ in range(30):
                verdicts.append(consumer.stuck())
                await asyncio.sleep(0.1)
            await bus.publish(topic, replace(silence(9), id="hang"), key="hang")
            await eventually(lambda: consumer.stuck() is not None, 30, what="stuck reported")
            reason = consumer.stuck()
            assert reason is not None and f"handling {topic}[0]@5-5" in reason, reason
            assert "no progress for" in reason and stuck_gauge(bus, "slow") == 1.0
            release.set()
            await eventually(lambda: consumer.stuck() is None, 10, what="stuck cleared")
            assert stuck_gauge(bus, "slow") == 0.0
    finally:
        release.set()
        await bus.stop()
    assert sizes[0] == 5, sizes  # the events came as one batch, the premise of the test
    assert verdicts == [None] * len(verdicts)


async def test_caught_up_means_handled_what_was_written_before_it_asked(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A consumer without a group starts at the end, and caught_up(within) returns True
    only once every record written before the call has been through the handler, False
    while a handler holds one up past ``within``."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("incidents")  # two partitions
    handled: list[str] = []
    release = asyncio.Event()

    async def handler(batch: list[Envelope]) -> None:
        for env in batch:
            if env.value.id == "s5":
                await release.wait()
            handled.append(env.value.id)

    await bus.publish(topic, silence(0), key="k0")  # before the start: not read
    watch = BatchConsumer(
        bus,
        name="watch",
        group_id=None,
        topics={topic: Silence},
        handler=handler,
        from_beginning=False,
        max_records=1,
    )
    try:
        async with watch:
            for i in range(1, 5):
                await bus.publish(topic, silence(i), key=f"k{i}")
            assert await watch.caught_up(10.0)
            assert sorted(handled) == ["s1", "s2", "s3", "s4"]
            await bus.publish(topic, silence(5), key="k5")
            assert not await watch.caught_up(0.5)  # s5 is in the handler
            release.set()
            assert await watch.caught_up(10.0)
            assert handled[-1] == "s5"
        assert not await watch.caught_up(0.1)  # stopped: it can tell nothing
    finally:
        await bus.stop()


async def test_holds_names_the_owner_of_each_key_and_on_gained_follows_the_group(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two consumers in a group over two partitions: each key is held by exactly the one
    its records reach. When one leaves, the other gains its partition, is told so, and
    holds every key."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("incidents")  # two partitions
    got: dict[str, list[str]] = {"a": [], "b": []}
    gains = {"a": 0, "b": 0}

    def member(name: str) -> BatchConsumer:
        async def handler(batch: list[Envelope]) -> None:
            got[name].extend(env.key or "" for env in batch)

        async def gained() -> None:
            gains[name] += 1

        return BatchConsumer(
            bus,
            name=name,
            group_id=f"{topic_prefix}owners",
            topics={topic: Silence},
            handler=handler,
            on_gained=gained,
        )

    a, b = member("a"), member("b")
    keys = [f"key-{i}" for i in range(40)]
    try:
        async with a, b:
            await eventually(
                lambda: len(a.holding) == 1 and len(b.holding) == 1, 30, what="one partition each"
            )
            owners = {k: [n for n, c in (("a", a), ("b", b)) if c.holds(topic, k)] for k in keys}
            assert all(len(o) == 1 for o in owners.values()), owners
            for i, k in enumerate(keys):
                await bus.publish(topic, silence(i), key=k)
            await eventually(
                lambda: len(got["a"]) + len(got["b"]) == len(keys), 30, what="all read"
            )
            assert all(k in got[owners[k][0]] for k in keys), (owners, got)
            assert gains["a"] >= 1 and gains["b"] >= 1
            before = gains["a"]
            await b.stop()  # b leaves: a gains its partition
            await eventually(lambda: len(a.holding) == 2, 30, what="a holds both")
            assert gains["a"] > before
            assert all(a.holds(topic, k) for k in keys)
        assert not a.holds(topic, keys[0])  # stopped: holds nothing
    finally:
        await bus.stop()


async def test_a_failed_take_over_is_retried_and_holds_up_no_record(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    handled: list[str] = []
    calls = 0

    async def gained() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DependencyUnavailable("kafka: the re-analysis could not be published")

    async def handler(batch: list[Envelope]) -> None:
        handled.extend(env.value.id for env in batch)

    consumer = silences_consumer(bus, topic_prefix, "takeover", handler, on_gained=gained)
    try:
        await bus.publish(topic, silence(1))
        async with consumer:
            await eventually(lambda: handled == ["s1"], 30, what="the record handled")
            await eventually(lambda: calls >= 2, 30, what="the take-over retried")
            assert consumer.holding and calls == 2
    finally:
        await bus.stop()


async def test_a_rebalance_mid_batch_loses_the_commit_not_the_consumer(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two members hold a partition each and are mid-batch when a third joins and takes
    one of theirs: committing that batch is refused (the partition is another member's
    now). No member dies of it, and every record is handled at least once."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("incidents")  # two partitions
    group = f"{topic_prefix}rebalance"
    handled: dict[str, list[str]] = {}
    gate = asyncio.Event()
    in_batch: set[str] = set()

    def member(name: str) -> BatchConsumer:
        async def handler(batch: list[Envelope]) -> None:
            if name != "0-joiner":  # the slow batch the rebalance lands in
                in_batch.add(name)
                await gate.wait()
            handled.setdefault(name, []).extend(env.value.id for env in batch)

        return BatchConsumer(
            bus, name=name, group_id=group, topics={topic: Silence}, handler=handler
        )

    # Member ids start with the client id: "0-joiner" sorts first, so the range assignor
    # gives it partition 0 and moves partition 1 from b to a: both lose theirs.
    a, b, joiner = member("a"), member("b"), member("0-joiner")
    ids = [f"s{i}" for i in range(20)]
    try:
        async with a, b:
            await eventually(
                lambda: len(a.holding) == 1 and len(b.holding) == 1, 30, what="one partition each"
            )
            await bus.publish_many([(topic, silence(i), f"key-{i}") for i in range(20)])
            await eventually(lambda: in_batch == {"a", "b"}, 30, what="both mid-batch")
            async with joiner:
                await eventually(lambda: joiner.holding, 30, what="the joiner assigned")
                gate.set()
                await eventually(
                    lambda: {i for got in handled.values() for i in got} >= set(ids),
                    30,
                    what="every record handled",
                )
                # Past their batch's commit (or dead of it).
                await eventually(
                    lambda: all(
                        c.failure is not None or not c._doing.startswith(("handling", "committing"))
                        for c in (a, b)
                    ),
                    30,
                    what="a and b past their commit",
                )
                assert a.failure is None and b.failure is None and joiner.failure is None, (
                    a.failure,
                    b.failure,
                    joiner.failure,
                )
    finally:
        gate.set()
        await bus.stop()
    assert "0-joiner" in handled  # it re-read what the others had not committed


async def test_an_undecodable_record_too_big_for_a_letter_is_dead_lettered_cut(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Binary garbage of 800 KB is a record Kafka takes, but as a letter (base64) it would
    pass the producer's 1 MiB: the letter keeps what fits, and the consumer goes on past it
    instead of dying on it at every restart."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, metrics = await started_bus(settings)
    topic = bus.topic("silences")
    garbage = os.urandom(800_000)
    handled: list[str] = []

    async def handler(batch: list[Envelope]) -> None:
        handled.extend(env.value.id for env in batch)

    await bus.publish(topic, garbage, key="bad")
    await bus.publish(topic, silence(1), key="s1")
    consumer = silences_consumer(bus, topic_prefix, "big", handler)
    try:
        async with (
            readers(kafka_bootstrap, {"dlq": (bus.topic("dead-letter"), DeadLetter)}) as r,
            consumer,
        ):
            await eventually(lambda: handled == ["s1"] or consumer.failure, 30, what="s1")
            assert consumer.failure is None, consumer.failure
            [letter] = await r["dlq"].wait_for(lambda xs: len(xs) >= 1, 30, "the letter")
            assert consumer._consumer is not None
            await eventually(
                lambda: consumer._consumer.committed(TopicPartition(topic, 0)),  # type: ignore[union-attr]
                30,
                what="a commit",
            )
            assert await consumer._consumer.committed(TopicPartition(topic, 0)) == 2
    finally:
        await bus.stop()
    assert letter.raw_encoding == "base64" and letter.raw_dropped > 0
    assert garbage.startswith(base64.b64decode(letter.raw))
    assert len(base64.b64decode(letter.raw)) + letter.raw_dropped == len(garbage)
    assert letter.raw_sha256 == hashlib.sha256(garbage).hexdigest()
    assert (letter.partition, letter.offset) == (0, 0)
    counted = metrics.registry.get_sample_value(
        "sre_agent_dead_letters_total", {"topic": topic, "consumer": "big"}
    )
    assert counted == 1


async def test_a_dependency_away_for_several_attempts_is_waited_out(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """An event whose dependency fails its first five attempts without naming a wait (the
    cluster restarting) is handled at the sixth, not dead-lettered after the third."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    attempts: list[str] = []
    handled: list[str] = []

    async def handler(batch: list[Envelope]) -> None:
        attempts.append(batch[0].value.id)
        if len(attempts) <= 5:  # the batch, then the event alone four times
            raise DependencyUnavailable("kubernetes API: connection refused")
        handled.extend(env.value.id for env in batch)

    consumer = silences_consumer(bus, topic_prefix, "patient-too", handler)
    consumer.retry_base = 0.01  # the schedule itself is tested in tests/unit/test_bus_retry.py
    await bus.publish(topic, silence(1), key="s1")
    try:
        async with (
            readers(kafka_bootstrap, {"dlq": (bus.topic("dead-letter"), DeadLetter)}) as r,
            consumer,
        ):
            await eventually(
                lambda: handled or r["dlq"].items or consumer.failure, 30, what="an outcome"
            )
    finally:
        await bus.stop()
    assert handled == ["s1"] and not r["dlq"].items, r["dlq"].items
    assert attempts == ["s1"] * 6


async def test_a_handler_failure_dead_letters_the_bytes_as_read(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The letter of an event its handler refused holds the record's bytes as they were
    read (not the decoded value written again), and a tombstone's says it had none."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    # Valid, but not as agent.codec would write it: indented, fields in another order.
    doc = to_dict(silence(1))
    raw = orjson.dumps(dict(reversed(doc.items())), option=orjson.OPT_INDENT_2)
    assert raw != encode(decode(Silence, raw))

    async def handler(batch: list[Envelope]) -> None:
        raise PermanentError("no such target")

    await bus.publish(topic, raw, key="s1")
    await bus.publish(topic, None, key="s1")  # a tombstone
    consumer = silences_consumer(bus, topic_prefix, "verbatim", handler)
    try:
        async with (
            readers(kafka_bootstrap, {"dlq": (bus.topic("dead-letter"), DeadLetter)}) as r,
            consumer,
        ):
            letters = await r["dlq"].wait_for(lambda xs: len(xs) >= 2, 30, "two letters")
    finally:
        await bus.stop()
    by_offset = {x.offset: x for x in letters}
    assert by_offset[0].raw == raw.decode() and by_offset[0].raw_encoding == "utf-8"
    assert by_offset[1].raw == "" and "tombstone" in by_offset[1].error


async def test_a_record_kafka_refuses_for_its_size_dead_letters_its_event_at_once(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """An output over the producer's 1 MiB, or over its topic's own max.message.bytes (the
    broker refuses it), is never retried: the event that made it is dead-lettered at its
    first attempt alone, naming the topic and the size, and counted; the outputs after it,
    on the same partition, are written."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, metrics = await started_bus(settings)
    source, out = bus.topic("silences"), f"{topic_prefix}out"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(out, 1, 1, topic_configs={"max.message.bytes": "100000"})]
        )
    finally:
        await admin.close()
    inputs = [b"ok-1", b"200000", b"ok-2", b"2000000", b"ok-3"]  # a digit: that many bytes out
    calls: list[bytes] = []

    def output(value: bytes) -> bytes:
        return b"x" * int(value) if value.isdigit() else value

    async def handler(batch: list[Envelope]) -> None:
        calls.extend(env.value for env in batch)
        await bus.publish_many([(out, output(env.value), "k") for env in batch])

    consumer = BatchConsumer(
        bus,
        name="sizes",
        group_id=f"{topic_prefix}sizes",
        topics={source: lambda raw: raw},
        handler=handler,
    )
    for value in inputs:
        await bus.publish(source, value, key="k")
    try:
        async with (
            readers(
                kafka_bootstrap, {"out": (out, None), "dlq": (bus.topic("dead-letter"), DeadLetter)}
            ) as r,
            consumer,
        ):
            await r["out"].wait_for(lambda xs: b"ok-3" in xs, 30, "the last output")
            letters = await r["dlq"].wait_for(lambda xs: len(xs) >= 2, 30, "two letters")
            assert consumer.failure is None, consumer.failure
    finally:
        await bus.stop()
    assert list(dict.fromkeys(r["out"].items)) == [b"ok-1", b"ok-2", b"ok-3"]
    # Its batch, then itself alone once: a retry would call it up to RETRY_ATTEMPTS more.
    assert calls.count(b"200000") == calls.count(b"2000000") == 2
    by_raw = {x.raw: x for x in letters}
    assert set(by_raw) == {"200000", "2000000"}
    assert all(x.source_topic == source and x.consumer == "sizes" for x in letters)
    broker = record_bytes(output(b"200000"), b"k")
    assert by_raw["200000"].error == (
        f"RecordTooLarge: a record for {out} is {broker} bytes, refused by the broker as "
        "over the topic's max.message.bytes: not written"
    )
    client = record_bytes(output(b"2000000"), b"k")
    assert by_raw["2000000"].error == (
        f"RecordTooLarge: a record for {out} is {client} bytes, over the limit of "
        f"{MAX_REQUEST_BYTES}: not written"
    )
    counted = metrics.registry.get_sample_value("sre_agent_oversized_records_total", {"topic": out})
    assert counted == 2
