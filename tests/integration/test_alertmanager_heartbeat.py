"""Alertmanager's heartbeat (``Watchdog``) over the agent's real webhook server, onto real
Kafka: when it stops, ``alertmanager-unavailable`` fires (the blindness the correlator
holds Alertmanager's incidents open for); when it comes back, it resolves. The heartbeat
itself is never published, so it opens no incident."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from agent.models import Anomaly
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from tests.fixtures.infra import WEBHOOK_PATH
from tests.helpers import make_settings, readers

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
