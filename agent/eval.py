"""The evaluation set: realistic incidents with the root cause and action an SRE expects.

A YAML file (``tests/eval/incidents.yaml``) holds a pattern catalogue (added to the
configuration's) and cases. Each case is an incident (group labels and members) plus the
context the gatherer would have found (rollouts, config changes, saturation, dependency
error ratios, node conditions, events, logs); every time is in minutes relative to the
incident's opening (negative: before). ``expected`` names the root-cause class and the
first action type (or none) and optionally its target.

:func:`run_eval` runs the rule-based analyzer over every case; ``sre-agent eval`` prints
each result and the accuracy. A case counts as correct when both the root-cause class and
the first action (type and, if given, target) match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from agent.analyzer import ConfigChange, Context, KubeEvent, Rollout, RootCauseClass, analyze
from agent.codec import validation_problems
from agent.context import derive_signals
from agent.errors import ConfigError
from agent.models import (
    SEVERITY_RANK,
    ActionType,
    Analysis,
    AnomalySource,
    AnomalyStatus,
    Incident,
    Member,
    Severity,
    fingerprint,
    stable_id,
)
from agent.redaction import redact
from agent.settings import REPO_ROOT, PatternSpec, RunbookSpec, Settings, load_yaml

DEFAULT_EVAL_FILE = REPO_ROOT / "tests" / "eval" / "incidents.yaml"
OPENED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
_STRICT = ConfigDict(extra="forbid")
Minutes = Annotated[float, Field(ge=-100_000, le=100_000)]


def at(minutes: float) -> datetime:
    return OPENED + timedelta(minutes=minutes)


@dataclass(frozen=True, slots=True)
class MemberSpec:
    __pydantic_config__ = _STRICT
    name: str
    labels: dict[str, str] = field(default_factory=dict)  # added to the case's labels
    at: Minutes = 0.0  # first seen
    status: AnomalyStatus = "firing"
    severity: Severity = "critical"
    source: AnomalySource = "prometheus"
    value: float | None = None


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    __pydantic_config__ = _STRICT
    workload: str
    revision: int
    image: str
    at: Minutes
    previous_image: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class ConfigChangeSpec:
    __pydantic_config__ = _STRICT
    name: str
    at: Minutes
    used_by: tuple[str, ...] = ()
    kind: str = "ConfigMap"
    summary: str = ""
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class EventSpec:
    __pydantic_config__ = _STRICT
    kind: str
    name: str
    reason: str
    message: str = ""
    count: int = 1
    type: str = "Warning"
    at: Minutes | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class ContextSpec:
    __pydantic_config__ = _STRICT
    rollouts: tuple[RolloutSpec, ...] = ()
    config_changes: tuple[ConfigChangeSpec, ...] = ()
    cpu_saturation: dict[str, float] = field(default_factory=dict)
    memory_saturation: dict[str, float] = field(default_factory=dict)
    concurrency_saturation: dict[str, float] = field(default_factory=dict)
    node_cpu_saturation: dict[str, float] = field(default_factory=dict)
    node_conditions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dependency_errors: dict[str, float] = field(default_factory=dict)
    events: tuple[EventSpec, ...] = ()
    logs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Expected:
    __pydantic_config__ = _STRICT
    root_cause_class: RootCauseClass
    action: ActionType | None = None
    target: str | None = None


@dataclass(frozen=True, slots=True)
class CaseSpec:
    __pydantic_config__ = _STRICT
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    labels: dict[str, str]
    members: Annotated[tuple[MemberSpec, ...], Field(min_length=1)]
    expected: Expected
    description: str = ""
    context: ContextSpec = field(default_factory=ContextSpec)


@dataclass(frozen=True, slots=True)
class EvalFile:
    __pydantic_config__ = _STRICT
    cases: tuple[CaseSpec, ...]
    patterns: tuple[PatternSpec, ...] = ()
    # Steps for cases' signals from other sources (a pattern's apply to its own only).
    runbooks: tuple[RunbookSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class EvalCase:
    spec: CaseSpec
    incident: Incident
    context: Context


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: EvalCase
    analysis: Analysis

    @property
    def action(self) -> str | None:
        return self.analysis.actions[0].type if self.analysis.actions else None

    @property
    def target(self) -> str | None:
        return self.analysis.actions[0].target.name if self.analysis.actions else None

    @property
    def class_ok(self) -> bool:
        return self.analysis.root_cause_class == self.case.spec.expected.root_cause_class

    @property
    def action_ok(self) -> bool:
        want = self.case.spec.expected
        return self.action == want.action and (want.target is None or self.target == want.target)

    @property
    def ok(self) -> bool:
        return self.class_ok and self.action_ok


@dataclass(frozen=True, slots=True)
class EvalReport:
    results: tuple[CaseResult, ...]

    def _share(self, n: int) -> float:
        return n / len(self.results) if self.results else 0.0

    @property
    def accuracy(self) -> float:
        return self._share(sum(r.ok for r in self.results))

    @property
    def class_accuracy(self) -> float:
        return self._share(sum(r.class_ok for r in self.results))

    @property
    def action_accuracy(self) -> float:
        return self._share(sum(r.action_ok for r in self.results))


def _incident(spec: CaseSpec) -> Incident:
    members = []
    for m in spec.members:
        labels = {**spec.labels, **m.labels}
        members.append(
            Member(
                fingerprint=fingerprint(m.source, m.name, labels),
                name=m.name,
                source=m.source,
                severity=m.severity,
                status=m.status,
                labels=labels,
                first_seen=at(m.at),
                last_seen=at(max(m.at, 0.0)),
                value=m.value,
            )
        )
    severity = max((m.severity for m in members), key=lambda s: SEVERITY_RANK[s])
    key = "/".join(spec.labels.get(k, "") for k in ("cluster", "namespace", "service"))
    return Incident(
        id=stable_id("eval", spec.name),
        key=key,
        status="open",
        severity=severity,
        labels=dict(spec.labels),
        members=tuple(members),
        opened_at=OPENED,
        updated_at=OPENED,
    )


def _context(spec: CaseSpec, incident: Incident) -> Context:
    c, ns = spec.context, spec.labels.get("namespace", "default")
    events = tuple(
        KubeEvent(
            namespace="" if e.kind == "Node" else (e.namespace or ns),
            kind=e.kind,
            name=e.name,
            reason=e.reason,
            message=redact(e.message),
            count=e.count,
            type=e.type,
            at=at(e.at) if e.at is not None else None,
        )
        for e in c.events
    )
    workloads = sorted(
        {m.labels.get("deployment") or m.labels.get("service", "") for m in incident.members}
        | {r.workload for r in c.rollouts}
    )
    signals = derive_signals(events, [w for w in workloads if w])
    conditions = dict(signals.node_conditions)
    for node, conds in c.node_conditions.items():
        conditions[node] = tuple(sorted({*conditions.get(node, ()), *conds}))
    return Context(
        rollouts=tuple(
            Rollout(
                namespace=r.namespace or ns,
                workload=r.workload,
                revision=r.revision,
                image=r.image,
                at=at(r.at),
                previous_image=r.previous_image,
            )
            for r in c.rollouts
        ),
        config_changes=tuple(
            ConfigChange(
                namespace=x.namespace or ns,
                name=x.name,
                at=at(x.at),
                kind=x.kind,
                used_by=x.used_by,
                summary=redact(x.summary),
            )
            for x in c.config_changes
        ),
        cpu_saturation=c.cpu_saturation,
        memory_saturation=c.memory_saturation,
        concurrency_saturation=c.concurrency_saturation,
        node_cpu_saturation=c.node_cpu_saturation,
        node_conditions=conditions,
        unhealthy_nodes=tuple(sorted(conditions)),
        dependency_errors=c.dependency_errors,
        crash_looping=signals.crash_looping,
        oom_killed=signals.oom_killed,
        events=events,
        logs={pod: redact(text) for pod, text in c.logs.items()},
    )


def load_eval(path: str | Path, settings: Settings) -> tuple[Settings, list[EvalCase]]:
    """The cases of ``path`` and ``settings`` with the file's patterns (a file pattern
    replaces a configured one of the same name) and runbooks (ahead of the configured
    ones) added."""
    path = Path(path)
    try:
        doc = load_yaml(path.read_text())
    except OSError as err:
        raise ConfigError([f"<file>: cannot read {path}: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise ConfigError([f"<file>: {path} is not valid YAML: {err}"]) from err
    try:
        spec = TypeAdapter(EvalFile).validate_python(doc)
    except ValidationError as err:
        raise ConfigError(validation_problems(err)) from err
    names = [c.name for c in spec.cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError([f"cases: duplicate names {', '.join(dupes)}"])
    mine = {p.name for p in spec.patterns}
    patterns = tuple(p for p in settings.patterns if p.name not in mine) + spec.patterns
    settings = replace(settings, patterns=patterns, runbooks=spec.runbooks + settings.runbooks)
    cases = []
    for c in spec.cases:
        incident = _incident(c)
        cases.append(EvalCase(spec=c, incident=incident, context=_context(c, incident)))
    return settings, cases


def run_eval(cases: Sequence[EvalCase], settings: Settings) -> EvalReport:
    return EvalReport(
        tuple(
            CaseResult(case=c, analysis=analyze(c.incident, c.context, settings, OPENED))
            for c in cases
        )
    )


def format_report(report: EvalReport) -> str:
    def show(cls: str, action: str | None, target: str | None) -> str:
        return f"{cls}/{action or 'none'}" + (f"({target})" if target else "")

    width = max((len(r.case.spec.name) for r in report.results), default=10)
    lines = []
    for r in report.results:
        want = r.case.spec.expected
        expected = show(want.root_cause_class, want.action, want.target)
        got = show(r.analysis.root_cause_class, r.action, r.target if want.target else None)
        lines.append(
            f"{'PASS' if r.ok else 'FAIL'}  {r.case.spec.name:<{width}}  expected {expected:<40} "
            f"got {got} (confidence {r.analysis.confidence:.2f})"
        )
    n = len(report.results)
    ok = sum(r.ok for r in report.results)
    lines.append(
        f"accuracy {ok}/{n} = {report.accuracy:.1%} "
        f"(root cause {report.class_accuracy:.1%}, action {report.action_accuracy:.1%}) "
        "- analyzer: rules"
    )
    return "\n".join(lines)
