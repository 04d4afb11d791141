"""Topology absorption and inhibition on the real broker, across partitions.

Pod anomalies of other groups (other partitions) join their node's incident through the
facts topic and a routed re-publication; pods that failed first hand their anomalies over
once the node's anomaly arrives; an inhibition source on one partition suppresses its
targets on another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from agent.detector import UNAVAILABLE, PromQLDetector, still_open
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import Anomaly, Incident, fingerprint, group_key, utcnow
from agent.prom import PromClient
from agent.runtime import read_facts
from agent.settings import Settings
from streams.bus import Bus, topics_of
from streams.correlation import CorrelationRules, correlate
from streams.correlator import Correlator
from streams.partitioning import partition_for
from streams.topology import facts_of
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration
GROUP_BY = ("cluster", "namespace", "service")


def anomaly(name: str, labels: dict[str, str], severity: str = "critical") -> Anomaly:
    now = utcnow()
    labels = {"cluster": "test", **labels}
    return Anomaly(
        fingerprint=fingerprint("kubernetes", name, labels),
        source="kubernetes",
        name=name,
        severity=severity,  # type: ignore[arg-type]
        status="firing",
        labels=labels,
        starts_at=now,
        observed_at=now,
    )


def node_down(node: str) -> Anomaly:
    return anomaly("node-not-ready", {"node": node, "namespace": "", "service": ""})


def crash(service: str, node: str) -> Anomaly:
    labels = {
        "namespace": "shop",
        "service": service,
        "workload": service,
        "pod": f"{service}-7d9-x1",
        "node": node,
    }
    return anomaly("pod-crash-loop", labels, severity="warning")


def services_on_other_partitions(settings: Settings, than: str, n: int) -> list[str]:
    """Services whose groups live on another partition than group ``than``."""
    parts = settings.kafka.partitions
    home = partition_for(than, parts)
    out = []
    for i in range(100):
        svc = f"svc-{i}"
        if (
            partition_for(
                group_key(crash(svc, "x").labels, ("cluster", "namespace", "service")), parts
            )
            != home
        ):
            out.append(svc)
        if len(out) == n:
            return out
    raise AssertionError("no service on another partition")


class Harness:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus = Bus(settings.kafka, metrics=Metrics())

    def key(self, a: Anomaly) -> str:
        return group_key(a.labels, self.settings.correlation.group_by)

    async def send(self, *anomalies: Anomaly) -> None:
        t = self.bus.topic
        await self.bus.publish_many([(t("anomalies"), a, self.key(a)) for a in anomalies])


def latest(items: list[Incident]) -> dict[str, Incident]:
    out: dict[str, Incident] = {}
    for inc in items:
        out[inc.id] = inc
    return out


def by_key(items: list[Incident], key: str) -> Incident | None:
    found = [i for i in latest(items).values() if i.key == key]
    return found[-1] if found else None


async def test_a_node_incident_takes_in_pod_anomalies_from_other_partitions(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    h = Harness(settings)
    await h.bus.start()
    await h.bus.create_topics()
    node = node_down("n1")
    node_key = h.key(node)
    early, late = services_on_other_partitions(settings, node_key, 2)
    metrics = Metrics()
    try:
        async with (
            readers(kafka_bootstrap, {"inc": (h.bus.topic("incidents"), Incident)}) as r,
            Correlator(settings, metrics=metrics) as corr,
        ):
            # A pod fails before its node's anomaly arrives: it opens its own incident.
            first = crash(early, "n1")
            await h.send(first)
            await r["inc"].wait_for(lambda xs: by_key(xs, h.key(first)) is not None, 60, "pod")

            await h.send(node)
            await eventually(lambda: node.fingerprint in corr.facts.items, 30, what="node fact")
            # Pods failing after it, on the failed node and on a healthy one.
            second, healthy = crash(late, "n1"), crash(late, "n2")
            healthy = anomaly(
                "pod-crash-loop", {**healthy.labels, "pod": "other-pod"}, severity="warning"
            )
            await h.send(second, healthy)

            def settled(xs: list[Incident]) -> bool:
                node_inc = by_key(xs, node_key)
                return node_inc is not None and {m.fingerprint for m in node_inc.firing} >= {
                    node.fingerprint,
                    first.fingerprint,
                    second.fingerprint,
                }

            items = await r["inc"].wait_for(settled, 60, "pods in the node's incident")
    finally:
        await h.bus.stop()

    decisions = {
        s.labels["decision"]: s.value
        for m in metrics.registry.collect()
        if m.name == "sre_agent_correlation_decisions"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert decisions.get("handed_over") == 1 and decisions.get("absorbed", 0) >= 2
    node_inc = by_key(items, node_key)
    assert node_inc is not None
    absorbed = {m.fingerprint: m.absorbed_by for m in node_inc.members}
    assert absorbed[first.fingerprint] == absorbed[second.fingerprint] == "node/n1"
    assert absorbed[node.fingerprint] is None
    assert healthy.fingerprint not in absorbed
    # The early pod's own incident handed over and resolved, pointing at the node's.
    own = by_key(items, h.key(first))
    assert own is not None and own.status == "resolved" and own.absorbed_into == node_inc.id
    # The healthy node's pod fired in its own group's incident, and only there.
    owners = [
        i
        for i in latest(items).values()
        if i.status != "resolved"
        for m in i.firing
        if m.fingerprint in (healthy.fingerprint, second.fingerprint)
    ]
    assert sorted(i.key for i in owners) == sorted([node_key, h.key(healthy)])


async def test_an_inhibition_source_suppresses_targets_on_other_partitions(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    rule = {
        "name": "dns-down",
        "source_matchers": ["alertname=cluster-dns-down"],
        "target_matchers": ["severity=warning"],
        "equal": ["cluster"],
    }
    settings = make_settings(
        kafka_bootstrap, topic_prefix, doc={"correlation": {"inhibit_rules": [rule]}}
    )
    h = Harness(settings)
    await h.bus.start()
    await h.bus.create_topics()
    dns = anomaly("cluster-dns-down", {"namespace": "kube-system", "service": "coredns"})
    warn_svc, crit_svc = services_on_other_partitions(settings, h.key(dns), 2)
    labels: Callable[[str], dict[str, str]] = lambda s: {"namespace": "shop", "service": s}  # noqa: E731
    warning = anomaly("high-latency", labels(warn_svc), severity="warning")
    critical = anomaly("high-error-rate", labels(crit_svc), severity="critical")
    try:
        async with (
            readers(kafka_bootstrap, {"inc": (h.bus.topic("incidents"), Incident)}) as r,
            Correlator(settings, metrics=Metrics()) as corr,
        ):
            await h.send(dns)
            await eventually(lambda: dns.fingerprint in corr.facts.items, 30, what="dns fact")
            await h.send(warning, critical)
            items = await r["inc"].wait_for(
                lambda xs: {h.key(warning), h.key(critical)} <= {i.key for i in xs}, 60, "both"
            )
    finally:
        await h.bus.stop()
    inhibited, loud = by_key(items, h.key(warning)), by_key(items, h.key(critical))
    assert inhibited is not None and loud is not None
    assert inhibited.status == "silenced" and not inhibited.firing
    assert inhibited.members[0].inhibited_by == f"dns-down:{dns.fingerprint}"
    assert loud.status == "open" and loud.members[0].inhibited_by is None


async def test_an_incident_that_gains_a_workload_anomaly_announces_it(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A pod's incident has no facts; the workload-level anomaly that later joins it (same
    group) is one, and must reach every worker's view although the incident had none."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    h = Harness(settings)
    await h.bus.start()
    await h.bus.create_topics()
    pod = crash("cart", "n1")
    workload = anomaly(
        "deployment-unavailable", {"namespace": "shop", "service": "cart", "workload": "cart"}
    )
    assert h.key(pod) == h.key(workload)
    try:
        async with (
            readers(kafka_bootstrap, {"inc": (h.bus.topic("incidents"), Incident)}) as r,
            Correlator(settings, metrics=Metrics()) as corr,
        ):
            await h.send(pod)
            await r["inc"].wait_for(lambda xs: len(xs) >= 1, 60, "the pod's incident")
            await h.send(replace(pod, observed_at=utcnow()))  # a refresh of a factless revision
            await h.send(workload)
            await r["inc"].wait_for(
                lambda xs: len(xs[-1].members) == 2, 60, "the workload anomaly joins"
            )
            await eventually(
                lambda: workload.fingerprint in corr.facts.items, 30, what="workload fact"
            )
    finally:
        await h.bus.stop()
    fact = corr.facts.items[workload.fingerprint]
    assert fact.incident_key == h.key(pod) and fact.incident_open
    assert pod.fingerprint not in corr.facts.items


async def test_a_prometheus_outage_resolves_no_pattern_incident_on_any_partition(
    kafka_bootstrap: str, topic_prefix: str, prometheus: Any
) -> None:
    """The detector loses Prometheus for twice resolve_timeout. Its pattern's incident, and
    one of a pattern whose detector state was lost, stay open on their partitions; once it
    answers, its evaluation resolves the first, and the other goes quiet from then."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        prometheus_url=prometheus.url,
        doc={
            "correlation": {"resolve_timeout": "3s"},
            "detectors": {"prometheus": {"failure_threshold": 1, "reset_timeout": "1s"}},
            "patterns": [{"name": "errors", "condition": "vector(5)"}],
        },
    )
    h = Harness(settings)
    await h.bus.start()
    await h.bus.create_topics()
    agent_key = group_key(normalise({"service": settings.agent.name}, "test"), GROUP_BY)
    home = partition_for(agent_key, settings.kafka.partitions)
    svc_a, svc_b = [
        s
        for s in (f"svc-{i}" for i in range(100))
        if partition_for(group_key(normalise({"service": s}, "test"), GROUP_BY), 2) != home
    ][:2]
    # The pattern's series is service A's.
    pattern = replace(
        settings.patterns[0], condition=f'label_replace(vector(5), "service", "{svc_a}", "", "")'
    )
    reachable = PromClient(prometheus.url)
    # The same endpoint, unreachable: nothing listens on port 1.
    unreachable = PromClient("http://127.0.0.1:1", timeout=1)
    unreachable.url = prometheus.url
    metrics = Metrics()
    d = PromQLDetector(
        settings, prom=reachable, publish=h.bus, topic=h.bus.topic("anomalies"), metrics=metrics
    )
    lost = anomaly("errors", normalise({"service": svc_b}, "test"))
    lost = replace(
        lost, source="prometheus", fingerprint=fingerprint("prometheus", "errors", lost.labels)
    )

    def second() -> datetime:
        return utcnow().replace(microsecond=0)

    try:
        async with (
            readers(kafka_bootstrap, {"inc": (h.bus.topic("incidents"), Incident)}) as r,
            Correlator(settings, metrics=metrics, tick_interval=0.5) as corr,
        ):
            [firing] = await d.evaluate_once(pattern, second())
            await h.send(lost)
            keys = {h.key(firing), h.key(lost)}
            await r["inc"].wait_for(lambda xs: keys <= {i.key for i in xs}, 60, "both open")
            d.prom = unreachable
            outage = utcnow()
            while utcnow() - outage < timedelta(seconds=6):  # twice resolve_timeout
                await d.evaluate_once(pattern, second())
                await asyncio.sleep(0.5)
            assert any(f.labels.get("alertname") == UNAVAILABLE for f in corr.facts.items.values())
            assert (
                metrics.registry.get_sample_value(
                    "sre_agent_correlator_blind", {"source": "prometheus", "cluster": "test"}
                )
                == 1
            )
            d.prom = reachable
            await asyncio.sleep(1)  # the breaker's next probe is due
            seen = second()
            gone = replace(pattern, condition="vector(1) < 0")  # A's series is gone
            [resolved] = await d.evaluate_once(gone, seen)
            assert resolved.status == "resolved"
            items = await r["inc"].wait_for(
                lambda xs: sum(i.status == "resolved" and i.key in keys for i in xs) == 2,
                60,
                "both resolved",
            )
    finally:
        await h.bus.stop()
        await reachable.close()
        await unreachable.close()
    events = {k: [(i.status, i.resolved_at) for i in items if i.key == k] for k in keys}
    assert events == {
        h.key(firing): [("open", None), ("resolved", seen)],
        h.key(lost): [("open", None), ("resolved", seen + timedelta(seconds=3))],
    }


async def test_a_detector_reads_the_blindness_the_facts_topic_records(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """What a restarted detector reads to know whether its former life's blindness is
    still recorded: the latest fact of each fingerprint on the real topic."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    down = anomaly("prometheus-unavailable", normalise({"service": "sre-agent"}, "test"))
    down = replace(down, source="agent")
    try:
        blind, _ = correlate(None, down, utcnow(), CorrelationRules(resolve_timeout=300))
        assert blind is not None
        (fact,) = facts_of(blind, False, ())
        await bus.publish(bus.topic("correlation-facts"), replace(fact, status="resolved"))
        await bus.publish(bus.topic("correlation-facts"), fact)
        recorded = await read_facts(settings)
    finally:
        await bus.stop()
    assert recorded == {fact.fingerprint: fact}
    assert still_open(recorded[fact.fingerprint]) == fact.first_seen


async def test_a_detector_reads_no_facts_where_the_topic_does_not_exist_yet(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """A fresh install: no correlator has created the facts topic, so nothing is recorded.
    The read answers that at once (it used to wait for the topic and fail, at every
    answer) and creates nothing: the correlator creates the topic compacted, not a
    broker with auto-create on with its defaults."""
    settings = make_settings(kafka_bootstrap, topic_prefix)
    assert await read_facts(settings) == {}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert topics_of(await admin.list_topics(), topic_prefix) == []
    finally:
        await admin.close()
