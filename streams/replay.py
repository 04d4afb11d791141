"""Reading a topic outside any consumer group (part of the Kafka boundary, like streams.bus).

``snapshot`` reads a topic from the beginning up to its end at the time of the call: how
the executor rebuilds its pending approvals from the compacted ``approvals`` topic at
start (a group's committed offsets would skip everything already seen), and how the CLI
lists approvals and finds an action's result. ``follow`` waits for a record matching a
predicate written after given offsets (the CLI waiting for an undo's result).

Records that do not decode are skipped with a warning: the consumers that own the topic
dead-letter them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agent.codec import decode
from agent.errors import DependencyUnavailable, InvalidEvent
from agent.models import Anomaly
from agent.settings import KafkaSection
from streams.bus import Envelope
from streams.partitioning import decode_anomalies, partition_for

log = logging.getLogger(__name__)

Offsets = dict[int, int]


# aiokafka's default (5 min).
METADATA_MAX_AGE_MS = 300_000
# A replay's consumer lives for one read. Subscribed to a topic its broker's metadata does
# not hold yet (created a moment ago, e.g. on a fresh broker at the agent's first start),
# aiokafka asks again only after metadata_max_age_ms: with the default it waited out the
# read's timeout, and the component's start failed with "topic not found".
REPLAY_METADATA_MAX_AGE_MS = 500


def groupless_consumer(
    kafka: KafkaSection,
    role: str,
    *,
    fetch_max_wait_ms: int | None = None,
    metadata_max_age_ms: int = METADATA_MAX_AGE_MS,
) -> AIOKafkaConsumer:
    """A consumer outside any group that sees committed records only (not yet started);
    ``fetch_max_wait_ms`` defaults to the Kafka section's."""
    if fetch_max_wait_ms is None:
        fetch_max_wait_ms = kafka.fetch_max_wait_ms
    return AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=f"{kafka.client_id}-{role}",
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms
        if fetch_max_wait_ms is None
        else fetch_max_wait_ms,
        metadata_max_age_ms=metadata_max_age_ms,
    )


async def _consumer(kafka: KafkaSection, topic: str, wait_s: float) -> AIOKafkaConsumer:
    consumer = groupless_consumer(kafka, "replay", metadata_max_age_ms=REPLAY_METADATA_MAX_AGE_MS)
    try:
        await consumer.start()
        # Subscribing (without a group: every partition is ours) makes the client fetch the
        # topic's metadata, which a topic created a moment ago may not be in yet.
        consumer.subscribe([topic])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not consumer.assignment():
            if loop.time() > deadline:
                raise DependencyUnavailable(f"kafka: topic {topic} not found")
            await asyncio.sleep(0.05)
    except KafkaError as err:
        await consumer.stop()
        raise DependencyUnavailable(f"kafka {kafka.bootstrap_servers}: {err}") from err
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def end_offsets(kafka: KafkaSection, topic: str, *, wait_s: float = 10.0) -> Offsets:
    consumer = await _consumer(kafka, topic, wait_s)
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


def _decode(cls: type[Any] | None, topic: str, raw: bytes | None) -> tuple[bool, Any]:
    if raw is None or cls is None:
        return True, raw
    try:
        return True, decode(cls, raw)
    except InvalidEvent as err:
        log.warning("%s: skipping a record that does not decode: %s", topic, err)
        return False, None


async def snapshot(
    kafka: KafkaSection,
    topic: str,
    cls: type[Any] | None,
    *,
    since: Mapping[int, int] | None = None,
    since_ms: int | None = None,
    wait_s: float = 30.0,
    key: str | None = None,
) -> list[Envelope]:
    """Every record from ``since`` (offsets; default: the beginning), or from the first
    record at or after the timestamp ``since_ms``, to the end as of now, in partition
    order; tombstones come through with value None. ``key``: only the partition Kafka's
    default partitioner puts that key on."""
    consumer = await _consumer(kafka, topic, wait_s)
    out: list[Envelope] = []
    try:
        parts = list(consumer.assignment())
        if key is not None:
            at = partition_for(key, len(parts))
            parts = [tp for tp in parts if tp.partition == at]
        ends = await consumer.end_offsets(parts)
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in parts})
            # No record that recent in a partition: nothing to read there.
            since = {tp.partition: ot.offset if ot else ends[tp] for tp, ot in found.items()}
        for tp in parts:
            start = (since or {}).get(tp.partition)
            if start is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        remaining = {tp for tp in parts if await consumer.position(tp) < ends[tp]}
        while remaining:
            if loop.time() > deadline:
                raise DependencyUnavailable(f"kafka: reading {topic} took over {wait_s:.0f}s")
            batches = await consumer.getmany(*remaining, timeout_ms=200)
            for tp, records in batches.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    ok, value = _decode(cls, topic, r.value)
                    if ok:
                        key = r.key.decode("utf-8", "replace") if r.key else None
                        out.append(Envelope(topic, tp.partition, r.offset, key, value))
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka: reading {topic}: {err}") from err
    finally:
        await consumer.stop()
    return out


# What a component that rebuilds from recent history is given: ``recent`` bound to a topic.
RecentSource = Callable[[float], Awaitable[Iterable[Envelope]]]

# Clocks differ: a report observed after a moment may have been written a little before it
# by the broker's clock.
CLOCK_SKEW = 60.0


async def reports_since(
    kafka: KafkaSection, topic: str, key: str, since: datetime
) -> list[Anomaly]:
    """The anomalies written to the anomalies ``topic`` for the correlation group ``key``
    (its partition) since about ``since``: what the sources reported of the group since
    then. Records that do not decode are skipped (the correlator dead-letters them)."""
    since_ms = int((since.timestamp() - CLOCK_SKEW) * 1000)
    out: list[Anomaly] = []
    for env in await snapshot(kafka, topic, None, since_ms=since_ms, key=key, wait_s=10.0):
        try:
            anomalies, _ = decode_anomalies(env.value)
        except InvalidEvent:
            continue
        out.extend(anomalies)
    return out


async def recent(
    kafka: KafkaSection, topic: str, cls: type[Any] | None, seconds: float, *, wait_s: float = 30.0
) -> list[Envelope]:
    """The records written in the last ``seconds`` (by record timestamp)."""
    since_ms = int((time.time() - seconds) * 1000)
    return await snapshot(kafka, topic, cls, since_ms=since_ms, wait_s=wait_s)


class SharedRead:
    """One read of a topic's recent records for the components that each replay it at
    start (the executor and the unresolved watch both replay the incidents topic). Each asks
    for its own window and gets the records of the longest, ``seconds``: a superset, which
    they accept (they keep the latest revision of each incident). The records are let go
    once ``users`` have had them. One that asks for more (the watch, over a long silence,
    known only once it runs) reads its own, rather than have every other read that far."""

    def __init__(self, read: RecentSource, seconds: float, users: int) -> None:
        self._read = read
        self.seconds = seconds
        self._left = users
        self._records: asyncio.Future[Iterable[Envelope]] | None = None

    async def __call__(self, seconds: float) -> Iterable[Envelope]:
        if seconds > self.seconds:
            self._done()
            return await self._read(seconds)
        if self._records is None:
            self._records = asyncio.ensure_future(self._read(self.seconds))
        records = self._records
        self._done()
        return await records

    def _done(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._records = None  # the next start, if any, reads afresh


async def follow(
    kafka: KafkaSection,
    topic: str,
    cls: type[Any],
    *,
    since: Mapping[int, int],
    until: Callable[[Any], bool],
    wait_s: float,
) -> Any | None:
    """The first record after ``since`` whose value satisfies ``until``, or None in time."""
    consumer = await _consumer(kafka, topic, wait_s)
    try:
        for tp in consumer.assignment():
            consumer.seek(tp, since.get(tp.partition, 0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    ok, value = _decode(cls, topic, r.value)
                    if ok and value is not None and until(value):
                        return value
        return None
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka: reading {topic}: {err}") from err
    finally:
        await consumer.stop()


async def read_range(
    kafka: KafkaSection,
    topic: str,
    partition: int,
    offsets: range,
    *,
    wait_s: float = 10.0,
    consumer: AIOKafkaConsumer | None = None,
) -> list[Any]:
    """The records of one partition at ``offsets`` (aiokafka ConsumerRecords, in order),
    read outside any group. Offsets that hold no record (transaction markers, compacted
    away, aborted) are skipped; stops at the end of the range, or of the log, or after
    ``wait_s``. ``consumer``: a started groupless consumer to use (and leave running)."""
    if not offsets:
        return []
    own = consumer is None
    consumer = consumer or groupless_consumer(kafka, "reread")
    tp = TopicPartition(topic, partition)
    out: list[Any] = []
    try:
        if own:
            await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, offsets.start)
        end = min(offsets.stop, (await consumer.end_offsets([tp]))[tp])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while await consumer.position(tp) < end:
            if loop.time() > deadline:
                raise DependencyUnavailable(f"kafka: {topic}[{partition}] not readable")
            batch = await consumer.getmany(tp, timeout_ms=200)
            out += [r for r in batch.get(tp, []) if r.offset in offsets]
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka {kafka.bootstrap_servers}: {err}") from err
    finally:
        if own:
            await consumer.stop()
    return out
