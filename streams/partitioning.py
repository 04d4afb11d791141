"""Which partition a correlation key lives on, the way Kafka's Java client decides it.

Anomalies of one group must always reach the same correlator partition. Producers that key
records by the correlation key with the Java-compatible partitioner (aiokafka, the Java
client, kcat with ``-X partitioner=murmur2_random``) place them there; micro-batches name the
partition explicitly with :func:`partition_for`. librdkafka's default partitioner (CRC32)
does not agree, which is why the correlator checks and re-routes.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from agent.codec import encode
from agent.errors import DependencyUnavailable
from agent.models import Anomaly, AnomalyBatch, group_key

MAX_BATCH = 500  # anomalies per record: keeps records far below the 1 MiB default limit


@functools.lru_cache(maxsize=65536)
def _hash(key: bytes) -> int:
    # murmur2 is pure Python (~10-20 us) and is asked for every record's key, of which there
    # are far fewer than records (one per group).
    return int(murmur2(key) & 0x7FFFFFFF)


def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner: murmur2(key) masked positive, modulo partitions."""
    return _hash(key.encode()) % partitions


def partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's DefaultPartitioner, with the hash of each key cached (for producers that
    send many records per key, such as the correlator's incidents and changelog)."""
    if key is None:
        return random.choice(available or all_partitions)  # noqa: S311 - spreading load, not secrecy
    return all_partitions[_hash(key) % len(all_partitions)]


def batch_by_partition(
    anomalies: Iterable[Anomaly], group_by: tuple[str, ...], partitions: int
) -> dict[int, list[list[Anomaly]]]:
    """Group anomalies per partition, each partition's list cut into MAX_BATCH chunks."""
    per: dict[int, list[Anomaly]] = defaultdict(list)
    for a in anomalies:
        per[partition_for(group_key(a.labels, group_by), partitions)].append(a)
    return {
        p: [items[i : i + MAX_BATCH] for i in range(0, len(items), MAX_BATCH)]
        for p, items in per.items()
    }


class RawProducer(Protocol):
    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
    ) -> Any: ...

    async def partitions_for(self, topic: str) -> Any: ...


async def publish_anomalies(
    producer: RawProducer, topic: str, anomalies: Sequence[Anomaly], group_by: tuple[str, ...]
) -> int:
    """Send anomalies as per-partition batches; returns the number of records sent.

    Waits for every delivery, so a caller may consider the anomalies durable afterwards.
    """
    if not anomalies:
        return 0
    partitions = len(await producer.partitions_for(topic))
    futures = []
    for p, chunks in batch_by_partition(anomalies, group_by, partitions).items():
        for chunk in chunks:
            value = encode(AnomalyBatch(anomalies=tuple(chunk)))
            futures.append(await producer.send(topic, value=value, partition=p))
    for f in futures:
        await f
    return len(futures)


async def topic_partitions(bootstrap: str, topic: str, *, wait: float = 10.0) -> list[int]:
    """The topic's partitions, from fresh metadata (waiting up to ``wait`` s for it to exist).

    Asks the admin API: a consumer's cached metadata can lag a topic created moments ago.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            described = await admin.describe_topics([topic])
            parts = [p["partition"] for d in described for p in d.get("partitions", [])]
            if parts and all(d.get("error_code", 0) == 0 for d in described):
                return sorted(parts)
            if loop.time() > deadline:
                raise DependencyUnavailable(f"kafka: topic {topic} not found")
            await asyncio.sleep(0.1)
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka {bootstrap}: {err}") from err
    finally:
        await admin.close()
