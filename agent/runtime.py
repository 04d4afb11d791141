"""Composition root: builds each role's components from Settings and runs them.

Roles: ``detector``, ``correlator``, ``analyzer``, ``executor`` or ``all``. Start order is
outputs before inputs (bus, then consumers, then detectors) and stop order the reverse, so
SIGTERM first stops intake, then lets in-flight batches finish and commit, then closes
clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

import aiohttp

from agent.alertmanager_api import AlertmanagerAPI
from agent.analysis_stage import AnalysisStage
from agent.calibration import CalibrationTracker
from agent.codec import decode
from agent.context import ClusterContext, ContextGatherer
from agent.detector import PromQLDetector
from agent.errors import ComponentFailed
from agent.escalation_watch import UnresolvedWatch, all_levels, seed_window
from agent.feeds import feed_consumer
from agent.llm import chat_model_from
from agent.llm_analyzer import LLMAnalyzer
from agent.metrics import Metrics
from agent.models import (
    ActionRequest,
    ActionResult,
    Analysis,
    ApprovalDecision,
    ApprovalRequest,
    Escalation,
    Fact,
    Heartbeat,
    Incident,
    SwitchChange,
)
from agent.notifier import Notifier
from agent.policy import history_window
from agent.prom import PromClient
from agent.server import HealthServer
from agent.settings import Settings
from agent.topics import topic
from agent.webhook import AlertmanagerReceiver
from handlers.cluster import Cluster
from handlers.executor import Executor, kill_switch_file, replay_window
from streams.bus import BatchConsumer, Bus, Envelope
from streams.correlator import Correlator
from streams.ledger import BudgetLedger
from streams.replay import SharedRead, recent, reports_since, snapshot
from streams.silences import current as current_silences
from streams.view import CompactedView

log = logging.getLogger(__name__)

ROLES = ("detector", "correlator", "analyzer", "executor")


def prometheus_gates_readiness(roles: Iterable[str]) -> bool:
    """Whether a process of these roles is ready only while Prometheus answers: the
    executor's (it verifies actions with it), unless the process is a detector. A
    detector's readiness is its Alertmanager webhook's (the Service routes alerts to
    ready pods), and alerts from other Prometheus servers matter most while its own is
    down; its pattern loop shows Prometheus in ``sre_agent_detector_prometheus_up`` and
    the agent's ``prometheus-unavailable`` anomaly instead."""
    return "executor" in roles and "detector" not in roles


async def read_facts(s: Settings) -> dict[str, Fact]:
    """The correlation facts by fingerprint, read to the topic's end once (the detector
    asks whether a blindness a former life announced is still recorded); none while the
    topic does not exist."""
    view = CompactedView(
        s.kafka,
        topic(s.kafka.topic_prefix, "correlation-facts"),
        functools.partial(decode, Fact),
        name="detector-facts",
    )
    # Bounded: the pattern's evaluation waits for it. A topic not created yet (a fresh
    # install) records nothing: empty at once, not a 10 s wait that fails at every answer.
    await view.start(wait=10.0, missing_ok=True)
    try:
        return dict(view.items)
    finally:
        await view.stop()


# A component whose stop has not ended in this long is abandoned, named in the log, so the
# rest still stop (and close what they hold) and the process exits. Longer than a batch
# consumer's own 30 s wait for its in-flight batch.
STOP_TIMEOUT = 40.0


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Agent:
    def __init__(
        self,
        settings: Settings,
        *,
        roles: Iterable[str],
        cluster: Cluster,
        metrics: Metrics | None = None,
        serve_http: bool = True,
    ) -> None:
        roles = set(roles)
        if "all" in roles:
            roles = set(ROLES)
        unknown = roles - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(sorted(unknown))}")
        self.settings = settings
        self.roles = roles
        self.cluster = cluster
        self.metrics = metrics or Metrics()
        self.bus = Bus(settings.kafka, metrics=self.metrics, name="+".join(sorted(roles)))
        self.prom = PromClient(
            settings.monitoring.prometheus.url, timeout=settings.monitoring.prometheus.timeout
        )
        am = settings.monitoring.alertmanager
        self.alertmanager = AlertmanagerAPI(am.url, timeout=am.timeout) if am.url else None
        self.server = (
            HealthServer(host=settings.server.host, port=settings.server.port, metrics=self.metrics)
            if serve_http
            else None
        )
        self.components: list[Component] = []
        self.stop_timeout = STOP_TIMEOUT
        self.detector: PromQLDetector | None = None
        self.executor: Executor | None = None
        self.correlator: Correlator | None = None
        self.llm: LLMAnalyzer | None = None
        self.analysis: AnalysisStage | None = None
        self.notifier: Notifier | None = None
        self._build()

    def _build(self) -> None:
        s, prefix = self.settings, self.settings.kafka.topic_prefix
        if "correlator" in self.roles:
            self.correlator = Correlator(s, metrics=self.metrics)
            self.components.append(self.correlator)
        # The analysis stage and the executor each replay the recent action results at
        # start (when one process runs both, e.g. `--role all`): one read between them.
        results = SharedRead(
            functools.partial(recent, s.kafka, self.bus.topic("action-results"), ActionResult),
            history_window(s.remediation),
            users=max(1, len(self.roles & {"analyzer", "executor"})),
        )
        incidents = self.bus.topic("incidents")
        # The same for the incidents: the stage's and the executor's replays, and the
        # unresolved watch's seed.
        watching = "executor" in self.roles and bool(all_levels(s))
        replay = SharedRead(
            functools.partial(recent, s.kafka, incidents, Incident),
            max(
                replay_window(s.remediation),
                seed_window(all_levels(s)) if watching else 0.0,
            ),
            users=max(1, len(self.roles & {"analyzer", "executor"}) + watching),
        )
        if "analyzer" in self.roles:
            stage = self._analysis_stage(s, results, replay)
            # Every replica reads every incident and action result (no group: results are
            # keyed by target, and a replica may come to own any incident's partition): the
            # one owning an incident whose remedy failed verification analyses it again.
            # Before the stage's replay, so nothing falls between them.
            analyzer_watch = BatchConsumer(
                self.bus,
                name="analyzer-watch",
                group_id=None,
                topics={
                    incidents: Incident,
                    self.bus.topic("action-results"): ActionResult,
                    self.bus.topic("analyses"): Analysis,
                },
                handler=stage.on_watch,
                from_beginning=False,
                stuck_after=s.agent.stuck_after,
            )
            stage.caught_up = analyzer_watch.caught_up
            self.components.append(analyzer_watch)
            self.components.append(stage)  # replays recent incidents and results before intake
            analyzer = BatchConsumer(
                self.bus,
                name="analyzer",
                group_id=f"{prefix}analyzer",
                topics={incidents: Incident},
                handler=stage.handle,
                stuck_after=s.agent.stuck_after,
                on_gained=stage.on_gained,
            )
            stage.owns = functools.partial(analyzer.holds, incidents)
            self.components.append(analyzer)
            calibration = CalibrationTracker(
                metrics=self.metrics,
                actions=functools.partial(
                    recent, s.kafka, self.bus.topic("actions"), ActionRequest
                ),
            )
            self.components.append(calibration)  # seeds recent predictions before intake
            self.components.append(
                BatchConsumer(
                    self.bus,
                    name="calibration",
                    group_id=f"{prefix}calibration",
                    topics={
                        self.bus.topic("actions"): ActionRequest,
                        self.bus.topic("action-results"): ActionResult,
                    },
                    handler=calibration.handle,
                    stuck_after=s.agent.stuck_after,
                )
            )
        if "executor" in self.roles:
            # Every replica reads every incident, action result and approval request (no
            # group: each reads all partitions). The executor must know an action's incident
            # closed although another replica owns that incident's partition, count every
            # replica's actions in its budgets, and know the request of any decision the
            # group hands it, whoever asked; the unresolved watch, that an incident it
            # seeded resolved. It starts first, so nothing falls between it and their replays.
            watch = (
                UnresolvedWatch(
                    after=s.escalation.unresolved_after,
                    topic=self.bus.topic("escalations"),
                    publish=self.bus.publish,
                    metrics=self.metrics,
                    recent=replay,
                    again=s.escalation.unresolved_again_after,
                    settings=s,
                    silences=functools.partial(
                        current_silences, s.kafka, self.bus.topic("silences")
                    ),
                )
                if watching
                else None
            )
            executor_watch = BatchConsumer(
                self.bus,
                name="executor-watch",
                group_id=None,
                topics={
                    incidents: Incident,
                    self.bus.topic("action-results"): ActionResult,
                    self.bus.topic("switches"): SwitchChange,
                    self.bus.topic("approvals"): ApprovalRequest,
                },
                handler=functools.partial(_follow, self, watch),
                from_beginning=False,
                stuck_after=s.agent.stuck_after,
            )
            self.components.append(executor_watch)
            self.executor = Executor(
                s,
                bus=self.bus,
                cluster=self.cluster,
                metrics=self.metrics,
                prom=self.prom,
                alertmanager=self.alertmanager,
                switches=kill_switch_file(s.agent.kill_switch_file),
                approvals=functools.partial(
                    snapshot, s.kafka, self.bus.topic("approvals"), ApprovalRequest
                ),
                results=results,
                actions=functools.partial(
                    recent, s.kafka, self.bus.topic("actions"), ActionRequest
                ),
                incidents=replay,
                watch_read=executor_watch.caught_up,
                switch_log=functools.partial(
                    snapshot, s.kafka, self.bus.topic("switches"), SwitchChange
                ),
                reports=functools.partial(reports_since, s.kafka, self.bus.topic("anomalies")),
                budget=BudgetLedger(self.bus, s.remediation),
            )
            self.components.append(self.executor)  # replays pending approvals before intake
            executor_group = BatchConsumer(
                self.bus,
                name="executor",
                group_id=f"{prefix}executor",
                # Not approvals: the watch reads those, in full (see above).
                topics={
                    self.bus.topic("decisions"): ApprovalDecision,
                    self.bus.topic("actions"): ActionRequest,
                },
                handler=self.executor.handle,
                stuck_after=s.agent.stuck_after,
                # Actions are serialized per target: small batches keep latency low.
                max_records=50,
            )
            # Every replica knows every request; the one its decision goes to expires it.
            self.executor.owns = functools.partial(
                executor_group.holds, self.bus.topic("decisions")
            )
            self.components.append(executor_group)
            if watch is not None:
                # Replicas escalate an incident under one id (see agent.escalation_watch).
                self.components.append(watch)  # seeds what is open
            if s.escalation.webhooks:
                self.notifier = Notifier(s, metrics=self.metrics)
                self.components.append(
                    BatchConsumer(
                        self.bus,
                        name="notifier",
                        group_id=f"{prefix}notifier",
                        topics={self.bus.topic("escalations"): Escalation},
                        handler=self.notifier.handle,
                        stuck_after=s.agent.stuck_after,
                    )
                )
                if any(w.takes("switch") for w in s.escalation.webhooks):
                    # Its own group, from the end at its first start: a new deployment does
                    # not announce the switches' whole history.
                    self.components.append(
                        BatchConsumer(
                            self.bus,
                            name="notifier-switches",
                            group_id=f"{prefix}notifier-switches",
                            topics={self.bus.topic("switches"): SwitchChange},
                            handler=self.notifier.handle,
                            from_beginning=False,
                            stuck_after=s.agent.stuck_after,
                        )
                    )
        if "detector" in self.roles:
            self.detector = PromQLDetector(
                s,
                prom=self.prom,
                publish=self.bus,
                topic=self.bus.topic("anomalies"),
                metrics=self.metrics,
                read_facts=functools.partial(read_facts, s),
            )
            self.components.append(self.detector)
            self._build_intake(s)

    def _build_intake(self, s: Settings) -> None:
        """The detector role's other sources: external feeds and the Alertmanager webhook."""
        feeds = feed_consumer(s, bus=self.bus, metrics=self.metrics)
        if feeds is not None:
            self.components.append(feeds)
        if s.detectors.kubernetes.enabled:
            from agent.kube_watch import KubeWatcher  # the kubernetes client loads only if used

            self.components.append(
                KubeWatcher(
                    s, publish=self.bus, topic=self.bus.topic("anomalies"), metrics=self.metrics
                )
            )
        am = s.detectors.alertmanager
        if not am.enabled:
            return
        # Unset (deploy/agent.yaml's Secret not created yet): the detector still runs its
        # other sources; the webhook refuses every request and keeps the role unready.
        token = os.environ.get(am.token_env) or None
        if token is None:
            log.error(
                "detectors.alertmanager.token_env: environment variable %s is unset; the "
                "webhook refuses every notification until it is set and the agent restarted",
                am.token_env,
            )
        if self.server is None:
            log.warning("alertmanager webhook enabled but the HTTP server is off; not mounted")
            return
        # Behind one Service a notification reaches one replica: each shares the heartbeats
        # it receives, and judges from the latest any received (see agent.webhook).
        beats = self.bus.topic("heartbeats")
        receiver = AlertmanagerReceiver(
            s,
            token=token,
            publish=self.bus,
            topic=self.bus.topic("anomalies"),
            metrics=self.metrics,
            api=self.alertmanager,
            shared=(
                CompactedView(
                    s.kafka, beats, functools.partial(decode, Heartbeat), name="heartbeats"
                )
                if am.heartbeat is not None
                else None
            ),
            shared_topic=beats,
            replica=socket.gethostname(),
        )
        receiver.install(self.server.app)
        self.server.checks["alertmanager-webhook"] = receiver.unready
        self.components.append(receiver)

    def _analysis_stage(
        self, s: Settings, results: SharedRead, incidents: SharedRead
    ) -> AnalysisStage:
        """The rules decide; with ``ai.enabled`` the LLM does, the rules as its fallback.
        Both see the same gathered context (metrics, events, node conditions, rollouts):
        the rules' crash-loop, OOM, saturation, node and dependency findings read it."""
        # Events, logs and config changes need an adapter implementing ClusterContext.
        source = self.cluster if isinstance(self.cluster, ClusterContext) else None
        # Logs are text for the LLM, never evidence for the rules: not fetched without it.
        gatherer = ContextGatherer(
            s, cluster=self.cluster, source=source, prom=self.prom, logs=s.ai.enabled
        )
        if s.ai.enabled:
            self.llm = LLMAnalyzer(s, model=chat_model_from(s.ai, os.environ), metrics=self.metrics)
        self.analysis = AnalysisStage(
            s,
            bus=self.bus,
            cluster=self.cluster,
            metrics=self.metrics,
            llm=self.llm,
            gatherer=gatherer,
            results=results,
            results_window=results.seconds,
            incidents=incidents,
            incidents_window=replay_window(s.remediation),
            analyses=functools.partial(recent, s.kafka, self.bus.topic("analyses"), Analysis),
        )
        return self.analysis

    async def start(self) -> None:
        if self.server is not None:
            self.server.checks["kafka"] = self.bus.ping
            if prometheus_gates_readiness(self.roles):
                self.server.checks["prometheus"] = self._prometheus_ready
            if self.correlator is not None:
                self.server.live_checks["correlator"] = self.correlator.stuck
            for c in self.components:
                if isinstance(c, BatchConsumer):
                    self.server.live_checks[c.name] = c.stuck
            await self.server.start()
        await self.bus.start()
        await self.bus.create_topics()
        for c in self.components:
            await c.start()
        if self.server is not None:
            self.server.started = True
        log.info("agent started: roles %s", ", ".join(sorted(self.roles)))

    def failure(self) -> ComponentFailed | None:
        """The first component whose processing loop died, if any."""
        for c in self.components:
            cause = getattr(c, "failure", None)
            if isinstance(cause, BaseException):
                return ComponentFailed(getattr(c, "name", type(c).__name__), cause)
        return None

    async def stop(self) -> None:
        # Reverse order: detectors (intake) first, the bus last.
        for c in reversed(self.components):
            name = getattr(c, "name", None) or type(c).__name__
            try:
                await asyncio.wait_for(c.stop(), self.stop_timeout)
            except TimeoutError:
                log.error("stopping %s took over %.0fs: abandoned", name, self.stop_timeout)
            except Exception:
                log.exception("stopping %s failed", name)
        if self.executor is not None:
            await self.executor.stop()
        await self.bus.stop()
        if self.llm is not None:
            await self.llm.close()
        await self.prom.close()
        if self.alertmanager is not None:
            await self.alertmanager.close()
        if self.notifier is not None:
            await self.notifier.close()
        await self.cluster.close()
        if self.server is not None:
            await self.server.stop()
        log.info("agent stopped")

    async def __aenter__(self) -> Agent:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start (and the cluster client) is closed too
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _prometheus_ready(self) -> str | None:
        url = self.settings.monitoring.prometheus.url.rstrip("/") + "/-/ready"
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"


async def _follow(agent: Agent, watch: UnresolvedWatch | None, batch: Sequence[Envelope]) -> None:
    """The executor watch's handler: what the executor knows of closed incidents, of every
    replica's actions, of the run-time switches and of every pending approval, and what the
    unresolved watch knows of open ones."""
    if agent.executor is not None:
        await agent.executor.on_incidents(batch)
        await agent.executor.on_results(batch)
        await agent.executor.on_switches(batch)
        await agent.executor.on_approvals(batch)
    if watch is not None:
        await watch.handle(batch)


# (young, middle, old): see freeze_heap
GC_THRESHOLDS = (50_000, 20, 100)


def freeze_heap() -> None:
    """Exempt everything start-up allocated from the cyclic garbage collector.

    Modules, clients, faust's machinery and restored state live as long as the process,
    yet every full collection walked all of them: a fifth of the correlator's CPU under
    load. Reference counting still frees what is dropped later; only reference cycles
    among these start-up objects would never be collected.

    Also collects the young generation every 50k allocations instead of 700: the fold
    allocates a few objects per anomaly and keeps most (the groups' state), so the default
    thresholds traversed that state again and again. On ``bench/correlate.py``'s throughput
    run this took collection time from 1.8 s to 0.6 s per 200k anomalies."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run_until_signalled(agent: Agent, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down in order. Raises
    ComponentFailed, after the same shutdown, when a component's processing loop died."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        freeze_heap()
        while not stop.is_set():
            if (failed := agent.failure()) is not None:
                log.critical("%s; stopping so the supervisor restarts the agent", failed)
                raise failed from failed.cause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        log.info("stop requested; draining")
    finally:
        await agent.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
