"""The Alertmanager webhook of a detector started without its token (deploy/agent.yaml's
Secret not created yet): the pod runs, and the webhook refuses every notification over
real HTTP, whatever the request carries, and keeps the detector unready."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest

from agent.metrics import Metrics
from agent.runtime import Agent
from agent.settings import parse_settings
from agent.webhook import AlertmanagerReceiver
from handlers.fake_cluster import FakeCluster

TOKEN_ENV = "SRE_TEST_UNSET_AM_TOKEN"
PATH = "/webhooks/alertmanager"
NOTIFICATION = {
    "version": "4",
    "status": "firing",
    "receiver": "agent-webhook",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "HighErrorRate", "service": "cart", "namespace": "shop"},
            "annotations": {},
            "startsAt": "2026-12-07T10:00:00Z",
        }
    ],
}


class Recording:
    """A bus that takes everything (the webhook must not hand it anything here)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, str | None]] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(items)


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
async def test_without_its_token_the_webhook_accepts_no_one(
    token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to refuse to start (a ConfigError), so the detector's pods, and their
    pattern and Kubernetes detection, waited for the Secret. Started without it, an
    empty token must never match an empty bearer credential."""
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    settings = parse_settings(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "detectors": {"alertmanager": {"enabled": True, "token_env": TOKEN_ENV}},
        },
        env={},
    )
    agent = Agent(settings, roles=["detector"], cluster=FakeCluster())
    (receiver,) = [c for c in agent.components if isinstance(c, AlertmanagerReceiver)]
    receiver.publisher = published = Recording()
    server = agent.server
    assert server is not None
    await server.start()
    await receiver.start()
    server.started = True
    try:
        base = f"http://127.0.0.1:{server.bound_port}"
        async with aiohttp.ClientSession() as http:
            for headers in (
                {},
                {"Authorization": "Bearer "},
                {"Authorization": "Bearer"},
                {"Authorization": "Bearer x"},
                {"Authorization": "Basic Og=="},
            ):
                async with http.post(f"{base}{PATH}", json=NOTIFICATION, headers=headers) as r:
                    body = await r.json()
                    assert r.status == 503, (headers, body)
                    assert body["error"] == "no_token" and TOKEN_ENV in body["reason"]
            async with http.get(f"{base}/health/ready") as r:
                assert r.status == 503
                failures = (await r.json())["failures"]
                assert TOKEN_ENV in failures["alertmanager-webhook"]
    finally:
        await receiver.stop()
        await server.stop()
        await agent.prom.close()
    assert published.items == []
    value = agent.metrics.registry.get_sample_value
    assert value("sre_agent_webhook_requests_total", {"receiver": "alertmanager", "code": "503"})


async def test_with_its_token_the_webhook_is_ready() -> None:
    settings = parse_settings({"detectors": {"alertmanager": {"enabled": True}}}, env={})
    publish = Recording()
    receiver = AlertmanagerReceiver(
        settings, token="s3cret", publish=publish, topic="t", metrics=Metrics()
    )
    assert await receiver.unready() is None
    with pytest.raises(ValueError, match="empty"):
        AlertmanagerReceiver(settings, token="", publish=publish, topic="t", metrics=Metrics())
