"""The hourly budget holds between executor replicas that decide at the same instant:
each claims its unit on the single-partition budget-claims topic of the real broker, and
the topic's order gives the last unit to one of them. An action the cluster refused gives
its unit back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import pytest

from agent.metrics import Metrics
from agent.models import ActionRequest, Target, utcnow
from agent.settings import Settings
from handlers.executor import Executor, undo_request
from handlers.fake_cluster import FakeCluster
from streams.bus import Bus
from streams.ledger import BudgetLedger
from tests.fakes.incidents import action_request, incident, member
from tests.helpers import make_settings, started_bus

pytestmark = pytest.mark.integration

REMEDIATION = {
    "max_actions_per_hour": 1,
    "cooldown": 0,
    "verify_after": "10m",
    "require_approval": [],
    "confidence_threshold": 0.5,
}


def scale_up(name: str) -> ActionRequest:
    labels = {"cluster": "c1", "namespace": "shop", "service": name}
    inc = incident(member(labels=labels), labels=labels, id=f"inc-{uuid.uuid4().hex[:8]}")
    target = Target(kind="Deployment", namespace="shop", name=name)
    return replace(action_request(inc, "scale_up", target), id=f"act-{inc.id}")


def replica(settings: Settings, bus: Bus, cluster: FakeCluster) -> Executor:
    """An executor that knows nothing of the other's actions (no watch): only the claims
    stand between them."""
    return Executor(
        settings,
        bus=bus,
        cluster=cluster,
        metrics=Metrics(),
        budget=BudgetLedger(bus, settings.remediation),
    )


@contextlib.asynccontextmanager
async def two_replicas(
    settings: Settings, cluster: FakeCluster
) -> AsyncIterator[tuple[Executor, Executor]]:
    """Two executor replicas on buses of their own, sharing the cluster and nothing else."""
    bus, _ = await started_bus(settings)
    other = Bus(settings.kafka, metrics=Metrics(), name="replica-2")
    await other.start()
    first, second = replica(settings, bus, cluster), replica(settings, other, cluster)
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()
        await other.stop()
        await bus.stop()


def settings_with(kafka_bootstrap: str, topic_prefix: str, **remediation: object) -> Settings:
    return make_settings(
        kafka_bootstrap, topic_prefix, doc={"remediation": {**REMEDIATION, **remediation}}
    )


async def test_two_replicas_deciding_at_once_spend_one_budget(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    cluster = FakeCluster()
    for name in ("cart", "checkout"):
        cluster.create_deployment("shop", name, image="v1", replicas=2, at=utcnow())
    async with two_replicas(settings_with(kafka_bootstrap, topic_prefix), cluster) as (a, b):
        results = await asyncio.gather(
            a.on_action(scale_up("cart")), b.on_action(scale_up("checkout"))
        )
    statuses = sorted(r.status for r in results)
    assert statuses == ["denied", "succeeded"], [r.message for r in results]
    (denied,) = [r for r in results if r.status == "denied"]
    assert denied.message.startswith("max_actions_per_hour: 1 actions in the last hour")
    assert "as claimed by every replica" in denied.message


async def test_an_action_the_cluster_refused_gives_its_unit_back(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_with(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    cluster = FakeCluster()
    cluster.create_deployment("shop", "cart", image="v1", replicas=2, at=utcnow())
    ex = replica(settings, bus, cluster)
    try:
        # No revision to roll back to: the cluster refuses, nothing changed.
        rollback = replace(
            scale_up("cart"), id=f"act-{uuid.uuid4().hex[:8]}", type="rollback", params={}
        )
        refused = await ex.on_action(rollback)
        assert refused.status == "failed", refused.message
        assert "no previous revision" in refused.message
        done = await ex.on_action(scale_up("cart"))
        assert done.status == "succeeded", done.message
    finally:
        await ex.stop()
        await bus.stop()


def cordon(node: str) -> ActionRequest:
    labels = {"cluster": "c1", "namespace": "", "service": "", "node": node}
    inc = incident(member(labels=labels), labels=labels, id=f"inc-{uuid.uuid4().hex[:8]}")
    target = Target(kind="Node", namespace="", name=node)
    return replace(action_request(inc, "cordon_node", target), id=f"act-{inc.id}")


async def test_two_replicas_cannot_each_cordon_the_last_node_allowed(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A zone going down: two replicas each cordon a node at once, with one node allowed.
    Each saw no node cordoned; the claims' order lets one through."""
    cluster = FakeCluster()
    for node in ("n1", "n2"):
        cluster.add_node(node)
    settings = settings_with(
        kafka_bootstrap, topic_prefix, max_actions_per_hour=20, max_nodes_cordoned=1
    )
    async with two_replicas(settings, cluster) as (a, b):
        results = await asyncio.gather(a.on_action(cordon("n1")), b.on_action(cordon("n2")))
    assert sorted(r.status for r in results) == ["denied", "succeeded"], [
        r.message for r in results
    ]
    (denied,) = [r for r in results if r.status == "denied"]
    assert denied.message.startswith("max_nodes_cordoned: 1 nodes already cordoned"), denied.message
    assert [n for n in ("n1", "n2") if cluster.node(n).unschedulable] == [
        r.target.name for r in results if r.status == "succeeded"
    ]


async def test_an_uncordon_is_granted_with_other_nodes_in_flight(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The undo of a cordon uncordons its node: another replica's cordon in flight (its
    claim granted, the cluster not showing it yet) is no reason to keep it cordoned, nor to
    page. Its unit of the hourly budget is still claimed."""
    cluster = FakeCluster()
    for node in ("n1", "n2"):
        cluster.add_node(node)
    settings = settings_with(
        kafka_bootstrap, topic_prefix, max_actions_per_hour=20, max_nodes_cordoned=1
    )
    bus, _ = await started_bus(settings)
    ex = replica(settings, bus, cluster)
    ledger = BudgetLedger(bus, settings.remediation)
    try:
        done = await ex.on_action(cordon("n1"))
        assert done.status == "succeeded", done.message
        # Another replica is cordoning n2: its claim is in, its cordon not yet.
        assert await ledger.claim(cordon("n2"), utcnow()) is None
        undo = await ex.on_action(undo_request(done, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        assert not cluster.node("n1").unschedulable
        # n2's claim still holds: a cordon of n1 now would be the second node.
        again = await ex.on_action(cordon("n1"))
        assert again.status == "denied", again.message
        assert again.message.startswith("max_nodes_cordoned: 1 nodes already cordoned (n2)")
    finally:
        await ledger.stop()
        await ex.stop()
        await bus.stop()


async def test_claims_are_counted_across_a_restart_of_the_claim_follower(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = settings_with(kafka_bootstrap, topic_prefix, max_actions_per_hour=2)
    bus, _ = await started_bus(settings)
    ledger = BudgetLedger(bus, settings.remediation)
    try:
        now = utcnow()
        assert await ledger.claim(scale_up("a"), now) is None
        # Its consumer fails under it: the follower dies of it.
        consumer = ledger.log._consumer
        assert consumer is not None
        await consumer.stop()
        for _ in range(100):
            if ledger.log._task is not None and ledger.log._task.done():
                break
            await asyncio.sleep(0.05)
        assert ledger.log._task is not None and ledger.log._task.done()
        # The next claim follows the topic afresh, and still counts the first.
        assert await ledger.claim(scale_up("b"), now) is None
        denied = await ledger.claim(scale_up("c"), now)
        assert denied is not None and denied.rule == "max_actions_per_hour", denied
        assert ledger.log._consumer is not consumer
    finally:
        await ledger.stop()
        await bus.stop()


def drain(node: str) -> ActionRequest:
    return replace(cordon(node), type="drain_node")


async def test_a_node_drained_past_the_hour_still_counts_toward_the_cordon_limit(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """drain_timeout of two hours: 70 minutes into n1's drain (its claim not done), n1
    still counts as cordoned for every replica, one following the topic since and one
    started now. A claim lifetime of the budget hour alone forgot it there."""
    rem = {**REMEDIATION, "max_actions_per_hour": 20, "max_nodes_cordoned": 1}
    doc = {"agent": {"stuck_after": "3h"}, "remediation": {**rem, "drain_timeout": "2h"}}
    settings = make_settings(kafka_bootstrap, topic_prefix, doc=doc)
    bus, _ = await started_bus(settings)
    ledger = BudgetLedger(bus, settings.remediation)
    fresh = BudgetLedger(bus, settings.remediation)
    try:
        start = utcnow()
        assert await ledger.claim(drain("n1"), start) is None
        later = start + timedelta(minutes=70)
        for arbiter in (ledger, fresh):
            denied = await arbiter.claim(drain("n2"), later)
            assert denied is not None and denied.rule == "max_nodes_cordoned", denied
            assert "already cordoned (n1)" in denied.reason, denied.reason
        # Past its lifetime (drain_timeout and the margin) a claim never done lets go.
        past = start + timedelta(seconds=settings.remediation.node_claim_lifetime + 1)
        assert await ledger.claim(drain("n3"), past) is None
    finally:
        await fresh.stop()
        await ledger.stop()
        await bus.stop()
