"""Verification re-checks an external feed's signal by what the feed reported since the
action, read back from the anomalies topic on the real broker: a report of it resolved
heals, a report of it firing again does not, and silence leaves the verdict to the
target's state. Only the incident's partition is read, from about the action on."""

from __future__ import annotations

import functools
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from agent.metrics import Metrics
from agent.models import ActionRequest, ActionResult, Anomaly, AnomalyStatus, Target, utcnow
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from streams.bus import Bus
from streams.partitioning import partition_for
from streams.replay import reports_since
from tests.fakes.incidents import OPENED, action_request, incident, member
from tests.fakes.publisher import MemoryBus
from tests.helpers import make_settings, readers, started_bus
from tests.unit.factories import anomaly

pytestmark = pytest.mark.integration


def report(name: str, where: dict[str, str], status: AnomalyStatus, seconds: float) -> Anomaly:
    """What a feed says of ``name`` at ``where``, observed ``seconds`` from now."""
    at = utcnow() + timedelta(seconds=seconds)
    said = anomaly(name, status=status, labels={"cluster": "c1", **where}, source="feed")
    return replace(said, starts_at=at, observed_at=at)


class Scene:
    def __init__(self, bus: Bus, settings: Any) -> None:
        self.bus = bus
        self.ns = f"feed-{uuid.uuid4().hex[:8]}"
        self.where = {"namespace": self.ns, "service": "checkout"}
        self.name = "CheckoutLatencyHigh"
        cluster = FakeCluster()
        cluster.create_deployment(self.ns, "checkout", image="v1", replicas=2, at=OPENED)
        cluster.rollout(self.ns, "checkout", image="v2", at=OPENED + timedelta(minutes=1))
        labels = {"cluster": "c1", **self.where}
        fed = replace(member(self.name, labels=labels), source="feed")
        self.request: ActionRequest = action_request(
            incident(fed, labels=labels),
            "rollback",
            Target(kind="Deployment", namespace=self.ns, name="checkout"),
        )
        self.executor = Executor(
            settings,
            bus=MemoryBus(),
            cluster=cluster,
            metrics=Metrics(),
            reports=functools.partial(reports_since, settings.kafka, bus.topic("anomalies")),
        )

    async def say(self, *anomalies: Anomaly) -> None:
        await self.bus.publish_many([(self.bus.topic("anomalies"), a, None) for a in anomalies])


async def test_a_feed_signal_is_judged_by_what_the_feed_reported_since_the_action(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix, doc={"agent": {"cluster": "c1"}})
    bus, _ = await started_bus(settings)
    try:
        sc = Scene(bus, settings)
        since = utcnow()
        # Before any report: silence proves nothing, the target's state decides.
        outcome, why = await sc.executor.verify_now(sc.request, since=since)
        assert outcome == "healed", why
        assert f"{sc.name} not re-checked (its feed has reported nothing" in why
        # The world before the action (observed before it, delivered late), and the same
        # signal of another service: neither is news about this one.
        await sc.say(
            report(sc.name, sc.where, "firing", -30),
            report(sc.name, {**sc.where, "service": "cart"}, "firing", 1),
        )
        outcome, why = await sc.executor.verify_now(sc.request, since=since)
        assert "reported nothing" in why, why
        # The feed says it resolved: healed by the condition itself.
        await sc.say(report(sc.name, sc.where, "resolved", 1))
        outcome, why = await sc.executor.verify_now(sc.request, since=since)
        assert (outcome, why.split(";")[0]) == ("healed", f"{sc.name} cleared"), why
        # It fired again after that: not healed.
        await sc.say(report(sc.name, sc.where, "firing", 2))
        outcome, why = await sc.executor.verify_now(sc.request, since=since)
        assert outcome == "not_healed" and f"{sc.name} still firing" in why, why
        # Without a moment to count from (a verification of an older kind), as before.
        outcome, why = await sc.executor.verify_now(sc.request)
        assert "an external feed's signal" in why, why
    finally:
        await bus.stop()


async def test_reports_since_reads_only_the_groups_partition_from_about_then(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix, doc={"agent": {"cluster": "c1"}})
    bus, _ = await started_bus(settings)
    topic = bus.topic("anomalies")
    try:
        # Two services whose groups live on different partitions (two in these tests).
        services = [f"svc-{i}" for i in range(20)]
        keys = {s: f"c1/ns/{s}" for s in services}
        a, b = next(
            (x, y)
            for x in services
            for y in services
            if partition_for(keys[x], 2) != partition_for(keys[y], 2)
        )
        since = utcnow()
        await bus.publish_many(
            [
                (topic, report("Slow", {"namespace": "ns", "service": a}, "firing", 1), None),
                (topic, report("Slow", {"namespace": "ns", "service": b}, "firing", 1), None),
            ]
        )
        found = await reports_since(settings.kafka, topic, keys[a], since)
        assert [x.labels["service"] for x in found] == [a]
        # From about the moment asked (a minute's margin for clocks): a later moment
        # finds nothing written before it.
        later = utcnow() + timedelta(minutes=5)
        assert await reports_since(settings.kafka, topic, keys[a], later) == []
    finally:
        await bus.stop()


async def test_the_executor_verifies_an_action_by_the_feeds_reports_after_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The whole path: the action runs, its feed reports the signal resolved a moment
    later, and the verification record says the condition cleared."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "agent": {"cluster": "c1"},
            "remediation": {
                "require_approval": [],
                "confidence_threshold": 0.5,
                "verify_after": "2s",
            },
        },
    )
    bus, _ = await started_bus(settings)
    t = settings.kafka.topic_prefix
    try:
        sc = Scene(bus, settings)
        sc.executor.bus = bus  # the real bus: results go to the broker
        async with readers(kafka_bootstrap, {"results": (f"{t}action-results", ActionResult)}) as r:
            executed = await sc.executor.on_action(sc.request)
            assert executed.status == "succeeded", executed.message
            await sc.say(report(sc.name, sc.where, "resolved", 0.5))
            done = await r["results"].wait_for(
                lambda xs: any(x.outcome != "unknown" for x in xs), 30, "the verification"
            )
        (verdict,) = [x for x in done if x.outcome != "unknown"]
        assert verdict.outcome == "healed", verdict.message
        assert verdict.message.startswith(f"{sc.name} cleared"), verdict.message
    finally:
        await sc.executor.stop()
        await bus.stop()
