"""A runbook escalates, every stage but the correlator real: an Alertmanager alert that
will not clear triggers the runbook's first remedy (a rollback of a recent rollout); the
verification asks Alertmanager (Debian's), finds it still firing and says not_healed; the
analyzer, reading that result, takes the runbook's next step (a restart), which the
executor runs although the target's cooldown has not run out, since the action it held
for was judged a failure; that too is verified not_healed, and nothing more is tried. The
same holds when the analyzer restarts while the first remedy is being verified."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.models import (
    ActionRequest,
    ActionResult,
    Analysis,
    Escalation,
    Incident,
    Target,
    utcnow,
)
from agent.runtime import Agent
from agent.settings import Settings
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import incident, member
from tests.helpers import make_settings, readers

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def alert(name: str, labels: dict[str, str], *, resolved: bool = False) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, **labels},
        "startsAt": iso(now - timedelta(minutes=5)),
        "endsAt": iso(now - timedelta(seconds=1) if resolved else now + timedelta(hours=1)),
    }


@dataclass(frozen=True)
class Scene:
    settings: Settings
    cluster: FakeCluster
    incident: Incident
    target: Target
    alertname: str
    where: dict[str, str]

    def clear(self, alertmanager: Any) -> None:
        alertmanager.post_alerts([alert(self.alertname, self.where, resolved=True)])


def scene(kafka_bootstrap: str, alertmanager: Any, topic_prefix: str, verify_after: str) -> Scene:
    """A checkout Deployment rolled out two minutes ago, an alert on it that will not
    clear, and its incident; the runbook: roll back, else restart."""
    uid = uuid.uuid4().hex[:8]
    # A namespace of its own: the shared Alertmanager notifies every receiver running.
    ns, alertname = f"escalate-{uid}", f"CheckoutDown{uid}"
    where = {"namespace": ns, "service": "checkout"}
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={
            "agent": {"cluster": "c1"},
            "monitoring": {"alertmanager": {"url": alertmanager.url, "timeout": "3s"}},
            "remediation": {
                "require_approval": [],
                "confidence_threshold": 0.5,
                "verify_after": verify_after,
                "cooldown": "5m",
            },
            "runbooks": [
                {
                    "name": "checkout-down",
                    "alert": alertname,
                    "source": "alertmanager",
                    "actions": ["auto_rollback_if_deployment_recent", "restart_workload"],
                }
            ],
        },
    )
    cluster = FakeCluster()
    now = utcnow()
    cluster.create_deployment(ns, "checkout", image="v1", replicas=2, at=now - timedelta(days=1))
    cluster.rollout(ns, "checkout", image="v2", at=now - timedelta(minutes=2))
    alertmanager.post_alerts([alert(alertname, where)])
    labels = {"cluster": "c1", **where}
    am = replace(member(alertname, labels=labels), source="alertmanager")
    inc = replace(incident(am, labels=labels, id=f"inc-{uid}"), opened_at=now, updated_at=now)
    target = Target(kind="Deployment", namespace=ns, name="checkout")
    return Scene(settings, cluster, inc, target, alertname, where)


def verified(xs: list[ActionResult]) -> list[ActionResult]:
    return [x for x in xs if x.outcome != "unknown"]


async def test_a_runbook_takes_its_next_step_when_the_first_is_verified_not_healed(
    kafka_bootstrap: str, alertmanager: Any, topic_prefix: str
) -> None:
    sc = scene(kafka_bootstrap, alertmanager, topic_prefix, "1s")
    settings, cluster, inc, target, alertname = (
        sc.settings,
        sc.cluster,
        sc.incident,
        sc.target,
        sc.alertname,
    )
    t = settings.kafka.topic_prefix
    agent = Agent(settings, roles=["analyzer", "executor"], cluster=cluster, serve_http=False)
    try:
        async with (
            agent,
            readers(
                kafka_bootstrap,
                {
                    "results": (f"{t}action-results", ActionResult),
                    "actions": (f"{t}actions", ActionRequest),
                    "analyses": (f"{t}analyses", Analysis),
                    "escalations": (f"{t}escalations", Escalation),
                },
            ) as r,
        ):
            await agent.bus.publish(agent.bus.topic("incidents"), inc)
            done = await r["results"].wait_for(
                lambda xs: len(verified(xs)) >= 2, 60, "both remedies verified"
            )
            # Nothing after the second: the runbook has no third remedy.
            await asyncio.sleep(3)
            requested = [(a.type, a.target) for a in r["actions"].items]
            analyses = r["analyses"].items
            escalations = r["escalations"].items
    finally:
        sc.clear(alertmanager)
    assert requested == [("rollback", target), ("restart_workload", target)], requested
    outcomes = [(x.type, x.outcome) for x in verified(done)]
    assert outcomes == [("rollback", "not_healed"), ("restart_workload", "not_healed")]
    assert all(f"{alertname} still firing" in x.message for x in verified(done))
    # The restart ran inside the rollback's cooldown: its first result is "succeeded".
    ran = [x for x in done if x.type == "restart_workload" and x.outcome == "unknown"]
    assert [x.status for x in ran] == ["succeeded"], [x.message for x in ran]
    w = await cluster.workload(target)
    assert w.image == "v1" and w.restarted_at is not None
    # Three analyses of the same revision: the first, after the rollback failed, after both.
    assert len({a.id for a in analyses}) == 3 and len({a.incident_revision for a in analyses}) == 1
    assert analyses[-1].actions == ()
    # A human heard of each failure, and, with nothing left to try, of the incident.
    reasons = sorted(e.reason for e in escalations)
    assert reasons == ["no_remedy", "not_healed", "not_healed"], reasons
    (last,) = [e for e in escalations if e.reason == "no_remedy"]
    tried = [d for d in last.details if d.startswith("already tried without effect")]
    assert len(tried) == 2, last.details


async def test_an_analyzer_restarted_during_the_verification_takes_the_next_step(
    kafka_bootstrap: str, alertmanager: Any, topic_prefix: str
) -> None:
    """The verdict on the rollback lands while no analyzer runs, and no new revision of
    the incident follows: the restarted analyzer replays the incident and the verdict,
    and once the group gives it the incident's partition, it takes the next step."""
    sc = scene(kafka_bootstrap, alertmanager, topic_prefix, "4s")
    t = sc.settings.kafka.topic_prefix

    def analyzer() -> Agent:
        return Agent(sc.settings, roles=["analyzer"], cluster=sc.cluster, serve_http=False)

    executor = Agent(sc.settings, roles=["executor"], cluster=sc.cluster, serve_http=False)
    try:
        async with (
            executor,
            readers(
                kafka_bootstrap,
                {
                    "results": (f"{t}action-results", ActionResult),
                    "actions": (f"{t}actions", ActionRequest),
                },
            ) as r,
        ):
            async with analyzer() as first:
                await first.bus.publish(first.bus.topic("incidents"), sc.incident)
                await r["actions"].wait_for(lambda xs: len(xs) >= 1, 30, "the rollback")
            stopped = utcnow()
            done = await r["results"].wait_for(
                lambda xs: len(verified(xs)) >= 1, 30, "the rollback verified"
            )
            (verdict,) = verified(done)
            # The premise: the verdict came after the analyzer was gone.
            assert (verdict.type, verdict.outcome) == ("rollback", "not_healed")
            assert verdict.finished_at > stopped, (verdict.finished_at, stopped)
            async with analyzer():
                await r["actions"].wait_for(lambda xs: len(xs) >= 2, 30, "the next step")
            requested = [(a.type, a.target) for a in r["actions"].items]
    finally:
        sc.clear(alertmanager)
    assert requested == [("rollback", sc.target), ("restart_workload", sc.target)], requested
