"""PromQL detector: evaluates configured patterns and publishes anomalies.

A pattern's condition is a PromQL filter (``... > 0.01``): every series it returns is a
firing instance, identified by its labels. (The reference reads ``value > 0`` of the first
series only, which misses every service but one.) ``for`` keeps an instance pending until
it has held that long; an instance that disappears is published once as resolved.

:func:`evaluate` is pure; :class:`PromQLDetector` runs it on each pattern's interval.
Firing instances are re-published at every evaluation: the correlator dedups them by
fingerprint and uses them as liveness for ``resolve_timeout``.

High availability: with ``detectors.prometheus.align`` every pattern is evaluated at the
wall-clock multiples of its interval (the *slot*), Prometheus is queried at that instant and
anomalies are stamped with it. Replicas therefore publish identical anomalies (same
fingerprint, ``observed_at`` and ``id``) and the correlator's fingerprint dedup absorbs
the copies: two replicas, one incident.

Failures are observations too. A query Prometheus rejects, whose result is not an instant
vector (a scalar condition), or that it answers only in part (a reply with ``warnings``: a
store behind Thanos or Mimir, a remote read, did not answer), ``failure_threshold`` times in
a row raises the agent's own ``pattern-query-failed`` anomaly for that pattern; an endpoint
that stops answering opens its circuit breaker (no more queries until ``reset_timeout``)
and raises ``prometheus-unavailable``. Both resolve on the next successful query.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from agent.breaker import BreakerRules, CircuitBreaker
from agent.codec import wire_problems
from agent.errors import AgentError, RecordTooLarge, cancel_and_wait, task_failure
from agent.labels import SERVICE_LABELS, fit, normalise
from agent.metrics import Metrics
from agent.models import (
    Anomaly,
    AnomalySource,
    AnomalyStatus,
    Fact,
    Severity,
    fingerprint,
    group_key,
    observed,
    stable_id,
    utcnow,
)
from agent.prom import PromClient, Sample
from agent.settings import PatternSpec, Settings
from streams.partitioning import oversized

log = logging.getLogger(__name__)

__all__ = ["SERVICE_LABELS", "PromQLDetector", "evaluate", "instance_labels", "next_slot"]

# The source of the anomalies a pattern raises: only these ran the pattern's condition.
SOURCE: AnomalySource = "prometheus"
UNAVAILABLE = "prometheus-unavailable"
QUERY_FAILED = "pattern-query-failed"


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
    # Cut to fit, not refused: the series fires and must open an incident, and nobody is
    # there to be told (refused, it would be refused again every slot).
    return fit(normalise(sample.labels, cluster))


def next_slot(now: float, interval: float, delay: float) -> float:
    """The next evaluation slot (epoch seconds, a multiple of ``interval``) whose query
    time ``slot + delay`` is not in the past. Pure: replicas agree on it."""
    slot = math.floor((now - delay) / interval) * interval
    return slot if slot + delay >= now else slot + interval


def evaluate(
    pattern: PatternSpec,
    samples: Sequence[Sample],
    state: PatternState,
    now: datetime,
    cluster: str,
    *,
    partial: bool = False,
) -> tuple[PatternState, list[Anomaly]]:
    """``partial``: the reply may lack series that are there (it came with warnings), so
    what is absent from it is kept as it was, neither resolved nor reset."""
    seen: dict[str, tuple[dict[str, str], float]] = {}
    for s in samples:
        labels = instance_labels(s, cluster)
        fp = fingerprint(SOURCE, pattern.name, labels)
        seen[fp] = (observed(labels, cluster), s.value)
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
        if fp in seen:
            continue
        if partial:
            instances[fp] = inst
        elif inst.firing:
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
    annotations = {"condition": pattern.condition.strip(), "description": pattern.description}
    if value is not None and not math.isfinite(value):
        # e.g. histogram_quantile() in the +Inf bucket: keep it readable, JSON has no Inf.
        annotations["value"] = str(value)
        value = None
    return Anomaly(
        fingerprint=fp,
        source=SOURCE,
        name=pattern.name,
        severity=pattern.severity,
        status=status,  # type: ignore[arg-type]
        labels=dict(labels),
        annotations=annotations,
        value=value,
        starts_at=inst.fired_at or now,
        observed_at=now,
        # Deterministic, so replicas evaluating the same slot publish identical events.
        id=stable_id(SOURCE, fp, status, now.isoformat()),
    )


@dataclass(frozen=True, slots=True)
class Health:
    """Consecutive failures of one thing the agent depends on, and whether it alerted."""

    failures: int = 0
    since: datetime | None = None  # when the agent's own anomaly started firing


def health_step(
    h: Health, ok: bool, now: datetime, threshold: int
) -> tuple[Health, AnomalyStatus | None]:
    """Pure: the new health and what to publish (firing again while down: liveness)."""
    if ok:
        return Health(), ("resolved" if h.since is not None else None)
    failures = h.failures + 1
    if h.since is not None:
        return replace(h, failures=failures), "firing"
    if failures >= threshold:
        return Health(failures=failures, since=now), "firing"
    return Health(failures=failures), None


def agent_anomaly(
    name: str,
    status: AnomalyStatus,
    *,
    severity: Severity,
    labels: Mapping[str, str],
    since: datetime,
    now: datetime,
    error: str,
) -> Anomaly:
    """An anomaly of the agent itself (it cannot see what it is supposed to watch)."""
    fp = fingerprint("agent", name, labels)
    return Anomaly(
        fingerprint=fp,
        source="agent",
        name=name,
        severity=severity,
        status=status,
        labels=dict(labels),
        annotations={"error": error[:4000]},
        starts_at=since,
        observed_at=now,
        id=stable_id("agent", fp, status, now.isoformat()),
    )


def still_open(fact: Fact | None) -> datetime | None:
    """Pure: when a blindness the correlation facts record as still going on began (its
    anomaly fires there), else None."""
    if fact is None or fact.status != "firing":
        return None
    return fact.first_seen or fact.observed_at


# The correlation facts by fingerprint, read whole from their compacted topic.
ReadFacts = Callable[[], Awaitable[Mapping[str, Fact]]]


class Publisher(Protocol):
    """What the detector needs from the bus; :class:`streams.bus.Bus` satisfies it."""

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None: ...


def refusals(anomaly: Anomaly, group_by: tuple[str, ...]) -> list[str]:
    """Pure: why an anomaly from outside would not reach the correlator: a field its wire
    schema refuses (the correlator dead-letters it), or a size Kafka refuses (it would fail
    every retry of the publish, with the anomalies published beside it)."""
    bad = wire_problems(Anomaly, anomaly)
    if bad:
        return list(bad)
    too_large = oversized(anomaly, group_key(anomaly.labels, group_by))
    return [f"<root>: {too_large}"] if too_large else []


@dataclass(frozen=True, slots=True)
class Refused:
    """An anomaly not published, and why (field paths, ``<root>`` for the whole)."""

    anomaly: Anomaly
    problems: tuple[str, ...]


async def publish_refusing(
    publisher: Publisher,
    topic: str,
    anomalies: Sequence[Anomaly],
    *,
    group_by: tuple[str, ...],
    metrics: Metrics,
) -> list[Refused]:
    """Publish the anomalies the correlator and Kafka take; return the others with why,
    logged and counted. One that cannot be published failed the publish of all of them
    at every retry: a pattern lost its whole evaluation each slot, the Kubernetes watch
    stopped for good. Kafka being away still raises (the caller retries)."""
    refused: list[Refused] = []
    good: list[Anomaly] = []
    for a in anomalies:
        if bad := refusals(a, group_by):
            refused.append(Refused(a, tuple(bad)))
        else:
            good.append(a)
    try:
        await publish_anomalies(publisher, topic, good, group_by=group_by, metrics=metrics)
    except RecordTooLarge as err:
        # The topic takes less than the producer sends (its max.message.bytes), and a batch
        # record is refused whole: alone, each is its own record, so only the culprit fails
        # (one the broker took already goes twice, a copy the correlator dedups).
        if len(good) == 1:
            refused.append(Refused(good[0], (f"<root>: {err}",)))
        else:
            for a in good:
                try:
                    await publish_anomalies(
                        publisher, topic, [a], group_by=group_by, metrics=metrics
                    )
                except RecordTooLarge as one:
                    refused.append(Refused(a, (f"<root>: {one}",)))
    for r in refused:
        metrics.refused_anomalies.labels(source=r.anomaly.source, name=r.anomaly.name).inc()
        log.error(
            "anomaly %s of %s (fingerprint %s) refused, not published: %s",
            r.anomaly.name,
            r.anomaly.source,
            r.anomaly.fingerprint,
            "; ".join(r.problems)[:2000],
        )
    return refused


async def publish_anomalies(
    publisher: Publisher,
    topic: str,
    anomalies: Sequence[Anomaly],
    *,
    group_by: tuple[str, ...],
    metrics: Metrics,
) -> None:
    """Publish anomalies keyed by their correlation group (one partition per group), and
    count them once the bus has taken them: what every source does with what it found."""
    await publisher.publish_many([(topic, a, group_key(a.labels, group_by)) for a in anomalies])
    for a in anomalies:
        metrics.anomalies.labels(source=a.source, name=a.name, status=a.status).inc()


class PromQLDetector:
    def __init__(
        self,
        settings: Settings,
        *,
        prom: PromClient,
        publish: Publisher,
        topic: str,
        metrics: Metrics,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        read_facts: ReadFacts | None = None,
    ) -> None:
        self.settings = settings
        self.prom = prom
        self.publisher = publish
        self.topic = topic
        self.metrics = metrics
        self.wall = wall  # only for finding the next slot; decisions take ``now``
        cfg = settings.detectors.prometheus
        self.breaker = CircuitBreaker(
            BreakerRules(failure_threshold=cfg.failure_threshold, reset_timeout=cfg.reset_timeout),
            clock=clock or _loop_time,
        )
        self.states: dict[str, PatternState] = {}
        self.query_health: dict[str, Health] = {}
        self.unavailable_since: datetime | None = None
        self.read_facts = read_facts
        # Blindnesses a former life of this detector announced and the facts still record
        # as going on, by fingerprint -> since; None until read (see _recorded).
        self.recorded: dict[str, datetime] | None = None
        self._reading = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._tasks:
            return
        for p in self.settings.patterns:
            self._tasks.append(asyncio.create_task(self._loop(p), name=f"detector-{p.name}"))

    @property
    def failure(self) -> BaseException | None:
        """Why a pattern's loop died, if one did (see agent.runtime.run_until_signalled)."""
        return task_failure(*self._tasks)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)

    async def _loop(self, pattern: PatternSpec) -> None:
        interval = pattern.interval or self.settings.monitoring.evaluation_interval
        cfg = self.settings.detectors.prometheus
        if not cfg.align:
            while True:
                await self._evaluate_logged(pattern, None)
                await asyncio.sleep(interval)
        delay = min(cfg.evaluation_delay, interval / 2)
        # Start with the slot just past, so a restarted replica catches up at once.
        slot = next_slot(self.wall(), interval, delay) - interval
        while True:
            await self._evaluate_logged(pattern, datetime.fromtimestamp(slot, UTC))
            slot = next_slot(self.wall(), interval, delay)  # skips slots missed while slow
            await asyncio.sleep(max(0.0, slot + delay - self.wall()))

    async def _evaluate_logged(self, pattern: PatternSpec, at: datetime | None) -> None:
        try:
            await self.evaluate_once(pattern, at)
        except AgentError as err:  # e.g. Kafka down: the next slot retries with fresh state
            log.warning("pattern %s: publishing failed: %s", pattern.name, err)
        except Exception:
            # A bug used to end this pattern's loop: it was never evaluated again, silently.
            # Counted (SREAgentDetectorFailing alerts on it); the next slot tries again.
            self.metrics.detector_errors.labels(pattern=pattern.name, reason="internal_error").inc()
            log.exception("pattern %s: evaluation failed", pattern.name)

    async def evaluate_once(
        self, pattern: PatternSpec, at: datetime | None = None
    ) -> list[Anomaly]:
        """Evaluate one pattern now, or at the slot ``at``; returns the pattern's anomalies
        (the agent's own anomalies about failures are published beside them)."""
        now = at or utcnow()
        if not self.breaker.allow():
            self.metrics.detector_errors.labels(pattern=pattern.name, reason="circuit_open").inc()
            await self._publish(self._endpoint_health(now, "circuit open"))
            return []
        try:
            reply = await self.prom.query_vector(pattern.condition, at=at)
        except AgentError as err:
            if err.retriable:
                reason = "unavailable"
                self.breaker.record_failure()
                agent = self._endpoint_health(now, str(err))
            else:  # Prometheus answered: the endpoint is fine, the query is not (rejected,
                # or not an instant vector: a scalar condition is the pattern's error)
                reason = "invalid_query"
                self.breaker.record_success()
                agent = self._endpoint_health(now, "") + self._query_health(
                    pattern, False, now, f"pattern {pattern.name}: {err}"
                )
                agent += await self._recorded(pattern, now, agent, query_ok=False)
            self.metrics.detector_errors.labels(pattern=pattern.name, reason=reason).inc()
            log.warning("pattern %s: query failed: %s", pattern.name, err)
            await self._publish(agent)
            return []
        self.breaker.record_success()
        problem = ""
        if reply.partial:
            # A store or ingester behind the endpoint did not answer: what it holds is
            # missing from the reply, unseen, not gone. Counted as an error (it alerts when
            # it lasts) and a failure of the pattern's query: pattern-query-failed, so the
            # correlator resolves none of the pattern's members as quiet meanwhile.
            self.metrics.detector_errors.labels(
                pattern=pattern.name, reason="partial_response"
            ).inc()
            problem = f"pattern {pattern.name}: partial reply: " + "; ".join(reply.warnings)
            log.warning(
                "pattern %s: partial reply, what is missing from it is not resolved: %s",
                pattern.name,
                problem[:2000],
            )
        seen = not problem
        agent = self._endpoint_health(now, "") + self._query_health(pattern, seen, now, problem)
        agent += await self._recorded(pattern, now, agent, query_ok=seen)
        state = self.states.get(pattern.name, PatternState())
        new_state, anomalies = evaluate(
            pattern,
            reply.samples,
            state,
            now,
            self.settings.agent.cluster,
            partial=reply.partial,
        )
        await self._publish(anomalies + agent)
        # Only after the anomalies are durable, so a failed publish is retried next round.
        self.states[pattern.name] = new_state
        return anomalies

    async def _publish(self, anomalies: list[Anomaly]) -> None:
        if not anomalies:
            return
        await publish_refusing(
            self.publisher,
            self.topic,
            anomalies,
            group_by=self.settings.correlation.group_by,
            metrics=self.metrics,
        )

    async def _recorded(
        self, pattern: PatternSpec, now: datetime, told: list[Anomaly], *, query_ok: bool
    ) -> list[Anomaly]:
        """The end of a blindness a former life announced, if the facts record it as still
        going on: restarted during an outage, this life never failed, so nothing else says
        it sees again, and the correlator held the pattern incidents until the fact
        lapsed. Read, not assumed: a replica that never was blind announces no end."""
        if self.read_facts is None:
            return []
        if self.recorded is None:
            if self._reading:
                return []  # another pattern's first evaluation is reading them
            self._reading = True
            try:
                facts = await self.read_facts()
            except (AgentError, TimeoutError) as err:
                # (TimeoutError: the view not loaded within its bound.) An extra of the
                # evaluation: its failure must not cost the pattern's anomalies.
                log.warning("reading the correlation facts failed (tried again): %r", err)
                return []
            finally:
                self._reading = False
            self.recorded = {}
            for fp, fact in facts.items():
                if (since := still_open(fact)) is not None:
                    self.recorded[fp] = since
        out: list[Anomaly] = []
        told_fps = {a.fingerprint for a in told}
        seeing = [(UNAVAILABLE, self._agent_labels())]
        if query_ok:  # (a query that fails still blinds its pattern)
            seeing.append((QUERY_FAILED, self._agent_labels(pattern=pattern.name)))
        for name, labels in seeing:
            fp = fingerprint("agent", name, labels)
            since = self.recorded.pop(fp, None)
            if since is None or fp in told_fps:
                continue
            log.info("%s (%s) recorded as still firing: it ends now", name, fp)
            severity: Severity = "critical" if name == UNAVAILABLE else "warning"
            out.append(
                agent_anomaly(
                    name,
                    "resolved",
                    severity=severity,
                    labels=labels,
                    since=since,
                    now=now,
                    error="",
                )
            )
        return out

    def _agent_labels(self, **extra: str) -> dict[str, str]:
        labels = {"service": self.settings.agent.name, "endpoint": self.prom.url, **extra}
        return normalise(labels, self.settings.agent.cluster)

    def _endpoint_health(self, now: datetime, error: str) -> list[Anomaly]:
        """``prometheus-unavailable`` follows the breaker: firing while it is not closed."""
        down, since = self.breaker.is_open, self.unavailable_since
        self.metrics.prometheus_up.labels(endpoint=self.prom.url).set(0 if down else 1)
        if since is None:
            if not down:
                return []
            since = self.unavailable_since = now
            log.error("prometheus %s unavailable: %s", self.prom.url, error)
        elif not down:
            self.unavailable_since = None
            log.info("prometheus %s answers again", self.prom.url)
        return [
            agent_anomaly(
                UNAVAILABLE,
                "firing" if down else "resolved",
                severity="critical",
                labels=self._agent_labels(),
                since=since,
                now=now,
                error=error or "",
            )
        ]

    def _query_health(
        self, pattern: PatternSpec, ok: bool, now: datetime, error: str
    ) -> list[Anomaly]:
        h = self.query_health.get(pattern.name, Health())
        threshold = self.settings.detectors.prometheus.failure_threshold
        new, status = health_step(h, ok, now, threshold)
        self.query_health[pattern.name] = new
        if status is None:
            return []
        since = new.since or h.since
        assert since is not None
        return [
            agent_anomaly(
                QUERY_FAILED,
                status,
                severity="warning",
                labels=self._agent_labels(pattern=pattern.name),
                since=since,
                now=now,
                error=error,
            )
        ]


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
