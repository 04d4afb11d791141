"""The Kafka boundary (aiokafka). Only this module and :mod:`streams.correlator` import Kafka.

- :class:`Bus` owns one idempotent producer; ``publish_many`` sends a batch and waits for
  every delivery, so callers commit their input only after their output is durable. A
  record Kafka refuses for its size raises :class:`RecordTooLarge` (permanent: a consumer
  dead-letters the event that made it at once and goes on) instead of being retried.
- :class:`BatchConsumer` reads a group's topics in batches, decodes each record once and
  sends undecodable ones to the dead-letter topic with the error naming the field. A
  handler failure is retried per event; an event that still fails is dead-lettered with the
  error. Offsets are committed after the batch's outputs are produced, never before, and
  only for partitions still held: one a rebalance moved mid-batch is left to its new owner.
  A consumer whose loop makes no progress for ``agent.stuck_after`` reports itself stuck
  (see :meth:`BatchConsumer.stuck` and :func:`progressed`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    TopicAlreadyExistsError,
)

from agent.codec import decode, encode
from agent.errors import (
    AgentError,
    DependencyUnavailable,
    InvalidEvent,
    PartialBatch,
    RecordTooLarge,
    TransientError,
    task_failure,
)
from agent.metrics import Metrics
from agent.models import Anomaly, DeadLetter, new_id, utcnow
from agent.settings import KafkaSection
from agent.topics import CATALOG, topic
from streams.partitioning import MAX_REQUEST_BYTES, anomaly_records, partition_for, record_bytes

log = logging.getLogger(__name__)


# A dead letter stays under this encoded (the producer refuses a record over 1 MiB): a
# letter that cannot be written would stop its consumer at the record, at every restart.
DEAD_LETTER_BYTES = 900_000
# An error message is kept to this many characters (a validation error can list thousands).
DEAD_LETTER_ERROR_CHARS = 8_000


def dead_letter_record(
    *,
    source_topic: str,
    raw: bytes | None,
    error: str,
    consumer: str,
    partition: int | None = None,
    offset: int | None = None,
    limit: int = DEAD_LETTER_BYTES,
) -> DeadLetter:
    """The raw bytes kept verbatim (UTF-8 text, else base64) beside the error, as many of
    them as fit in ``limit`` encoded bytes: the rest is dropped from the end and counted in
    ``raw_dropped``; ``raw_sha256`` identifies the whole record in its source topic."""
    raw = raw or b""
    if len(error) > DEAD_LETTER_ERROR_CHARS:
        cut = len(error) - DEAD_LETTER_ERROR_CHARS
        error = f"{error[:DEAD_LETTER_ERROR_CHARS]}... ({cut} more characters)"
    try:
        raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        encoding = "base64"
    digest = hashlib.sha256(raw).hexdigest()
    keep = len(raw)
    for _ in range(8):
        if encoding == "utf-8":
            # A cut inside a character drops that character's bytes too.
            text = raw[:keep].decode("utf-8", "ignore")
            kept = len(text.encode("utf-8"))
        else:
            text, kept = base64.b64encode(raw[:keep]).decode(), keep
        letter = DeadLetter(
            id=new_id(),
            source_topic=source_topic,
            error=error,
            raw=text,
            raw_encoding=encoding,  # type: ignore[arg-type]
            failed_at=utcnow(),
            consumer=consumer,
            partition=partition,
            offset=offset,
            raw_dropped=len(raw) - kept,
            raw_sha256=digest,
        )
        over = len(encode(letter)) - limit
        if over <= 0 or kept == 0:
            return letter
        # A kept byte costs 1 to 6 encoded ones (base64 4/3, JSON escapes up to 6): drop
        # by the average, plus room for the digits raw_dropped gains.
        per = max(1.0, len(encode(text)) / kept)
        keep = max(0, kept - int(over / per) - 16)
    return dead_letter_record(
        source_topic=source_topic,
        raw=None,
        error=f"{error} (the record's {len(raw)} bytes dropped, sha256 {digest})",
        consumer=consumer,
        partition=partition,
        offset=offset,
    )


def refusal(topic_name: str, value: bytes | None, key: bytes | None) -> RecordTooLarge | None:
    """Why the producer refuses this record (None: it fits). A record that can never be
    written must not be retried: it held its consumer for every attempt and then was
    dead-lettered as if Kafka had been away."""
    if value is None:
        return None
    size = record_bytes(value, key)
    return RecordTooLarge(topic_name, size, MAX_REQUEST_BYTES) if size > MAX_REQUEST_BYTES else None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded record with where it came from, and its bytes as read (None: a tombstone,
    or an envelope not read from Kafka) for a dead letter to keep verbatim."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: Any
    raw: bytes | None = field(default=None, repr=False, compare=False)


class Bus:
    def __init__(self, kafka: KafkaSection, *, metrics: Metrics, name: str = "agent") -> None:
        self.kafka = kafka
        self.metrics = metrics
        self.name = name
        self._producer: AIOKafkaProducer | None = None
        self._renewing = asyncio.Lock()

    def topic(self, name: str) -> str:
        return topic(self.kafka.topic_prefix, name)

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = await self._started_producer()

    async def _started_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            client_id=f"{self.kafka.client_id}-{self.name}",
            enable_idempotence=True,
            acks="all",
            linger_ms=self.kafka.linger_ms,
            max_request_size=MAX_REQUEST_BYTES,  # what sources check their anomalies against
        )
        try:
            await producer.start()
        except KafkaError as err:
            await producer.stop()
            raise DependencyUnavailable(f"kafka {self.kafka.bootstrap_servers}: {err}") from err
        return producer

    async def _renew(self, old: AIOKafkaProducer) -> None:
        """Replace the producer by a new one (a new producer id). After the broker refused
        one of its records, the idempotent producer had still counted that record in the
        partition's sequence: every later record to the partition failed with
        OutOfOrderSequenceNumber until the process restarted."""
        async with self._renewing:
            current = self._producer is old
            if not current:
                return  # another publish renewed it already, or the bus stopped
            self._producer = await self._started_producer()
        try:
            await old.stop()
        except KafkaError as err:
            log.warning("%s: stopping the replaced producer: %s", self.name, err)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("Bus is not started")
        return self._producer

    async def ping(self) -> str | None:
        """Readiness: None when the cluster answers a metadata request, else the reason."""
        try:
            await self.producer.client.fetch_all_metadata()
        except (KafkaError, RuntimeError) as err:
            return f"kafka: {err}"
        return None

    async def publish(self, topic_name: str, event: Any, key: str | None = None) -> None:
        await self.publish_many([(topic_name, event, key)])

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        """Send all, then wait for all deliveries (one round of batching, not one per event).

        Anomalies bound for one partition travel as :class:`AnomalyBatch` records of up to
        ``MAX_BATCH`` anomalies and about ``MAX_BATCH_BYTES``, in order: the correlator
        pays its per-record cost once per batch, which is 5-10x its per-anomaly cost. A
        lone anomaly stays a plain record.
        """
        if not items:
            return
        producer = self.producer
        try:
            records = await self._records(items)
        except KafkaError as err:
            raise DependencyUnavailable(f"kafka publish failed: {err}") from err
        # Checked before anything is sent: the retry of a caller would repeat those sent.
        for topic_name, value, key, _ in records:
            if (too_large := refusal(topic_name, value, key)) is not None:
                raise too_large
        futures = []
        try:
            for topic_name, value, key, partition in records:
                futures.append(
                    await producer.send(topic_name, value=value, key=key, partition=partition)
                )
        except KafkaError as err:
            raise DependencyUnavailable(f"kafka publish failed: {err}") from err
        results = await asyncio.gather(*futures, return_exceptions=True)
        for (topic_name, value, key, _), result in zip(records, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):  # the topic's limit is lower
                await self._renew(producer)
                size = record_bytes(value or b"", key)
                raise RecordTooLarge(topic_name, size, None) from result
        for result in results:
            if isinstance(result, OutOfOrderSequenceNumber):
                await self._renew(producer)  # see _renew; the retry goes through
            if isinstance(result, KafkaError):
                raise DependencyUnavailable(f"kafka publish failed: {result}") from result
            if isinstance(result, BaseException):
                raise result

    async def _records(
        self, items: Sequence[tuple[str, Any, str | None]]
    ) -> list[tuple[str, bytes | None, bytes | None, int | None]]:
        """(topic, value, key, partition) of each record to send."""
        out: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        anomalies: dict[str, list[tuple[Anomaly, str]]] = {}  # per topic, in order
        for topic_name, event, key in items:
            k = key if key is not None else getattr(event, "key", None)
            if isinstance(event, Anomaly) and k:
                anomalies.setdefault(topic_name, []).append((event, k))
                continue
            value: bytes | None = None  # for None: a tombstone on a compacted topic
            if event is not None:
                value = event if isinstance(event, bytes) else encode(event)
            out.append((topic_name, value, k.encode() if k else None, None))
        for topic_name, keyed in anomalies.items():
            count = len(await self.producer.partitions_for(topic_name))
            out += [(topic_name, v, rk, p) for p, v, rk in anomaly_records(keyed, count)]
        return out

    async def dead_letter(
        self,
        *,
        source_topic: str,
        raw: bytes | None,
        error: str,
        consumer: str,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        """Publish a dead letter; counted once it is written. It always fits in a record
        (see :func:`dead_letter_record`): only Kafka being away makes this raise."""
        letter = dead_letter_record(
            source_topic=source_topic,
            raw=raw,
            error=error,
            consumer=consumer,
            partition=partition,
            offset=offset,
        )
        await self.publish(self.topic("dead-letter"), letter)
        log.warning("dead-lettered %s[%s]@%s: %s", source_topic, partition, offset, letter.error)
        self.metrics.dead_letters.labels(topic=source_topic, consumer=consumer).inc()

    async def create_topics(self) -> list[str]:
        """Create every catalog topic that does not exist yet; returns the ones created."""
        return await create_topics(self.kafka)


def topics_of(topics: Sequence[str], prefix: str) -> list[str]:
    """The topics named with ``prefix`` (one run's own), sorted; none for an empty prefix,
    which would name every topic of the cluster."""
    return sorted(t for t in topics if prefix and t.startswith(prefix))


async def delete_topics(kafka: KafkaSection) -> list[str]:
    """Delete every topic named with ``kafka.topic_prefix``; returns them. For a run's own
    prefix only (the lab's): each run's ~35 partitions would otherwise stay in the broker
    until it runs out of partitions."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers, client_id=f"{kafka.client_id}-admin"
    )
    try:
        await admin.start()
        ours = topics_of(await admin.list_topics(), kafka.topic_prefix)
        if ours:
            await admin.delete_topics(ours)
        return ours
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka {kafka.bootstrap_servers}: {err}") from err
    finally:
        await admin.close()


async def create_topics(kafka: KafkaSection, names: Sequence[str] | None = None) -> list[str]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers, client_id=f"{kafka.client_id}-admin"
    )
    try:
        await admin.start()
    except KafkaError as err:
        await admin.close()
        raise DependencyUnavailable(f"kafka {kafka.bootstrap_servers}: {err}") from err
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        for spec in CATALOG:
            if names is not None and spec.name not in names:
                continue
            full = spec.full_name(kafka.topic_prefix)
            if full in existing:
                continue
            new = NewTopic(
                name=full,
                num_partitions=spec.partitions or kafka.partitions,
                replication_factor=kafka.replication_factor,
                topic_configs=spec.configs(),
            )
            try:
                await admin.create_topics([new])
                created.append(full)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another replica: that is the goal anyway
    finally:
        await admin.close()
    return created


# A retriable handler failure is retried this many times per event, waiting RETRY_BASE
# seconds and doubling, at most max_retry_wait (30 s): 1+2+4+8+16+30, about a minute,
# outlasts a broker restart; a longer outage dead-letters the event and moves on.
RETRY_ATTEMPTS = 7
RETRY_BASE = 1.0


def retry_wait(failed: int, hint: float | None, *, base: float, cap: float) -> float:
    """Seconds to wait after attempt ``failed`` (1-based) failed: ``base`` doubling each
    time, no less than the dependency's Retry-After ``hint`` when it gave one, at most
    ``cap`` (an hour's Retry-After would hold the partition)."""
    return min(max(base * 2.0 ** (failed - 1), hint or 0.0), cap)


Handler = Callable[[list[Envelope]], Awaitable[None]]
# The running consumer's heartbeat, for handlers deep in a batch (see progressed).
_beat: ContextVar[Callable[[], None] | None] = ContextVar("sre_agent_beat", default=None)


def progressed() -> None:
    """A handler finished one unit of work (an event, an analysis): the consumer running it
    is making progress, however long its whole batch takes. Outside a consumer, nothing."""
    beat = _beat.get()
    if beat is not None:
        beat()


# Bytes -> value; raises InvalidEvent naming the problem (the record is dead-lettered).
Decoder = Callable[[bytes], Any]


def committable(
    offsets: Mapping[TopicPartition, int],
    assignment: frozenset[TopicPartition],
    skipped: frozenset[TopicPartition] = frozenset(),
) -> dict[TopicPartition, int]:
    """The offsets of the batch to commit: only partitions this member still holds (a
    rebalance may have given one to another member, which re-reads it from the last commit;
    aiokafka refuses the commit anyway), and none whose records it skipped as revoked (it
    may hold that partition again by now: committing would pass over them)."""
    return {tp: offset for tp, offset in offsets.items() if tp in assignment and tp not in skipped}


def _decoder(spec: type[Any] | Decoder) -> Decoder:
    if isinstance(spec, type):
        return lambda raw: decode(spec, raw)
    return spec


async def handle_each(
    batch: Sequence[Envelope], one: Callable[[Envelope], Awaitable[None]]
) -> None:
    """Handle a batch in order, one event at a time; a failure raises PartialBatch saying
    how many events took effect, so the consumer retries only the rest."""
    for i, env in enumerate(batch):
        try:
            await one(env)
        except Exception as err:  # wrapped with the progress and re-raised
            raise PartialBatch(i, err) from err
        progressed()


class BatchConsumer:
    """Consume ``topics`` in group ``group_id`` and hand batches over.

    ``group_id`` None: no group. The consumer reads every partition and commits nothing,
    for a follower that starts where it is told (``from_beginning``) each time: a group per
    process start would be left behind at each restart, until Kafka expires its offsets.
    Its position is fixed when :meth:`start` returns, so a caller that then reads what was
    written before (a seed) misses nothing in between, and :meth:`caught_up` tells a caller
    when everything written before it asked has been handled.

    ``topics`` maps a topic to the event type its records decode into, or to a decode
    function (bytes -> value, raising InvalidEvent) for records in a foreign format.

    ``stuck_after``: liveness. A loop that has neither fetched nor finished an event (see
    :func:`progressed`) for this long is stuck, whatever the cause (a handler awaiting
    something that never answers, a commit that never returns); 0: never. It must exceed
    the longest single event a handler may legitimately take.

    ``on_gained``: awaited in the consuming loop, before the next batch is handled, each
    time the group gives this consumer partitions it did not hold (the first assignment
    too), for a component that acts on what its partitions' owner must do. A failure is
    logged and retried at the next round; the batches are handled meanwhile.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        name: str,
        group_id: str | None,
        topics: Mapping[str, type[Any] | Decoder],
        handler: Handler,
        max_records: int = 500,
        from_beginning: bool = True,
        max_attempts: int = RETRY_ATTEMPTS,
        stuck_after: float = 0.0,
        on_gained: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.name = name
        self.group_id = group_id
        self.types = dict(topics)
        self._decoders = {t: _decoder(spec) for t, spec in topics.items()}
        self.handler = handler
        self.max_records = max_records
        self.from_beginning = from_beginning
        self.max_attempts = max_attempts
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.assigned = asyncio.Event()
        self.stuck_after = stuck_after
        self.max_retry_wait = 30.0  # seconds between attempts at one event, at most
        self.retry_base = RETRY_BASE  # seconds before the first retry, doubling after
        self._last_beat = time.monotonic()
        self._doing = "starting"
        self._busy = False  # records fetched and not yet handled
        self.on_gained = on_gained
        self._held: frozenset[TopicPartition] = frozenset()  # the assignment on_gained saw
        self._skipped: set[TopicPartition] = set()  # revoked mid-batch: not to commit
        bus.metrics.consumer_stuck.labels(consumer=name).set_function(
            lambda: float(self.stuck() is not None)
        )

    async def start(self) -> None:
        if self._task is not None:
            return
        k = self.bus.kafka
        consumer = AIOKafkaConsumer(
            *self.types,
            bootstrap_servers=k.bootstrap_servers,
            group_id=self.group_id,
            client_id=f"{k.client_id}-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 3),
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
        except KafkaError as err:
            await consumer.stop()
            raise DependencyUnavailable(f"kafka {k.bootstrap_servers}: {err}") from err
        if self.group_id is None:
            try:
                for tp in consumer.assignment():
                    await consumer.position(tp)  # "latest" resolved now, not at first fetch
            except KafkaError as err:
                await consumer.stop()
                raise DependencyUnavailable(f"kafka {k.bootstrap_servers}: {err}") from err
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")

    async def caught_up(self, within: float) -> bool:
        """Whether everything written to the topics before this call has been handled,
        waiting up to ``within`` s for it. For a consumer without a group, which reads
        every partition; False when it is not running or Kafka does not answer."""
        consumer, task = self._consumer, self._task
        if consumer is None or task is None or task.done():
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            ends = await consumer.end_offsets(list(consumer.assignment()))
            while True:
                at = {tp: await consumer.position(tp) for tp in ends}
                # Positions move when a fetch hands records over, before they are handled.
                if not self._busy and all(at[tp] >= end for tp, end in ends.items()):
                    return True
                if loop.time() >= deadline or task.done():
                    return False
                await asyncio.sleep(0.01)
        except KafkaError as err:
            log.warning("%s: cannot tell how far it has read: %s", self.name, err)
            return False

    @property
    def holding(self) -> frozenset[TopicPartition]:
        """The partitions the consuming loop last saw assigned (what on_gained follows)."""
        return self._held

    def holds(self, topic: str, key: str) -> bool:
        """Whether this consumer is assigned the partition of ``topic`` that Kafka's default
        partitioner puts ``key`` on: whether this replica owns that key now."""
        consumer = self._consumer
        if consumer is None:
            return False
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return False  # no metadata yet: nothing is known to be held
        return TopicPartition(topic, partition_for(key, len(partitions))) in consumer.assignment()

    async def stop(self) -> None:
        """Stop intake, let the in-flight batch finish and commit, then leave the group."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, timeout=30)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception as err:  # noqa: BLE001 - reported through .failure; still close
                log.warning("%s had failed: %r", self.name, err)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    @property
    def failure(self) -> BaseException | None:
        """Why the consuming loop died, if it did (see agent.runtime.run_until_signalled)."""
        return task_failure(self._task)

    def _heartbeat(self) -> None:
        self._last_beat = time.monotonic()

    def stuck(self) -> str | None:
        """Why this consumer is stuck (no progress for ``stuck_after``), or None.
        /health/live reports it, so Kubernetes restarts the process; the gauge
        sre_agent_consumer_stuck shows it."""
        task = self._task
        if self.stuck_after <= 0 or task is None or task.done():
            return None
        quiet = time.monotonic() - self._last_beat
        if quiet < self.stuck_after:
            return None
        return f"{self._doing}: no progress for {quiet:.0f}s (stuck_after {self.stuck_after:g}s)"

    async def __aenter__(self) -> BatchConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        _beat.set(self._heartbeat)  # this task's context: the handlers it awaits see it
        while not self._stopping.is_set():
            self._heartbeat()
            self._doing = "fetching"
            self._busy = False
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                self._busy = bool(batches)  # no await since the fetch: see caught_up
            except KafkaError as err:
                log.error("%s: fetch failed, retrying: %s", self.name, err)
                await asyncio.sleep(1.0)
                continue
            assignment = frozenset(consumer.assignment())
            if assignment:
                self.assigned.set()
            if assignment != self._held:
                gained = assignment - self._held
                if gained and self.on_gained is not None:
                    self._doing = "taking over " + ", ".join(
                        f"{tp.topic}[{tp.partition}]" for tp in sorted(gained)
                    )
                    try:
                        await self.on_gained()
                        self._held = assignment
                    except Exception as err:  # noqa: BLE001 - retried; the batch goes on
                        # Kept as not yet taken over: the next round tries again.
                        log.warning(
                            "%s: taking over partitions failed, retrying: %r", self.name, err
                        )
                        await asyncio.sleep(1.0)
                else:
                    self._held = assignment
            if not batches:
                continue
            offsets: dict[TopicPartition, int] = {}
            good: list[Envelope] = []
            for tp, records in batches.items():
                decoder = self._decoders[tp.topic]
                for rec in records:
                    offsets[tp] = rec.offset + 1
                    key = rec.key.decode("utf-8", "replace") if rec.key else None
                    if rec.value is None:  # tombstone (compacted topics): handlers decide
                        good.append(Envelope(tp.topic, tp.partition, rec.offset, key, None))
                        continue
                    try:
                        value = decoder(rec.value)
                    except InvalidEvent as err:
                        await self.bus.dead_letter(
                            source_topic=tp.topic,
                            raw=rec.value,
                            error=str(err),
                            consumer=self.name,
                            partition=tp.partition,
                            offset=rec.offset,
                        )
                        continue
                    good.append(Envelope(tp.topic, tp.partition, rec.offset, key, value, rec.value))
            self._doing = "handling " + ", ".join(
                f"{tp.topic}[{tp.partition}]@{records[0].offset}-{records[-1].offset}"
                for tp, records in batches.items()
                if records
            )
            self._skipped = set()
            await self._handle(self._owned(good))
            self.bus.metrics.processed.labels(consumer=self.name).inc(len(good))
            self._heartbeat()
            if self.group_id is None:
                continue  # nothing to commit to
            # No await between reading the assignment and commit's own check of it.
            kept = committable(offsets, frozenset(consumer.assignment()), frozenset(self._skipped))
            if len(kept) < len(offsets):
                lost = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in offsets if tp not in kept)
                log.warning(
                    "%s: %s moved to another member mid-batch: not committed", self.name, lost
                )
            if not kept:
                continue
            self._doing = "committing " + ", ".join(f"{tp.topic}[{tp.partition}]" for tp in kept)
            try:
                await consumer.commit(kept)
            except (CommitFailedError, IllegalStateError) as err:
                # A rebalance took the partitions; the new owner re-reads from the last commit
                # and idempotent handling makes the repeat harmless (at least once).
                log.warning("%s: commit lost to a rebalance: %s", self.name, err)

    async def _handle(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        done = 0
        try:
            await self.handler(batch)
            return
        except PartialBatch as err:
            done = err.done  # those took effect: retrying them would repeat their output
            log.warning(
                "%s: batch of %d failed at event %d (%r); retrying the rest one by one",
                self.name,
                len(batch),
                done,
                err.cause,
            )
        except Exception as err:  # noqa: BLE001 - isolate the bad event below, keep running
            log.warning(
                "%s: batch of %d failed (%r); retrying one by one", self.name, len(batch), err
            )
        for env in batch[done:]:
            if self._owned([env]):
                await self._handle_one(env)
            progressed()

    def _owned(self, batch: list[Envelope]) -> list[Envelope]:
        """The events of partitions this member still holds. One a rebalance gave to another
        member since the fetch is left to it (it re-reads from the last commit): handling it
        here too would be a second effect. Its partition is then not committed."""
        consumer = self._consumer
        if self.group_id is None or consumer is None:
            return batch
        held = consumer.assignment()
        revoked = {TopicPartition(e.topic, e.partition) for e in batch} - held
        self._skipped |= revoked
        return [e for e in batch if TopicPartition(e.topic, e.partition) in held]

    async def _handle_one(self, env: Envelope) -> None:
        for attempt in range(1, self.max_attempts + 1):
            try:
                try:
                    await self.handler([env])
                except PartialBatch as wrapped:
                    raise wrapped.cause from wrapped
                return
            except AgentError as err:
                if not err.retriable or attempt == self.max_attempts:
                    await self._dead(env, err)
                    return
                progressed()  # an attempt that answered, if with a failure
                hint = err.retry_after if isinstance(err, TransientError) else None
                await asyncio.sleep(
                    retry_wait(attempt, hint, base=self.retry_base, cap=self.max_retry_wait)
                )
            except Exception as err:
                log.exception("%s: handler failed on %s@%s", self.name, env.topic, env.offset)
                await self._dead(env, err)
                return

    async def _dead(self, env: Envelope, err: BaseException) -> None:
        if isinstance(err, RecordTooLarge):  # counted once per event, not per attempt
            self.bus.metrics.oversized_records.labels(topic=err.topic).inc()
        error = f"{type(err).__name__}: {err}"
        raw = env.raw
        if raw is None and env.value is None:
            error += " (a tombstone: the record has no value)"
        elif raw is None:  # not read from Kafka: the value is all there is
            try:
                raw = encode(env.value)
            except Exception as bad:  # noqa: BLE001 - the letter still goes, with the error
                error += f" (value not encodable: {bad!r})"
        await self.bus.dead_letter(
            source_topic=env.topic,
            raw=raw,
            error=error,
            consumer=self.name,
            partition=env.partition,
            offset=env.offset,
        )
