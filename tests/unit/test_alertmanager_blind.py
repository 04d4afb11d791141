"""An Alertmanager the receiver cannot ask is blindness to its alerts.

Alertmanager repeats a notification only every repeat_interval; the receiver asks its API
every third of resolve_timeout what still fires and announces it again. While the API did
not answer, nothing was announced, and every Alertmanager incident of the cluster resolved
as quiet after resolve_timeout: closed, approvals withdrawn, an MTTR recorded, for alerts
still firing that nobody could see. The real API client, over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from agent.alertmanager_api import AlertmanagerAPI
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.settings import parse_settings
from agent.webhook import AlertmanagerReceiver
from streams.correlation import CorrelationRules, correlate_batch, expire
from streams.topology import build_index, facts_of
from tests.unit.factories import at

RECEIVER = "agent"
UNAVAILABLE = "alertmanager-unavailable"


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)


class Clock:
    def __init__(self) -> None:
        self.now = at(0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def alertmanager() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local server speaking GET /api/v2/alerts: ``state["up"]`` False answers 503 (a
    proxy in front of an Alertmanager that is down)."""
    state: dict[str, Any] = {"up": True}

    async def alerts(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.Response(status=503, text="no healthy upstream")
        assert request.query["receiver"] == RECEIVER
        alert = {
            "labels": {"alertname": "QueueStuck", "cluster": "eu-1", "service": "co"},
            "startsAt": "2024-06-01T10:00:00Z",
            "endsAt": "2099-01-01T00:00:00Z",
        }
        return web.json_response([alert])

    app = web.Application()
    app.router.add_get("/api/v2/alerts", alerts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def test_an_alertmanager_that_does_not_answer_holds_its_alerts_incidents_open(
    alertmanager: tuple[str, dict[str, Any]],
) -> None:
    url, state = alertmanager
    settings = parse_settings(
        {
            "agent": {"cluster": "c1"},
            "correlation": {"resolve_timeout": "300s"},
            "detectors": {"alertmanager": {"enabled": True, "receivers": [RECEIVER]}},
        },
        env={},
    )
    rec, clock, api = Recorder(), Clock(), AlertmanagerAPI(url, timeout=2)
    am = AlertmanagerReceiver(
        settings, token="t", publish=rec, topic="t", metrics=Metrics(), clock=clock, api=api
    )
    try:
        assert await am.refresh() == 1
        state["up"] = False  # from t=100 to t=1000 it answers 503
        for t in range(100, 1000, 100):
            clock.now = at(t)
            assert await am.refresh() == 0
        blind = [a for a in rec.items if a.name == UNAVAILABLE]
        assert [a.status for a in blind] == ["firing"] * 9
        assert blind[0].starts_at == at(100) and blind[0].labels["cluster"] == "c1"
        assert "503" in blind[-1].annotations["error"]
        rules = CorrelationRules(resolve_timeout=300)
        held = _expired(rec.items, at(1000), rules)
        assert held == "open"  # quiet since t=0, blind since t=100
        state["up"] = True
        clock.now = at(1000)
        assert await am.refresh() == 1
    finally:
        await api.close()
    assert rec.items[-1].name == UNAVAILABLE and rec.items[-1].status == "resolved"
    assert rec.items[-1].starts_at == at(100)
    # Seen again at t=1000: the incident lives on the announcement, and without one its
    # quiet would count from there.
    assert _expired(rec.items, at(1299), rules) == "open"
    alert = next(a for a in rec.items if a.source == "alertmanager")
    # Behind a global Alertmanager the alert names another cluster; the receiver's own
    # blindness covers it (agent_cluster: who saw it).
    assert alert.labels["cluster"] == "eu-1" and alert.labels["agent_cluster"] == "c1"


def _expired(items: list[Anomaly], now: datetime, rules: CorrelationRules) -> str:
    """The Alertmanager incident's status, folded and expired as the correlator does."""
    states, _ = correlate_batch({}, items, now, rules)
    incidents = [i for i in states.values() if i is not None]
    facts = [f for i in incidents for f in facts_of(i, True, ())]
    blind = build_index(facts, now, rules.resolve_timeout).blind
    [inc] = [i for i in incidents if i.members[0].source == "alertmanager"]
    quiet = now - max(m.last_seen for m in inc.members) >= timedelta(seconds=rules.resolve_timeout)
    assert expire(inc, now, rules)[0].status == ("resolved" if quiet else "open")
    return expire(inc, now, rules, blind)[0].status
