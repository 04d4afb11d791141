"""Verification re-checks what fired where it fired: a drain is judged by the workloads it
moved, not by the node it left broken; a series is matched on the labels the detector gave
it; a signal Prometheus cannot re-check hands the verdict to the target's state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from agent.metrics import Metrics
from agent.models import (
    Firing,
    Incident,
    Member,
    Target,
)
from agent.prom import PromClient, Sample, Vector
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import OPENED, PATTERNS, incident, member
from tests.fakes.incidents import action_request as request
from tests.fakes.publisher import MemoryBus
from tests.helpers import prometheus_query_api
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

    async def query_vector(self, expr: str) -> Vector:
        self.queries.append(expr)
        found = next((v for k, v in self.answers.items() if k in expr), [])
        return Vector([Sample(labels, 1.0) for labels in found])


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


@pytest.fixture
async def prometheus() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local server speaking the Prometheus query API: the URL, and the reply it gives."""
    async with prometheus_query_api(lambda q: "http_requests_total" in q) as served:
        yield served


def _reply(*series: dict[str, str], warnings: list[str] | None = None) -> dict[str, Any]:
    result = [{"metric": s, "value": [1717239600, "0.5"]} for s in series]
    extra = {} if warnings is None else {"warnings": warnings}
    return {"status": "success", "data": {"resultType": "vector", "result": result}, **extra}


async def test_a_partial_reply_missing_the_series_proves_nothing_healed(
    cluster: FakeCluster, prometheus: tuple[str, dict[str, Any]]
) -> None:
    url, reply = prometheus
    prom = PromClient(url)
    settings = make_settings({"remediation": {"verify_after": 0}, "patterns": PATTERNS})
    ex = Executor(settings, bus=MemoryBus(), cluster=cluster, metrics=Metrics(), prom=prom)
    rollback = request(
        incident(member()), "rollback", Target(kind="Deployment", namespace="shop", name="checkout")
    )
    missing = "partial response: store eu-1 unavailable"
    try:
        # Thanos lost the store holding checkout's series: "success", without it.
        reply.update(_reply({"namespace": "pay", "service": "ledger"}, warnings=[missing]))
        assert await ex.recheck_trigger(rollback) == (
            "unknown",
            f"high-error-rate not re-checked (Prometheus answered in part: {missing})",
        )
        # What a partial reply does show still fires.
        reply.update(_reply(CHECKOUT, warnings=[missing]))
        assert await ex.recheck_trigger(rollback) == (
            "not_healed",
            "high-error-rate still firing after the action",
        )
        # Prometheus' own annotation of the expression misses nothing: decided.
        note = "PromQL warning: quantile value should be between 0 and 1"
        reply.update(_reply({"namespace": "pay", "service": "ledger"}, warnings=[note]))
        assert await ex.recheck_trigger(rollback) == ("healed", "high-error-rate cleared")
        # A whole reply without it: cleared.
        reply.clear()
        reply.update(_reply({"namespace": "pay", "service": "ledger"}))
        assert await ex.recheck_trigger(rollback) == ("healed", "high-error-rate cleared")
    finally:
        await ex.stop()
        await prom.close()
