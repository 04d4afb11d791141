"""No executor replica acts on an incident that closed, whichever partitions it owns; and
a decision executes whichever replica asked for it.

An action and its incident's resolution travel on different topics, keyed differently: in
a group of replicas, the one that takes the action often does not own the partition the
resolution is on. Each replica therefore reads every incident (outside the group), and an
action waits until that reader has caught up with what was published before it. The same
holds for an approval request and its decision: every replica reads every request.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from agent.models import (
    ActionRequest,
    ActionResult,
    ApprovalDecision,
    Incident,
    Target,
    stable_id,
    utcnow,
)
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from streams.bus import BatchConsumer
from streams.partitioning import partition_for
from tests.fakes.incidents import action_request, incident, member
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration


def _incidents(n: int) -> list[Incident]:
    run = uuid.uuid4().hex[:6]
    out = []
    for i in range(n):
        labels = {"cluster": "c1", "namespace": "shop", "service": f"svc-{i}"}
        out.append(incident(member(labels=labels), labels=labels, id=f"inc-{run}-{i}"))
    return out


def _resolved(inc: Incident) -> Incident:
    return replace(inc, status="resolved", revision=2, resolved_at=utcnow(), updated_at=utcnow())


def _action(inc: Incident) -> ActionRequest:
    target = Target(kind="Deployment", namespace="shop", name=inc.labels["service"])
    return replace(action_request(inc, "rollback", target), id=f"act-{inc.id}")


async def test_no_replica_acts_on_an_incident_that_closed(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two replicas share 4 partitions of each topic. Of 12 incidents, 5 resolve before the
    replicas start (their replay at start), 5 after, each just before its action (the
    incident watch, and the wait for it); 2 stay open. Every action of a resolved one is
    denied as incident_closed; those of the open ones are not (so the check can tell)."""
    settings = make_settings(kafka_bootstrap, topic_prefix, doc={"kafka": {"partitions": 4}})
    incidents = _incidents(12)
    before, after, still_open = incidents[:5], incidents[5:10], incidents[10:]
    bus, _ = await started_bus(settings)
    try:
        for inc in incidents:
            await bus.publish(bus.topic("incidents"), inc)
        for inc in before:
            await bus.publish(bus.topic("incidents"), _resolved(inc))
        replicas = [
            Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
            for _ in range(2)
        ]
        async with (
            replicas[0],
            replicas[1],
            readers(kafka_bootstrap, {"results": (bus.topic("action-results"), ActionResult)}) as r,
        ):
            for inc in before + still_open:
                await bus.publish(bus.topic("actions"), _action(inc))
            for inc in after:
                await bus.publish(bus.topic("incidents"), _resolved(inc))
                await bus.publish(bus.topic("actions"), _action(inc))
            wanted = {_action(inc).id for inc in incidents}
            results = await r["results"].wait_for(
                lambda xs: wanted <= {x.action_id for x in xs}, 60, "a result for every action"
            )
    finally:
        await bus.stop()
    first = {}
    for res in results:
        first.setdefault(res.action_id, res)
    for inc in before + after:
        res = first[_action(inc).id]
        assert (res.status, res.message.split(":")[0]) == ("denied", "incident_closed"), res
    for inc in still_open:
        assert "incident_closed" not in first[_action(inc).id].message


async def test_the_hourly_budget_is_one_budget_for_every_replica(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two replicas share 4 partitions; 8 scale-ups of 8 workloads, two per partition, so
    each replica owns some. With a budget of 3 actions an hour, 3 run in all, not 3 per
    replica: each replica reads every replica's action results (the executor watch) and
    waits for it before deciding."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "kafka": {"partitions": 4},
            "remediation": {"max_actions_per_hour": 3, "cooldown": 0, "verify_after": "10m"},
        },
    )
    names: dict[int, list[str]] = {p: [] for p in range(4)}
    for i in range(200):
        p = partition_for(f"Deployment/shop/svc-{i}", 4)
        if len(names[p]) < 2:
            names[p].append(f"svc-{i}")
    # p0, p1, p2, p3, p0, ...: the first three land on both replicas whichever way the
    # group assigns the partitions.
    order = [names[p][n] for n in range(2) for p in range(4)]
    clusters = [FakeCluster(), FakeCluster()]
    for c in clusters:
        for name in order:
            c.create_deployment("shop", name, image="v1", replicas=2, at=utcnow())
    actions = []
    for name in order:
        labels = {"cluster": "c1", "namespace": "shop", "service": name}
        inc = incident(member(labels=labels), labels=labels, id=f"inc-{uuid.uuid4().hex[:8]}")
        target = Target(kind="Deployment", namespace="shop", name=name)
        actions.append(replace(action_request(inc, "scale_up", target), id=f"act-{inc.id}"))
    bus, _ = await started_bus(settings)
    try:
        replicas = [
            Agent(settings, roles=["executor"], cluster=c, serve_http=False) for c in clusters
        ]
        async with (
            replicas[0],
            replicas[1],
            readers(kafka_bootstrap, {"results": (bus.topic("action-results"), ActionResult)}) as r,
        ):
            for a in actions:  # one at a time: each decision follows the last one's result
                await bus.publish(bus.topic("actions"), a)
                await r["results"].wait_for(
                    lambda xs, a=a: any(x.action_id == a.id for x in xs), 30, f"{a.id}'s result"
                )
            results = r["results"].items
    finally:
        await bus.stop()
    status = {x.action_id: x.status for x in results}
    assert [status[a.id] for a in actions].count("succeeded") == 3, status
    denied = [x for x in results if x.status == "denied"]
    assert len(denied) == 5 and all(x.message.startswith("max_actions_per_hour") for x in denied), (
        denied
    )
    scaled = [sum([(await c.workload(a.target)).replicas != 2 for a in actions]) for c in clusters]
    assert sum(scaled) == 3 and 0 not in scaled, f"actions per replica: {scaled}"


def _group_consumer(agent: Agent) -> BatchConsumer:
    (c,) = [c for c in agent.components if isinstance(c, BatchConsumer) and c.name == "executor"]
    return c


async def test_a_decision_executes_on_the_replica_that_did_not_ask(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Two replicas, 3 partitions (the shipped setup). Replica C owns the rollback's actions
    partition and asks for the approval; the decision lands on a decisions partition replica
    D owns (and, were approvals read in the group, not on D's approvals partition either).
    D knows the request and rolls back; neither replica keeps it pending afterwards."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "kafka": {"partitions": 3},
            "remediation": {"require_approval": ["rollback"], "cooldown": 0, "verify_after": "10m"},
        },
    )
    cluster = FakeCluster()  # one cluster, as in production: both replicas see its versions
    cluster.create_deployment("shop", "checkout", image="v1", replicas=2, at=utcnow())
    cluster.rollout("shop", "checkout", image="v2", at=utcnow())
    target = Target(kind="Deployment", namespace="shop", name="checkout")
    labels = {"cluster": "c1", "namespace": "shop", "service": "checkout"}
    inc = incident(member(labels=labels), labels=labels, id=f"inc-{uuid.uuid4().hex[:8]}")
    bus, _ = await started_bus(settings)
    try:
        replicas = [
            Agent(settings, roles=["executor"], cluster=cluster, serve_http=False) for _ in range(2)
        ]
        async with (
            replicas[0],
            replicas[1],
            readers(
                kafka_bootstrap,
                {
                    "results": (bus.topic("action-results"), ActionResult),
                    "letters": (bus.topic("dead-letter"), None),
                },
            ) as r,
        ):
            groups = [_group_consumer(a) for a in replicas]
            actions, decisions = bus.topic("actions"), bus.topic("decisions")

            def settled() -> bool:  # both in the group, every partition held once
                held = [g.holding for g in groups]
                return (
                    all(held)
                    and not (held[0] & held[1])
                    and len(held[0] | held[1]) == 3 * len(groups[0].types)
                )

            await eventually(settled, 60, what="the group's assignment to settle")
            (creator,) = [i for i, g in enumerate(groups) if g.holds(actions, target.key)]
            for n in range(200):
                a = replace(action_request(inc, "rollback", target), id=f"act-{inc.id}-{n}")
                rid = stable_id("approval", a.id)
                decider = groups[1 - creator]
                if decider.holds(decisions, rid) and not decider.holds(bus.topic("approvals"), rid):
                    break
            else:
                raise AssertionError("no action id whose decision the other replica owns")
            await bus.publish(actions, a)
            (asked,) = await r["results"].wait_for(
                lambda xs: any(x.action_id == a.id for x in xs), 30, "the approval request"
            )
            assert asked.status == "pending_approval", asked
            req = replicas[creator].executor.pending[rid]  # type: ignore[union-attr]
            await bus.publish(
                decisions,
                ApprovalDecision(
                    id=f"d-{uuid.uuid4().hex[:8]}",
                    request_id=rid,
                    action_hash=req.action_hash,
                    decision="approve",
                    decided_by="alice",
                    decided_at=utcnow(),
                ),
            )
            done = await r["results"].wait_for(
                lambda xs: (
                    any(x.action_id == a.id and x.status != "pending_approval" for x in xs)
                    or bool(r["letters"].items)
                ),
                30,
                "the decision's outcome",
            )
            assert r["letters"].items == []
            (ran,) = [x for x in done if x.action_id == a.id and x.status != "pending_approval"]
            assert ran.status == "succeeded" and "[approved]" in ran.message, ran
            assert (await cluster.workload(target)).image == "v1"
            await eventually(
                lambda: all(rid not in x.executor.pending for x in replicas),  # type: ignore[union-attr]
                30,
                what="both replicas to forget the decided request",
            )
    finally:
        await bus.stop()
