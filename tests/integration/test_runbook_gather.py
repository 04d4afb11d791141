"""A runbook file's ``spec.context.gather`` metrics queries, run on a real Prometheus by
the context gatherer: their series reach the context redacted, and a query Prometheus
rejects costs only its own series. Constant vectors: no scrape to wait for."""

from __future__ import annotations

from dataclasses import replace

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.context import ContextGatherer
from agent.prom import PromClient
from agent.promql_vars import substitute
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


# absent() of a series no one exports answers with the labels of its equality matchers:
# Prometheus itself says what string the literal parsed to. The regex matcher must compile.
NAMESPACED = 'absent(no_such_metric{namespace="$namespace", re=~"$namespace", other="x"})'


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=1, max_size=64))
def test_prometheus_reads_a_substituted_label_value_as_that_value(
    prometheus: Prometheus, value: str
) -> None:
    query, problem = substitute(NAMESPACED, {"namespace": value})
    assert problem is None and query is not None
    reply = requests.get(f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=5)
    assert reply.status_code == 200, reply.text
    (series,) = reply.json()["data"]["result"]
    assert series["metric"] == {"namespace": value, "other": "x"}
