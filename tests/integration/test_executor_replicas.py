"""No executor replica acts on an incident that closed, whichever partitions it owns.

An action and its incident's resolution travel on different topics, keyed differently: in
a group of replicas, the one that takes the action often does not own the partition the
resolution is on. Each replica therefore reads every incident (outside the group), and an
action waits until that reader has caught up with what was published before it.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from agent.models import ActionRequest, ActionResult, Incident, Target, utcnow
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import action_request, incident, member
from tests.helpers import make_settings, readers, started_bus

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
