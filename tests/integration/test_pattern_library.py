"""The shipped Kubernetes pattern library against a real Prometheus scraping a test exporter
that serves the kube-state-metrics, cAdvisor and node-exporter families.

Every pattern is evaluated as shipped except for two things the test must shorten to run in
seconds: ``for`` is set to 0 (``for`` itself is shown in test_detector_prometheus.py) and
range windows (``[5m]``, ``[6h]``...) become ``[10s]``. Metric names, label matchers,
aggregations and thresholds are the shipped ones.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from agent.detector import PromQLDetector
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.prom import PromClient
from agent.settings import PatternSpec
from tests.helpers import make_settings
from tests.integration.exporter import Exporter

pytestmark = pytest.mark.integration

WINDOW = re.compile(r"\[\d+(?:ms|s|m|h|d)\]")


def shortened(p: PatternSpec) -> PatternSpec:
    return replace(p, for_=0.0, condition=WINDOW.sub("[10s]", p.condition))


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)


class Cluster:
    """The faults, as the exporters of a small cluster would show them."""

    def __init__(self, exp: Exporter, ns: str, node: str) -> None:
        self.exp, self.ns, self.node = exp, ns, node
        self.pod = {"namespace": ns, "pod": "cart-7d9f-x2x4z", "container": "cart"}
        self.deploy = {"namespace": ns, "deployment": "cart"}
        self.hpa = {"namespace": ns, "horizontalpodautoscaler": "cart"}
        self.fs = {"node": node, "device": "/dev/sda1", "mountpoint": "/", "fstype": "ext4"}
        self.t0 = time.monotonic()
        self.throttled_base = 0.0
        self.throttle_from: float | None = None
        self.avail = 50.0

    def _periods(self) -> float:
        return 10 * (time.monotonic() - self.t0)

    def _throttled(self) -> float:
        if self.throttle_from is None:
            return self.throttled_base
        return self.throttled_base + 0.5 * 10 * (time.monotonic() - self.throttle_from)

    def _avail(self) -> float:
        if self.avail >= 15:
            return self.avail
        self.avail -= 0.01  # filling up, a little more at every scrape
        return self.avail

    def install(self) -> None:
        e = self.exp
        e.set("kube_pod_container_status_restarts_total", self.pod, 0)
        e.set("kube_deployment_spec_replicas", self.deploy, 3)
        e.set("kube_deployment_status_replicas_updated", self.deploy, 3)
        e.set("kube_horizontalpodautoscaler_spec_max_replicas", self.hpa, 10)
        e.set("node_filesystem_size_bytes", self.fs, 100)
        e.set("node_filesystem_readonly", self.fs, 0)
        e.set("node_filesystem_avail_bytes", self.fs, self._avail)
        e.set("container_cpu_cfs_periods_total", self.pod, self._periods)
        e.set("container_cpu_cfs_throttled_periods_total", self.pod, self._throttled)
        self.healthy()

    def healthy(self) -> None:
        e = self.exp
        e.set(
            "kube_pod_container_status_waiting_reason",
            {**self.pod, "reason": "CrashLoopBackOff"},
            0,
        )
        e.drop(
            "kube_pod_container_status_last_terminated_reason", {**self.pod, "reason": "OOMKilled"}
        )
        e.set("kube_deployment_status_replicas_available", self.deploy, 3)
        e.set("kube_horizontalpodautoscaler_status_current_replicas", self.hpa, 4)
        self.avail = 50.0
        if self.throttle_from is not None:
            self.throttled_base, self.throttle_from = self._throttled(), None

    def faulty(self) -> None:
        e = self.exp
        e.set(
            "kube_pod_container_status_waiting_reason",
            {**self.pod, "reason": "CrashLoopBackOff"},
            1,
        )
        e.set("kube_pod_container_status_restarts_total", self.pod, 1)
        e.set(
            "kube_pod_container_status_last_terminated_reason",
            {**self.pod, "reason": "OOMKilled"},
            1,
        )
        e.set("kube_deployment_status_replicas_available", self.deploy, 1)
        e.set("kube_horizontalpodautoscaler_status_current_replicas", self.hpa, 10)
        self.avail = 10.0
        self.throttle_from = time.monotonic()


EXPECTED = {  # pattern -> the labels that identify the instance, and the service it maps to
    "crash-looping": ({"pod", "container"}, "cart"),
    "replicas-mismatch": ({"deployment", "workload", "owner"}, "cart"),
    "container-oom-killed": ({"pod", "container"}, "cart"),
    "node-filesystem-filling": ({"node", "device", "mountpoint"}, ""),
    "cpu-throttling": ({"pod", "container"}, "cart"),
    "hpa-maxed-out": ({"horizontalpodautoscaler"}, "cart"),
}


async def test_each_library_pattern_fires_and_resolves_on_cue(prometheus: Any) -> None:
    uid = uuid.uuid4().hex[:8]
    job, ns, node = f"ksm{uid}", f"ns{uid}", f"node{uid}"
    settings = make_settings(
        "127.0.0.1:1",
        "unused.",
        prometheus_url=prometheus.url,
        doc={"pattern_files": ["patterns/kubernetes.yaml"]},
    )
    patterns = [shortened(p) for p in settings.patterns]
    assert sorted(p.name for p in patterns) == sorted(EXPECTED)
    rec, prom = Recorder(), PromClient(prometheus.url, timeout=3)
    detector = PromQLDetector(settings, prom=prom, publish=rec, topic="t", metrics=Metrics())

    def ours(status: str) -> dict[str, list[Anomaly]]:
        out: dict[str, list[Anomaly]] = {}
        for a in rec.items:
            mine = a.labels.get("namespace") == ns or a.labels.get("node") == node
            if mine and a.status == status:
                out.setdefault(a.name, []).append(a)
        return out

    async def evaluate_until(status: str, within: float) -> float:
        t0 = time.monotonic()
        while set(ours(status)) != set(EXPECTED):
            missing = set(EXPECTED) - set(ours(status))
            assert time.monotonic() - t0 < within, f"never {status}: {sorted(missing)}"
            for p in patterns:
                await detector.evaluate_once(p)
            await asyncio.sleep(0.5)
        return time.monotonic() - t0

    try:
        async with Exporter() as exp:
            cluster = Cluster(exp, ns, node)
            cluster.install()
            prometheus.add_target(job, exp.host_port)
            await prometheus.wait_for_target_up_async(job, 30)
            # Healthy, long enough for counters to have a history: nothing fires.
            await prometheus.wait_for_query_async(
                f'count_over_time(container_cpu_cfs_periods_total{{namespace="{ns}"}}[10s]) > 2', 30
            )
            for p in patterns:
                await detector.evaluate_once(p)
            assert ours("firing") == {}
            cluster.faulty()
            fired_in = await evaluate_until("firing", 20)
            cluster.healthy()
            resolved_in = await evaluate_until("resolved", 30)
    finally:
        prometheus.remove_target(job)
        await prom.close()
    firing, resolved = ours("firing"), ours("resolved")
    for name, (identity, service) in EXPECTED.items():
        fps = {a.fingerprint for a in firing[name]}
        assert len(fps) == 1, f"{name}: one instance, one fingerprint: {firing[name]}"
        assert [a.fingerprint for a in resolved[name]] == list(fps), f"{name}: resolved once"
        a = firing[name][0]
        assert identity <= set(a.labels), (name, a.labels)
        assert a.labels["service"] == service, (name, a.labels)
        assert a.labels["cluster"] == "test"
        assert "job" not in a.labels, (name, a.labels)  # aggregated away: scrape config moves
    assert firing["replicas-mismatch"][0].value == 2  # replicas missing
    assert firing["hpa-maxed-out"][0].labels["namespace"] == ns
    print(f"all fired within {fired_in:.1f}s, resolved within {resolved_in:.1f}s")
