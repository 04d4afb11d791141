"""Silences end to end: created and expired with the CLI, honoured by the correlator."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from agent.metrics import Metrics
from agent.models import Anomaly, Incident, fingerprint, group_key, utcnow
from agent.silence_cli import new_silence, parse_matcher
from streams.correlator import Correlator
from streams.silences import SilenceStore, current
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "silence", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def anomaly(service: str, name: str = "errors") -> Anomaly:
    labels = {"cluster": "test", "namespace": "shop", "service": service}
    now = utcnow()
    return Anomaly(
        fingerprint=fingerprint("prometheus", name, labels),
        source="prometheus",
        name=name,
        severity="critical",
        status="firing",
        labels=labels,
        starts_at=now,
        observed_at=now,
    )


async def test_cli_silence_is_honoured_then_expired(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    env = {
        "SRE_AGENT__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SRE_AGENT__KAFKA__TOPIC_PREFIX": topic_prefix,
    }
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    sid = cli(
        env,
        "add",
        "-m",
        "service=checkout",
        "-m",
        "namespace=~sh.*",
        "--duration",
        "1h",
        "--author",
        "alice",
        "--comment",
        "planned failover",
    )
    listed = cli(env, "list")
    assert sid in listed and "active" in listed and "service=checkout" in listed

    async def send(a: Anomaly) -> None:
        await bus.publish(
            bus.topic("anomalies"), a, key=group_key(a.labels, settings.correlation.group_by)
        )

    try:
        async with (
            readers(kafka_bootstrap, {"inc": (bus.topic("incidents"), Incident)}) as r,
            Correlator(settings, metrics=Metrics()) as corr,
        ):
            assert sid in corr.silences.silences  # loaded before the first anomaly
            await send(anomaly("checkout"))
            await send(anomaly("cart"))
            items = await r["inc"].wait_for(lambda xs: len(xs) >= 2, 60, "two incidents")
            by = {i.labels["service"]: i for i in items}
            assert by["checkout"].status == "silenced"
            assert by["checkout"].members[0].silenced_by == sid
            assert by["cart"].status == "open"

            assert cli(env, "expire", sid) == f"{sid} expired"
            await eventually(
                lambda: not corr.silences.silences[sid].active(utcnow()), 20, what="expiry"
            )
            await send(anomaly("checkout"))
            items = await r["inc"].wait_for(lambda xs: len(xs) >= 3, 60, "update after expiry")
    finally:
        await bus.stop()
    last = items[-1]
    assert last.labels["service"] == "checkout" and last.status == "updated"
    assert last.members[0].silenced_by is None
    assert "expired" in cli(env, "list", "--all") and sid not in cli(env, "list")


async def test_a_view_starts_with_every_record_written_before_and_an_empty_one_at_once(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A view whose topic holds nothing is loaded without waiting on a first fetch; one
    whose topic holds records returns from start() only once it holds them all."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    try:
        empty = SilenceStore(settings.kafka, topic)
        await empty.start()
        try:
            assert empty.loaded.is_set() and empty.silences == {}
        finally:
            await empty.stop()
        now = utcnow()
        matchers = (parse_matcher("service=checkout"),)
        # More than one fetch returns (1 MB per partition): start() must wait for them all.
        written = [
            new_silence(f"s{i}-{topic_prefix}", matchers, now, 3600, "alice", "w" * 400, now)
            for i in range(4000)
        ]
        await bus.publish_many([(topic, s, s.key) for s in written])
        view = SilenceStore(settings.kafka, topic)
        await view.start()
        try:
            assert set(view.silences) == {s.id for s in written}
        finally:
            await view.stop()
    finally:
        await bus.stop()


async def test_the_silences_read_once_are_the_latest_of_each_id(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """What the unresolved watch reads at start (streams.silences.current): one silence
    as last written (expired early), none of a deleted one, nothing of an invalid one."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")
    try:
        assert await current(settings.kafka, topic) == []
        now = utcnow()
        matchers = (parse_matcher("service=checkout"),)
        kept, gone = (
            new_silence(f"{n}-{topic_prefix}", matchers, now, 3600, "alice", "", now)
            for n in ("kept", "gone")
        )
        expired = replace(kept, ends_at=now + timedelta(seconds=1))
        await bus.publish_many([(topic, kept, kept.key), (topic, gone, gone.key)])
        await bus.publish(topic, None, key=gone.key)
        await bus.publish(topic, expired, key=kept.key)
        await bus.publish(topic, {"id": "bad"}, key="bad")
        assert await current(settings.kafka, topic) == [expired]
    finally:
        await bus.stop()
