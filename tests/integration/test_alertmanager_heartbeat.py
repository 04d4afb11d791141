"""Alertmanager's heartbeat (``Watchdog``) over the agent's real webhook server, onto real
Kafka: when it stops, ``alertmanager-unavailable`` fires (the blindness the correlator
holds Alertmanager's incidents open for); when it comes back, it resolves. The heartbeat
itself is never published, so it opens no incident. Two detector replicas, as behind
deploy/agent.yaml's Service, judge it from the latest either received."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from agent.errors import cancel_and_wait
from agent.models import Anomaly
from agent.runtime import Agent
from agent.webhook import AlertmanagerReceiver
from handlers.fake_cluster import FakeCluster
from tests.fixtures.infra import WEBHOOK_PATH
from tests.helpers import eventually, make_settings, readers

pytestmark = pytest.mark.integration

TOKEN = "heartbeat-token"
UNAVAILABLE = "alertmanager-unavailable"


def notification(*alerts: tuple[str, str]) -> bytes:
    return orjson.dumps(
        {
            "version": "4",
            "status": "firing",
            "receiver": "agent",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": name, "service": service, "severity": "none"},
                    "annotations": {},
                    "startsAt": "2024-05-01T12:00:00Z",
                }
                for name, service in alerts
            ],
        }
    )


async def post(url: str, body: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, await r.json()


async def test_a_heartbeat_that_stops_raises_alertmanager_unavailable_until_it_is_back(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SRE_TEST_AM_TOKEN", TOKEN)
    watchdog, service = f"Watchdog{uuid.uuid4().hex[:8]}", f"svc{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "server": {"host": "127.0.0.1", "port": 0},
            "detectors": {
                "alertmanager": {
                    "enabled": True,
                    "token_env": "SRE_TEST_AM_TOKEN",
                    "heartbeat": {"alertname": watchdog, "within": "2s"},
                }
            },
        },
    )
    agent = Agent(settings, roles=["detector"], cluster=FakeCluster())

    def blind(xs: list[Anomaly], status: str) -> list[Anomaly]:
        return [
            a
            for a in xs
            if a.name == UNAVAILABLE and a.labels.get("heartbeat") == watchdog
            if a.status == status
        ]

    async with (
        agent,
        readers(kafka_bootstrap, {"an": (agent.bus.topic("anomalies"), Anomaly)}) as r,
    ):
        assert agent.server is not None
        url = f"http://127.0.0.1:{agent.server.bound_port}{WEBHOOK_PATH}"
        beat, alert = notification((watchdog, service)), notification(("QueueStuck", service))
        assert await post(url, notification((watchdog, service), ("QueueStuck", service))) == (
            200,
            {"accepted": 1},
        )
        await r["an"].wait_for(lambda xs: [a for a in xs if a.name == "QueueStuck"], 30, "alert")
        assert await post(url, beat) == (200, {"accepted": 0})
        assert not blind(r["an"].items, "firing")  # heard just now
        # The heartbeat stops: blind within a few checks of its bound, and repeated.
        await r["an"].wait_for(lambda xs: len(blind(xs, "firing")) >= 2, 30, "blindness")
        assert await post(url, alert) == (200, {"accepted": 1})  # others still go through
        assert await post(url, beat) == (200, {"accepted": 0})
        await r["an"].wait_for(lambda xs: blind(xs, "resolved"), 30, "its end")
        items = list(r["an"].items)
    fired, [ended] = blind(items, "firing"), blind(items, "resolved")
    assert fired[0].severity == "critical" and fired[0].labels["cluster"] == "test"
    assert ended.fingerprint == fired[0].fingerprint and ended.starts_at == fired[0].starts_at
    assert items.index(ended) > items.index(fired[-1])
    # The heartbeat reached no topic: nothing of it for the correlator to open an incident on.
    assert not [a for a in items if a.name == watchdog]
    assert [a.name for a in items if a.labels.get("service") == service] == ["QueueStuck"] * 2


async def beats(url: str, beat: bytes) -> None:
    while True:
        assert await post(url, beat) == (200, {"accepted": 0})
        await asyncio.sleep(0.5)


def receiver(agent: Agent) -> AlertmanagerReceiver:
    [am] = [c for c in agent.components if isinstance(c, AlertmanagerReceiver)]
    return am


async def test_replicas_behind_one_service_share_the_heartbeat_one_of_them_receives(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alertmanager's notification reaches one replica behind the Service: the other
    raised a false blindness, holding every Alertmanager incident open. Now neither does
    while one receives it; both tell the same blindness when it stops; one heartbeat to
    either ends it for both."""
    monkeypatch.setenv("SRE_TEST_AM_TOKEN", TOKEN)
    watchdog = f"Watchdog{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "server": {"host": "127.0.0.1", "port": 0},
            "detectors": {
                "alertmanager": {
                    "enabled": True,
                    "token_env": "SRE_TEST_AM_TOKEN",
                    "heartbeat": {"alertname": watchdog, "within": "2s"},
                }
            },
        },
    )
    a, b = (Agent(settings, roles=["detector"], cluster=FakeCluster()) for _ in "ab")

    def blind(xs: list[Anomaly], status: str | None = None) -> list[Anomaly]:
        return [
            x
            for x in xs
            if x.name == UNAVAILABLE and x.labels.get("heartbeat") == watchdog
            if status is None or x.status == status
        ]

    beat = notification((watchdog, "alertmanager"))
    async with (
        a,
        b,
        readers(kafka_bootstrap, {"an": (a.bus.topic("anomalies"), Anomaly)}) as r,
    ):
        assert a.server is not None
        url = f"http://127.0.0.1:{a.server.bound_port}{WEBHOOK_PATH}"
        # Only a hears it, every half a second, for three times its bound.
        for _ in range(12):
            assert await post(url, beat) == (200, {"accepted": 0})
            await asyncio.sleep(0.5)
        assert not blind(r["an"].items)
        assert receiver(a).heartbeat_lost is receiver(b).heartbeat_lost is None
        # It stops: both are blind, since the last one a received.
        await eventually(
            lambda: receiver(a).heartbeat_lost and receiver(b).heartbeat_lost, what="both blind"
        )
        await r["an"].wait_for(lambda xs: len(blind(xs, "firing")) >= 4, 30, "blindness")
        fired = blind(r["an"].items, "firing")
        assert receiver(a).heartbeat_lost == receiver(b).heartbeat_lost == fired[0].starts_at
        # One anomaly repeated, whoever told it: nothing the correlator takes for two.
        assert {(x.fingerprint, x.starts_at) for x in fired} == {
            (fired[0].fingerprint, fired[0].starts_at)
        }
        # Back, to a alone: it ends for both.
        beating = asyncio.create_task(beats(url, beat))
        try:
            await eventually(
                lambda: receiver(a).heartbeat_lost is None and receiver(b).heartbeat_lost is None,
                what="both see again",
            )
            await r["an"].wait_for(lambda xs: len(blind(xs, "resolved")) >= 2, 30, "its ends")
            await asyncio.sleep(1.5)  # three more checks: nothing more to tell
            items = blind(r["an"].items)
        finally:
            await cancel_and_wait(beating)
    assert items[-1].status == "resolved"
    assert {(x.fingerprint, x.starts_at) for x in items} == {
        (fired[0].fingerprint, fired[0].starts_at)
    }
