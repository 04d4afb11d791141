"""The deterministic rule-based analyzer: incident + context -> Analysis.

Pure: it reads no clock and does no I/O; the analysis stage gathers the :class:`Context`
and passes ``now``. It is always available, and decides whenever the LLM cannot.

Each firing member is matched to its configured pattern; the pattern's steps say which
actions may be recommended and under which evidence:

- ``auto_rollback_if_deployment_recent``: a rollout of the service's workload within
  ``rollout_window`` before the incident opened -> roll that workload back.
- ``scale_up_if_cpu_high``: CPU saturation above 0.8 -> scale up.
- ``restart_if_crash_looping`` / ``drain_if_node_unhealthy``: restart / drain on evidence.
- a plain action name recommends that action outright (policy still applies).
Nothing found -> an analysis with no actions and a low confidence, which escalates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.models import (
    ACTION_TYPES,
    Analysis,
    Incident,
    Member,
    RecommendedAction,
    Target,
    stable_id,
)
from agent.settings import CONDITIONAL_STEPS, Settings


@dataclass(frozen=True, slots=True)
class Rollout:
    """One revision of a workload, as the context gatherer saw it."""

    namespace: str
    workload: str
    revision: int
    image: str
    at: datetime
    previous_image: str | None = None


@dataclass(frozen=True, slots=True)
class Context:
    rollouts: tuple[Rollout, ...] = ()
    cpu_saturation: Mapping[str, float] = field(default_factory=dict)  # workload -> 0..1
    crash_looping: tuple[str, ...] = ()  # workloads with restarting pods
    unhealthy_nodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the gatherer could not fetch, and why


def workload_target(labels: Mapping[str, str]) -> Target:
    name = labels.get("deployment") or labels.get("workload") or labels.get("service") or ""
    return Target(kind="Deployment", namespace=labels.get("namespace") or "default", name=name)


def _recent_rollout(
    rollouts: tuple[Rollout, ...], target: Target, before: datetime, window: float
) -> Rollout | None:
    lo = before - timedelta(seconds=window)
    candidates = [
        r
        for r in rollouts
        if r.workload == target.name
        and r.namespace == target.namespace
        and lo <= r.at <= before + timedelta(seconds=60)
    ]
    return max(candidates, key=lambda r: r.at, default=None)


@dataclass(frozen=True, slots=True)
class _Finding:
    root_cause: str
    root_cause_class: str
    confidence: float
    evidence: tuple[str, ...]
    action: RecommendedAction | None


def _for_member(m: Member, inc: Incident, ctx: Context, settings: Settings) -> _Finding | None:
    pattern = settings.pattern(m.name)
    if pattern is None:
        return None
    target = workload_target(m.labels or inc.labels)
    steps = pattern.actions
    for step in steps:
        action = CONDITIONAL_STEPS.get(step)
        if action == "rollback":
            r = _recent_rollout(
                ctx.rollouts, target, inc.opened_at, settings.remediation.rollout_window
            )
            if r is None:
                continue
            minutes = (inc.opened_at - r.at).total_seconds() / 60
            # The closer the rollout to the symptom, the stronger the suspicion.
            conf = 0.92 if minutes <= 15 else 0.8
            return _Finding(
                root_cause=f"{m.name} on {target.name} began {minutes:.1f} min after rollout "
                f"to revision {r.revision} ({r.image})",
                root_cause_class="bad_rollout",
                confidence=conf,
                evidence=(
                    f"pattern {m.name} firing, value={m.value}",
                    f"rollout of {target.key} to revision {r.revision} at {r.at.isoformat()}",
                ),
                action=RecommendedAction(
                    type="rollback",
                    target=target,
                    params={},
                    expected_impact=f"restore the previous template ({r.previous_image or '?'})",
                    rollback_plan=f"roll forward to revision {r.revision} ({r.image})",
                ),
            )
        if action == "scale_up":
            sat = ctx.cpu_saturation.get(target.name)
            if sat is None or sat < 0.8:
                continue
            return _Finding(
                root_cause=f"{target.name} is CPU-saturated ({sat:.0%}) under load",
                root_cause_class="saturation",
                confidence=0.86,
                evidence=(f"pattern {m.name} firing", f"cpu saturation {sat:.2f}"),
                action=RecommendedAction(
                    type="scale_up",
                    target=target,
                    params={"replicas": "+1"},
                    expected_impact="more capacity lowers saturation and latency",
                    rollback_plan="scale back to the prior replica count",
                ),
            )
        if action == "restart_workload" and target.name in ctx.crash_looping:
            return _Finding(
                root_cause=f"{target.name} pods are crash looping",
                root_cause_class="crash_loop",
                confidence=0.7,
                evidence=(f"pattern {m.name} firing", f"{target.name} restarting"),
                action=RecommendedAction(
                    type="restart_workload",
                    target=target,
                    expected_impact="fresh pods clear transient state",
                    rollback_plan="none needed; the template is unchanged",
                ),
            )
        if action == "drain_node":
            node = m.labels.get("node", "")
            if node and node in ctx.unhealthy_nodes:
                return _Finding(
                    root_cause=f"node {node} is unhealthy",
                    root_cause_class="node_failure",
                    confidence=0.88,
                    evidence=(f"pattern {m.name} firing", f"node {node} condition bad"),
                    action=RecommendedAction(
                        type="drain_node",
                        target=Target(kind="Node", name=node),
                        expected_impact="pods move to healthy nodes",
                        rollback_plan=f"uncordon {node} once healthy",
                    ),
                )
        if step in ACTION_TYPES:
            return _Finding(
                root_cause=f"{m.name} matched pattern {pattern.name}, which prescribes {step}",
                root_cause_class="prescribed",
                confidence=0.75,
                evidence=(f"pattern {m.name} firing",),
                action=RecommendedAction(
                    type=step,
                    target=target,
                    expected_impact=f"the runbook's remedy for {pattern.name}",
                ),
            )
    return None


def analyze(incident: Incident, ctx: Context, settings: Settings, now: datetime) -> Analysis:
    findings = [
        f for m in incident.firing if (f := _for_member(m, incident, ctx, settings)) is not None
    ]
    findings.sort(key=lambda f: -f.confidence)
    names = sorted({m.name for m in incident.firing}) or sorted({m.name for m in incident.members})
    if findings:
        best = findings[0]
        actions: list[RecommendedAction] = []
        for f in findings:
            if f.action is not None and f.action not in actions:
                actions.append(f.action)
        root, cls, conf = best.root_cause, best.root_cause_class, best.confidence
        evidence = tuple(e for f in findings for e in f.evidence)
    else:
        root = f"{', '.join(names)} firing; no known cause matched the evidence"
        cls, conf, actions = "unknown", 0.3, []
        evidence = (*(f"pattern {n} firing" for n in names), *ctx.notes)
    return Analysis(
        id=stable_id("analysis", incident.id, str(incident.revision), "rules"),
        incident_id=incident.id,
        incident_key=incident.key,
        incident_revision=incident.revision,
        analyzer="rules",
        root_cause=root,
        root_cause_class=cls,
        confidence=conf,
        evidence=evidence,
        actions=tuple(actions),
        created_at=now,
        evidence_confidence=conf,
    )
