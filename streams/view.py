"""A compacted topic that every worker reads in full and keeps following.

Used for state that is global rather than partitioned: silences, and the correlation facts
(node-, workload-level and inhibition-source anomalies). The latest record per key wins, a
tombstone deletes it; an invalid record is logged and skipped (the producer is ours or the
CLI, which validate before writing), so one bad record never stops the view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agent.errors import DependencyUnavailable, InvalidEvent, task_failure
from agent.settings import KafkaSection
from streams.partitioning import topic_partitions
from streams.replay import groupless_consumer

log = logging.getLogger(__name__)
T = TypeVar("T")


def apply_record(
    store: dict[str, T], key: str | None, raw: bytes | None, decode: Callable[[bytes], T]
) -> bool:
    """Fold one record into ``store``; False when it was invalid and skipped."""
    if raw is None:
        if key:
            store.pop(key, None)
        return True
    try:
        value = decode(raw)
    except InvalidEvent as err:
        log.warning("view: ignoring an invalid record with key %r (%s)", key, err)
        return False
    if key:
        store[key] = value
    return True


def caught_up(positions: list[int], ends: list[int]) -> bool:
    """Whether a reader at ``positions`` has read every record up to ``ends`` (per
    partition, in the same order)."""
    return all(pos >= end for pos, end in zip(positions, ends, strict=True))


class CompactedView(Generic[T]):
    def __init__(
        self,
        kafka: KafkaSection,
        topic: str,
        decode: Callable[[bytes], T],
        *,
        name: str,
        fetch_max_wait_ms: int = 200,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.name = name
        self.items: dict[str, T] = {}
        self.version = 0  # bumped on every applied batch, so callers can cache derived views
        self.loaded = asyncio.Event()
        self._decode = decode
        self._fetch_wait = fetch_max_wait_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, wait: float = 30.0, missing_ok: bool = False) -> None:
        """Read the topic to its current end before returning, then keep following.

        ``missing_ok``, for a one-time read: a topic that does not exist records nothing,
        so the view is empty and loaded at once (and follows nothing)."""
        if self._task is not None:
            return
        consumer = groupless_consumer(self.kafka, self.name, fetch_max_wait_ms=self._fetch_wait)
        try:
            await consumer.start()
            parts = await topic_partitions(
                self.kafka.bootstrap_servers, self.topic, wait=wait, missing_ok=missing_ok
            )
            if not parts:
                await consumer.stop()
                self.loaded.set()
                return
            tps = [TopicPartition(self.topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            # Nothing to read (an empty topic, the usual case for silences): loaded now,
            # not after a first fetch that waits its whole long-poll for nothing.
            if caught_up([await consumer.position(tp) for tp in ends], list(ends.values())):
                self.loaded.set()
        except (KafkaError, DependencyUnavailable) as err:
            await consumer.stop()
            raise DependencyUnavailable(f"{self.name}: {err}") from err
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(ends), name=self.name)
        await asyncio.wait_for(self.loaded.wait(), timeout=wait)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop these keys from what the view holds (they are spent; the topic keeps them
        until a record with a value brings one back or a tombstone deletes it)."""
        dropped = False
        for key in keys:
            dropped = self.items.pop(key, None) is not None or dropped
        if dropped:
            self.version += 1

    @property
    def failure(self) -> BaseException | None:
        """Why following the topic stopped, if it died: the view would go stale unnoticed."""
        return task_failure(self._task)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as err:  # noqa: BLE001 - reported through .failure; still close
                log.warning("%s had failed: %r", self.name, err)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _run(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except KafkaError as err:
                log.warning("%s: fetch failed, retrying: %s", self.name, err)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for r in records:
                    key = r.key.decode() if r.key else None
                    apply_record(self.items, key, r.value, self._decode)
            if batches:
                self.version += 1
            if not self.loaded.is_set():
                positions = [await consumer.position(tp) for tp in ends]
                if caught_up(positions, list(ends.values())):
                    self.loaded.set()
