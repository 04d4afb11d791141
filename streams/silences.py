"""Silences: a compacted topic every correlator worker reads in full and keeps following.

Silences are global (any anomaly on any partition may match), so they are not partitioned
state: each worker holds all of them. Creating or expiring one is a record on the topic
(`sre-agent silence add|expire`, or any Kafka client), keyed by the silence id; the latest
record per id wins, a tombstone deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agent.codec import decode
from agent.errors import DependencyUnavailable, InvalidEvent
from agent.models import Silence
from agent.settings import KafkaSection
from streams.partitioning import topic_partitions

log = logging.getLogger(__name__)


def apply(store: dict[str, Silence], key: str | None, raw: bytes | None) -> None:
    """Fold one record of the silences topic into ``store`` (pure apart from the dict)."""
    if raw is None:
        if key:
            store.pop(key, None)
        return
    try:
        silence = decode(Silence, raw)
    except InvalidEvent as err:
        log.warning("silences: ignoring an invalid record (%s)", err)
        return
    store[silence.id] = silence


class SilenceStore:
    def __init__(self, kafka: KafkaSection, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.silences: dict[str, Silence] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()

    def active(self, at: datetime) -> list[Silence]:
        return [s for s in self.silences.values() if s.active(at)]

    def all(self) -> list[Silence]:
        return list(self.silences.values())

    async def start(self, *, wait: float = 30.0) -> None:
        """Read the topic to its current end before returning, then keep following."""
        if self._task is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            client_id=f"{self.kafka.client_id}-silences",
            enable_auto_commit=False,
            fetch_max_wait_ms=200,
            isolation_level="read_committed",
        )
        try:
            await consumer.start()
            parts = await topic_partitions(self.kafka.bootstrap_servers, self.topic, wait=wait)
            tps = [TopicPartition(self.topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
        except (KafkaError, DependencyUnavailable) as err:
            await consumer.stop()
            raise DependencyUnavailable(f"silences: {err}") from err
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(ends), name="silences")
        await asyncio.wait_for(self.loaded.wait(), timeout=wait)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
                log.warning("silences: fetch failed, retrying: %s", err)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for r in records:
                    apply(self.silences, r.key.decode() if r.key else None, r.value)
            if not self.loaded.is_set():
                positions = [await consumer.position(tp) for tp in ends]
                if all(pos >= end for pos, end in zip(positions, ends.values(), strict=True)):
                    self.loaded.set()
