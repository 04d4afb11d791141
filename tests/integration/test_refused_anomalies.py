"""An anomaly Kafka refuses for its size is refused alone, by name, on the real broker:
the others of its batch are published (the pattern detector, the Kubernetes watch, the
Alertmanager webhook)."""

from __future__ import annotations

import asyncio
import io
import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agent.detector import PromQLDetector
from agent.kube_signals import step
from agent.kube_watch import KubeWatcher
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.prom import PromClient
from agent.server import HealthServer
from agent.settings import Settings
from agent.webhook import AlertmanagerReceiver
from streams.bus import Bus
from tests.fixtures.infra import WEBHOOK_PATH
from tests.helpers import make_settings, prometheus_query_api, readers, started_bus
from tests.unit.factories import at

pytestmark = pytest.mark.integration


async def small_anomalies_topic(kafka_bootstrap: str, settings: Settings) -> Bus:
    """A started bus whose anomalies topic takes records of 100 kB at most (its owner set
    max.message.bytes under the producer's 1 MiB): the broker refuses larger ones."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        name = f"{settings.kafka.topic_prefix}anomalies"
        config = {"max.message.bytes": "100000"}
        await admin.create_topics([NewTopic(name, 2, 1, topic_configs=config)])
    finally:
        await admin.close()
    bus, _ = await started_bus(settings)
    return bus


def refused(metrics: Metrics, source: str, name: str) -> float | None:
    labels = {"source": source, "name": name}
    return metrics.registry.get_sample_value("sre_agent_refused_anomalies_total", labels)


async def test_a_pattern_series_too_large_for_a_record_is_refused_the_others_published(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A series carrying 300 labels of 4 kB makes an anomaly of 1.2 MB: the producer
    refused the evaluation's whole publish, at every slot, and the pattern's other
    services never opened an incident."""
    many = {f"label_{i}": "v" * 4000 for i in range(300)}
    series = [
        {"metric": {"service": "cart", "namespace": "shop"}, "value": [0, "5"]},
        {"metric": {"service": "wide", "namespace": "shop", **many}, "value": [0, "5"]},
        {"metric": {"service": "checkout", "namespace": "shop"}, "value": [0, "5"]},
    ]
    async with prometheus_query_api(lambda q: q == "errors > 1") as (url, reply):
        reply.update(status="success", data={"resultType": "vector", "result": series})
        settings = make_settings(
            kafka_bootstrap,
            topic_prefix,
            prometheus_url=url,
            doc={"patterns": [{"name": "errors", "condition": "errors > 1"}]},
        )
        bus, _ = await started_bus(settings)
        prom, metrics = PromClient(url), Metrics()
        d = PromQLDetector(
            settings, prom=prom, publish=bus, topic=bus.topic("anomalies"), metrics=metrics
        )
        try:
            found = await d.evaluate_once(settings.patterns[0])
            async with readers(kafka_bootstrap, {"a": (bus.topic("anomalies"), Anomaly)}) as r:
                got = await r["a"].wait_for(lambda xs: len(xs) >= 2, 30, "two anomalies")
        finally:
            await bus.stop()
            await prom.close()
    assert len(found) == 3
    assert sorted(a.labels["service"] for a in got) == ["cart", "checkout"]
    assert refused(metrics, "prometheus", "errors") == 1
    assert d.states["errors"].instances  # the evaluation moved on: next slot repeats it


def warning_event(uid: str, pod: str, container: str) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid, "resourceVersion": "1", "namespace": "shop"},
        "type": "Warning",
        "reason": "BackOff",
        "message": "Back-off restarting",
        "involvedObject": {
            "kind": "Pod",
            "name": pod,
            "namespace": "shop",
            "fieldPath": f"spec.containers{{{container}}}",
        },
    }


async def test_the_kube_watch_refuses_an_anomaly_kafka_will_not_take_and_goes_on(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """An event whose fieldPath names a container of 1.1 MB (any client may write events)
    makes an anomaly the producer refuses: the watch retried the whole publish forever,
    and no later watch event was ever published."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    metrics = Metrics()
    w = KubeWatcher(
        settings, publish=bus, topic=bus.topic("anomalies"), metrics=metrics, api=object()
    )
    rules = replace(w.rules, cluster="test")
    events = [
        warning_event("u1", "cart-1", "app"),
        warning_event("u2", "cart-2", "c" * 1_100_000),
        warning_event("u3", "checkout-1", "app"),
    ]
    anomalies = [a for e in events for a in step(w.state, "events", "ADDED", e, at(0), rules)]
    assert len(anomalies) == 3
    try:
        await asyncio.wait_for(w._publish(anomalies), 30)
        async with readers(kafka_bootstrap, {"a": (bus.topic("anomalies"), Anomaly)}) as r:
            got = await r["a"].wait_for(lambda xs: len(xs) >= 2, 30, "two anomalies")
    finally:
        await bus.stop()
    assert sorted(a.labels["pod"] for a in got) == ["cart-1", "checkout-1"]
    assert refused(metrics, "kubernetes", "k8s-back-off") == 1


async def test_an_alert_its_topic_will_not_take_is_422_by_name_the_others_published(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The anomalies topic takes 100 kB records: an alert of 160 kB was answered 503, and
    Alertmanager retried the notification forever, its other alerts never published."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"detectors": {"alertmanager": {"enabled": True, "max_body_bytes": 4_000_000}}},
    )
    bus = await small_anomalies_topic(kafka_bootstrap, settings)
    metrics = Metrics()
    token = uuid.uuid4().hex
    server = HealthServer(host="127.0.0.1", port=0, metrics=metrics)
    am = AlertmanagerReceiver(
        settings, token=token, publish=bus, topic=bus.topic("anomalies"), metrics=metrics
    )
    am.install(server.app)
    await server.start()
    await am.start()

    def alert(service: str, **annotations: str) -> dict[str, Any]:
        return {
            "status": "firing",
            "labels": {"alertname": "HighErrorRate", "namespace": "shop", "service": service},
            "annotations": annotations,
            "startsAt": "2024-05-01T12:00:00Z",
        }

    notes = {f"n{i}": "x" * 4000 for i in range(40)}
    body = {"alerts": [alert("cart"), alert("wide", **notes), alert("checkout")]}
    url = f"http://127.0.0.1:{server.bound_port}{WEBHOOK_PATH}"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=io.BytesIO(orjson.dumps(body)), headers=headers) as resp,
        ):
            status, doc = resp.status, orjson.loads(await resp.read())
        assert (status, doc["error"], doc.get("accepted")) == (422, "invalid_alerts", 2)
        async with readers(kafka_bootstrap, {"a": (bus.topic("anomalies"), Anomaly)}) as r:
            got = await r["a"].wait_for(lambda xs: len(xs) >= 2, 30, "two anomalies")
    finally:
        await am.stop()
        await server.stop()
        await bus.stop()
    [problem] = doc["problems"]
    assert problem.startswith(f"alerts[1]: a record for {bus.topic('anomalies')} is ")
    assert problem.endswith(
        "refused by the broker as over the topic's max.message.bytes: not written"
    )
    # (One the broker had taken beside it may come twice: replicas' copies are deduped.)
    assert {a.labels["service"] for a in got} == {"cart", "checkout"}
    value = metrics.registry.get_sample_value
    assert value("sre_agent_webhook_refused_alerts_total", {"receiver": "alertmanager"}) == 1
