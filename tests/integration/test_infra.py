"""The real test infrastructure works: Kafka 4 with aiokafka, Prometheus, Alertmanager."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.fixtures.infra import (
    KAFKA_PORT,
    WEBHOOK_PATH,
    WEBHOOK_PORT,
    Alertmanager,
    InfraError,
    Prometheus,
    run_script,
)

pytestmark = pytest.mark.integration


async def _create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def _consume(consumer: AIOKafkaConsumer, count: int, within: float = 30.0) -> list[Any]:
    records: list[Any] = []
    deadline = time.monotonic() + within
    while len(records) < count and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for batch in batches.values():
            records.extend(batch)
    return records


async def test_kafka_roundtrip_with_consumer_group(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}roundtrip"
    await _create_topic(kafka_bootstrap, topic, partitions=2)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=f"k{i}".encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic_prefix}group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        records = await _consume(consumer, 5)
        await consumer.commit()
        committed = {tp.partition: await consumer.committed(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()

    assert sorted(r.value for r in records) == [f"m{i}".encode() for i in range(5)]
    assert sum(committed.values()) == 5


async def test_kafka_transactional_producer(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}tx"
    await _create_topic(kafka_bootstrap, topic)

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic_prefix}producer"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-1")
            await producer.send_and_wait(topic, b"committed-2")
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed-3")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic_prefix}group",
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        records = await _consume(consumer, 3)
        # Nothing else shows up (the aborted record stays invisible).
        records += await _consume(consumer, 1, within=1.0)
    finally:
        await consumer.stop()

    assert [r.value for r in records] == [b"committed-1", b"committed-2", b"committed-3"]


def test_kafka_start_is_a_no_op_while_running_and_healthy(kafka_bootstrap: str) -> None:
    proc = run_script("kafka.sh", "start", check=False)
    assert proc.returncode == 0
    assert "kafka already running and healthy (pid" in proc.stderr
    assert f"127.0.0.1:{KAFKA_PORT}" in proc.stderr
    assert run_script("kafka.sh", "status").returncode == 0


def test_kafka_env_prints_bootstrap(kafka_bootstrap: str) -> None:
    proc = run_script("kafka.sh", "env")
    assert proc.stdout.strip() == f"KAFKA_BOOTSTRAP={kafka_bootstrap}"


def test_prometheus_scrapes_a_target_added_at_run_time(prometheus: Prometheus) -> None:
    probe = uuid.uuid4().hex[:8]
    registry = CollectorRegistry()
    gauge = Gauge("sre_infra_probe", "Probe gauge of the infra test", ["probe"], registry=registry)
    gauge.labels(probe=probe).set(42)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    job = f"probe-{probe}"
    try:
        prometheus.add_target(job, f"127.0.0.1:{server.server_port}")
        prometheus.wait_for_target_up(job)
        result = prometheus.wait_for_query(f'sre_infra_probe{{probe="{probe}"}}')
        assert result[0]["metric"]["job"] == job
        assert float(result[0]["value"][1]) == 42.0
    finally:
        prometheus.remove_target(job)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_prometheus_rule_fires_and_reaches_alertmanager(
    prometheus: Prometheus, alertmanager: Alertmanager
) -> None:
    alertname = f"SreInfraProbe{uuid.uuid4().hex[:8]}"
    prometheus.add_rules(
        alertname,
        f"""
groups:
  - name: {alertname}
    rules:
      - alert: {alertname}
        expr: vector(1) > 0
        labels:
          severity: warning
        annotations:
          summary: infra test alert
""",
    )
    try:
        prometheus.wait_for_alert(alertname, "firing")
        alert = alertmanager.wait_for_alert({"alertname": alertname})
        assert alert["labels"]["severity"] == "warning"
        assert alert["status"]["state"] == "active"
    finally:
        prometheus.remove_rules(alertname)


def test_prometheus_rejects_invalid_rules(prometheus: Prometheus) -> None:
    with pytest.raises(InfraError, match="invalid rules"):
        prometheus.add_rules("broken", "groups:\n  - name: x\n    rules:\n      - alert: A\n")
    assert not (prometheus.rules_dir / "broken.yml").exists()


def _alert(alertname: str, **labels: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": alertname, **labels},
        "annotations": {"summary": "posted by the infra test"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=5)).isoformat(),
        "generatorURL": "http://127.0.0.1/infra-test",
    }


def test_alertmanager_accepts_and_lists_alerts(alertmanager: Alertmanager) -> None:
    alertname = f"SreInfraPosted{uuid.uuid4().hex[:8]}"
    alertmanager.post_alerts([_alert(alertname, severity="critical", namespace="demo")])
    alert = alertmanager.wait_for_alert({"alertname": alertname})
    assert alert["labels"] == {"alertname": alertname, "severity": "critical", "namespace": "demo"}
    assert alert["annotations"]["summary"] == "posted by the infra test"
    assert alertmanager.alerts({"alertname": "no-such-alert"}) == []


async def test_alertmanager_delivers_to_webhook_with_bearer_token(
    alertmanager: Alertmanager,
) -> None:
    alertname = f"SreInfraWebhook{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[tuple[str | None, dict[str, Any]]] = asyncio.Queue()

    async def webhook(request: web.Request) -> web.Response:
        await received.put((request.headers.get("Authorization"), await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, webhook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", WEBHOOK_PORT)
    await site.start()
    try:
        await asyncio.to_thread(alertmanager.post_alerts, [_alert(alertname)])
        async with asyncio.timeout(30):
            while True:
                auth, payload = await received.get()
                if payload["groupLabels"].get("alertname") == alertname:
                    break
    finally:
        await runner.cleanup()

    assert alertmanager.webhook_url == f"http://127.0.0.1:{WEBHOOK_PORT}{WEBHOOK_PATH}"
    assert auth == f"Bearer {alertmanager.webhook_token}"
    assert payload["status"] == "firing"
    assert [a["labels"]["alertname"] for a in payload["alerts"]] == [alertname]
