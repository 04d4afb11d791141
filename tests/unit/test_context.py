"""Context gathering: every source bounded in time and bytes, redacted, and failures noted."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.analyzer import ConfigChange, KubeEvent, analyze
from agent.context import (
    ClusterContext,
    ContextGatherer,
    LogQuery,
    derive_signals,
    is_workload_pod,
    owner_of,
    parse_logql,
    render_query,
    windows,
)
from agent.errors import DependencyUnavailable
from agent.prom import Sample
from agent.runbook_expr import parse
from agent.settings import (
    DEFAULT_CONTEXT_QUERIES,
    FileRunbook,
    FileStep,
    GatherItem,
    parse_settings,
)
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import OPENED, SHOP, ai_settings, incident, member

SECRET = "s3cr3t-Passw0rd"


class FakeProm:
    """Answers by the first matching substring of the expression; records queries."""

    def __init__(
        self,
        answers: dict[str, list[Sample]],
        *,
        delay: float = 0.0,
        fail: bool = False,
        hung: tuple[str, ...] = (),
        broken: str = "\0",  # expressions containing it fail
    ) -> None:
        self.answers = answers
        self.delay = delay
        self.fail = fail
        self.hung = hung  # substrings of the expressions it never answers
        self.broken = broken
        self.queries: list[str] = []

    async def query(self, expr: str) -> list[Sample]:
        self.queries.append(expr)
        if self.fail or self.broken in expr:
            raise DependencyUnavailable(f"prometheus down (password={SECRET})")
        if any(h in expr for h in self.hung):
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        return next((v for k, v in self.answers.items() if k in expr), [])


class SlowLogs(FakeCluster):
    async def logs(
        self, namespace: str, pod: str, *, tail: int, since: datetime | None = None
    ) -> str:
        await asyncio.sleep(5)
        return ""


class HangingLogs(FakeCluster):
    """The fake cluster, where reading the log of a pod in ``hung`` never returns (a
    kubelet that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.hung: set[str] = set()

    async def logs(
        self, namespace: str, pod: str, *, tail: int, since: datetime | None = None
    ) -> str:
        if pod in self.hung:
            await asyncio.Event().wait()
        return await super().logs(namespace, pod, tail=tail, since=since)


def cluster(cls: type[FakeCluster] = FakeCluster) -> FakeCluster:
    c = cls()
    c.create_deployment(
        "shop", "checkout", image="shop/checkout:v6", replicas=3, at=OPENED - timedelta(days=3)
    )
    c.rollout("shop", "checkout", image="shop/checkout:v7", at=OPENED - timedelta(minutes=5))
    c.set_logs(
        "shop",
        "checkout-7c9f-abcde",
        "\n".join(
            [f"line {i}" for i in range(200)] + [f"connecting with password={SECRET}", "ERROR boom"]
        ),
    )
    c.set_logs("shop", "cart-1-a", "not ours")
    c.add_event(
        KubeEvent(
            "shop", "Pod", "checkout-7c9f-abcde", "OOMKilled", message=f"token={SECRET}", at=OPENED
        )
    )
    c.add_event(KubeEvent("shop", "Pod", "checkout-7c9f-abcde", "BackOff", at=OPENED))
    c.add_event(KubeEvent("shop", "Pod", "cart-1-a", "BackOff", at=OPENED))
    c.add_event(KubeEvent("", "Node", "node-a", "NodeHasDiskPressure", at=OPENED))
    c.add_config_change(
        ConfigChange(
            "shop",
            "checkout-config",
            OPENED - timedelta(minutes=3),
            used_by=("checkout",),
            summary=f"api_key={SECRET}",
        )
    )
    c.add_config_change(
        ConfigChange("shop", "old-config", OPENED - timedelta(days=2), used_by=("checkout",))
    )
    c.set_node_conditions("node-a", ["MemoryPressure"])
    return c


QUERIES = {
    "cpu_saturation": 'cpu{namespace="$namespace",pod=~"$workload-.*"}',
    "node_cpu_saturation": 'node_cpu{namespace="$namespace",workload="$workload"}',
    "dependency_error_ratio": 'dep_errors{service="$service"}',
}
PROM = {
    "node_cpu": [Sample({"node": "node-a"}, 0.97)],
    "cpu{": [Sample({"namespace": "shop"}, 0.93)],
    "dep_errors": [Sample({"dependency": "payments"}, 0.8), Sample({"dependency": "db"}, 0.0)],
    "http_requests_total": [
        Sample({"namespace": "shop", "service": "checkout"}, 0.2),
        Sample({"namespace": "shop", "service": "cart"}, 0.9),  # another service: left out
    ],
}
INC = incident(member(), member("high-latency", labels={"node": "node-a"}))


async def gather(c: FakeCluster | None = None, prom: FakeProm | None = None, **context: object):  # type: ignore[no-untyped-def]
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s", **context})
    c = c or cluster()
    g = ContextGatherer(settings, cluster=c, source=c, prom=prom or FakeProm(PROM))
    return await g.gather(INC)


async def test_every_source_is_gathered_and_derived() -> None:
    ctx = await gather()
    assert [(r.revision, r.image) for r in ctx.rollouts] == [
        (1, "shop/checkout:v6"),
        (2, "shop/checkout:v7"),
    ]
    assert ctx.cpu_saturation == {"checkout": 0.93}
    assert ctx.node_cpu_saturation == {"node-a": 0.97}
    assert ctx.dependency_errors == {"payments": 0.8, "db": 0.0}
    assert ctx.oom_killed == ("checkout",) and ctx.crash_looping == ("checkout",)
    assert ctx.node_conditions == {"node-a": ("DiskPressure", "MemoryPressure")}
    assert [c.name for c in ctx.config_changes] == ["checkout-config"]  # the old one is outside
    assert list(ctx.logs) == ["checkout-7c9f-abcde"]
    assert {e.name for e in ctx.events} == {"checkout-7c9f-abcde", "node-a"}
    pattern = [s for s in ctx.metrics if s.query == "pattern:high-error-rate"]
    assert [s.labels["service"] for s in pattern] == ["checkout"]
    assert ctx.notes == ()


class CountingPods(FakeCluster):
    def __init__(self) -> None:
        super().__init__()
        self.listed: list[tuple[str, str]] = []

    async def pods(self, namespace: str, workload: str) -> Sequence[str]:
        self.listed.append((namespace, workload))
        return await super().pods(namespace, workload)


async def test_the_events_and_the_logs_share_one_listing_of_the_pods() -> None:
    c = cluster(CountingPods)
    assert isinstance(c, CountingPods)
    ctx = await gather(c)
    assert c.listed == [("shop", "checkout")]
    assert list(ctx.logs) == ["checkout-7c9f-abcde"]  # the logs read the listed pod
    assert ctx.crash_looping == ("checkout",)  # the events' pod is among those listed


async def test_secrets_are_redacted_before_anything_is_kept() -> None:
    ctx = await gather()
    text = repr(ctx)
    assert SECRET not in text
    assert "[REDACTED]" in ctx.logs["checkout-7c9f-abcde"]


async def test_logs_keep_the_tail_within_the_byte_budget() -> None:
    ctx = await gather(max_bytes=300, log_lines=50)
    log = ctx.logs["checkout-7c9f-abcde"]
    assert len(log.encode()) <= 300
    assert log.endswith("ERROR boom") and "line 0" not in log


async def test_events_and_metrics_are_cut_to_the_budget_with_a_note() -> None:
    ctx = await gather(max_bytes=256, max_events=2)
    assert len(ctx.events) <= 2
    assert any(n.startswith("events:") for n in ctx.notes)


async def test_a_slow_source_times_out_and_is_noted_while_others_arrive() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    ctx = await gather(cluster(SlowLogs))
    assert loop.time() - started < 2
    assert "logs: no answer within 0.3s; not read: Pod/shop/checkout-7c9f-abcde" in ctx.notes
    assert ctx.rollouts and ctx.cpu_saturation  # the other sources still arrived


async def test_prometheus_failures_are_noted_redacted() -> None:
    ctx = await gather(prom=FakeProm({}, fail=True))
    assert ctx.cpu_saturation == {}
    assert any("unavailable" in n for n in ctx.notes)
    assert SECRET not in " ".join(ctx.notes)


async def test_without_a_cluster_context_adapter_the_rest_still_works() -> None:
    c = cluster()
    g = ContextGatherer(
        ai_settings(context={"queries": QUERIES}), cluster=c, source=None, prom=FakeProm(PROM)
    )
    ctx = await g.gather(INC)
    assert ctx.rollouts and not ctx.logs and not ctx.events
    assert any("no cluster context adapter" in n for n in ctx.notes)


def test_fake_cluster_implements_the_protocol() -> None:
    assert isinstance(FakeCluster(), ClusterContext)


def test_signals_come_from_reasons_not_messages() -> None:
    events: Sequence[KubeEvent] = [
        KubeEvent(
            "shop", "Pod", "api-1-x", "Pulled", message="OOMKilled BackOff NodeHasDiskPressure"
        ),
        KubeEvent("shop", "Pod", "api-v2-1-x", "OOMKilled"),
        KubeEvent("", "Node", "n1", "NodeNotReady"),
        KubeEvent("shop", "Pod", "other-1", "BackOff"),
    ]
    s = derive_signals(events, ["api", "api-v2"])
    assert s.oom_killed == ("api-v2",)  # the longest owner, and not "api" from a message
    assert s.crash_looping == ()
    assert s.node_conditions == {"n1": ("NotReady",)}


def test_an_event_about_a_pod_already_replaced_is_not_evidence_now() -> None:
    events: Sequence[KubeEvent] = [
        KubeEvent("shop", "Pod", "api-old-1", "BackOff"),  # before the restart
        KubeEvent("shop", "Pod", "cart-1", "OOMKilled"),
    ]
    # The restart replaced api-old-1: its crash loop is over.
    s = derive_signals(events, ["api", "cart"], {"api": ["api-new-1"], "cart": ["cart-1"]})
    assert s.crash_looping == () and s.oom_killed == ("cart",)
    # Still there, or nothing listed: the event counts.
    assert derive_signals(events, ["api"], {"api": ["api-old-1"]}).crash_looping == ("api",)
    assert derive_signals(events, ["api"], {"api": []}).crash_looping == ("api",)
    assert derive_signals(events, ["api"]).crash_looping == ("api",)


def test_owner_of() -> None:
    assert owner_of("checkout-7c9f-abcde", ["check", "checkout"]) == "checkout"
    assert owner_of("cart-1", ["checkout"]) is None


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"namespace": "shop", "workload": "api"}, 'x{namespace="shop",pod=~"api-.*"}'),
        ({"namespace": 'shop"} or vector(1) #', "workload": "api"}, None),
        ({"namespace": "shop", "workload": ""}, None),
    ],
)
def test_queries_only_take_dns_names(names: dict[str, str], expected: str | None) -> None:
    assert render_query('x{namespace="$namespace",pod=~"${workload}-.*"}', **names) == expected


async def test_a_pod_whose_log_cannot_be_read_costs_only_its_own_tail() -> None:
    # A pod of the bad rollout still in ContainerCreating: no log to give yet.
    inc = incident(member(), member("high-latency", labels={"pod": "checkout-7c9f-xz2k9"}))
    c = cluster()
    settings = ai_settings(context={"queries": QUERIES})
    ctx = await ContextGatherer(settings, cluster=c, source=c, prom=FakeProm(PROM)).gather(inc)
    assert (
        list(ctx.logs) == ["checkout-7c9f-abcde"]
        and "ERROR boom" in ctx.logs["checkout-7c9f-abcde"]
    )
    assert ctx.notes == (
        "logs of Pod/shop/checkout-7c9f-xz2k9 unavailable: Pod/shop/checkout-7c9f-xz2k9 not found",
    )


class FailingReads(FakeCluster):
    """The fake cluster, with the reads named in ``down`` failing as an API server's do."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    async def events(
        self, namespace: str, names: Sequence[str], *, limit: int
    ) -> Sequence[KubeEvent]:
        if ("events" if namespace else "node events") in self.down:
            raise DependencyUnavailable(f"events: HTTP 503 (password={SECRET})")
        return await super().events(namespace, names, limit=limit)

    async def pods(self, namespace: str, workload: str) -> Sequence[str]:
        if "pods" in self.down:
            raise DependencyUnavailable("pods: HTTP 503")
        return await super().pods(namespace, workload)


async def test_the_nodes_events_failing_keeps_the_workloads_events() -> None:
    c = cluster(FailingReads)
    assert isinstance(c, FailingReads)
    c.down = {"node events"}
    ctx = await gather(c)
    assert {e.name for e in ctx.events} == {"checkout-7c9f-abcde"}
    assert ctx.crash_looping == ("checkout",)
    (note,) = ctx.notes
    assert note.startswith("events of nodes unavailable: events: HTTP 503")
    assert SECRET not in note


async def test_a_pod_listing_failing_keeps_the_events_and_is_noted_once() -> None:
    c = cluster(FailingReads)
    assert isinstance(c, FailingReads)
    c.down = {"pods"}
    ctx = await gather(c)
    assert {e.name for e in ctx.events} == {"checkout-7c9f-abcde", "node-a"}
    assert ctx.crash_looping == ("checkout",)  # unlisted: all its events count
    assert ctx.notes == ("pods of shop/checkout not listed: pods: HTTP 503",)


async def test_logs_read_before_the_source_timed_out_are_kept() -> None:
    # The pod on a dead node never answers; its sibling's tail was read well before.
    c = cluster(HangingLogs)
    assert isinstance(c, HangingLogs)
    c.set_logs("shop", "checkout-7c9f-zz9yx", "on the dead node")
    c.hung = {"checkout-7c9f-zz9yx"}
    ctx = await gather(c)
    assert list(ctx.logs) == ["checkout-7c9f-abcde"]
    assert ctx.logs["checkout-7c9f-abcde"].endswith("ERROR boom")
    assert SECRET not in ctx.logs["checkout-7c9f-abcde"]
    assert ctx.notes == ("logs: no answer within 0.3s; not read: Pod/shop/checkout-7c9f-zz9yx",)
    assert ctx.rollouts and ctx.crash_looping == ("checkout",)  # the other sources arrived


@pytest.mark.parametrize("source", ["kubernetes", "alertmanager", "feed", "agent"])
async def test_a_pattern_query_runs_only_for_the_detectors_own_anomaly(source: str) -> None:
    # A signal of another source named like the pattern: its condition never saw it.
    other = replace(member(), source=source)  # type: ignore[arg-type]
    prom = FakeProm(PROM)
    settings = ai_settings(context={"queries": QUERIES})
    c = cluster()
    ctx = await ContextGatherer(settings, cluster=c, source=c, prom=prom).gather(incident(other))
    assert not any("http_requests_total" in q for q in prom.queries)
    assert not any(s.query.startswith("pattern:") for s in ctx.metrics)
    assert ctx.cpu_saturation == {"checkout": 0.93}  # the related queries still run
    # The detector's anomaly of that name, in the same incident, runs it once.
    prom = FakeProm(PROM)
    both = incident(other, member())
    ctx = await ContextGatherer(settings, cluster=c, source=c, prom=prom).gather(both)
    assert sum("http_requests_total" in q for q in prom.queries) == 1
    assert {s.query for s in ctx.metrics if s.query.startswith("pattern:")} == {
        "pattern:high-error-rate"
    }


async def test_metrics_read_before_the_source_timed_out_are_kept() -> None:
    # Prometheus never answers the node query (a rule group stuck on a huge series set).
    ctx = await gather(prom=FakeProm(PROM, hung=("node_cpu",)))
    assert ctx.cpu_saturation == {"checkout": 0.93}
    assert ctx.dependency_errors == {"payments": 0.8, "db": 0.0}
    assert ctx.node_cpu_saturation == {}
    pattern = [s for s in ctx.metrics if s.query == "pattern:high-error-rate"]
    assert [s.labels["service"] for s in pattern] == ["checkout"]
    assert ctx.notes == (
        "metrics: no answer within 0.3s; not read: node_cpu_saturation of Deployment/shop/checkout",
    )
    assert ctx.rollouts and ctx.logs  # the other sources arrived


# --- a matched runbook's spec.context.gather ------------------------------------------------

ORDERS = FileRunbook(
    name="orders",
    alert="CheckoutErrors",
    path="orders.yaml",
    steps=(FileStep(name="look", action="check_recent_deployments"),),
    gather=(
        GatherItem("logs", ('{app="checkout", namespace="shop"} |= "ERROR" | json',)),
        GatherItem("metrics", ('rate(http_5xx{app="checkout"}[5m])', "broken_query")),
        GatherItem("events", namespace="shop", duration=1800.0),
        GatherItem("deployments", namespace="shop", duration=3600.0),
        GatherItem("events", namespace="billing", duration=60.0),
    ),
)
RUNBOOK_PROM = {
    **PROM,
    "http_5xx": [
        Sample({"app": "checkout", "url": f"https://u:{SECRET}@db?password={SECRET}"}, 0.4)
    ],
}


async def gather_for(book: FileRunbook, name: str = "CheckoutErrors", **kw: object):  # type: ignore[no-untyped-def]
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s"})
    settings = replace(settings, file_runbooks=(book,))
    c = cluster()
    c.add_event(
        KubeEvent("shop", "Pod", "checkout-7c9f-abcde", "Old", at=OPENED - timedelta(hours=2))
    )
    prom = FakeProm(RUNBOOK_PROM, broken="broken_query")
    g = ContextGatherer(settings, cluster=c, source=c, prom=prom, **kw)  # type: ignore[arg-type]
    return await g.gather(incident(member(name))), prom


async def test_a_matched_runbooks_gather_items_shape_the_context() -> None:
    ctx, prom = await gather_for(ORDERS)
    # Its metrics queries ran besides the defaults; the one that failed is noted, the
    # other kept, redacted.
    assert 'rate(http_5xx{app="checkout"}[5m])' in prom.queries and ctx.cpu_saturation
    (got,) = [s for s in ctx.metrics if s.query.startswith("runbook orders:")]
    assert got.query == 'runbook orders: rate(http_5xx{app="checkout"}[5m])' and got.value == 0.4
    assert SECRET not in repr(ctx) and "[REDACTED]" in got.labels["url"]
    assert any(n.startswith("runbook orders metrics 'broken_query' unavailable") for n in ctx.notes)
    # deployments: 1h and events: 30m are the runbook's own windows (the creation three
    # days ago, the event of two hours ago are not in them); the rest reads them all.
    assert [r.revision for r in ctx.rollouts] == [1, 2]
    assert ctx.deployments_since == {"runbook orders": {"shop": OPENED - timedelta(hours=1)}}
    assert {"Old", "BackOff"} <= {e.reason for e in ctx.events}
    assert set(ctx.events_signals) == {"runbook orders"}
    # The LogQL line filter narrowed the workload's tail.
    assert ctx.logs["checkout-7c9f-abcde"] == "ERROR boom"
    assert (
        "runbook orders events of namespace billing: not gathered: no workload of the "
        "incident is there"
    ) in ctx.notes


async def test_an_incident_no_runbook_matches_gets_the_default_context() -> None:
    ctx, prom = await gather_for(ORDERS, name="high-error-rate")
    assert not any("http_5xx" in q for q in prom.queries)
    assert {r.revision for r in ctx.rollouts} == {1, 2}
    assert "Old" in {e.reason for e in ctx.events}
    assert "line 199" in ctx.logs["checkout-7c9f-abcde"]


async def test_a_logql_query_the_pod_logs_cannot_answer_is_noted_by_name() -> None:
    book = replace(ORDERS, gather=(GatherItem("logs", ('{cluster="c1"} |= "error"',)),))
    ctx, _ = await gather_for(book)
    (note,) = [n for n in ctx.notes if n.startswith("runbook orders logs")]
    assert note.startswith(
        'runbook orders logs \'{cluster="c1"} |= "error"\': not gathered: no Loki'
    )
    assert "line 199" in ctx.logs["checkout-7c9f-abcde"]  # the default tail stays
    ctx, _ = await gather_for(ORDERS, logs=False)
    assert any(n.startswith("runbook orders logs") and "not gathered" in n for n in ctx.notes)


def test_logql_maps_only_selectors_and_line_filters() -> None:
    assert parse_logql('{app="order-service"} |= "error" != "debug" | json') == LogQuery(
        {"app": "order-service"}, ("error",), ("debug",)
    )
    assert isinstance(parse_logql('{app=~"order.*"}'), str)
    assert isinstance(parse_logql('{app="a"} |~ "err.*"'), str)
    assert isinstance(parse_logql('rate({app="a"}[5m])'), str)
    assert isinstance(parse_logql('{pod="a"}'), str)


def test_windows_are_the_widest_per_namespace_and_stray_namespaces_named() -> None:
    items = [
        GatherItem("events", duration=600.0),
        GatherItem("events", namespace="shop", duration=1800.0),
        GatherItem("events", namespace="gone", duration=60.0),
        GatherItem("deployments", namespace="cart"),  # no duration: everything
    ]
    since, stray = windows(items, "events", {"shop", "cart"}, OPENED)
    assert since == {"shop": OPENED - timedelta(minutes=30), "cart": OPENED - timedelta(minutes=10)}
    assert stray == ["gone"]
    assert windows(items, "deployments", {"shop", "cart"}, OPENED) == ({}, [])


async def test_a_runbooks_logs_duration_reads_only_that_window_of_its_workloads_pods() -> None:
    book = replace(
        ORDERS,
        gather=(GatherItem("logs", ('{app="checkout"} |= "ERROR"',), duration=900.0),),
    )
    c = cluster()
    times = [OPENED - timedelta(hours=2), OPENED - timedelta(minutes=5), OPENED]
    c.set_logs("shop", "checkout-7c9f-abcde", "ERROR old\nERROR new\nERROR now", at=times)
    c.set_logs("shop", "cart-1-a", "ERROR cart, long ago", at=[OPENED - timedelta(days=1)])
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s", "log_lines": 5})
    g = ContextGatherer(
        replace(settings, file_runbooks=(book,)), cluster=c, source=c, prom=FakeProm(PROM)
    )
    labels = {"pod": "cart-1-a"}  # a pod of another workload: its tail is not windowed
    ctx = await g.gather(incident(member("CheckoutErrors"), member(labels=labels)))
    # 15m before the incident opened: the line of two hours before is not read.
    assert ctx.logs["checkout-7c9f-abcde"] == "ERROR new\nERROR now"
    assert ctx.logs["cart-1-a"] == "ERROR cart, long ago"
    (note,) = [n for n in ctx.notes if n.startswith("runbook orders logs")]
    assert "(the last 5 lines since 2024-05-01T11:45:00+00:00)" in note


async def test_a_logs_window_is_not_applied_to_a_workload_whose_name_extends_its_own() -> None:
    # checkout's window must not narrow checkout-worker's pods, though their names start
    # with "checkout-": a pod is its longest-named workload's among the incident's.
    book = replace(
        ORDERS,
        gather=(GatherItem("logs", ('{app="checkout"} |= "ERROR"',), duration=900.0),),
    )
    c = cluster()
    c.create_deployment("shop", "checkout-worker", image="shop/worker:v1", replicas=1, at=OPENED)
    old = [OPENED - timedelta(hours=2), OPENED]
    c.set_logs("shop", "checkout-7c9f-abcde", "ERROR old\nERROR now", at=old)
    c.set_logs("shop", "checkout-worker-5d8f-xyz12", "worker old\nworker now", at=old)
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s", "log_lines": 5})
    g = ContextGatherer(
        replace(settings, file_runbooks=(book,)), cluster=c, source=c, prom=FakeProm(PROM)
    )
    worker = {"service": "checkout-worker", "pod": "checkout-worker-5d8f-xyz12"}
    ctx = await g.gather(incident(member("CheckoutErrors"), member(labels=worker)))
    assert ctx.logs["checkout-7c9f-abcde"] == "ERROR now"
    assert ctx.logs["checkout-worker-5d8f-xyz12"] == "worker old\nworker now"


async def test_the_fake_clusters_log_window_comes_before_its_tail() -> None:
    c = FakeCluster()
    times = [OPENED - timedelta(minutes=m) for m in (30, 20, 10, 0)]
    c.set_logs("shop", "web-1", "a\nb\nc\nd", at=times)
    assert await c.logs("shop", "web-1", tail=2) == "c\nd"
    assert await c.logs("shop", "web-1", tail=9, since=OPENED - timedelta(minutes=25)) == "b\nc\nd"
    assert await c.logs("shop", "web-1", tail=9, since=OPENED + timedelta(minutes=1)) == ""


async def test_a_runbooks_metrics_query_gets_the_incidents_namespace() -> None:
    query = 'rate(http_5xx{namespace="$namespace"}[5m])'
    book = replace(ORDERS, gather=(GatherItem("metrics", (query,)),))
    settings = replace(ai_settings(context={"timeout": "0.3s"}), file_runbooks=(book,))
    c = cluster()
    prom = FakeProm(RUNBOOK_PROM)
    g = ContextGatherer(settings, cluster=c, source=c, prom=prom)
    hostile = 'shop"}) or vector(1) #'
    labels = {**SHOP, "namespace": hostile}
    ctx = await g.gather(incident(member("CheckoutErrors"), labels=labels))
    assert 'rate(http_5xx{namespace="shop\\"}) or vector(1) #"}[5m])' in prom.queries
    (got,) = [s for s in ctx.metrics if s.query.startswith("runbook orders:")]
    assert got.query == f"runbook orders: {query}"  # as the runbook wrote it
    # An incident without the label: noted, and nothing asked of Prometheus for it.
    prom.queries.clear()
    ctx = await g.gather(incident(member("CheckoutErrors"), labels={**SHOP, "namespace": ""}))
    assert not any("http_5xx" in q for q in prom.queries)
    assert (
        f"runbook orders metrics {query!r}: not gathered: the incident has no namespace label "
        "for $namespace"
    ) in ctx.notes


async def test_a_runbooks_deployments_window_hides_no_rollout_from_the_other_rules() -> None:
    # The pattern high-error-rate rolls back a rollout of the last 30 minutes
    # (auto_rollback_if_deployment_recent); the runbook counts only its last 10.
    book = FileRunbook(
        name="orders",
        alert="CheckoutErrors",
        path="orders.yaml",
        steps=(
            FileStep(
                name="fresh rollout",
                action="rollback",
                condition=parse("deployments.count > 0"),
                condition_text="deployments.count > 0",
            ),
        ),
        gather=(GatherItem("deployments", duration=600.0),),
    )
    settings = replace(ai_settings(context={"timeout": "0.3s"}), file_runbooks=(book,))
    c = FakeCluster()
    c.create_deployment("shop", "checkout", image="v1", replicas=3, at=OPENED - timedelta(days=3))
    c.rollout("shop", "checkout", image="v2", at=OPENED - timedelta(minutes=20))
    inc = incident(member("CheckoutErrors"), member("high-error-rate"))
    ctx = await ContextGatherer(settings, cluster=c, source=c, prom=FakeProm(PROM)).gather(inc)
    assert [r.revision for r in ctx.rollouts] == [1, 2]
    analysis = analyze(inc, ctx, settings, OPENED)
    # The pattern's rule still sees the rollout of 20 minutes ago and rolls it back ...
    (action,) = analysis.actions
    assert (action.type, action.target.key) == ("rollback", "Deployment/shop/checkout")
    # ... while the runbook's own condition counts none within its 10 minutes.
    assert any(
        "step 'fresh rollout': condition 'deployments.count > 0' is false "
        "(deployments.count=0)" in line
        for line in analysis.evidence
    ), analysis.evidence


async def test_a_runbooks_events_window_hides_no_oom_kill_from_the_other_rules() -> None:
    # The pattern restarts a workload whose pods were OOM-killed, on any event gathered;
    # the runbook's own oom_killed fact reads only its last 10 minutes.
    book = FileRunbook(
        name="orders",
        alert="CheckoutErrors",
        path="orders.yaml",
        steps=(
            FileStep(
                name="fresh oom",
                action="restart_workload",
                condition=parse("oom_killed == 1"),
                condition_text="oom_killed == 1",
            ),
        ),
        gather=(GatherItem("events", duration=600.0),),
    )
    restarts = {
        "name": "pod-restart-loop",
        "condition": "increase(kube_pod_container_status_restarts_total[1h]) > 5",
        "actions": ["restart_if_crash_looping"],
    }
    settings = parse_settings(
        {"patterns": [restarts], "ai": {"context": {"timeout": "0.3s"}}}, env={}
    )
    settings = replace(settings, file_runbooks=(book,))
    c = FakeCluster()
    c.create_deployment("shop", "checkout", image="v1", replicas=3, at=OPENED - timedelta(days=3))
    old = OPENED - timedelta(minutes=20)
    c.add_event(KubeEvent("shop", "Pod", "checkout-7c9f-abcde", "OOMKilled", at=old))
    inc = incident(member("CheckoutErrors"), member("pod-restart-loop"))
    ctx = await ContextGatherer(settings, cluster=c, source=c, prom=FakeProm(PROM)).gather(inc)
    assert ctx.oom_killed == ("checkout",) and not ctx.notes
    analysis = analyze(inc, ctx, settings, OPENED)
    # The pattern's rule still sees the OOM kill of 20 minutes ago and restarts ...
    (action,) = analysis.actions
    assert (action.type, action.target.key) == ("restart_workload", "Deployment/shop/checkout")
    assert analysis.root_cause_class == "memory_leak"
    # ... while the runbook's own condition sees none within its 10 minutes.
    assert any(
        "step 'fresh oom': condition 'oom_killed == 1' is false (oom_killed=0)" in line
        for line in analysis.evidence
    ), analysis.evidence


# --- which pods the default saturation queries read ------------------------------------------

_SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s rand.SafeEncodeString's alphabet
_safe = st.text(_SAFE, min_size=1, max_size=10)
_name = st.from_regex(r"[a-z][a-z0-9]{0,8}(-[a-z][a-z0-9]{0,8}){0,2}", fullmatch=True)


def _pod_selectors(query: str, workload: str) -> list[str]:
    """The pod regexes of ``query`` rendered for shop/``workload``: PromQL anchors a label
    regex at both ends (RE2; this subset reads the same in Python's re)."""
    expr = render_query(query, namespace="shop", workload=workload, service=workload)
    assert expr is not None
    found = re.findall(r'pod=~"([^"]*)"', expr)
    assert found
    return found


def _reads(query: str, workload: str, pod: str) -> bool:
    hits = {re.fullmatch(rx, pod) is not None for rx in _pod_selectors(query, workload)}
    assert len(hits) == 1  # usage and limits read the same pods
    return hits.pop()


@pytest.mark.parametrize("qname", sorted(DEFAULT_CONTEXT_QUERIES))
@given(
    workload=_name,
    word=st.from_regex(r"[a-z0-9]{0,5}[aeiou][a-z0-9]{0,5}", fullmatch=True),
    pod_hash=_safe,
    suffix=st.text(_SAFE, min_size=5, max_size=5),
    ordinal=st.integers(0, 500),
)
def test_the_default_saturation_queries_read_only_the_workloads_own_pods(
    qname: str, workload: str, word: str, pod_hash: str, suffix: str, ordinal: int
) -> None:
    # "$workload-.*" read checkout-worker's pods as checkout's: a saturated sibling made
    # the incident's workload look saturated (and a scale-up look supported).
    query = DEFAULT_CONTEXT_QUERIES[qname]
    own = [f"{workload}-{pod_hash}-{suffix}", f"{workload}-{suffix}", f"{workload}-{ordinal}"]
    assert all(_reads(query, workload, p) for p in own)
    sibling = f"{workload}-{word}"  # a word with a vowel: never a pod-template-hash
    theirs = [f"{sibling}-{pod_hash}-{suffix}", f"{sibling}-{suffix}", f"{sibling}-{ordinal}"]
    assert not any(_reads(query, workload, p) for p in theirs)


async def test_a_siblings_pods_are_not_the_incidents_workloads() -> None:
    # checkout-worker's crash-looping pod is not in checkout's listing (owner references),
    # and its events are not checkout's. Read as checkout's, its BackOff made
    # checkout crash looping (a restart of the wrong workload) and its log the LLM's.
    c = FakeCluster()
    c.create_deployment("shop", "checkout", image="shop/checkout:v6", replicas=1, at=OPENED)
    c.set_logs("shop", "checkout-7c9f-abcde", "ERROR boom")
    worker = "checkout-worker-5d8f-xyz12"
    c.set_logs("shop", worker, "worker panics")
    c.add_event(KubeEvent("shop", "Pod", worker, "BackOff", at=OPENED))
    c.add_event(KubeEvent("shop", "Pod", worker, "OOMKilled", at=OPENED))
    assert worker not in await c.pods("shop", "checkout")
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s", "max_pods": 5})
    g = ContextGatherer(settings, cluster=c, source=c, prom=FakeProm(PROM))
    ctx = await g.gather(incident(member()))
    assert list(ctx.logs) == ["checkout-7c9f-abcde"]
    assert ctx.crash_looping == () and ctx.oom_killed == ()
    # checkout's own pod's events still count.
    c.add_event(KubeEvent("shop", "Pod", "checkout-7c9f-abcde", "BackOff", at=OPENED))
    assert (await g.gather(incident(member()))).crash_looping == ("checkout",)


@pytest.mark.parametrize(
    ("pod", "mine"),
    [
        ("checkout-7d9f8-x2k4q", True),  # Deployment: <hash>-<suffix>
        ("checkout-x2k4q", True),  # DaemonSet, ReplicaSet, Job: <suffix>
        ("checkout-12", True),  # StatefulSet: <ordinal>
        ("checkout-7d9f8", True),  # its ReplicaSet
        ("checkout-worker-7d9f8-x2k4q", False),  # Deployment checkout-worker's
        ("checkout-api-v2-7d9f8-x2k4q", False),
        ("checkout", False),
        ("checkout--x2k4q", False),
        ("checkoutx-1", False),
    ],
)
def test_is_workload_pod(pod: str, mine: bool) -> None:
    assert is_workload_pod("checkout", pod) is mine


# A Deployment name long enough that Kubernetes truncates its pods' generated names:
# "<name>-<hash>-" is cut at 58 characters before the 5-character suffix.
LONG = "checkout-payments-reconciliation-worker-for-europe-west-shards"


async def test_a_long_named_workloads_truncated_pods_are_its_own() -> None:
    c = FakeCluster()
    c.add_node("n1")
    c.create_deployment("shop", LONG, image="shop/x:v1", replicas=1, at=OPENED)
    pod = f"{LONG}-6d5f7c9b8-"[:58] + "q2x7z"
    assert not pod.startswith(f"{LONG}-")
    c.add_pod("shop", pod, node="n1", workload=LONG)
    c.set_logs("shop", pod, "ERROR boom")
    c.add_event(KubeEvent("shop", "Pod", pod, "BackOff", at=OPENED))
    assert await c.pods("shop", LONG) == [pod]
    labels = {**SHOP, "service": LONG, "workload": LONG}
    settings = ai_settings(context={"queries": QUERIES, "timeout": "0.3s", "max_pods": 5})
    g = ContextGatherer(settings, cluster=c, source=c, prom=FakeProm(PROM))
    ctx = await g.gather(incident(member(labels=labels), labels=labels))
    assert list(ctx.logs) == [pod]
    assert ctx.crash_looping == (LONG,)


async def test_a_longer_named_workloads_placed_pods_are_not_listed() -> None:
    # shop-api's pod has the shape of a shop pod's name (<hash>-<suffix> after "shop-"
    # would be "api-7c9f-..." with three parts, but a StatefulSet-like "shop-api-0" has
    # two): only its owner reference says whose it is.
    c = FakeCluster()
    c.add_node("n1")
    c.create_deployment("shop", "shop", image="shop/x:v1", replicas=1, at=OPENED)
    c.add_pod("shop", "shop-api-0", node="n1", workload="shop-api", owner="StatefulSet")
    c.add_pod("shop", "shop-7c9f-abcde", node="n1", workload="shop")
    assert await c.pods("shop", "shop") == ["shop-7c9f-abcde"]
    assert await c.pods("shop", "shop-api") == ["shop-api-0"]
