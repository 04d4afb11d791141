"""Verification re-checks what fired where it fired: a drain is judged by the workloads it
moved, not by the node it left broken; a series is matched on the labels the detector gave
it; a signal Prometheus cannot re-check hands the verdict to the target's state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from agent.metrics import Metrics
from agent.models import (
    Firing,
    Incident,
    Member,
    Target,
)
from agent.prom import Sample
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import OPENED, PATTERNS, incident, member
from tests.fakes.incidents import action_request as request
from tests.fakes.publisher import MemoryBus
from tests.unit.factories import settings as make_settings

NODE_DOWN = {
    "name": "node-not-ready",
    "condition": 'kube_node_status_condition{condition="Ready", status!="true"} == 1',
    "actions": ["check_node_conditions"],
}
CHECKOUT = {"namespace": "shop", "service": "checkout"}


class FakeProm:
    """Answers each pattern by a substring of its expression."""

    def __init__(self, answers: dict[str, list[dict[str, str]]]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    async def query(self, expr: str) -> list[Sample]:
        self.queries.append(expr)
        found = next((v for k, v in self.answers.items() if k in expr), [])
        return [Sample(labels, 1.0) for labels in found]


def node_member(node: str = "n1") -> Member:
    """The node's own condition, as the Kubernetes detector reports it."""
    down = member("node-not-ready", labels={"node": node, "namespace": "", "service": ""})
    return replace(down, source="kubernetes")


def node_incident() -> Incident:
    """Node n1 down; the checkout pod on it failing, absorbed into the node's incident."""
    pod = member(labels={"pod": "checkout-a", "node": "n1"})
    return incident(node_member(), pod, labels={"cluster": "c1", "namespace": "", "service": ""})


@pytest.fixture
def cluster() -> FakeCluster:
    c = FakeCluster()
    c.create_deployment("shop", "checkout", image="v1", replicas=2, at=OPENED)
    for n in ("n1", "n2"):
        c.add_node(n)
    c.add_pod("shop", "checkout-a", node="n1", workload="checkout")
    return c


@pytest.fixture
async def executor(cluster: FakeCluster) -> AsyncIterator[tuple[Executor, FakeProm]]:
    prom = FakeProm({})
    settings = make_settings(
        {
            "remediation": {"cooldown": 0, "verify_after": 0, "max_nodes_cordoned": 1},
            "patterns": [*PATTERNS, NODE_DOWN],
            "agent": {"cluster": "c1"},
        }
    )
    ex = Executor(settings, bus=MemoryBus(), cluster=cluster, metrics=Metrics(), prom=prom)
    try:
        yield ex, prom
    finally:
        await ex.stop()


def test_a_node_action_is_not_judged_by_its_own_node() -> None:
    drain = request(node_incident(), "drain_node", Target(kind="Node", name="n1"))
    assert drain.firing == (Firing("high-error-rate", CHECKOUT, "prometheus"),)
    assert drain.trigger == ("high-error-rate",)
    # Any other action on the same incident keeps the node's condition, on the node.
    restart = request(
        node_incident(),
        "restart_workload",
        Target(kind="Deployment", **{"namespace": "shop", "name": "checkout"}),
    )
    assert restart.firing == (
        Firing("high-error-rate", CHECKOUT, "prometheus"),
        Firing("node-not-ready", {"node": "n1"}, "kubernetes"),
    )


async def test_a_drain_heals_when_its_workloads_do_while_the_node_stays_down(
    executor: tuple[Executor, FakeProm],
) -> None:
    ex, prom = executor
    drain = request(node_incident(), "drain_node", Target(kind="Node", name="n1"))
    assert (await ex.on_action(drain)).status == "succeeded"
    # The node is still NotReady; another service in another namespace has errors.
    prom.answers = {
        "kube_node_status_condition": [{"node": "n1"}],
        "http_requests_total": [{"namespace": "pay", "service": "ledger"}],
    }
    outcome, why = await ex.verify_now(drain)
    assert (outcome, why) == ("healed", "high-error-rate cleared")
    # The moved pods still failing elsewhere is not healed.
    prom.answers["http_requests_total"].append({**CHECKOUT, "pod": "checkout-b", "node": "n2"})
    assert (await ex.verify_now(drain))[0] == "not_healed"


async def test_an_action_verified_not_healed_is_escalated(
    executor: tuple[Executor, FakeProm],
) -> None:
    ex, prom = executor
    prom.answers = {"http_requests_total": [CHECKOUT]}  # still firing after the action
    restart = request(
        incident(member()),
        "restart_workload",
        Target(kind="Deployment", namespace="shop", name="checkout"),
    )
    bus = ex.bus
    assert isinstance(bus, MemoryBus)
    result = await ex.on_action(restart)  # verify_after 0: verified in the background at once
    assert result.status == "succeeded", result.message
    for _ in range(200):
        if bus.on("escalations"):
            break
        await asyncio.sleep(0.01)
    (escalation,) = [e for e, _ in bus.on("escalations")]
    assert (escalation.reason, escalation.action_id) == ("not_healed", restart.id)
    assert escalation.details == ("high-error-rate still firing after the action",)


async def test_a_series_naming_its_service_by_app_is_still_firing(
    executor: tuple[Executor, FakeProm],
) -> None:
    ex, prom = executor
    inc = incident(member())
    rollback = request(
        inc, "rollback", Target(kind="Deployment", namespace="shop", name="checkout")
    )
    # The detector gave it service=checkout from its app label; the re-check must too.
    prom.answers = {"http_requests_total": [{"namespace": "shop", "app": "checkout"}]}
    outcome, why = await ex.verify_now(rollback)
    assert (outcome, why) == ("not_healed", "high-error-rate still firing after the action")


async def test_a_signal_prometheus_cannot_recheck_does_not_hide_one_it_can(
    executor: tuple[Executor, FakeProm],
) -> None:
    ex, prom = executor
    backoff = member("BackOff")  # a Kubernetes event: no pattern re-runs it
    inc = incident(backoff, member())
    restart = request(
        inc, "restart_workload", Target(kind="Deployment", namespace="shop", name="checkout")
    )
    assert [f.name for f in restart.firing] == ["BackOff", "high-error-rate"]
    prom.answers = {"http_requests_total": [CHECKOUT]}
    assert await ex.verify_now(restart) == (
        "not_healed",
        "high-error-rate still firing after the action",
    )
    # Once the pattern clears, the unchecked part leaves the verdict to the workload.
    prom.answers = {}
    outcome, why = await ex.verify_now(restart)
    assert outcome == "healed"
    assert why.startswith(
        "high-error-rate cleared; BackOff not re-checked (not a configured Prometheus pattern); "
    ), why
