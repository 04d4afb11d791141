"""The local lab behind ``make run`` and ``make chaos``: a fault injected, healed end to end.

A simulated service exports ``http_requests_total`` per pod and node, its containers'
restart count and CPU use for Prometheus to scrape. Its health follows its Deployment and
the nodes its pods run on, in the in-process cluster or on a real control plane (kwok's
nodes, ``kubernetes.backend: kubernetes``; see :mod:`agent.lab_clusters`). Each
chaos experiment (:data:`EXPERIMENTS`) injects one fault, then lets the real pipeline
(Prometheus, detector, faust correlator, analyzer, executor) find and heal it, printing
each stage as it crosses Kafka; it passes only if the remedy it names healed the service
(verified), the incident resolved and every requested replica runs ready again.
``make run`` runs the first, a faulty rollout.
The default policy asks for approval below the confidence threshold and before a
rollback; the lab plays the on-call engineer and approves through the decisions topic, as
any Kafka client could.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.analyzer import KubeEvent
from agent.errors import DependencyUnavailable, cancel_and_wait, task_failure
from agent.lab_clusters import InProcessLab, LabCluster
from agent.models import (
    ActionResult,
    ActionType,
    Analysis,
    Anomaly,
    ApprovalDecision,
    ApprovalRequest,
    Incident,
    Target,
    new_id,
    utcnow,
)
from agent.prom import PromClient
from agent.server import serve
from agent.settings import REPO_ROOT, Settings
from handlers.cluster import Cluster, WorkloadState
from streams.bus import BatchConsumer, Envelope, delete_topics
from streams.partitioning import decode_anomalies

log = logging.getLogger(__name__)

BAD_IMAGE_SUFFIX = ":v2"
GOOD_IMAGE = "registry.local/checkout:v1"


class SimulatedService:
    """An HTTP service's metrics, driven by its Deployment and the pods that serve it and
    their nodes (in process it plays the ReplicaSet controller and the scheduler too, see
    :meth:`FakeCluster.reconcile`; on a real control plane they run), so a drained node's
    pods come back elsewhere."""

    def __init__(
        self,
        lab: LabCluster,
        *,
        namespace: str,
        name: str,
        rps: int = 50,
        seed: int = 7,
        workload_refresh: float = 0.5,
    ) -> None:
        self.lab = lab
        # Seconds between reads of the Deployment (its image, replicas, restart).
        self.workload_refresh = workload_refresh
        self.namespace = namespace
        self.name = name
        self.rps = rps
        # (pod, node, status) -> requests served; the pods serving now
        self.counts: dict[tuple[str, str, str], int] = {}
        self.serving: frozenset[tuple[str, str]] = frozenset()
        self._rng = random.Random(seed)  # noqa: S311 - simulated traffic, not security
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        # Containers crash from this time on until the Deployment is restarted after it.
        self.crashing_since: datetime | None = None
        self.restarts = 0
        # CPU cores the traffic needs; each replica has one (its limit). Past what the
        # replicas have, requests fail.
        self.load = 1.5
        self.replicas = 0  # as last read from the Deployment
        self.cpu_seconds: dict[str, float] = {}  # per pod
        self.first_pod = f"{name}-0"  # whose container restarts are counted

    def crash_looping(self, w: WorkloadState) -> bool:
        if self.crashing_since is None:
            return False
        return w.restarted_at is None or w.restarted_at < self.crashing_since

    def error_share(self, w: WorkloadState) -> float:
        bad_image = 0.3 if w.image.endswith(BAD_IMAGE_SUFFIX) else 0.0
        # Requests that reached a container about to crash fail.
        crashing = 0.2 if self.crash_looping(w) else 0.0
        overloaded = max(0.0, (self.load - w.replicas) / self.load) if self.load else 0.0
        return max(bad_image, crashing, overloaded)

    def pod_error_share(self, w: WorkloadState, node: str, down: frozenset[str]) -> float:
        """A pod on a node that is down answers nothing: every request sent to it fails."""
        return 1.0 if node in down else self.error_share(w)

    def cpu_per_pod(self, w: WorkloadState) -> float:
        """Cores each replica uses: the load shared out, at most its limit of one."""
        return min(self.load, w.replicas) / w.replicas if w.replicas else 0.0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.port = await serve(app, "127.0.0.1", 0)
        self._task = asyncio.create_task(self._traffic(), name="lab-traffic")

    @property
    def failure(self) -> BaseException | None:
        """Why the traffic stopped, if it died: its metrics would freeze and look healthy."""
        return task_failure(self._task)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)  # a dead traffic loop: the server still closes
        self._task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _traffic(self) -> None:
        target = Target(kind="Deployment", namespace=self.namespace, name=self.name)
        sent = 0
        loop = asyncio.get_running_loop()
        last = loop.time()
        due = 0.0  # requests owed since the last tick
        crash_due = 0.0  # seconds of crash loop since the last container restart
        w, read_at = await self.lab.cluster.workload(target), last
        while True:
            # Not at every tick: on a real control plane that is a Deployment and its
            # ReplicaSets read from the API server ten times a second, for as long as the
            # lab runs, on the machine that runs the whole suite.
            if loop.time() - read_at >= self.workload_refresh:
                w, read_at = await self.lab.cluster.workload(target), loop.time()
            view = await self.lab.serving(self.namespace, self.name)
            now = loop.time()
            elapsed, last = now - last, now
            pods = list(view.pods)
            self.serving = frozenset(pods)
            if pods:
                self.first_pod = pods[0][0]
            # By the clock, not the tick: a busy machine stretches ticks, and a fixed count
            # per tick then served less than the rate the patterns' thresholds assume. None
            # when no pod runs (no endpoints: those requests are lost, not queued).
            due = min(due + self.rps * elapsed, float(self.rps)) if pods else 0.0
            n = int(due)
            due -= n
            # Spread over the pods in turn, as a Service does.
            for i in range(n):
                pod, node = pods[(sent + i) % len(pods)]
                failed = self._rng.random() < self.pod_error_share(w, node, view.down)
                key = (pod, node, "500" if failed else "200")
                self.counts[key] = self.counts.get(key, 0) + 1
            sent += n
            # A container restart a second, by the clock as well: at most one a tick, and a
            # stall is not made up for with a burst.
            crash_due = min(crash_due + elapsed, 1.5) if self.crash_looping(w) else 0.0
            if crash_due >= 1.0:
                # The Deployment read again, after the pods were: a restart since the last
                # read replaced the crashing pods, and a new pod (first_pod by now) must not
                # take an old one's crash, which verification would read as not healed.
                w, read_at = await self.lab.cluster.workload(target), loop.time()
            if crash_due >= 1.0 and self.crash_looping(w):
                crash_due -= 1.0
                self.restarts += 1
                # ... in the pod's status too, where verification reads it.
                await self.lab.crash(self.namespace, self.first_pod)
            self.replicas = w.replicas
            # CPU by the clock too: 0.1 s per tick read as less than the load uses (under the
            # pattern's 0.9).
            used = self.cpu_per_pod(w) * elapsed
            for i in range(w.replicas):
                name = f"{self.name}-{i}"
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + used
            await asyncio.sleep(0.1)

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = ["# TYPE http_requests_total counter"]
        # Only pods serving now: a drained pod's series ends (Prometheus marks it stale).
        for (pod, node, status), value in sorted(self.counts.items()):
            if (pod, node) in self.serving:
                on = f',node="{node}"' if node else ""
                lines.append(
                    f'http_requests_total{{namespace="{self.namespace}",service="{self.name}",'
                    f'pod="{pod}"{on},status="{status}"}} {value}'
                )
        lines += [
            "# TYPE kube_pod_container_status_restarts_total counter",
            f'kube_pod_container_status_restarts_total{{namespace="{self.namespace}",'
            f'service="{self.name}",pod="{self.first_pod}",container="app"}} {self.restarts}',
            "# TYPE container_cpu_usage_seconds_total counter",
        ]
        where = f'namespace="{self.namespace}",service="{self.name}"'
        for pod, used in sorted(self.cpu_seconds.items()):
            lines.append(
                f'container_cpu_usage_seconds_total{{{where},pod="{pod}",container="app"}} {used}'
            )
        lines.append("# TYPE kube_pod_container_resource_limits gauge")
        for i in range(self.replicas):
            lines.append(
                f'kube_pod_container_resource_limits{{{where},pod="{self.name}-{i}",'
                'container="app",resource="cpu",unit="core"} 1'
            )
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def prometheus_targets_dir() -> Path:
    state = Path(os.environ.get("SRE_STATE_DIR") or REPO_ROOT / ".state")
    return state / "prometheus" / "targets"


def register_target(name: str, port: int, directory: Path | None = None) -> Path:
    directory = directory or prometheus_targets_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"job": name}}]))
    tmp.replace(path)  # atomic: Prometheus never reads half a file
    return path


async def _bad_rollout(lab: LabCluster, service: SimulatedService, now: datetime) -> None:
    image = f"registry.local/{service.name}{BAD_IMAGE_SUFFIX}"
    await lab.rollout(service.namespace, service.name, image=image, at=now)


async def _crash_loop(lab: LabCluster, service: SimulatedService, now: datetime) -> None:
    service.crashing_since = now
    # What the kubelet reports: the evidence the analyzer reads (by reason).
    why = "Back-off restarting failed container"
    pod = service.first_pod
    await lab.add_event(KubeEvent(service.namespace, "Pod", pod, "BackOff", why, at=now))


async def _traffic_surge(lab: LabCluster, service: SimulatedService, now: datetime) -> None:
    service.load = 3.3


async def _node_failure(lab: LabCluster, service: SimulatedService, now: datetime) -> None:
    view = await lab.serving(service.namespace, service.name)
    if not view.pods:
        raise RuntimeError(f"{service.name} has no pods yet: no node to fail")
    _, node = view.pods[0]
    why = "Node is not ready: kubelet stopped posting node status"
    await lab.fail_node(node, why=why, at=now)


@dataclass(frozen=True, slots=True)
class Experiment:
    """A fault the lab injects, and the action that must heal it."""

    name: str
    fault: str  # what is injected, as printed
    remedy: ActionType
    apply: Callable[[LabCluster, SimulatedService, datetime], Awaitable[None]]

    async def inject(self, lab: LabCluster, service: SimulatedService) -> None:
        await self.apply(lab, service, utcnow())


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "bad-rollout", "rolled out checkout:v2 (30% of requests fail)", "rollback", _bad_rollout
    ),
    Experiment(
        "crash-loop",
        "checkout's containers crash and restart every second (20% of requests fail)",
        "restart_workload",
        _crash_loop,
    ),
    Experiment(
        "traffic-surge",
        "checkout's traffic needs 3.3 CPUs; its 3 replicas have 3 (saturated, 9% fail)",
        "scale_up",
        _traffic_surge,
    ),
    Experiment(
        "node-failure",
        "the node of checkout's first pod goes NotReady; the pod on it fails every request "
        "(a third)",
        "drain_node",
        _node_failure,
    ),
)


def experiment(name: str) -> Experiment:
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    known = ", ".join(e.name for e in EXPERIMENTS)
    raise ValueError(f"unknown experiment {name!r}; known: {known}")


# Longer than the lab's rate windows (20 s, config/lab.yaml): an earlier run's series
# older than this can no longer add to any pattern or context query.
QUIET = 25.0


async def await_quiet(
    prom: PromClient,
    namespace: str,
    service: str,
    *,
    window: float = QUIET,
    limit: float = 60.0,
    poll: float = 1.0,
) -> float:
    """Wait until Prometheus holds no sample of the lab's service from the last ``window``
    seconds; returns the seconds waited. A run that starts while an earlier run's series are
    still in the rate windows adds both: the CPU of a surge run that had just ended made the
    next run's service look saturated and scaled it up. (Staleness markers do not help: a
    range selector still reads the samples before one.)"""
    # One metric of the service stands for its scrape: over several, count_over_time's
    # results (names dropped) collide.
    where = f'namespace="{namespace}",service="{service}"'
    expr = f"count(count_over_time(http_requests_total{{{where}}}[{window:g}s]))"
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await prom.query(expr):
        if loop.time() - started > limit:
            raise DependencyUnavailable(
                f"prometheus {prom.url} still receives series of {namespace}/{service} after "
                f"{limit:g}s: is another lab running?"
            )
        await asyncio.sleep(poll)
    return loop.time() - started


def anomalies_in(raw: bytes) -> tuple[Anomaly, ...]:
    """The anomalies of an anomalies-topic record (none for a mitigation record)."""
    return tuple(decode_anomalies(raw)[0])


def lab_service(v: Any) -> tuple[str, str] | None:
    """(namespace, service) an event is about, or None when it names none."""
    if isinstance(v, Anomaly | Incident):
        return v.labels.get("namespace", ""), v.labels.get("service", "")
    # By the incident: an action's target may be a node, which names no service.
    key = None
    if isinstance(v, Analysis | ActionResult):
        key = v.incident_key
    elif isinstance(v, ApprovalRequest):
        key = v.action.incident_key
    if key is None:
        return None
    _, namespace, service = ([*key.split("/"), "", ""])[:3]
    return namespace, service


def describe(env: Envelope) -> str:
    v: Any = env.value
    if isinstance(v, Anomaly):
        return f"[detector]   anomaly {v.name} {v.status} {v.labels.get('service')} value={v.value}"
    if isinstance(v, Incident):
        return (
            f"[correlator] incident {v.id[:10]} {v.status} rev {v.revision} "
            f"severity={v.severity} members={len(v.members)}"
        )
    if isinstance(v, Analysis):
        acts = ", ".join(f"{a.type} {a.target.key}" for a in v.actions) or "none"
        return (
            f"[analyzer]   {v.root_cause_class}: {v.root_cause} "
            f"(confidence {v.confidence:.2f}, {v.analyzer}); actions: {acts}"
        )
    if isinstance(v, ApprovalRequest):
        return f"[executor]   approval requested for {v.action.type} {v.action.target.key}"
    if isinstance(v, ActionResult):
        return f"[executor]   result {v.type} {v.status} outcome={v.outcome}: {v.message}"
    return f"[{env.topic}] {v}"


async def all_set_or_failed(
    events: Sequence[asyncio.Event],
    timeout: float,  # noqa: ASYNC109 - a deadline the caller reports on expiry
    failure: Callable[[], BaseException | None],
    poll: float = 0.5,
) -> BaseException | None:
    """Wait until every event is set, or a component failed (returned: waiting on would
    only end in the timeout). Raises TimeoutError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(e.is_set() for e in events):
        if (err := failure()) is not None:
            return err
        if loop.time() >= deadline:
            raise TimeoutError
        await asyncio.sleep(poll)
    return None


# Seconds the lab waits at least for the pods to be back once verification said healed:
# the replacement of an evicted pod is created, scheduled and started after the eviction.
RESTORE_MIN = 30.0


def shortfall(replicas: int, ready: Sequence[tuple[str, str]]) -> str | None:
    """Why the service is not back (None when it is): every requested replica must run
    ready on a healthy node, not only the failing pod's alert be gone."""
    if len(ready) == replicas:
        return None
    pods = ", ".join(f"{pod} on {node}" for pod, node in ready) or "none"
    return f"{len(ready)} of {replicas} pods run ready on healthy nodes ({pods})"


async def until_restored(
    lab: LabCluster, namespace: str, name: str, replicas: int, *, limit: float, poll: float = 0.5
) -> tuple[tuple[str, str], ...]:
    """The ready pods (:meth:`LabCluster.ready`) once they are as many as ``replicas``, or
    as they are after ``limit`` seconds (read at least once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        ready = await lab.ready(namespace, name)
        if shortfall(replicas, ready) is None or loop.time() >= deadline:
            return ready
        await asyncio.sleep(poll)


async def run_lab(
    settings: Settings,
    *,
    timeout: float = 240.0,  # noqa: ASYNC109 - the lab's own deadline, reported on expiry
    baseline: float = 15.0,
    chaos: Experiment = EXPERIMENTS[0],
    namespace: str = "shop",
) -> int:
    """Run one experiment: 0 when its remedy healed the service (verified), the incident
    resolved and every requested replica runs ready on a healthy node; 1 when not within
    ``timeout``, healed by another action or the pods are not all back, 2 when a
    component died. ``namespace``: the simulated service's (the tests give each experiment
    its own, so no run waits out another's series)."""
    from agent.runtime import Agent

    # A fresh prefix per run: earlier runs' events and correlator state stay out of it.
    prefix = f"{settings.kafka.topic_prefix}{utcnow():%Y%m%d%H%M%S}."
    settings = replace(settings, kafka=replace(settings.kafka, topic_prefix=prefix))
    ns, name = namespace, "checkout"
    # ... and so must their metrics (see await_quiet).
    prom = PromClient(settings.monitoring.prometheus.url, timeout=5.0)
    try:
        waited = await await_quiet(prom, ns, name)
    finally:
        await prom.close()
    if waited >= 1:
        print(f"lab: waited {waited:.0f}s for an earlier run's series to leave the windows")
    lab, cluster = lab_cluster(settings)
    try:
        await lab.setup(ns, name, image=GOOD_IMAGE, replicas=3)
    except BaseException:
        await lab.teardown()
        await lab.close()
        await cluster.close()
        raise
    service = SimulatedService(lab, namespace=ns, name=name)
    await service.start()
    target_file = register_target("sre-agent-lab", service.port)
    print(
        f"lab: simulated service {ns}/{name} ({lab.where}) on 127.0.0.1:{service.port}, "
        "scraped by Prometheus"
    )
    agent = Agent(settings, roles=["all"], cluster=cluster)
    healed = asyncio.Event()
    resolved = asyncio.Event()
    seen: set[str] = set()  # anomaly names printed firing
    healed_by: list[str] = []  # action types whose verification said healed

    async def tap(batch: list[Envelope]) -> None:
        # An anomalies record holds a batch of anomalies: one envelope each.
        each = [
            replace(env, value=v)
            for env in batch
            for v in (env.value if isinstance(env.value, tuple) else (env.value,))
        ]
        for env in each:
            v = env.value
            if v is None:
                continue  # a tombstone: an approval was decided
            if lab_service(v) != (ns, name):
                # Another service the same Prometheus happens to scrape: not the lab's fault,
                # and the lab's on-call must never approve actions on it.
                continue
            if isinstance(v, Anomaly) and v.status == "firing":
                if v.name in seen:
                    continue  # repeats of a firing anomaly: print the first only
                seen.add(v.name)
            print(describe(env), flush=True)
            if isinstance(v, ApprovalRequest):
                decision = ApprovalDecision(
                    id=new_id(),
                    request_id=v.id,
                    action_hash=v.action_hash,
                    decision="approve",
                    decided_by="lab-oncall",
                    decided_at=utcnow(),
                    reason="lab: matches the rollout timeline",
                )
                print(f"[on-call]    approves {v.action.type} {v.action.target.key}", flush=True)
                await agent.bus.publish(agent.bus.topic("decisions"), decision)
            if isinstance(v, ActionResult) and v.outcome == "healed":
                healed_by.append(v.type)
                healed.set()
            if isinstance(v, Incident) and v.status == "resolved":
                resolved.set()

    t = agent.bus.topic
    tap_consumer = BatchConsumer(
        agent.bus,
        name="lab-tap",
        group_id=f"{prefix}lab-tap",
        topics={
            t("anomalies"): anomalies_in,
            t("incidents"): Incident,
            t("analyses"): Analysis,
            t("approvals"): ApprovalRequest,
            t("action-results"): ActionResult,
        },
        handler=tap,
    )
    code = 1
    try:
        await agent.start()
        await tap_consumer.start()
        print(
            "lab: agent running (detector, correlator, analyzer, executor); "
            f"baseline {baseline:.0f}s"
        )
        await asyncio.sleep(baseline)
        loop = asyncio.get_running_loop()
        injected = loop.time()
        await chaos.inject(lab, service)
        print(f"lab: experiment {chaos.name}: {chaos.fault}", flush=True)
        try:
            failed = await all_set_or_failed(
                (healed, resolved), timeout, lambda: service.failure or agent.failure()
            )
            if failed is not None:
                print(f"lab: stopped, a component failed: {failed!r}", flush=True)
                return 2
            took = loop.time() - injected
            if chaos.remedy not in healed_by:
                print(
                    f"lab: experiment {chaos.name} failed: healed by {', '.join(healed_by)}, "
                    f"not by {chaos.remedy}",
                    flush=True,
                )
                return 1
            # Verification judges the service's metrics, which a pod that never runs does
            # not export: the pods themselves must say the service is back.
            target = Target(kind="Deployment", namespace=ns, name=name)
            replicas = (await cluster.workload(target)).replicas
            ready = await until_restored(
                lab, ns, name, replicas, limit=max(RESTORE_MIN, injected + timeout - loop.time())
            )
            if (short := shortfall(replicas, ready)) is not None:
                print(f"lab: experiment {chaos.name} failed: {short}", flush=True)
                return 1
            w = await cluster.workload(target)
            nodes = ", ".join(sorted({node for _, node in ready}))
            print(
                f"lab: healed by {chaos.remedy} in {took:.0f}s (fault to verified and "
                f"resolved). checkout runs {len(ready)} x {w.image} (revision {w.revision}, "
                f"generation {w.generation}), ready on {nodes}; incident resolved"
            )
            code = 0
        except TimeoutError:
            print(f"lab: experiment {chaos.name}: not healed within {timeout:.0f}s", flush=True)
    finally:
        await tap_consumer.stop()
        await agent.stop()
        try:
            gone = await delete_topics(settings.kafka)  # the run's prefix: its own only
            log.info("lab: deleted the run's %d topics (%s*)", len(gone), prefix)
        except DependencyUnavailable:
            log.exception("lab: could not delete the run's topics (%s*)", prefix)
        await service.stop()
        target_file.unlink(missing_ok=True)
        await lab.teardown()
        await lab.close()
    return code


def lab_cluster(settings: Settings) -> tuple[LabCluster, Cluster]:
    """The lab's side of the configured cluster, and the agent's: one shared in process;
    on a real control plane each its own client (the agent closes its own when it stops,
    and the lab still removes what it created after)."""
    if settings.kubernetes.backend == "kubernetes":
        from agent.lab_kube import KubeLab  # the kubernetes client loads only if used
        from handlers.kube import KubeCluster

        return (
            KubeLab(KubeCluster.from_settings(settings.kubernetes)),
            KubeCluster.from_settings(settings.kubernetes),
        )
    lab = InProcessLab()
    return lab, lab.cluster
