"""A runbook file's ``spec.context.gather`` metrics queries, run on a real Prometheus by
the context gatherer: their series reach the context redacted, and a query Prometheus
rejects costs only its own series. Constant vectors: no scrape to wait for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.context import ContextGatherer
from agent.prom import PromClient
from agent.settings import FileRunbook, FileStep, GatherItem
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import ai_settings, incident, member
from tests.fixtures.infra import Prometheus

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-Passw0rd"
GOOD = f'label_replace(vector(0.42), "url", "https://u:{SECRET}@db", "", "")'
REJECTED = "rate(vector(1)[5m])"  # a range of an instant vector: Prometheus answers 400


async def test_a_runbooks_metrics_queries_run_on_prometheus(prometheus: Prometheus) -> None:
    book = FileRunbook(
        name="orders",
        alert="CheckoutErrors",
        path="orders.yaml",
        steps=(FileStep(name="look", action="check_recent_deployments"),),
        gather=(GatherItem("metrics", (GOOD, REJECTED)),),
    )
    settings = replace(ai_settings(context={"timeout": "5s"}), file_runbooks=(book,))
    prom = PromClient(prometheus.url, timeout=4.0)
    c = FakeCluster()
    try:
        g = ContextGatherer(settings, cluster=c, source=c, prom=prom)
        ctx = await g.gather(incident(member("CheckoutErrors")))
    finally:
        await prom.close()
    (got,) = [s for s in ctx.metrics if s.query.startswith("runbook orders:")]
    assert (got.query, got.value) == (f"runbook orders: {GOOD}", 0.42)
    assert SECRET not in got.labels["url"] and "[REDACTED]" in got.labels["url"]
    assert any(n.startswith(f"runbook orders metrics {REJECTED!r} unavailable") for n in ctx.notes)
