"""Fault tolerance of the correlator group on the real broker.

Three correlator workers (separate processes, `sre-agent run --role correlator`) share a
steady anomaly stream; one is SIGKILLed mid-stream. Afterwards every anomaly sent is in
exactly one incident, no incident is duplicated, and the survivors continued the killed
worker's incidents from the changelog (same incident ids, revisions continuing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from agent.models import Anomaly, Incident, fingerprint, group_key, utcnow
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUPS = 30
PER_GROUP = 40  # distinct anomalies per group, spread over the whole stream
PARTITIONS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def _settled(bootstrap: str, group: str, members: int) -> bool:
    """Whether the consumer group is Stable (no rebalance under way) with ``members``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    # DescribeGroupsResponse: (error_code, group_id, state, protocol_type, protocol, members)
    (described,) = response.groups
    return bool(described[2] == "Stable" and len(described[5]) == members)


def _worker(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--role", "correlator"],
            cwd=REPO,
            env={**os.environ, **env, "SRE_AGENT__SERVER__PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _anomaly(group: int, n: int) -> Anomaly:
    labels = {"cluster": "test", "namespace": "shop", "service": f"svc-{group}", "pod": f"p{n}"}
    now = utcnow()
    return Anomaly(
        fingerprint=fingerprint("prometheus", "errors", labels),
        source="prometheus",
        name="errors",
        severity="warning",
        status="firing",
        labels=labels,
        starts_at=now,
        observed_at=now,
    )


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_killing_a_worker_loses_and_duplicates_nothing(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, guarantee: str
) -> None:
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "kafka": {"partitions": PARTITIONS, "session_timeout_ms": 6000},
            "correlation": {"resolve_timeout": "1h"},
        },
    )
    bus, _ = await started_bus(settings)
    env = {
        "SRE_AGENT__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SRE_AGENT__KAFKA__TOPIC_PREFIX": topic_prefix,
        "SRE_AGENT__KAFKA__PARTITIONS": str(PARTITIONS),
        "SRE_AGENT__KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SRE_AGENT__CORRELATION__RESOLVE_TIMEOUT": "1h",
        "SRE_AGENT__CORRELATION__PROCESSING_GUARANTEE": guarantee,
        "SRE_AGENT__MONITORING__PROMETHEUS__URL": "http://127.0.0.1:1",
    }
    ports = [_free_port() for _ in range(3)]
    workers = [_worker(env, p, tmp_path / f"w{i}.log") for i, p in enumerate(ports)]
    sent: dict[str, set[str]] = defaultdict(set)
    try:
        deadline = time.monotonic() + 90
        while not all(_ready(p) for p in ports):
            assert time.monotonic() < deadline, "workers did not become ready"
            assert all(w.poll() is None for w in workers), "a worker exited"
            await asyncio.sleep(0.3)
        # The group settled into one generation with all three (faust's group is its app id).
        group = f"{topic_prefix}correlator"
        await eventually(lambda: _settled(kafka_bootstrap, group, 3), 60, 0.3, "all three in")
        async with readers(kafka_bootstrap, {"inc": (bus.topic("incidents"), Incident)}) as r:
            t_kill = 0.0
            for n in range(PER_GROUP):
                batch = [_anomaly(g, n) for g in range(GROUPS)]
                for a in batch:
                    sent[a.labels["service"]].add(a.fingerprint)
                by = settings.correlation.group_by
                await bus.publish_many(
                    [(bus.topic("anomalies"), a, group_key(a.labels, by)) for a in batch]
                )
                if n == PER_GROUP // 3:
                    workers[0].send_signal(signal.SIGKILL)
                    t_kill = time.monotonic()
                await asyncio.sleep(0.1)

            def complete(items: list[Incident]) -> bool:
                last: dict[str, Incident] = {}
                for i in items:
                    last[i.labels["service"]] = i
                return len(last) == GROUPS and all(
                    {m.fingerprint for m in last[s].members} == sent[s] for s in sent
                )

            try:
                items = await r["inc"].wait_for(complete, 120, "every anomaly in an incident")
            except AssertionError:
                last: dict[str, Incident] = {}
                for i in r["inc"].items:
                    last[i.labels["service"]] = i
                missing = {
                    s: len(sent[s] - {m.fingerprint for m in last[s].members})
                    if s in last
                    else "all"
                    for s in sent
                }
                raise AssertionError(
                    f"incomplete after 120 s; missing members per service: {missing}; "
                    f"workers alive: {[w.poll() is None for w in workers]}"
                ) from None
            recovered = time.monotonic() - t_kill
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=45)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        await bus.stop()

    by_service: dict[str, list[Incident]] = defaultdict(list)
    for i in items:
        by_service[i.labels["service"]].append(i)
    for service, incidents in by_service.items():
        assert len({i.id for i in incidents}) == 1, f"{service}: duplicated incident"
        final = max(incidents, key=lambda i: i.revision)
        members = [m.fingerprint for m in final.members]
        assert len(members) == len(set(members)) == PER_GROUP, f"{service}: members wrong"
        # Revisions only move forward, and the last state is the complete one.
        assert final.revision == max(i.revision for i in incidents)
    print(
        f"\nkill -> every anomaly reflected in its incident: {recovered:.1f} s "
        f"(session timeout 6 s); {len(items)} incident events for {GROUPS} incidents"
    )
    assert workers[1].returncode == 0 and workers[2].returncode == 0, "survivors stop cleanly"
