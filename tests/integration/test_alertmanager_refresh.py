"""Alertmanager repeats a notification only every repeat_interval (4h by default); the
correlator resolves an incident none of whose members it saw for resolve_timeout. The
webhook receiver asks a real Alertmanager (Debian's) which alerts it would notify the
agent's receivers of now and announces those that still fire again: not the silenced, not
the resolved, and only for receivers it knows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from agent.alertmanager_api import AlertmanagerAPI
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import Anomaly, fingerprint
from agent.server import HealthServer
from agent.webhook import AlertmanagerReceiver
from tests.fixtures.infra import WEBHOOK_PATH
from tests.helpers import eventually, make_settings
from tests.integration.test_alertmanager_recheck import iso, silence

pytestmark = pytest.mark.integration

RECEIVER = "agent-webhook"  # the only receiver of scripts/alertmanager.sh's route
TOKEN = "refresh-token"


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)

    def of(self, ns: str) -> list[Anomaly]:
        return [a for a in self.items if a.labels.get("namespace") == ns]


def resolve(am: Any, posted: list[dict[str, Any]]) -> None:
    """End the test's alerts: every agent that runs later asks the shared Alertmanager."""
    ended = iso(datetime.now(UTC) - timedelta(seconds=1))
    am.post_alerts([{**a, "endsAt": ended} for a in posted])


def alerts(ns: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A firing alert, one to be silenced and a resolved one, in namespace ``ns``; and the
    firing one's labels."""
    now = datetime.now(UTC)
    started = iso(now - timedelta(minutes=30))

    def alert(service: str, ends: datetime) -> dict[str, Any]:
        labels = {"alertname": "RefreshTest", "namespace": ns, "service": service}
        return {"labels": labels, "startsAt": started, "endsAt": iso(ends)}

    firing = alert("cart", now + timedelta(hours=1))
    muted = alert("ledger", now + timedelta(hours=1))
    resolved = alert("search", now - timedelta(seconds=1))
    return [firing, muted, resolved], firing["labels"]


async def test_what_alertmanager_would_notify_is_announced_again(alertmanager: Any) -> None:
    ns = f"refresh-{uuid.uuid4().hex[:8]}"
    posted, labels = alerts(ns)
    await asyncio.to_thread(alertmanager.post_alerts, posted)
    await asyncio.to_thread(silence, alertmanager, [("namespace", ns), ("service", "ledger")])
    settings = make_settings(
        "127.0.0.1:1",
        "unused.",
        doc={
            "correlation": {"resolve_timeout": "3s"},  # announced every second
            "detectors": {"alertmanager": {"enabled": True, "receivers": [RECEIVER]}},
        },
    )
    rec, api = Recorder(), AlertmanagerAPI(alertmanager.url, timeout=3)
    am = AlertmanagerReceiver(
        settings, token=TOKEN, publish=rec, topic="anomalies", metrics=Metrics(), api=api
    )
    await am.start()
    try:
        await eventually(lambda: len(rec.of(ns)) >= 2, 20, what="announced twice")
    finally:
        await am.stop()
        await api.close()
        await asyncio.to_thread(resolve, alertmanager, posted)
    said = rec.of(ns)
    # The firing alert only: not the silenced one, not the resolved one.
    assert {a.labels["service"] for a in said} == {"cart"}
    # The very anomaly the webhook delivers for it: same identity, observed again.
    want = fingerprint("alertmanager", "RefreshTest", normalise(labels, "test"))
    assert {a.fingerprint for a in said} == {want}
    assert {a.status for a in said} == {"firing"} and len({a.starts_at for a in said}) == 1
    assert said[1].observed_at > said[0].observed_at


async def test_a_receiver_named_by_a_notification_is_refreshed_from_then_on(
    alertmanager: Any,
) -> None:
    ns = f"refresh-{uuid.uuid4().hex[:8]}"
    posted, _ = alerts(ns)
    await asyncio.to_thread(alertmanager.post_alerts, posted[:1])
    settings = make_settings(
        "127.0.0.1:1", "unused.", doc={"detectors": {"alertmanager": {"enabled": True}}}
    )
    metrics, rec = Metrics(), Recorder()
    api = AlertmanagerAPI(alertmanager.url, timeout=3)
    server = HealthServer(host="127.0.0.1", port=0, metrics=metrics)
    am = AlertmanagerReceiver(
        settings, token=TOKEN, publish=rec, topic="anomalies", metrics=metrics, api=api
    )
    am.install(server.app)
    await server.start()
    await am.start()
    try:
        assert await am.refresh() == 0  # no receiver known yet: nothing to ask for
        # A notification names its receiver.
        payload = {"receiver": RECEIVER, "status": "firing", "alerts": posted[:1]}
        url = f"http://127.0.0.1:{server.bound_port}{WEBHOOK_PATH}"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=orjson.dumps(payload), headers=headers) as resp,
        ):
            assert resp.status == 200
        delivered = rec.of(ns)
        assert len(delivered) == 1
        assert await am.refresh() >= 1
        [again] = rec.of(ns)[1:]
        assert again.fingerprint == delivered[0].fingerprint and again.status == "firing"
    finally:
        await am.stop()
        await server.stop()
        await api.close()
        await asyncio.to_thread(resolve, alertmanager, posted[:1])


async def test_an_alert_without_alertname_leaves_the_receivers_other_alerts_announced(
    alertmanager: Any,
) -> None:
    # Alertmanager takes an alert without alertname (any API client may post one); the
    # webhook refuses it alone. The refresh failed the whole reply for it: the receiver's
    # other alerts were never announced again and alertmanager-unavailable fired for as
    # long as that alert was active.
    ns = f"refresh-{uuid.uuid4().hex[:8]}"
    posted, _ = alerts(ns)
    nameless = {**posted[0], "labels": {"namespace": ns, "service": "nameless"}}
    sent = [posted[0], nameless]
    await asyncio.to_thread(alertmanager.post_alerts, sent)
    settings = make_settings(
        "127.0.0.1:1",
        "unused.",
        doc={"detectors": {"alertmanager": {"enabled": True, "receivers": [RECEIVER]}}},
    )
    rec, api = Recorder(), AlertmanagerAPI(alertmanager.url, timeout=3)
    am = AlertmanagerReceiver(
        settings, token=TOKEN, publish=rec, topic="anomalies", metrics=Metrics(), api=api
    )
    try:
        reply = await api.notified(RECEIVER)
        assert any("labels" in p and "alertname" in p for p in reply.refused)
        await am.refresh()
    finally:
        await api.close()
        await asyncio.to_thread(resolve, alertmanager, sent)
    assert {a.labels["service"] for a in rec.of(ns)} == {"cart"}
    assert am.unavailable_since is None
    assert not [a for a in rec.items if a.name == "alertmanager-unavailable"]
