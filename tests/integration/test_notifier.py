"""Escalations reach people: the agent's notifier (executor role) reads the escalations
topic on the real broker and POSTs each one to every configured webhook, retrying one
that answers 503, never re-posting to one that already took it, and dead-lettering an
escalation a webhook refuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from agent.models import DeadLetter, Escalation, Incident, utcnow
from agent.runtime import Agent
from agent.server import serve
from agent.settings import Settings
from agent.switch_cli import set_switch
from handlers.fake_cluster import FakeCluster
from streams.bus import BatchConsumer
from tests.fakes.incidents import incident, member
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration


class Receiver:
    """A chat webhook that answers each path with the statuses it is given, in turn."""

    def __init__(self, statuses: dict[str, list[int]]) -> None:
        self.statuses = statuses
        self.got: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        path = request.path
        self.got.append((path, dict(request.headers), orjson.loads(await request.read())))
        answers = self.statuses[path]
        status = answers.pop(0) if len(answers) > 1 else answers[0]
        return web.Response(status=status, text="busy" if status >= 500 else "")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{name}", self._hook)
        self._runner, self.port = await serve(app, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def to(self, path: str) -> list[dict[str, Any]]:
        return [body for p, _, body in self.got if p == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    statuses = {"/chat": [503, 200], "/pager": [503, 400], "/night": [200], "/calm": [200]}
    async with Receiver(statuses) as r:
        yield r


async def written_before(settings: Settings, *incidents: Incident) -> None:
    """The incidents, written before the agent starts (as before a restart)."""
    bus, _ = await started_bus(settings)
    try:
        for inc in incidents:
            await bus.publish(bus.topic("incidents"), inc)
    finally:
        await bus.stop()


async def test_an_escalation_is_delivered_retried_and_refusals_dead_lettered(
    kafka_bootstrap: str,
    topic_prefix: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv("SRE_TEST_CHAT_TOKEN", token)
    base = f"http://127.0.0.1:{receiver.port}"
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "escalation": {
                "webhooks": [
                    {"name": "chat", "url": f"{base}/chat", "token_env": "SRE_TEST_CHAT_TOKEN"},
                    # Only what stays open, or only warnings: not sent this critical
                    # not_healed (checked before the pager).
                    {"name": "night", "url": f"{base}/night", "reasons": ["unresolved"]},
                    {"name": "calm", "url": f"{base}/calm", "severities": ["warning"]},
                    {"name": "pager", "url": f"{base}/pager", "timeout": "2s"},
                ]
            }
        },
    )
    escalation = Escalation(
        id=f"esc-{uuid.uuid4().hex[:8]}",
        incident_id="inc-1",
        incident_key="test/shop/checkout",
        reason="not_healed",
        summary="rollback on Deployment/shop/checkout: not healed",
        at=utcnow(),
        action_id="a-1",
        target="Deployment/shop/checkout",
        service="checkout",
        details=("high-error-rate still firing after the action",),
        severity="critical",
    )
    agent = Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
    async with (
        agent,
        readers(kafka_bootstrap, {"dead": (agent.bus.topic("dead-letter"), DeadLetter)}) as r,
    ):
        await agent.bus.publish(agent.bus.topic("escalations"), escalation)
        await r["dead"].wait_for(
            lambda xs: any(escalation.id in x.raw for x in xs), 60, "the pager's refusal"
        )
        (letter,) = [x for x in r["dead"].items if escalation.id in x.raw]
    # The chat webhook was busy once, then took it, once.
    chat = receiver.to("/chat")
    assert len(chat) == 2 and all(body["id"] == escalation.id for body in chat)
    assert chat[-1]["text"].startswith(
        "[not_healed, critical] rollback on Deployment/shop/checkout"
    )
    assert chat[-1]["severity"] == "critical"
    headers = [h for p, h, _ in receiver.got if p == "/chat"]
    assert headers[-1]["Authorization"] == f"Bearer {token}"
    assert headers[-1]["Idempotency-Key"] == escalation.id
    # The pager was busy (so the event was retried: the chat was not posted it again),
    # then refused it: dead-lettered, naming the webhook.
    assert len(receiver.to("/pager")) == 2
    assert receiver.to("/night") == [] and receiver.to("/calm") == []
    assert letter.consumer == "notifier"
    assert "webhook pager refused escalation" in letter.error and "HTTP 400" in letter.error
    value = agent.metrics.registry.get_sample_value
    delivered = {"webhook": "chat", "result": "delivered"}
    assert value("sre_agent_escalation_notifications_total", delivered) == 1
    refused = {"webhook": "pager", "result": "failed"}
    assert value("sre_agent_escalation_notifications_total", refused) == 1


async def test_an_incident_left_open_is_escalated_after_a_restart_too(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Incidents written before the agent started (as before a restart) seed the watch: the
    one still open is escalated as unresolved and delivered; the resolved one is not."""
    opened = utcnow() - timedelta(minutes=10)
    still_open = replace(incident(member()), id=f"open-{uuid.uuid4().hex[:6]}", opened_at=opened)
    closed = replace(still_open, id=f"closed-{uuid.uuid4().hex[:6]}", status="resolved")
    async with Receiver({"/chat": [200]}) as receiver:
        settings = watching(kafka_bootstrap, topic_prefix, receiver, "5m")
        await written_before(settings, still_open, closed)
        agent = Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
        async with (
            agent,
            readers(kafka_bootstrap, {"esc": (agent.bus.topic("escalations"), Escalation)}) as r,
        ):
            await r["esc"].wait_for(lambda xs: len(xs) >= 1, 30, "an escalation")
            await eventually(lambda: _has(receiver, "/chat"), 30, 0.2, "delivery")
            escalations = list(r["esc"].items)
    assert [(e.reason, e.incident_id) for e in escalations] == [("unresolved", still_open.id)]
    (body,) = receiver.to("/chat")
    assert body["reason"] == "unresolved" and body["incident_id"] == still_open.id


async def test_a_later_level_reaches_the_webhooks_that_take_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """An incident open for 10 minutes, with levels at 5 and 9 minutes (and 1 hour): both
    reached levels are escalated, each under its own id; the chat takes both, the
    manager's pager (levels [2]) only the second."""
    opened = utcnow() - timedelta(minutes=10)
    inc = replace(incident(member()), id=f"open-{uuid.uuid4().hex[:6]}", opened_at=opened)
    async with Receiver({"/chat": [200], "/manager": [200]}) as receiver:
        hooks = [
            {"name": "chat", "url": f"http://127.0.0.1:{receiver.port}/chat"},
            {"name": "manager", "url": f"http://127.0.0.1:{receiver.port}/manager", "levels": [2]},
        ]
        doc = {
            "escalation": {
                "unresolved_after": "5m",
                "unresolved_again_after": ["9m", "1h"],
                "webhooks": hooks,
            }
        }
        settings = make_settings(kafka_bootstrap, topic_prefix, doc=doc)
        await written_before(settings, inc)
        agent = Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
        async with (
            agent,
            readers(kafka_bootstrap, {"esc": (agent.bus.topic("escalations"), Escalation)}) as r,
        ):
            await r["esc"].wait_for(lambda xs: len(xs) >= 2, 30, "two levels")
            await eventually(lambda: len(receiver.to("/chat")) >= 2, 30, 0.2, "chat")
            await eventually(lambda: _has(receiver, "/manager"), 30, 0.2, "the manager's pager")
            escalations = list(r["esc"].items)
    assert sorted((e.reason, e.level) for e in escalations) == [
        ("unresolved", 1),
        ("unresolved", 2),
    ]
    assert len({e.id for e in escalations}) == 2
    assert sorted(b["level"] for b in receiver.to("/chat")) == [1, 2]
    assert [b["level"] for b in receiver.to("/manager")] == [2]


async def _has(receiver: Receiver, path: str) -> bool:
    return bool(receiver.to(path))


def watching(bootstrap: str, prefix: str, receiver: Receiver, after: str) -> Settings:
    """Settings escalating incidents open ``after``, to the receiver's chat webhook."""
    chat = {"name": "chat", "url": f"http://127.0.0.1:{receiver.port}/chat"}
    return make_settings(
        bootstrap,
        prefix,
        doc={"escalation": {"unresolved_after": after, "webhooks": [chat]}},
    )


async def test_two_replicas_escalate_what_stays_open_delivered_once_and_not_what_resolved(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Each executor replica watches every incident: one that resolves after both started
    is escalated by neither (a replica seeing only its partitions would miss it); one left
    open is escalated by both under one id, which is what reaches the webhook (at least
    once: a rebalance between the replicas' notifiers can post it again, under that id)."""
    now = utcnow()
    # Due 5 s from now; the other one only after the replicas started and saw it resolve.
    stays = replace(
        incident(member()),
        id=f"stays-{uuid.uuid4().hex[:6]}",
        opened_at=now - timedelta(seconds=15),
    )
    other = {"cluster": "c1", "namespace": "pay", "service": "ledger"}
    ends = replace(incident(member(labels=other), labels=other), id=f"ends-{uuid.uuid4().hex[:6]}")
    ends = replace(ends, opened_at=now)
    async with Receiver({"/chat": [200]}) as receiver:
        settings = watching(kafka_bootstrap, topic_prefix, receiver, "20s")
        bus, _ = await started_bus(settings)
        try:
            for inc in (stays, ends):
                await bus.publish(bus.topic("incidents"), inc)
            replicas = [
                Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
                for _ in range(2)
            ]
            async with (
                replicas[0],
                replicas[1],
                readers(kafka_bootstrap, {"esc": (bus.topic("escalations"), Escalation)}) as r,
            ):
                # Both seeded it; it resolves before the bound (the replicas start in seconds).
                assert (utcnow() - now).total_seconds() < 16
                resolved = replace(ends, revision=2, status="resolved", resolved_at=utcnow())
                await bus.publish(bus.topic("incidents"), resolved)
                await r["esc"].wait_for(lambda xs: len(xs) >= 2, 30, "both replicas' escalation")
                await eventually(lambda: _has(receiver, "/chat"), 30, 0.2, "delivery")
                # A sweep more (every 5 s) past the resolved one's bound.
                await asyncio.sleep(max(0.0, 26 - (utcnow() - now).total_seconds()))
                escalations = list(r["esc"].items)
        finally:
            await bus.stop()
    assert {(e.reason, e.incident_id) for e in escalations} == {("unresolved", stays.id)}
    assert len({e.id for e in escalations}) == 1
    posted = receiver.to("/chat")
    assert posted and {(b["id"], b["incident_id"]) for b in posted} == {
        (escalations[0].id, stays.id)
    }
    # The incident watch reads in no consumer group: a group per start would stay behind.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        groups = [g[0] for g in await admin.list_consumer_groups()]
    finally:
        await admin.close()
    ours = [g for g in groups if g.startswith(topic_prefix)]
    assert ours, "the executor's own consumer groups"
    assert not [g for g in ours if "watch" in g], ours


async def test_a_switch_change_is_announced_where_asked_for(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """`sre-agent switches kill on` reaches the chat that lists "switch", once per change,
    naming who and why; the pager (every reason but the informational ones) is not woken."""
    async with Receiver({"/chat": [200], "/pager": [200]}) as receiver:
        hooks = [
            {
                "name": "chat",
                "url": f"http://127.0.0.1:{receiver.port}/chat",
                "reasons": ["switch", "not_healed"],
            },
            {"name": "pager", "url": f"http://127.0.0.1:{receiver.port}/pager"},
        ]
        doc = {"escalation": {"unresolved_after": 0, "webhooks": hooks}}
        settings = make_settings(kafka_bootstrap, topic_prefix, doc=doc)
        agent = Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
        async with agent:
            (switches,) = [
                c
                for c in agent.components
                if isinstance(c, BatchConsumer) and c.name == "notifier-switches"
            ]
            await asyncio.wait_for(switches.assigned.wait(), 30)
            await set_switch(settings, "kill_switch", True, by="alice", reason="db migration")
            await set_switch(
                settings, "dry_run", True, by="bob", reason="freeze", namespace="payments"
            )
            await eventually(lambda: len(receiver.to("/chat")) >= 2, 30, 0.2, "announcements")
            await asyncio.sleep(0.5)  # nothing more comes
    kill, dry = receiver.to("/chat")
    assert kill["reason"] == "switch" and kill["summary"] == "kill_switch ON: no action executes"
    assert "by alice" in kill["text"] and "db migration" in kill["text"]
    assert dry["summary"].startswith("dry_run ON in namespace payments")
    assert len(receiver.to("/chat")) == 2 and receiver.to("/pager") == []
