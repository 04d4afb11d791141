"""The correlator: a faust-streaming app folding anomalies into incidents.

Hot path is batched (see shared perf notes): the agent hands a folding task whatever
arrived while it folded the last batch, plus the records the log already held when the batch
began (a backlog; at most ``batch_size`` records and about ``batch_bytes``); each batch
decodes once, reads each group's state once, folds the pure
:func:`streams.correlation.correlate_batch`, writes each changed group once to the
changelogged table and emits only incident *changes*.

Table writes name their changelog partition explicitly (the partition the anomaly came
from) instead of relying on faust's "current event", which inside a batch is only the last
event and could file state under another partition. Changelog writes and incident events go
straight to faust's producer (the transaction manager under exactly-once), as faust's own
``Topic.publish_message`` does, but without its per-message ``FutureMessage``, send buffer
and sensor bookkeeping, which cost more than the correlation itself (~60-190 us a message).

A record carries one anomaly or an :class:`AnomalyBatch` of one partition's anomalies
(detectors publish per evaluation): faust's per-record cost is paid once per batch, not per
anomaly. Each group must live on one partition: an anomaly found on another partition than
Kafka's default partitioner gives its correlation key (e.g. from a librdkafka producer's
CRC32 partitioner) is re-published keyed by that key instead of being folded in the wrong
place. One bad anomaly in a batch is dead-lettered alone; the rest are folded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP, Message

from agent.codec import decode, encode, from_obj
from agent.errors import InvalidEvent, cancel_and_wait, task_failure
from agent.metrics import Metrics
from agent.models import Anomaly, Fact, Incident, Mitigation, utcnow
from agent.settings import Settings
from agent.topics import topic
from streams.bus import dead_letter_record
from streams.correlation import (
    MAX_AHEAD,
    NO_MARKS,
    CorrelationRules,
    Keyed,
    Marks,
    Positions,
    Resolutions,
    as_published,
    correlate_batch,
    earliness,
    expire,
    hand_over,
    last_resolutions,
    lateness,
    mark_mitigating,
    note_resolutions,
    owned_resolutions,
    publish_due,
    release,
    repeat_due,
)
from streams.delivery import DeliveryGuard, Stall
from streams.faust_kafka import App
from streams.incident_json import IncidentEncoder
from streams.partitioning import (
    MAX_REQUEST_BYTES,
    decode_anomalies,
    decode_mitigation,
    partition_for,
    partitioner,
    record_bytes,
    topic_partitions,
    value_room,
)
from streams.replay import groupless_consumer, read_range
from streams.silences import SilenceStore
from streams.topology import (
    EMPTY,
    FactIndex,
    InhibitRule,
    as_anomaly,
    blinds,
    build_index,
    facts_of,
    moves,
    placements,
    spent,
)
from streams.view import CompactedView

# Headers of an anomaly re-published to the partition of the group it belongs to: the
# group key, and where it was absorbed. The receiving worker folds it there as it is told,
# so a record is routed once and never ping-pongs while workers' views differ.
ROUTE_KEY, ROUTE_ABSORBED_BY = "sre-agent-group", "sre-agent-absorbed-by"

log = logging.getLogger(__name__)

# Table values larger than this are zlib-compressed: an incident of thousands of members
# (2.2 MB of JSON for 5000 pods) passed the record limit, and its group's state could not
# be written at all; compressed it is ~14 times smaller. Smaller values, nearly all, are
# not worth the CPU.
COMPRESS_ABOVE = 64 * 1024
_ZLIB = b"\x00z"  # no JSON document starts with a NUL byte


@dataclass(frozen=True, slots=True)
class Stored:
    """A table value: the group's incident, the partition its state belongs to, when this
    incident (not the group: a new incident has its own timers) was last published and
    whether a newer state of it is held back (group_wait, group_interval)."""

    partition: int
    incident: Incident | None
    emitted_at: datetime | None = None
    pending: bool = False

    def dump(self, encoded: bytes | None = None) -> bytes:
        """``encoded``: the incident's JSON when the caller already has it."""
        if encoded is None:
            encoded = encode(self.incident) if self.incident is not None else b"null"
        emitted = orjson.dumps(self.emitted_at, option=orjson.OPT_UTC_Z)
        pending = b"true" if self.pending else b"false"
        # "x": whose timers these are, so a reader can tell them from a state written
        # before they were kept per incident.
        owner = orjson.dumps(self.incident.id if self.incident is not None else None)
        raw = b'{"p":%d,"e":%s,"q":%s,"x":%s,"i":%s}' % (
            self.partition,
            emitted,
            pending,
            owner,
            encoded,
        )
        return _ZLIB + zlib.compress(raw, 1) if len(raw) > COMPRESS_ABOVE else raw

    @staticmethod
    def load(raw: bytes) -> Stored:
        if raw.startswith(_ZLIB):
            raw = zlib.decompress(raw[len(_ZLIB) :])
        doc = orjson.loads(raw)
        inc = from_obj(Incident, doc["i"]) if doc.get("i") is not None else None
        emitted = datetime.fromisoformat(doc["e"].replace("Z", "+00:00")) if doc.get("e") else None
        emitted, pending = timers_of(inc, emitted, bool(doc.get("q")), doc.get("x", _LEGACY))
        return Stored(partition=int(doc["p"]), incident=inc, emitted_at=emitted, pending=pending)


_LEGACY = object()  # a state written when timers were kept per group


def timers_of(
    inc: Incident | None, emitted_at: datetime | None, pending: bool, owner: object
) -> tuple[datetime | None, bool]:
    """The stored timers as ``inc``'s: (emitted_at, pending).

    Timers of another incident are none of this one's: it counts as never published,
    and pending while open, so it goes out at group_wait as "open" rather than never.
    A state written before timers were kept per incident names no owner; its timers are
    another incident's when they predate this one's opening (the group's earlier
    incident was published, this one not yet), else this one's."""
    if inc is None or emitted_at is None:
        return emitted_at, pending
    mine = emitted_at >= inc.opened_at if owner is _LEGACY else owner == inc.id
    return (emitted_at, pending) if mine else (None, pending or inc.status != "resolved")


@dataclass(frozen=True, slots=True)
class Refetched:
    """A record faust skipped, read directly (see :mod:`streams.delivery`), shaped like the
    faust events the correlator folds. Acking it acks it with faust's consumer, as the
    events after it are, so faust commits past it once it is folded."""

    message: Message
    value: bytes | None
    consumer: Any

    @staticmethod
    def of(record: Any, consumer: Any) -> Refetched:
        message = Message(
            record.topic,
            record.partition,
            record.offset,
            record.timestamp / 1000,
            record.timestamp_type,
            list(record.headers or ()),
            record.key,
            record.value,
            record.checksum,
            tp=TP(record.topic, record.partition),
        )
        return Refetched(message, record.value, consumer)

    def ack(self) -> None:
        self.consumer.ack(self.message)


def remove_empty_tree(root: Path) -> None:
    """Remove ``root`` if it holds only directories (faust's data directory: the tables are
    in memory); leave it as it is otherwise."""
    with contextlib.suppress(OSError):  # not empty, or already gone
        for d in sorted(root.rglob("*"), reverse=True):
            d.rmdir()
        root.rmdir()


def rules_from(settings: Settings) -> CorrelationRules:
    c = settings.correlation
    return CorrelationRules(
        group_by=c.group_by,
        resolve_timeout=c.resolve_timeout,
        reopen_window=c.reopen_window,
        group_wait=c.group_wait,
        group_interval=c.group_interval,
        repeat_interval=c.repeat_interval,
        late_bound=c.late_bound,
        member_retention=c.member_retention,
        max_members=c.max_members,
    )


class Correlator:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        batch_size: int = 2000,
        tick_interval: float = 1.0,
        linger: float = 0.5,
        batch_bytes: int = 16 << 20,
        watch_interval: float = 2.0,
    ) -> None:
        self.settings = settings
        # How often the watchdog looks at recovery and liveness (see _watch); tests that
        # wait for its verdict shorten it.
        self.watch_interval = watch_interval
        self.metrics = metrics
        self.rules = rules_from(settings)
        self.batch_size = batch_size
        self.linger = linger
        self.batch_bytes = batch_bytes
        k = settings.kafka
        prefix = k.topic_prefix
        self.anomalies_name = topic(prefix, "anomalies")
        self.app = App(
            f"{prefix}correlator",
            broker=f"kafka://{k.bootstrap_servers}",
            store="memory://",
            # faust creates its data directory at start, by default in the working
            # directory: a read-only root filesystem (deploy/agent.yaml) refused it. Tables
            # are in memory; nothing but the empty directory is ever written.
            datadir=str(Path(tempfile.gettempdir()) / "{conf.name}-data"),
            web_enabled=False,
            key_serializer="raw",
            value_serializer="raw",
            topic_partitions=k.partitions,
            topic_replication_factor=k.replication_factor,
            table_standby_replicas=0,
            broker_session_timeout=k.session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.1, k.session_timeout_ms / 3000),
            broker_commit_interval=0.2,
            consumer_auto_offset_reset="earliest",
            processing_guarantee=settings.correlation.processing_guarantee,
            producer_linger_ms=k.linger_ms,
            producer_partitioner=partitioner,
            # aiokafka holds one open batch per partition and makes send() wait while a full
            # one is in flight; at faust's 16 KiB default that is every 2-5 incidents.
            producer_max_batch_size=512 * 1024,
            producer_max_request_size=MAX_REQUEST_BYTES,  # what its size checks measure against
            # A rebalance waits until the batch in hand is processed and acked, and commits
            # it, before partitions move and tables recover. Without that, a batch finished
            # during the recovery had its state overwritten by the replayed changelog while
            # its offsets were committed: the fail-over test lost members that way once the
            # consumer's long-poll was short enough to have records in hand at every rebalance.
            stream_wait_empty=True,
        )
        self.app.fetch_max_wait_ms = k.fetch_max_wait_ms
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.anomalies = self.app.topic(self.anomalies_name, partitions=k.partitions, **raw)
        self.incidents_name = topic(prefix, "incidents")
        self.incidents = self.app.topic(self.incidents_name, **raw)
        self.dlq = self.app.topic(topic(prefix, "dead-letter"), **raw)
        self.table = self.app.Table(
            "incident-state", partitions=k.partitions, key_type=bytes, value_type=bytes
        )
        self._changelog_name: str = self.table.changelog_topic.get_topic_name()
        self.app.agent(self.anomalies, name=f"{prefix}correlate")(self._agent)
        self.app.timer(tick_interval)(self._tick)
        self.table.on_recover(self._recovered)
        self._owned: set[int] = set()
        self._pruned: frozenset[int] = frozenset()  # the assignment last forgotten down to
        # The last resolution of each service per owned partition: the MTTR gauge's source.
        self._resolutions: Resolutions = {}
        self.recoveries = 0  # rebalance recoveries this worker completed
        # Under exactly-once too: faust's fetch loop is the same there. Offsets without a
        # record (commit markers of producers writing transactionally, aborted records)
        # are holes as well: reading one finds nothing, on a consumer kept for the purpose.
        self._guard = DeliveryGuard()
        self._rereader: AIOKafkaConsumer | None = None
        self._reread_lock = asyncio.Lock()
        self._stall = Stall(stall_s=10.0)
        # Liveness (see Stall): partitions unmoved past stuck_after while records wait.
        self.stuck_after = settings.correlation.stuck_after
        self._progress = Stall(stall_s=self.stuck_after, rearm=False)
        self._quiet: dict[Any, int] = {}  # tp -> offsets before this hold no record
        self._stuck: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._started = False
        self._failure: BaseException | None = None
        # Decoded view of the table. An entry is used only while the table holds the very
        # bytes object it was decoded from, so a recovery from the changelog (new objects)
        # can never be shadowed by a stale decode.
        self._decoded: dict[str, tuple[bytes, Stored]] = {}
        self._json = IncidentEncoder()
        self._positions: Positions = {}  # members' positions per group, kept between batches
        self._changelog: list[tuple[int, bytes, bytes]] = []  # written, not yet sent
        self._persisted: dict[str, float] = {}  # key -> monotonic time of its last write
        self.persist_interval = min(30.0, self.rules.resolve_timeout / 10)
        self.max_event_members = settings.correlation.max_event_members
        self.processed = 0  # anomalies folded, for benchmarks and tests
        self.partitions = k.partitions  # the real count is read from the topic at start
        self.silences = SilenceStore(k, topic(prefix, "silences"))
        c = settings.correlation
        self.topology = c.topology
        self.inhibit_rules = tuple(InhibitRule.from_section(r) for r in c.inhibit_rules)
        self.facts_topic = self.app.topic(topic(prefix, "correlation-facts"), **raw)
        self.facts = CompactedView(
            k,
            topic(prefix, "correlation-facts"),
            partial(decode, Fact),
            name="facts",
            # Fresh enough for routing (the timer hands over what arrived before a fact was
            # seen); a 10 ms long-poll on a mostly idle topic cost ~5% of a busy worker.
            fetch_max_wait_ms=100,
        )
        self._index: tuple[tuple[int, int], FactIndex] = ((-1, -1), EMPTY)
        # fingerprint -> the fact this worker published last, while it is live: a retraction
        # is forgotten once sent (an unknown closed fact is not sent), and one no incident
        # produces any more once every view has expired it (see _prune_facts). It grew by
        # every fact ever seen while partitions stayed owned.
        self._facts_sent: dict[str, Fact] = {}
        # key -> (incident id, revision) found to have no fact-source members: a revision's
        # member set is fixed (a refresh keeps it), so its refreshes need no second look.
        self._factless: dict[str, tuple[str, int]] = {}
        self._blind_shown: set[tuple[str, str]] = set()  # (source, cluster) shown blind

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self._started:
            self.partitions = len(
                await topic_partitions(self.settings.kafka.bootstrap_servers, self.anomalies_name)
            )
            await self.silences.start()
            await self.facts.start()
            await self.app.start()
            self._watchdog = asyncio.create_task(
                self._watch(self.watch_interval), name="correlator-watch"
            )
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await cancel_and_wait(self._watchdog)
            await self.app.stop()
            if self._rereader is not None:
                await self._rereader.stop()
                self._rereader = None
            await self.facts.stop()
            await self.silences.stop()
            remove_empty_tree(Path(self.app.conf.datadir))

    async def __aenter__(self) -> Correlator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- processing ------------------------------------------------------------------------------
    async def _agent(self, stream: Any) -> None:
        """Hand events to a folding task, which folds whatever has arrived while it folded
        the previous batch: one event at low load (no waiting), large batches under
        load.

        Not faust's ``take_events``: its buffer hand-off can append an event after a batch
        was copied out and before the buffer is cleared, then ack it unprocessed; the
        fail-over test lost a member that way. Here the batch is swapped out with no await
        in between, so an event is in exactly one batch.

        Manual acks (``noack``): an event is acked only after its state and incident events
        are handed to Kafka (faust flushes the producer before it commits acked offsets).
        """
        pending: list[Any] = []
        ready, room = asyncio.Event(), asyncio.Event()
        room.set()

        async def gather() -> None:
            """Let the fetcher hand over the records the log held when this batch began
            (for the partition being read; a record per few loop steps), for up to
            ``linger`` s or ``batch_bytes``: a backlog is folded in large batches, whose
            per-group costs (encoding, changelog write, event) are paid once per group, not
            once per small batch. At the head of the log, nothing waits; records that
            arrive meanwhile go to the next batch rather than keep this one open."""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.linger
            first = pending[-1].message
            goal = self._highwater(first.topic, first.partition)
            size = counted = 0
            while len(pending) < self.batch_size and loop.time() < deadline:
                for event in pending[counted:]:
                    size += len(event.value or b"")
                counted = len(pending)
                last = pending[-1].message
                if size >= self.batch_bytes or last.offset + 1 >= goal:
                    return
                if (last.topic, last.partition) != (first.topic, first.partition):
                    return  # another partition's turn: its backlog is not known here
                await asyncio.sleep(0.001)

        async def fold_batches() -> None:
            nonlocal pending
            try:
                while True:
                    await ready.wait()
                    await gather()
                    events, pending = pending, []  # atomically: nothing joins a taken batch
                    ready.clear()
                    room.set()
                    await self.process(events)
                    await self._drain_producer_buffer()
                    for event in events:
                        event.ack()
                    self._observe_progress(events)
            except Exception as err:
                self._fail(err)
                raise
            finally:
                room.set()  # never leave the stream waiting on a folder that is gone

        worker = asyncio.create_task(fold_batches(), name="correlator-fold")
        try:
            async for event in stream.noack().events():
                # faust can drop a record around a rebalance (see streams.delivery).
                msg = event.message
                hole = self._guard.hole(msg.tp, msg.offset, self._committed(msg.tp))
                if hole:
                    found, _ = await self._reread(msg.topic, msg.partition, hole)
                    # Nothing found: transaction markers or aborted records, not news.
                    log.log(
                        logging.WARNING if found else logging.DEBUG,
                        "%s: faust skipped offsets %d-%d; read %d records directly",
                        msg.tp,
                        hole.start,
                        hole.stop - 1,
                        len(found),
                    )
                    pending.extend(found)
                while True:
                    if worker.done():  # a crash of the folding task surfaces here
                        worker.result()
                        raise RuntimeError("the correlator's folding task ended")
                    if len(pending) < self.batch_size:
                        break
                    room.clear()  # back-pressure on the stream until a batch is taken
                    await room.wait()
                pending.append(event)
                ready.set()
        except Exception as err:
            self._fail(err)
            raise
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def _observe_progress(self, events: list[Any]) -> None:
        """How far behind the folding is: each record's age now that its changes are handed
        to Kafka, and what is left of each partition it read. Consumer lag in records is
        what tells an operator the correlator is falling behind before latency shows it."""
        now = time.time()
        last: dict[int, Any] = {}
        lag = self.metrics.correlation_lag
        for event in events:
            msg = event.message
            if msg.timestamp:
                lag.observe(max(0.0, now - msg.timestamp))
            prev = last.get(msg.partition)
            if prev is None or msg.offset > prev.offset:  # re-read holes come out of order
                last[msg.partition] = msg
        for partition, msg in last.items():
            if highwater := self._highwater(msg.topic, msg.partition):
                backlog = max(0, highwater - msg.offset - 1)
                self.metrics.correlator_backlog.labels(partition=str(partition)).set(backlog)

    @property
    def failure(self) -> BaseException | None:
        """Why processing died, if it did: faust's agent is then gone for good, and the
        worker must be restarted (see agent.runtime.run_until_signalled). A dead view of
        silences or facts counts too: it would go on folding with stale ones."""
        return (
            self._failure
            or self.silences.failure
            or self.facts.failure
            or task_failure(self._watchdog)
        )

    def stuck(self) -> str | None:
        """Why this worker is stuck (records wait and nothing has moved for
        ``stuck_after``), or None. /health/live reports it, so Kubernetes restarts it."""
        return self._stuck

    async def _watch(self, every: float = 2.0) -> None:
        """Un-stick faust's table recovery when it stops moving (see Stall), and keep
        :meth:`stuck` current."""
        while True:
            await asyncio.sleep(every)
            recovery: Any = getattr(self.app.tables, "recovery", None)
            if recovery is None:
                raise RuntimeError("faust changed: TableManager.recovery is gone")
            if recovery.in_recovery:
                offsets = dict(recovery.active_offsets)
                remaining = dict(recovery.active_remaining())
                await self._unstall(offsets, remaining)
            else:
                self._stall.reset()
                offsets, remaining = self._waiting()
            if self.stuck_after > 0:
                await self._check_progress(offsets, remaining, recovering=recovery.in_recovery)

    async def _unstall(self, offsets: dict[Any, int], remaining: dict[Any, int]) -> None:
        for tp, offset in self._stall.observe(offsets, remaining, time.monotonic()):
            log.warning(
                "recovery of %s has not moved for %.0f s (at offset %d, %d records to "
                "go): reading it again from offset %d",
                tp,
                self._stall.stall_s,
                offset - 1,
                remaining[tp],
                offset,
            )
            self.metrics.recovery_stalls.inc()
            await self.app.consumer.seek(tp, offset)

    def _waiting(self) -> tuple[dict[Any, int], dict[Any, int]]:
        """Per owned anomalies partition: the last offset committed (-1: none) and the
        records after it, less those known to hold no record (see _check_progress)."""
        offsets: dict[Any, int] = {}
        remaining: dict[Any, int] = {}
        for tp in self._assignment():
            if tp.topic != self.anomalies_name:
                continue
            highwater = self._highwater(tp.topic, tp.partition)  # 0: nothing known waits
            committed = self._committed(tp)
            start = max(committed or 0, self._quiet.get(tp, 0))
            offsets[tp] = (committed or 0) - 1
            remaining[tp] = max(0, highwater - start)
        for tp in [tp for tp in self._quiet if tp not in offsets]:
            del self._quiet[tp]
        return offsets, remaining

    async def _check_progress(
        self, offsets: dict[Any, int], remaining: dict[Any, int], *, recovering: bool
    ) -> None:
        unmoved = self._progress.observe(offsets, remaining, time.monotonic())
        reasons = []
        for tp, offset in unmoved:
            if not recovering:
                # Offsets past the commit may hold no record at all: commit markers of an
                # upstream transactional producer. Only a record waiting counts; a bounded
                # look, from where the last one stopped.
                start = max(offset, self._quiet.get(tp, 0))
                look = range(start, start + min(remaining[tp], 100))
                try:
                    found, reached = await self._reread(tp.topic, tp.partition, look)
                except Exception as err:  # noqa: BLE001 - a probe must not end the worker
                    log.warning("could not look at %s offsets %s: %s", tp, look, err)
                    continue
                if not found:
                    # Up to where it could read: an open transaction's records (past the
                    # last stable offset) are not known to be empty yet.
                    self._quiet[tp] = max(start, min(look.stop, reached))
                    continue
            what = "table recovery of" if recovering else "folding of"
            reasons.append(
                f"{what} {tp.topic}[{tp.partition}]: {remaining[tp]} records waiting, "
                f"offset {offset} unmoved for {self.stuck_after:.0f}s or more"
            )
        stuck = "; ".join(reasons) or None
        if stuck and not self._stuck:
            log.error("correlator stuck, reported on /health/live: %s", stuck)
        elif self._stuck and not stuck:
            log.warning("correlator moving again")
        self._stuck = stuck
        self.metrics.correlator_stuck.set(1 if stuck else 0)

    def _fail(self, err: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = err
        log.critical("correlator processing failed; this worker must restart", exc_info=err)
        # faust waits, before a rebalance or stop, until every event it handed out is acked;
        # those of the failed batch never will be, so stop() hung forever. Unacked, they are
        # not committed either: the next owner of the partition reads them again.
        self.app.conf.stream_wait_empty = False

    async def process(self, events: Iterable[Any]) -> None:
        by_partition: dict[int, list[Keyed]] = defaultdict(list)
        # partition -> (index of its first item in by_partition, topic, offset) per record
        records: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
        index = self.fact_index(utcnow())
        for event in events:
            msg = event.message
            # (.get: a record of only a mitigation or dead letters must not add an empty fold)
            first = len(by_partition.get(msg.partition, ()))
            records[msg.partition].append((first, msg.topic, msg.offset))
            try:
                mitigation = decode_mitigation(event.value)
                if mitigation is not None:
                    await self._mitigating(msg.partition, mitigation)
                    continue
                anomalies, problems = decode_anomalies(event.value)
            except InvalidEvent as err:
                await self._dead(msg.topic, msg.partition, msg.offset, event.value, str(err))
                continue
            for problem, raw in problems:
                await self._dead(msg.topic, msg.partition, msg.offset, raw, problem)
            now = utcnow()
            routed = self._routed(msg)
            for a in anomalies:
                ahead = earliness(a, now) if routed is None else None
                if ahead is not None:
                    await self._dead(
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        encode(a),
                        f"observed_at: {ahead:.0f}s ahead of the correlator's clock, beyond "
                        f"the {MAX_AHEAD:.0f}s allowed for clock skew",
                    )
                    continue
                age = lateness(a, now, self.rules) if routed is None else None
                if age is not None:
                    # Too old to change an incident now; kept where nothing is lost.
                    self.metrics.late_anomalies.labels(name=a.name).inc()
                    await self._dead(
                        msg.topic,
                        msg.partition,
                        msg.offset,
                        encode(a),
                        f"late anomaly: observed {age:.0f}s ago, beyond "
                        f"correlation.late_bound {self.rules.late_bound:.0f}s",
                    )
                    continue
                for key, marks in placements(
                    a, routed, index, self.rules, topology=self.topology, inhibit=self.inhibit_rules
                ):
                    if partition_for(key, self.partitions) != msg.partition:
                        # Wrong partition for this group: route it to the right one.
                        await self._route(key, a, marks.absorbed_by)
                        continue
                    by_partition[msg.partition].append((key, a, marks))
                    if marks is not NO_MARKS:
                        self._count_marks(marks)
        for partition, keyed in by_partition.items():
            refused = await self._fold(partition, keyed)
            if refused:
                await self._refuse(partition, keyed, records[partition], refused)
            self.metrics.processed.labels(consumer="correlator").inc(len(keyed))
            self.processed += len(keyed)

    # --- topology and inhibition ------------------------------------------------------------
    def fact_index(self, now: datetime) -> FactIndex:
        """The active facts, rebuilt when the view changed and at most once a second."""
        stamp = (self.facts.version, int(now.timestamp()))
        if self._index[0] != stamp:
            ttl = self.rules.resolve_timeout
            self.facts.forget([k for k, f in self.facts.items.items() if spent(f, now, ttl)])
            stamp = (self.facts.version, int(now.timestamp()))
            if not self.facts.items:
                self._index = (stamp, EMPTY)
            else:
                index = build_index(
                    self.facts.items.values(),
                    now,
                    self.rules.resolve_timeout,
                    self.inhibit_rules,
                )
                self._index = (stamp, index)
        return self._index[1]

    async def _reread(
        self, topic: str, partition: int, offsets: range
    ) -> tuple[list[Refetched], int]:
        """The records at ``offsets``, read directly, and the offset reading them reached."""
        async with self._reread_lock:  # the stream and the watchdog share the consumer
            if self._rereader is None:
                # Kept: a transactional producer upstream leaves a hole (a marker) per
                # commit, and a consumer per hole cost tens of milliseconds each.
                self._rereader = groupless_consumer(self.settings.kafka, "reread")
                await self._rereader.start()
            records = await read_range(
                self.settings.kafka, topic, partition, offsets, consumer=self._rereader
            )
            reached = await self._rereader.position(TopicPartition(topic, partition))
        return [Refetched.of(r, self.app.consumer) for r in records], int(reached)

    def _committed(self, tp: Any) -> int | None:
        """The partition's committed offset as faust last read or wrote it (None if none)."""
        committed = getattr(self.app.consumer, "_committed_offset", None)
        if committed is None:
            raise RuntimeError("faust changed: Consumer._committed_offset is gone")
        value = committed.get(tp)
        return int(value) if value is not None else None

    def _highwater(self, topic_name: str, partition: int) -> int:
        """The end of the partition as of its last fetch (0 when unknown)."""
        try:
            highwater = self.app.consumer.highwater(TopicPartition(topic_name, partition))
        except Exception:  # noqa: BLE001 - consumer restarting: fold what is in hand
            return 0
        return int(highwater or 0)

    def _routed(self, msg: Any) -> tuple[str, str | None] | None:
        headers = dict(msg.headers or ())
        raw_key = headers.get(ROUTE_KEY)
        if not raw_key:
            return None
        key = bytes(raw_key).decode()
        if partition_for(key, self.partitions) != msg.partition:
            return None  # partition count changed since: decide afresh
        absorbed = bytes(headers.get(ROUTE_ABSORBED_BY) or b"").decode()
        return key, absorbed or None

    def _count_marks(self, marks: Marks) -> None:
        if marks.absorbed_by:
            self.metrics.correlation_decisions.labels(decision="absorbed").inc()
        if marks.inhibited_by:
            self.metrics.correlation_decisions.labels(decision="inhibited").inc()

    async def _route(self, key: str, a: Anomaly, absorbed_by: str | None) -> None:
        self.metrics.correlation_decisions.labels(decision="rerouted").inc()
        headers = {ROUTE_KEY: key.encode(), ROUTE_ABSORBED_BY: (absorbed_by or "").encode()}
        await self.anomalies.send(key=key.encode(), value=encode(a), headers=headers)

    async def _publish_facts(self, incidents: Iterable[Incident | None]) -> None:
        """Publish the facts of these incidents that changed (anomaly status, incident open)
        or whose liveness moved a third of their lifetime since last sent, so every
        worker's view sees them, and a view can expire a fact whose updates stop."""
        refresh = self.rules.resolve_timeout / 3
        for inc in incidents:
            if inc is None:
                continue
            stamp = (inc.id, inc.revision)
            if self._factless.get(inc.key) == stamp:
                continue
            facts = facts_of(inc, self.topology, self.inhibit_rules)
            if not facts:
                self._factless[inc.key] = stamp
            for fact in facts:
                sent = self._facts_sent.get(fact.fingerprint)
                if sent is None and not fact.incident_open and blinds(fact.labels) is None:
                    # Never announced: nothing to retract. But a blindness's end is always
                    # told: this worker may have announced it before a restart, and views
                    # would count it blind until it expired, then as ended long before.
                    continue
                if (
                    sent is not None
                    and (sent.status, sent.incident_open, sent.holds)
                    == (fact.status, fact.incident_open, fact.holds)
                    and (fact.observed_at - sent.observed_at).total_seconds() < refresh
                ):
                    continue
                if fact.incident_open:
                    self._facts_sent[fact.fingerprint] = fact
                else:  # retracted: what a later closed fact would find without the entry
                    self._facts_sent.pop(fact.fingerprint, None)
                await self.facts_topic.send(key=fact.fingerprint.encode(), value=encode(fact))

    def _prune_facts(self, now: datetime) -> None:
        """Forget the facts sent that no incident refreshed for twice ``resolve_timeout``:
        every view expired them a timeout ago, and an incident still holding the member
        would have refreshed it or, expiring, retracted it (a member dropped by
        member_retention or max_members is neither). The same as after a crash: a fact
        never retracted expires where it is."""
        horizon = 2 * self.rules.resolve_timeout
        stale = [
            fp
            for fp, f in self._facts_sent.items()
            if (now - f.observed_at).total_seconds() > horizon
        ]
        for fp in stale:
            del self._facts_sent[fp]

    async def _hand_over(
        self, key: str, stored: Stored, index: FactIndex, now: datetime
    ) -> Incident | None:
        """An owned incident hands the firing anomalies a node- or workload-level incident
        now explains over to it: pods that failed before their node's anomaly arrived end
        up in the node's incident too, and an incident left with none resolves. Returns
        the event to publish now: none for an incident never published that resolves (its
        anomalies went on), and an open/updated one waits for its timer like any other."""
        inc = stored.incident
        found = moves(inc, index) if inc is not None else {}
        if inc is None or not found:
            return None
        for m in inc.members:
            if m.fingerprint in found:
                how, fact = found[m.fingerprint]
                await self._route(fact.incident_key, as_anomaly(m), how)
        moved = {fp: (how, f.incident_id) for fp, (how, f) in found.items()}
        self.metrics.correlation_decisions.labels(decision="handed_over").inc(len(moved))
        new, event = hand_over(inc, moved, now)
        out: Incident | None = None
        emitted_at, pending = stored.emitted_at, stored.pending
        if event is not None:
            # Held during group_wait, the incident must stay pending: storing it as
            # published hid it for good when its other members kept firing.
            out, emitted_at, pending = release(event, emitted_at, now, self.rules)
        self._store(stored.partition, key, new, emitted_at=emitted_at, pending=pending)
        await self._publish_facts([new])
        log.info("incident %s handed %d anomalies over", inc.id[:12], len(moved))
        return out

    async def _fold(self, partition: int, anomalies: list[Keyed]) -> list[Keyed]:
        """Fold, store and publish; returns the anomalies refused (see max_members)."""
        now = utcnow()
        before = {k: self._get(k) for k in {k for k, _, _ in anomalies}}
        states = {k: s.incident if s else None for k, s in before.items()}
        refused: list[Keyed] = []
        changed, events = correlate_batch(
            states, anomalies, now, self.rules, self.silences.all(), self._positions, refused
        )
        # Which events go out now and which wait for group_wait/group_interval (the batch's
        # events come coalesced). Timers are per incident, as Alertmanager's are per
        # notification: a group's new incident waits group_wait and opens as "open",
        # whatever its predecessor (maybe resolved in this very batch) last sent.
        timers = {
            s.incident.id: (s.emitted_at, s.pending)
            for s in before.values()
            if s is not None and s.incident is not None
        }
        out: list[Incident] = []
        for event in events:
            emitted_at, _ = timers.get(event.id, (None, False))
            sent, emitted_at, held = release(event, emitted_at, now, self.rules)
            if sent is not None:
                out.append(sent)
            timers[event.id] = (emitted_at, held)
        # Each changed incident is encoded once, for the changelog and for its event.
        encoded: dict[int, bytes] = {}
        noisy = {e.key for e in events}
        for k, inc in changed.items():
            if k not in noisy and inc is not None and self._refresh(k, inc):
                continue  # a silent liveness refresh, kept in memory for now
            if inc is not None:
                encoded[id(inc)] = self._json.encode(inc)
            emitted_at, pending = timers.get(inc.id, (None, False)) if inc else (None, False)
            self._store(partition, k, inc, encoded.get(id(inc)), emitted_at, pending)
        await self._emit(out, encoded)
        await self._publish_facts(changed.values())
        return refused

    async def _refuse(
        self,
        partition: int,
        keyed: list[Keyed],
        records: list[tuple[int, str, int]],
        refused: list[Keyed],
    ) -> None:
        """Dead-letter the anomalies a full incident refused, each with the record it came
        in, and log once per incident rather than once per anomaly (a mass outage refuses
        thousands each round)."""
        where = {id(a): i for i, (_, a, _) in enumerate(keyed)}
        starts = [first for first, _, _ in records]
        cap = self.rules.max_members
        per_key: Counter[str] = Counter()
        for k, a, _ in refused:
            _, source, offset = records[bisect.bisect_right(starts, where[id(a)]) - 1]
            per_key[k] += 1
            self.metrics.refused_members.labels(name=a.name).inc()
            reason = (
                f"refused: incident {k} already holds correlation.max_members={cap} firing members"
            )
            await self._dead(source, partition, offset, encode(a), reason, quiet=True)
        for k, n in per_key.items():
            log.warning(
                "incident %s holds correlation.max_members=%d firing members: "
                "%d new members dead-lettered",
                k,
                cap,
                n,
            )

    async def _drain_producer_buffer(self, limit: float = 10.0) -> None:
        """Wait until faust has handed this batch's changelog writes and incident events to
        the Kafka client. Table writes go through faust's send buffer, and faust's pre-commit
        flush gives up after 100 ms with messages still in it: acking before the buffer is
        empty let a commit cover state that a crash then lost (the fail-over test saw it).
        Once the buffer is empty, the commit's flush of the Kafka client makes it durable."""
        buffer = self.app.producer.buffer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while buffer.size:
            if loop.time() > deadline:
                log.error("producer buffer not drained in %.0fs; acking anyway", limit)
                return
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)  # the message taken last reaches the client

    async def _recovered(self) -> None:
        """After a rebalance, re-publish the incidents of partitions this worker took over.

        The changelog write and the incident event are two topics: a worker killed between
        them leaves a state whose event never went out, and the new owner's re-processing
        changes nothing, so it would stay unpublished. Publishing the restored state once
        closes that gap (at-least-once: consumers may see a revision twice). A state held
        back (group_wait, group_interval) owes no event yet: this worker's timer publishes
        it when due, and publishing it here as well sent its "open" before group_wait, then
        again at group_wait.
        """
        self._guard.reset()  # positions restart at the committed offsets
        self.recoveries += 1
        owned = self._owned_partitions()
        taken_over, self._owned = owned - self._owned, owned
        self._forget_unowned(owned)
        if not taken_over:
            return
        events = []
        resolved = []
        now = utcnow()
        for raw_key, raw in list(self.table.data.items()):
            stored = self._stored(raw_key.decode(), raw)
            inc = stored.incident
            if stored.partition in taken_over and inc is not None and inc.status == "resolved":
                resolved.append((inc, stored.partition))
                # Its resolution may be the event the killed worker never sent, and no
                # input left to fold sends it again (the resolving record is committed or
                # changes nothing now; a quiet one's timer finds it resolved): an incident
                # told opened and never resolved stays open to every subscriber. One
                # resolved unpublished was never told (emitted_at None); one resolved
                # longer than resolve_timeout ago was told by a worker that lived on.
                if stored.emitted_at is not None and (
                    (now - stored.emitted_at).total_seconds() < self.rules.resolve_timeout
                ):
                    events.append(inc)
            if (
                stored.partition in taken_over
                and inc is not None
                and inc.status != "resolved"
                and not stored.pending
            ):
                events.append(as_published(inc, stored.emitted_at))
        if resolved:
            # The gauge of a taken-over service goes on from its last resolution, not
            # absent until the next one (the histogram counted it where it resolved).
            self._resolutions = note_resolutions(self._resolutions, resolved)
            self.metrics.export_resolutions(last_resolutions(self._resolutions))
        if events:
            log.info("re-publishing %d incidents of partitions %s", len(events), taken_over)
        # Resolutions re-published are not counted again: the histogram counted them where
        # they resolved, and the gauge took them from the restored state above.
        await self._emit(events, recount=False)

    def _forget_unowned(self, owned: set[int]) -> None:
        """Drop what this worker holds per group of partitions it no longer owns: the
        memos only grew, and a worker that had owned every partition at some point kept a
        decoded copy of every incident. Regaining a partition recovers it from the
        changelog."""
        self._pruned = frozenset(owned)

        def gone(key: str) -> bool:
            return partition_for(key, self.partitions) not in owned

        # faust's memory store drops a revoked partition's keys only if it recovered them
        # from the changelog; those this worker wrote stayed, and the timer walked them.
        for raw_key in [k for k in self.table.data if gone(k.decode())]:
            self.table.data.pop(raw_key, None)

        memos: tuple[dict[str, Any], ...] = (
            self._decoded,
            self._positions,
            self._persisted,
            self._factless,
        )
        for memo in memos:
            for key in [k for k in memo if gone(k)]:
                del memo[key]
        self._json.forget_where(gone)
        # Their services' gauge is exported by their new owner now.
        self._resolutions = owned_resolutions(self._resolutions, owned)
        self.metrics.export_resolutions(last_resolutions(self._resolutions))
        # A dropped fact is re-announced by whoever folds its incident next; one never
        # retracted expires resolve_timeout after it was last refreshed, as after a crash.
        for fp in [fp for fp, f in self._facts_sent.items() if gone(f.incident_key)]:
            del self._facts_sent[fp]

    async def _mitigating(self, partition: int, m: Mitigation) -> None:
        stored = self._get(m.incident_key)
        if stored is None or stored.incident is None or stored.incident.id != m.incident_id:
            return  # the incident is gone or was replaced: nothing is mitigating it now
        new, event = mark_mitigating(stored.incident, m.at)
        if event is not None:
            self._store(partition, m.incident_key, new, emitted_at=utcnow())
            await self._emit([event])

    async def _tick(self) -> None:
        """One pass over the incidents of partitions this worker owns: resolve those that
        went quiet, publish held and repeated ones, and hand anomalies over to node- or
        workload-level incidents."""
        owned = self._owned_partitions()
        if owned and owned != self._pruned and not (self.app.rebalancing or self.app.in_recovery):
            # Normally done once the rebalance's recovery ends (see _recovered); a CI run
            # found a worker whose assignment had shrunk still holding the lost groups 30 s
            # later. With the group settled, dropping what is not ours is what it would do.
            log.info("partitions %s no longer ours: forgetting their groups", self._pruned - owned)
            self._forget_unowned(owned)
        now = utcnow()
        index = self.fact_index(now)
        absorbing = self.topology and index.absorbs
        self._show_blind(index)
        events = []
        for raw_key, raw in list(self.table.data.items()):
            key = raw_key.decode()
            if partition_for(key, self.partitions) not in owned:
                continue  # until _forget_unowned drops it: never decoded again
            stored = self._stored(key, raw)
            if stored.incident is None:
                continue
            new, event = expire(stored.incident, now, self.rules, index.blind)
            if event is not None:  # a resolution is never held, nor told if nothing was
                sent, emitted_at, pending = release(event, stored.emitted_at, now, self.rules)
                self._store(stored.partition, key, new, emitted_at=emitted_at, pending=pending)
                if sent is not None:
                    events.append(sent)
                await self._publish_facts([new])
                continue
            if (
                stored.pending and publish_due(stored.incident, stored.emitted_at, now, self.rules)
            ) or repeat_due(stored.incident, stored.emitted_at, now, self.rules):
                self._store(stored.partition, key, stored.incident, emitted_at=now)
                events.append(as_published(stored.incident, stored.emitted_at))
                stored = replace(stored, emitted_at=now, pending=False)
            if absorbing and (handed := await self._hand_over(key, stored, index, now)):
                events.append(handed)
        await self._emit(events)
        self._prune_facts(now)  # after the pass: what expired in it was retracted first

    def _show_blind(self, index: FactIndex) -> None:
        """Which sources the view holds blind, for operators: their incidents stay open."""
        # Whole sources only: a pattern that cannot see says so by its own anomaly.
        now_blind = {
            (where[0], where[1])
            for where, b in index.blind.items()
            if b.until is None and len(where) == 2
        }
        for source, cluster in now_blind | self._blind_shown:
            self.metrics.correlator_blind.labels(source=source, cluster=cluster).set(
                1 if (source, cluster) in now_blind else 0
            )
        self._blind_shown = now_blind

    def _owned_partitions(self) -> set[int]:
        """The anomalies partitions assigned to this worker now."""
        return {tp.partition for tp in self._assignment() if tp.topic == self.anomalies_name}

    def _assignment(self) -> set[TopicPartition]:
        try:
            return set(self.app.consumer.assignment())
        except Exception:  # noqa: BLE001 - not yet assigned / consumer restarting
            return set()

    def _stored(self, key: str, raw: bytes) -> Stored:
        cached = self._decoded.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]  # the table still holds exactly the bytes this was decoded from
        stored = Stored.load(raw)
        self._decoded[key] = (raw, stored)
        return stored

    def _get(self, key: str) -> Stored | None:
        raw = self.table.data.get(key.encode())
        return self._stored(key, raw) if raw is not None else None

    def _refresh(self, key: str, inc: Incident) -> bool:
        """Apply a change that publishes nothing (a repeat refreshing members' last_seen)
        in memory only, when the group's state was written to the changelog less than
        ``persist_interval`` ago. Repeats are most of the stream, and each rewrote the whole
        incident; now a restore from the changelog can find liveness at most that stale,
        which only matters to ``resolve_timeout`` (the interval is a tenth of it, at most
        30 s). Returns False when the change must be written."""
        raw = self.table.data.get(key.encode())
        cached = self._decoded.get(key)
        last = self._persisted.get(key)
        now = time.monotonic()
        if raw is None or cached is None or cached[0] is not raw or last is None:
            return False
        if now - last >= self.persist_interval:
            return False
        # The table keeps the bytes last written; the decoded view (keyed to those very
        # bytes) carries the fresher state, and a recovery (new bytes) supersedes it.
        self._decoded[key] = (raw, replace(cached[1], incident=inc))
        return True

    def _store(
        self,
        partition: int,
        key: str,
        inc: Incident | None,
        encoded: bytes | None = None,
        emitted_at: datetime | None = None,
        pending: bool = False,
    ) -> None:
        stored = Stored(partition, inc, emitted_at, pending)
        if encoded is None and inc is not None:
            encoded = self._json.encode(inc)
        value = stored.dump(encoded)
        raw_key = key.encode()
        self.table.data[raw_key] = value
        self._decoded[key] = (value, stored)
        self._persisted[key] = time.monotonic()
        self._changelog.append((partition, raw_key, value))

    async def _send_changelog(self) -> None:
        """What Table.send_changelog does, minus faust's send buffer: the writes are in the
        Kafka client once this returns, so the flush before the next commit covers them.
        (Its persisted-offset callback only matters to on-disk stores; this one is memory.)
        Table updates stay synchronous, as they were: no await between reading and writing a
        batch's state."""
        writes, self._changelog = self._changelog, []
        if writes:
            producer = await self.app.maybe_start_producer()
            for partition, key, value in writes:
                if record_bytes(value, key) > MAX_REQUEST_BYTES:
                    # Sending it would fail this batch, and every retry of it, for good.
                    self.metrics.oversized_states.inc()
                    log.error(
                        "state of group %s is %d bytes compressed, beyond a Kafka record; "
                        "kept in memory only: a restart of this worker loses it",
                        key.decode(),
                        len(value),
                    )
                    continue
                await producer.send(self._changelog_name, key, value, partition, None, None)

    async def _emit(
        self,
        events: list[Incident],
        encoded: dict[int, bytes] | None = None,
        *,
        recount: bool = True,
    ) -> None:
        """Publish ``events`` after the changelog writes in hand; ``recount``: count the
        resolutions among them (False for those re-published after a takeover)."""
        await self._send_changelog()
        if not events:
            return
        producer = await self.app.maybe_start_producer()
        statuses: Counter[str] = Counter()
        for inc in events:
            key = inc.key.encode()
            value = self._json.event(
                inc, self.max_event_members, value_room(key), (encoded or {}).get(id(inc))
            )
            await producer.send(self.incidents_name, key, value, None, None, None)
            statuses[inc.status] += 1
            # Every update at INFO cost more than folding it at a few thousand a second.
            log.log(
                logging.DEBUG if inc.status == "updated" else logging.INFO,
                "incident %s %s rev %d (%s)",
                inc.id[:12],
                inc.status,
                inc.revision,
                inc.key,
            )
        for status, n in statuses.items():
            self.metrics.incidents.labels(status=status).inc(n)
        if recount:
            self._count_resolutions(events)

    def _count_resolutions(self, events: Sequence[Incident]) -> None:
        """Count the resolutions among published ``events`` and export the MTTR gauge."""
        resolved = [
            (inc, partition_for(inc.key, self.partitions))
            for inc in events
            if inc.status == "resolved" and inc.resolved_at is not None
        ]
        if not resolved:
            return
        for inc, _ in resolved:
            assert inc.resolved_at is not None
            seconds = (inc.resolved_at - inc.opened_at).total_seconds()
            self.metrics.incident_resolved(inc.labels.get("service", ""), seconds)
        self._resolutions = note_resolutions(self._resolutions, resolved)
        self.metrics.export_resolutions(last_resolutions(self._resolutions))

    async def _dead(
        self,
        source: str,
        partition: int,
        offset: int,
        raw: bytes | None,
        error: str,
        *,
        quiet: bool = False,
    ) -> None:
        """``quiet``: the caller logs a summary instead of a line per letter."""
        letter = dead_letter_record(
            source_topic=source,
            raw=raw,
            error=error,
            consumer="correlator",
            partition=partition,
            offset=offset,
        )
        await self.dlq.send(key=source.encode(), value=encode(letter))
        self.metrics.dead_letters.labels(topic=source, consumer="correlator").inc()
        if not quiet:
            log.warning("dead-lettered %s[%s]@%s: %s", source, partition, offset, letter.error)
