"""PromQL detector: evaluates configured patterns and publishes anomalies.

A pattern's condition is a PromQL filter (``... > 0.01``): every series it returns is a
firing instance, identified by its labels. (The reference reads ``value > 0`` of the first
series only, which misses every service but one.) ``for`` keeps an instance pending until
it has held that long; an instance that disappears is published once as resolved.

:func:`evaluate` is pure; :class:`PromQLDetector` runs it on each pattern's interval.
Firing instances are re-published at every evaluation: the correlator dedups them by
fingerprint and uses them as liveness for ``resolve_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.errors import AgentError
from agent.metrics import Metrics
from agent.models import Anomaly, fingerprint, group_key, utcnow
from agent.prom import PromClient, Sample
from agent.settings import PatternSpec, Settings

log = logging.getLogger(__name__)

# Labels that identify an instance; the rest (e.g. pod-hash values) would split one fault
# into many anomalies when a deployment rolls.
SERVICE_LABELS = ("service", "app", "app_kubernetes_io_name", "job")


@dataclass(frozen=True, slots=True)
class Instance:
    labels: Mapping[str, str]
    since: datetime  # first evaluation that returned it (pending start)
    firing: bool = False
    fired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PatternState:
    instances: Mapping[str, Instance] = field(default_factory=dict)


def instance_labels(sample: Sample, cluster: str) -> dict[str, str]:
    labels = {k: v for k, v in sample.labels.items() if k != "__name__"}
    labels.setdefault("cluster", cluster)
    if "service" not in labels:
        svc = next((labels[k] for k in SERVICE_LABELS if labels.get(k)), "")
        labels["service"] = svc
    labels.setdefault("namespace", "default")
    return labels


def evaluate(
    pattern: PatternSpec,
    samples: Sequence[Sample],
    state: PatternState,
    now: datetime,
    cluster: str,
) -> tuple[PatternState, list[Anomaly]]:
    seen: dict[str, tuple[dict[str, str], float]] = {}
    for s in samples:
        labels = instance_labels(s, cluster)
        fp = fingerprint("prometheus", pattern.name, labels)
        seen[fp] = (labels, s.value)
    out: list[Anomaly] = []
    instances: dict[str, Instance] = {}
    hold = timedelta(seconds=pattern.for_)
    for fp, (labels, value) in seen.items():
        inst = state.instances.get(fp) or Instance(labels=labels, since=now)
        if not inst.firing and now - inst.since >= hold:
            inst = replace(inst, firing=True, fired_at=now)
        instances[fp] = inst
        if inst.firing:
            out.append(_anomaly(pattern, fp, labels, "firing", inst, now, value))
    for fp, inst in state.instances.items():
        if fp not in seen and inst.firing:
            out.append(_anomaly(pattern, fp, inst.labels, "resolved", inst, now, None))
    return PatternState(instances=instances), out


def _anomaly(
    pattern: PatternSpec,
    fp: str,
    labels: Mapping[str, str],
    status: str,
    inst: Instance,
    now: datetime,
    value: float | None,
) -> Anomaly:
    return Anomaly(
        fingerprint=fp,
        source="prometheus",
        name=pattern.name,
        severity=pattern.severity,
        status=status,  # type: ignore[arg-type]
        labels=dict(labels),
        annotations={"condition": pattern.condition.strip(), "description": pattern.description},
        value=value,
        starts_at=inst.fired_at or now,
        observed_at=now,
    )


class Publisher(Protocol):
    """What the detector needs from the bus; :class:`streams.bus.Bus` satisfies it."""

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None: ...


class PromQLDetector:
    def __init__(
        self,
        settings: Settings,
        *,
        prom: PromClient,
        publish: Publisher,
        topic: str,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.prom = prom
        self.publisher = publish
        self.topic = topic
        self.metrics = metrics
        self.states: dict[str, PatternState] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._tasks:
            return
        for p in self.settings.patterns:
            self._tasks.append(asyncio.create_task(self._loop(p), name=f"detector-{p.name}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _loop(self, pattern: PatternSpec) -> None:
        interval = pattern.interval or self.settings.monitoring.evaluation_interval
        while True:
            await self.evaluate_once(pattern)
            await asyncio.sleep(interval)

    async def evaluate_once(self, pattern: PatternSpec) -> list[Anomaly]:
        try:
            samples = await self.prom.query(pattern.condition)
        except AgentError as err:
            reason = "invalid_query" if not err.retriable else "unavailable"
            self.metrics.detector_errors.labels(pattern=pattern.name, reason=reason).inc()
            log.warning("pattern %s: query failed: %s", pattern.name, err)
            return []
        state = self.states.get(pattern.name, PatternState())
        new_state, anomalies = evaluate(
            pattern, samples, state, utcnow(), self.settings.agent.cluster
        )
        group_by = self.settings.correlation.group_by
        await self.publisher.publish_many(
            [(self.topic, a, group_key(a.labels, group_by)) for a in anomalies]
        )
        # Only after the anomalies are durable, so a failed publish is retried next round.
        self.states[pattern.name] = new_state
        for a in anomalies:
            self.metrics.anomalies.labels(source=a.source, name=a.name, status=a.status).inc()
        return anomalies
