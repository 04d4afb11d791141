"""The bus sends anomalies as one AnomalyBatch record per partition, on the real broker:
each on the partition of its group, in order, and the correlator reads them back."""

from __future__ import annotations

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from agent.codec import encode
from agent.models import Anomaly, group_key
from streams.partitioning import decode_anomalies, partition_for
from tests.helpers import make_settings, started_bus
from tests.unit.factories import anomaly

pytestmark = pytest.mark.integration

BY = ("cluster", "namespace", "service")


def labels(service: str, pod: str = "") -> dict[str, str]:
    return {"cluster": "c1", "namespace": "shop", "service": service, "pod": pod}


Record = tuple[int, bytes | None, bytes]  # partition, key, value


async def records(bootstrap: str, topic: str, expected: int) -> list[Record]:
    # No group: on a fresh broker a group waits for the offsets topic to exist.
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        c.assign([TopicPartition(topic, p) for p in (0, 1)])
        await c.seek_to_beginning()
        out: list[Record] = []
        for _ in range(100):
            for recs in (await c.getmany(timeout_ms=200)).values():
                out += [(r.partition, r.key, r.value) for r in recs if r.value is not None]
            if len(out) >= expected:
                break
        return sorted(out, key=lambda r: r[0])
    finally:
        await c.stop()


async def test_anomalies_travel_as_one_record_per_partition(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    bus, _ = await started_bus(make_settings(kafka_bootstrap, topic_prefix))
    try:
        topic = bus.topic("anomalies")
        # Services on both partitions of the topic, several pods each.
        services = [f"svc-{i}" for i in range(8)]
        sent = [anomaly(f"p{j}", labels=labels(s, f"{s}-{j}")) for j in range(3) for s in services]
        by_partition: dict[int, list[Anomaly]] = {}
        for a in sent:
            by_partition.setdefault(partition_for(group_key(a.labels, BY), 2), []).append(a)
        assert set(by_partition) == {0, 1}
        await bus.publish_many([(topic, a, group_key(a.labels, BY)) for a in sent])
        lone = anomaly("lone", labels=labels("svc-lone"))
        lone_key = group_key(lone.labels, BY)
        await bus.publish_many([(topic, lone, lone_key)])

        got = await records(kafka_bootstrap, topic, 3)
        assert len(got) == 3, got  # one batch per partition, then the lone anomaly
        batches = [(p, k, v) for p, k, v in got if b'"anomalies"' in v]
        assert len(batches) == 2
        for p, key, value in batches:
            assert key is None
            decoded, problems = decode_anomalies(value)
            assert problems == []
            assert decoded == by_partition[p]  # its partition's anomalies, in order
        # Replicas publishing the same anomalies send the same bytes (no random batch id).
        await bus.publish_many([(topic, a, group_key(a.labels, BY)) for a in sent])
        again = await records(kafka_bootstrap, topic, 5)
        assert sorted(v for _, _, v in again if b'"anomalies"' in v) == sorted(
            2 * [v for _, _, v in batches]
        )
        (single,) = [(p, k, v) for p, k, v in got if b'"anomalies"' not in v]
        assert single == (partition_for(lone_key, 2), lone_key.encode(), encode(lone))
        assert orjson.loads(single[2])["name"] == "lone"
    finally:
        await bus.stop()
