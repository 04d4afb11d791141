"""Two detector replicas side by side, real Prometheus, real Kafka, the real faust
correlator: one incident per fault, because replicas evaluate the same wall-clock slots
and publish identical anomalies that the correlator's fingerprint dedup absorbs."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from typing import Any

import pytest

from agent.codec import encode
from agent.detector import PromQLDetector
from agent.metrics import Metrics
from agent.models import Incident
from agent.prom import PromClient
from streams.bus import Bus
from streams.correlator import Correlator
from streams.partitioning import decode_anomalies
from tests.helpers import make_settings, readers
from tests.integration.exporter import Exporter

pytestmark = pytest.mark.integration


async def test_two_replicas_one_incident_per_fault(
    prometheus: Any, kafka_bootstrap: str, topic_prefix: str
) -> None:
    uid = uuid.uuid4().hex[:8]
    job, services = f"ha{uid}", [f"cart{uid}", f"pay{uid}"]
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        prometheus_url=prometheus.url,
        doc={
            "detectors": {"prometheus": {"evaluation_delay": "0.2s"}},
            "patterns": [
                {
                    "name": "ha-errors",
                    "condition": f'ha_test_errors{{job="{job}"}} > 0',
                    "interval": "1s",
                }
            ],
        },
    )
    metrics = Metrics()
    buses = [Bus(settings.kafka, metrics=metrics, name=f"replica{i}") for i in (1, 2)]
    proms = [PromClient(prometheus.url, timeout=2) for _ in (1, 2)]
    detectors = [
        PromQLDetector(settings, prom=p, publish=b, topic=b.topic("anomalies"), metrics=Metrics())
        for p, b in zip(proms, buses, strict=True)
    ]
    try:
        async with Exporter() as exp:
            for s in services:
                exp.set("ha_test_errors", {"service": s, "namespace": "shop"}, 0)
            prometheus.add_target(job, exp.host_port)
            await prometheus.wait_for_target_up_async(job, 30)
            for b in buses:
                await b.start()
            await buses[0].create_topics()
            topics = {
                "inc": (buses[0].topic("incidents"), Incident),
                "an": (buses[0].topic("anomalies"), None),
            }
            async with readers(kafka_bootstrap, topics) as r, Correlator(settings, metrics=metrics):
                await detectors[0].start()
                await asyncio.sleep(0.5)  # replicas never start in step
                await detectors[1].start()
                for s in services:
                    exp.set("ha_test_errors", {"service": s, "namespace": "shop"}, 5)
                await r["inc"].wait_for(
                    lambda xs: {i.labels["service"] for i in xs} >= set(services), 60, "opened"
                )
                await asyncio.sleep(2)  # a few more slots of duplicate firing anomalies
                for s in services:
                    exp.set("ha_test_errors", {"service": s, "namespace": "shop"}, 0)
                await r["inc"].wait_for(
                    lambda xs: sum(i.status == "resolved" for i in xs) >= len(services),
                    60,
                    "resolved",
                )
                await asyncio.sleep(2)  # late copies from the other replica must change nothing
                incidents, raw = list(r["inc"].items), list(r["an"].items)
    finally:
        for d in detectors:
            await d.stop()
        for b in buses:
            await b.stop()
        for p in proms:
            await p.close()
        prometheus.remove_target(job)

    by_service: dict[str, list[Incident]] = defaultdict(list)
    for inc in incidents:
        by_service[inc.labels["service"]].append(inc)
    for s in services:
        assert len({i.id for i in by_service[s]}) == 1, f"{s}: more than one incident"
        assert [i.status for i in by_service[s]] == ["open", "resolved"], by_service[s]
    # Both replicas published, and their copies of one slot are byte-identical (records
    # may batch several anomalies: compared anomaly by anomaly).
    published = [a for value in raw for a in decode_anomalies(value)[0]]
    copies = Counter(encode(a) for a in published)
    assert any(n >= 2 for n in copies.values()), "the second replica published nothing"
    by_slot: dict[tuple[str, str, str], set[bytes]] = defaultdict(set)
    for a in published:
        by_slot[(a.fingerprint, a.status, a.observed_at.isoformat())].add(encode(a))
        assert a.observed_at.microsecond == 0, "observed_at is the aligned slot"
    assert all(len(v) == 1 for v in by_slot.values()), "replicas disagreed on a slot"
