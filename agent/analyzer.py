"""The deterministic rule-based analyzer: incident + context -> Analysis.

Pure: it reads no clock and does no I/O; the analysis stage gathers the :class:`Context`
and passes ``now``. It is always available, and decides whenever the LLM cannot.

Each firing member is matched to its configured pattern; the pattern's steps say which
actions may be recommended and under which evidence:

- ``auto_rollback_if_deployment_recent``: a rollout of the service's workload within
  ``rollout_window`` before the incident opened -> roll that workload back.
- ``scale_up_if_cpu_high``: CPU (or concurrency) saturation above 0.8 -> scale up.
- ``restart_if_crash_looping`` / ``drain_if_node_unhealthy``: restart / drain on evidence.
- a plain action name recommends that action outright (policy still applies), on the
  target the anomaly's labels name (:func:`action_target`); none named, no action, and the
  finding says so.

A runbook file's step (:class:`agent.settings.FileStep`) names its action and params; it
applies when its ``condition`` holds over :func:`runbook_facts` and its scope params (if
any) name the incident's own target, which is always the one acted on.

Context steps (``check_memory_limits``, ``check_downstream_services``, ...) never
recommend an action. When no action step matched they still name the root cause from
structured evidence (OOM kills, a failing dependency, a node condition, a recent config
change, a busy node), so the escalation tells an engineer where to look first.
Nothing found -> an analysis with no actions and a low confidence, which escalates.

Free text (log lines, event messages, annotations) is never read here: an attacker can
write it. Only structured signals (event reasons, metric values, rollout history) count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal, get_args

from agent.labels import WORKLOAD_LABELS
from agent.models import (
    ACTION_TYPES,
    WORKLOAD_KINDS,
    Analysis,
    Incident,
    Member,
    RecommendedAction,
    Target,
    stable_id,
)
from agent.policy import kind_problem
from agent.runbook_expr import evaluate, facts_in
from agent.settings import CONDITIONAL_STEPS, FileStep, Settings

# The root-cause taxonomy shared by the rules, the LLM's answer schema and the eval set.
RootCauseClass = Literal[
    "bad_rollout",
    "config_change",
    "saturation",
    "memory_leak",
    "crash_loop",
    "noisy_neighbour",
    "dependency_outage",
    "node_failure",
    "node_disk_pressure",
    "prescribed",
    "unknown",
]
ROOT_CAUSE_CLASSES: tuple[str, ...] = get_args(RootCauseClass)

SATURATED = 0.8  # CPU or concurrency use of the limit above which scaling up helps
OUT_OF_MEMORY = 0.95  # working set / limit that counts as running out of memory
DEPENDENCY_DOWN = 0.5  # error ratio of calls to a dependency that makes it the suspect
NODE_BUSY = 0.9  # node CPU use that starves a workload which itself uses little
NOT_BUSY = 0.5  # ... and "little"


@dataclass(frozen=True, slots=True)
class Rollout:
    """One revision of a workload, as the context gatherer saw it."""

    namespace: str
    workload: str
    revision: int
    image: str
    at: datetime
    previous_image: str | None = None
    # It re-activated an older template (a rollback, kubectl rollout undo, a patch back):
    # rolling it back re-deploys ``previous_image``, which it moved away from.
    restored: bool = False


@dataclass(frozen=True, slots=True)
class KubeEvent:
    """A Kubernetes event about an object in scope. ``message`` is untrusted free text."""

    namespace: str
    kind: str  # involvedObject kind: Pod, Node, Deployment, ...
    name: str
    reason: str  # set by the component that emitted it (kubelet, a controller)
    message: str = ""
    count: int = 1
    type: str = "Warning"
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """A ConfigMap (or Secret: name only, never data) that changed, and who mounts it."""

    namespace: str
    name: str
    at: datetime
    kind: str = "ConfigMap"
    used_by: tuple[str, ...] = ()  # workloads referencing it; empty: unknown
    summary: str = ""  # e.g. the changed keys; redacted, untrusted


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One series of the metrics snapshot shown to the LLM."""

    query: str  # the pattern or related-query name
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class Signals:
    """What events show (agent.context.derive_signals): workloads crash looping or
    OOM-killed, nodes' bad conditions."""

    crash_looping: tuple[str, ...] = ()
    oom_killed: tuple[str, ...] = ()
    node_conditions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Context:
    rollouts: tuple[Rollout, ...] = ()
    # A runbook file's ``spec.context.gather`` windows narrow its own conditions' facts
    # only; the rest of the analysis reads every rollout and every event. Keyed
    # "runbook <name>": namespace -> the earliest rollout its ``deployments`` facts count;
    # the signals of the events within its ``events`` window (crash_looping, oom_killed).
    deployments_since: Mapping[str, Mapping[str, datetime]] = field(default_factory=dict)
    events_signals: Mapping[str, Signals] = field(default_factory=dict)
    cpu_saturation: Mapping[str, float] = field(default_factory=dict)  # workload -> 0..1
    crash_looping: tuple[str, ...] = ()  # workloads with restarting pods
    unhealthy_nodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # what the gatherer could not fetch, and why
    # Structured evidence, from metrics and event reasons.
    memory_saturation: Mapping[str, float] = field(default_factory=dict)  # working set/limit
    concurrency_saturation: Mapping[str, float] = field(default_factory=dict)  # in-flight/limit
    node_cpu_saturation: Mapping[str, float] = field(default_factory=dict)  # hosting nodes
    node_conditions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # bad ones
    oom_killed: tuple[str, ...] = ()  # workloads whose containers were OOM-killed
    dependency_errors: Mapping[str, float] = field(default_factory=dict)  # dependency -> ratio
    config_changes: tuple[ConfigChange, ...] = ()
    # Redacted, size-bounded material for the LLM; the rules never read it.
    events: tuple[KubeEvent, ...] = ()
    logs: Mapping[str, str] = field(default_factory=dict)  # pod -> tail
    metrics: tuple[MetricSample, ...] = ()
    # (action type, target key) of this incident's actions verified not_healed or worse:
    # a runbook moves on to its next step, and no analyzer proposes them again.
    ineffective: tuple[tuple[str, str], ...] = ()

    def tried(self, action: RecommendedAction) -> bool:
        return (action.type, action.target.key) in self.ineffective


def workload_owner(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """(kind, name) of the controller the labels show owning the pods: the ``owner`` label
    (the Kubernetes detectors set it from the pod's controller, :mod:`agent.labels` from a
    kube-state-metrics ``deployment``/``statefulset``/``daemonset`` label), else such a
    label itself; None when they show none."""
    kind, sep, name = labels.get("owner", "").partition("/")
    if sep and kind and name:
        return kind, name
    return next(((k, labels[label]) for label, k in WORKLOAD_LABELS if labels.get(label)), None)


def workload_target(labels: Mapping[str, str]) -> Target:
    """The workload the labels name, of the kind their evidence shows. Only with no owner
    shown is a service's workload taken to be its Deployment; an owner the agent does not
    act on (a Job, a bare ReplicaSet, a node's static pod) gives a target named "" (none),
    never a Deployment of the same name."""
    ns = labels.get("namespace") or "default"
    owner = workload_owner(labels)
    if owner is None:
        name = labels.get("workload") or labels.get("service") or ""
        return Target(kind="Deployment", namespace=ns, name=name)
    kind, name = owner
    for k in WORKLOAD_KINDS:
        if k == kind:
            return Target(kind=k, namespace=ns, name=name)
    return Target(kind="Deployment", namespace=ns, name="")


def workload_needs(labels: Mapping[str, str]) -> str:
    """What a workload action needs that ``labels`` lack, said for them."""
    owner = workload_owner(labels)
    if owner is not None and owner[0] not in WORKLOAD_KINDS:
        return (
            f"a workload, and its pods' owner {owner[0]}/{owner[1]} is none the agent acts "
            f"on ({', '.join(WORKLOAD_KINDS)})"
        )
    return WORKLOAD_NEEDS


# What an action acts on, as an anomaly's labels must name it for a step to request it.
TARGET_NEEDS: Mapping[str, str] = {
    "cordon_node": "a node (label node)",
    "drain_node": "a node (label node)",
    "restart_pod": "a pod (labels namespace and pod)",
    # No label names a ConfigMap, and a step carries no key or value to set.
    "update_config": "a ConfigMap, a key and a value, which no step can give",
}
WORKLOAD_NEEDS = "a workload (label deployment, workload or service)"


def action_target(action: str, labels: Mapping[str, str]) -> Target | None:
    """The target of a step's ``action`` that the anomaly's labels name; None when they
    name none (a Deployment named "" is invalid on the wire and dead-lettered)."""
    if action in ("cordon_node", "drain_node"):
        node = labels.get("node", "")
        return Target(kind="Node", name=node) if node else None
    if action == "restart_pod":
        ns, pod = labels.get("namespace", ""), labels.get("pod", "")
        return Target(kind="Pod", namespace=ns, name=pod) if ns and pod else None
    if action == "update_config":
        return None
    target = workload_target(labels)
    return target if target.name else None


def recent_rollout(
    rollouts: tuple[Rollout, ...], target: Target, before: datetime, window: float
) -> Rollout | None:
    """The latest rollout of ``target`` within ``window`` seconds before ``before``. The
    workload's creation is not one: there is nothing to roll back to (a real cluster's
    new Deployment failing at once was rolled "back" to nothing, and escalated)."""
    lo = before - timedelta(seconds=window)
    candidates = [
        r
        for r in rollouts
        if r.workload == target.name
        and r.namespace == target.namespace
        and r.previous_image is not None
        and lo <= r.at <= before + timedelta(seconds=60)
    ]
    # Revisions dated alike (a superseded re-activated one is dated no later than the next
    # one: handlers.kube.revision_times): the higher number is the later rollout.
    return max(candidates, key=lambda r: (r.at, r.revision), default=None)


def recent_config_change(
    changes: tuple[ConfigChange, ...], target: Target, before: datetime, window: float
) -> ConfigChange | None:
    lo = before - timedelta(seconds=window)
    candidates = [
        c
        for c in changes
        if c.namespace == target.namespace
        and (not c.used_by or target.name in c.used_by)
        and lo <= c.at <= before + timedelta(seconds=60)
    ]
    return max(candidates, key=lambda c: c.at, default=None)


def saturation(target: Target, ctx: Context) -> tuple[str, float] | None:
    """The saturated resource of ``target`` ("CPU" or "concurrency") and its level."""
    cpu = ctx.cpu_saturation.get(target.name)
    if cpu is not None and cpu >= SATURATED:
        return "CPU", cpu
    conc = ctx.concurrency_saturation.get(target.name)
    if conc is not None and conc >= SATURATED:
        return "concurrency", conc
    return None


@dataclass(frozen=True, slots=True)
class _Finding:
    root_cause: str
    root_cause_class: str
    confidence: float
    evidence: tuple[str, ...]
    action: RecommendedAction | None


def _rollback(m: Member, inc: Incident, target: Target, r: Rollout) -> _Finding:
    minutes = (inc.opened_at - r.at).total_seconds() / 60
    # The closer the rollout to the symptom, the stronger the suspicion.
    conf = 0.92 if minutes <= 15 else 0.8
    # Proposed all the same (a downgrade can be the bad change); the policy sends a rollback
    # to a template a rollback just left to a person (rule rollback_flip).
    restored = (
        (
            f"revision {r.revision} re-activated an older template in place of "
            f"{r.previous_image}: rolling it back re-deploys {r.previous_image}",
        )
        if r.restored
        else ()
    )
    return _Finding(
        root_cause=f"{m.name} on {target.name} began {minutes:.1f} min after rollout "
        f"to revision {r.revision} ({r.image})",
        root_cause_class="bad_rollout",
        confidence=conf,
        evidence=(
            f"pattern {m.name} firing, value={m.value}",
            f"rollout of {target.key} to revision {r.revision} at {r.at.isoformat()}",
            *restored,
        ),
        action=RecommendedAction(
            type="rollback",
            target=target,
            params={},
            expected_impact=f"restore the previous template ({r.previous_image or '?'})",
            rollback_plan=f"roll forward to revision {r.revision} ({r.image})",
        ),
    )


def _scale_up(m: Member, target: Target, resource: str, level: float) -> _Finding:
    return _Finding(
        root_cause=f"{target.name} is {resource}-saturated ({level:.0%}) under load",
        root_cause_class="saturation",
        confidence=0.86,
        evidence=(f"pattern {m.name} firing", f"{resource.lower()} saturation {level:.2f}"),
        action=RecommendedAction(
            type="scale_up",
            target=target,
            params={"replicas": "+1"},
            expected_impact="more capacity lowers saturation and latency",
            rollback_plan="scale back to the prior replica count",
        ),
    )


def _noisy_neighbour(m: Member, target: Target, ctx: Context) -> _Finding | None:
    own = ctx.cpu_saturation.get(target.name)
    if own is not None and own >= NOT_BUSY:
        return None
    node = m.labels.get("node", "")
    nodes = [node] if node else sorted(ctx.node_cpu_saturation)
    busy = [(n, ctx.node_cpu_saturation[n]) for n in nodes if n in ctx.node_cpu_saturation]
    busy = [(n, v) for n, v in busy if v >= NODE_BUSY]
    if not busy:
        return None
    n, v = max(busy, key=lambda nv: nv[1])
    own_text = f"{own:.0%}" if own is not None else "unknown"
    return _Finding(
        root_cause=f"{target.name} is starved on node {n} ({v:.0%} CPU busy) while using "
        f"{own_text} of its own CPU: a noisy neighbour",
        root_cause_class="noisy_neighbour",
        confidence=0.6,
        evidence=(f"pattern {m.name} firing", f"node {n} cpu {v:.2f}, {target.name} {own_text}"),
        action=None,
    )


def _restart(m: Member, target: Target, ctx: Context) -> _Finding:
    oom = target.name in ctx.oom_killed
    return _Finding(
        root_cause=f"{target.name} pods are OOM-killed and restarting: likely a memory leak"
        if oom
        else f"{target.name} pods are crash looping",
        root_cause_class="memory_leak" if oom else "crash_loop",
        confidence=0.7,
        evidence=(
            f"pattern {m.name} firing",
            f"{target.name} {'OOM-killed' if oom else 'restarting'}",
        ),
        action=RecommendedAction(
            type="restart_workload",
            target=target,
            expected_impact="fresh pods clear transient state"
            + (" and reclaim leaked memory for a while" if oom else ""),
            rollback_plan="none needed; the template is unchanged",
        ),
    )


def _node(m: Member, ctx: Context, *, drain: bool) -> _Finding | None:
    node = m.labels.get("node", "")
    conditions = ctx.node_conditions.get(node, ())
    if not node or not (conditions or node in ctx.unhealthy_nodes):
        return None
    disk = "DiskPressure" in conditions
    detail = ", ".join(conditions) or "unhealthy"
    return _Finding(
        root_cause=f"node {node} " + ("is under disk pressure" if disk else "is unhealthy"),
        root_cause_class="node_disk_pressure" if disk else "node_failure",
        confidence=0.88 if drain else 0.6,
        evidence=(f"pattern {m.name} firing", f"node {node} condition bad: {detail}"),
        action=RecommendedAction(
            type="drain_node",
            target=Target(kind="Node", name=node),
            expected_impact="pods move to healthy nodes",
            rollback_plan=f"uncordon {node} once healthy",
        )
        if drain
        else None,
    )


def _diagnose(
    step: str, m: Member, inc: Incident, target: Target, ctx: Context, settings: Settings
) -> _Finding | None:
    """What a context step finds in the evidence: a root cause, never an action."""
    name = target.name
    if step in ("check_memory_limits", "analyze_crash_logs"):
        mem = ctx.memory_saturation.get(name)
        if name in ctx.oom_killed or (mem is not None and mem >= OUT_OF_MEMORY):
            detail = "OOM-killed" if name in ctx.oom_killed else f"at {mem:.0%} of its limit"
            return _Finding(
                root_cause=f"{name} runs out of memory ({detail}): likely a memory leak",
                root_cause_class="memory_leak",
                confidence=0.65,
                evidence=(f"pattern {m.name} firing", f"{name} memory: {detail}"),
                action=None,
            )
        if name in ctx.crash_looping:
            return _Finding(
                root_cause=f"{name} pods are crash looping",
                root_cause_class="crash_loop",
                confidence=0.55,
                evidence=(f"pattern {m.name} firing", f"{name} restarting"),
                action=None,
            )
    if step in ("check_downstream_services", "check_database_connections"):
        failing = {d: r for d, r in ctx.dependency_errors.items() if r >= DEPENDENCY_DOWN}
        if failing:
            dep = max(sorted(failing), key=lambda d: failing[d])
            return _Finding(
                root_cause=f"{name} fails because its dependency {dep} fails "
                f"({failing[dep]:.0%} of calls)",
                root_cause_class="dependency_outage",
                confidence=0.7,
                evidence=(f"pattern {m.name} firing", f"calls to {dep}: {failing[dep]:.0%} errors"),
                action=None,
            )
    if step == "check_node_conditions":
        return _node(m, ctx, drain=False)
    if step == "check_recent_deployments":
        r = recent_rollout(ctx.rollouts, target, inc.opened_at, settings.remediation.rollout_window)
        if r is not None:  # the pattern's runbook may not allow a rollback: name it anyway
            return replace(_rollback(m, inc, target, r), action=None, confidence=0.7)
        c = recent_config_change(
            ctx.config_changes, target, inc.opened_at, settings.remediation.rollout_window
        )
        if c is not None:
            minutes = (inc.opened_at - c.at).total_seconds() / 60
            return _Finding(
                root_cause=f"{m.name} on {name} began {minutes:.1f} min after {c.kind} "
                f"{c.name} changed",
                root_cause_class="config_change",
                confidence=0.7,
                evidence=(
                    f"pattern {m.name} firing",
                    f"{c.kind} {c.namespace}/{c.name} changed at {c.at.isoformat()}",
                ),
                action=None,
            )
    return None


def _for_member(m: Member, inc: Incident, ctx: Context, settings: Settings) -> _Finding | None:
    """The first step of the member's runbook that applies, skipping a remedy this
    incident already tried without effect (escalation: a restart that did not heal gives
    way to the next step, say a rollback); else the first diagnosis."""
    runbook = settings.steps_for(m.name, m.source)
    if runbook is None:
        return None
    prescriber, steps = runbook
    labels = m.labels or inc.labels
    target = workload_target(labels)
    diagnosis: _Finding | None = None  # the first root cause found without an action
    skipped = False  # a remedy that applies was passed over as tried
    untargeted: list[str] = []  # plain action steps the labels name no target for
    for step in steps:
        if isinstance(step, FileStep):
            found, note, tried = _file_step(step, prescriber, m, inc, labels, ctx, settings)
            untargeted += [note] if note else []
            if tried and step.on_failure != "continue":
                # The runbook says who to page now: its later steps are not taken alone.
                return _untargeted(_after(_stopped(m, prescriber, step), ctx), untargeted)
            if tried:
                skipped = True
            elif found is not None and (why := _unfit(found)) is not None:
                untargeted.append(f"{prescriber} step {step.name!r}: {why}; not requested")
            elif found is not None and found.action is not None:
                return _untargeted(_after(found, ctx), untargeted)
            elif found is not None:
                diagnosis = diagnosis or found
            continue
        if step in ACTION_TYPES and action_target(step, labels) is None:
            untargeted.append(
                f"{prescriber} prescribes {step}, but {m.name} names no target for it: "
                f"it needs {TARGET_NEEDS.get(step, workload_needs(labels))}; not requested"
            )
            continue
        found = _remedy(step, prescriber, m, inc, target, ctx, settings)
        if found is not None and (why := _unfit(found)) is not None:
            untargeted.append(f"{prescriber} prescribes {step}, but {why}; not requested")
            continue
        if found is not None and found.action is not None and ctx.tried(found.action):
            skipped = True
            continue
        if found is not None and found.action is not None:
            return _untargeted(_after(found, ctx), untargeted)
        if found is not None:
            diagnosis = diagnosis or found
        elif step not in CONDITIONAL_STEPS and step not in ACTION_TYPES:
            diagnosis = diagnosis or _diagnose(step, m, inc, target, ctx, settings)
    if diagnosis is None and skipped:
        return _untargeted(_exhausted(m, prescriber, ctx), untargeted)
    if diagnosis is None and untargeted:
        # Say so: an analysis with no finding would hide that the runbook was not followed.
        diagnosis = _Finding(
            root_cause=untargeted[0],
            root_cause_class="unknown",
            confidence=0.3,
            evidence=(f"pattern {m.name} firing",),
            action=None,
        )
    return _untargeted(_after(diagnosis, ctx), untargeted)


def deployments_of(
    target: Target, inc: Incident, ctx: Context, prescriber: str = ""
) -> list[Rollout]:
    """The rollouts of ``target`` that replaced an earlier template (its creation is not
    one: nothing to roll back to) up to the incident's opening, newest first; for the
    runbook file ``prescriber``, only those within its deployments window."""
    latest = inc.opened_at + timedelta(seconds=60)
    earliest = ctx.deployments_since.get(prescriber, {}).get(target.namespace)
    return sorted(
        (
            r
            for r in ctx.rollouts
            if r.workload == target.name
            and r.namespace == target.namespace
            and r.previous_image is not None
            and r.at <= latest
            and (earliest is None or r.at >= earliest)
        ),
        key=lambda r: (r.at, r.revision),
        reverse=True,
    )


def runbook_facts(
    target: Target, inc: Incident, ctx: Context, prescriber: str = ""
) -> dict[str, float]:
    """The facts a runbook file's conditions may name (agent.runbook_expr.FACTS), from the
    structured context only; a source the gatherer could not read leaves its facts out,
    so a condition on them is unknown rather than false. ``prescriber`` ("runbook <name>"):
    whose gather windows the ``deployments`` and event facts keep to."""
    facts: dict[str, float] = {}
    rollouts_failed = any(
        n.startswith("rollouts") or (target.key in n and ("rollout" in n or "cluster" in n))
        for n in ctx.notes
    )
    if not rollouts_failed:
        found = deployments_of(target, inc, ctx, prescriber)
        facts["deployments.count"] = float(len(found))
        for i, r in enumerate(found):
            facts[f"deployments[{i}].age"] = max(0.0, (inc.opened_at - r.at).total_seconds())
    for fact, series in (
        ("cpu_utilization", ctx.cpu_saturation),
        ("memory_utilization", ctx.memory_saturation),
        ("concurrency_utilization", ctx.concurrency_saturation),
    ):
        if target.name in series:
            facts[fact] = series[target.name] * 100
    if ctx.dependency_errors:
        facts["dependency_error_rate"] = max(ctx.dependency_errors.values()) * 100
    if not any(n.startswith("events") for n in ctx.notes):
        seen = ctx.events_signals.get(prescriber, Signals(ctx.crash_looping, ctx.oom_killed))
        facts["crash_looping"] = float(target.name in seen.crash_looping)
        facts["oom_killed"] = float(target.name in seen.oom_killed)
    return facts


def _out_of_scope(step: FileStep, target: Target) -> str | None:
    """Which of the step's scope params names another object than the incident's target."""
    have = {
        "deployment": target.name if target.kind != "Node" and target.kind != "Pod" else "",
        "namespace": target.namespace,
        "node": target.name if target.kind == "Node" else "",
        "pod": target.name if target.kind == "Pod" else "",
    }
    for key, want in sorted(step.scope.items()):
        if have.get(key) != want:
            return f"{key} {want}, not {have.get(key) or 'named'}"
    return None


def _file_step(
    step: FileStep,
    prescriber: str,
    m: Member,
    inc: Incident,
    labels: Mapping[str, str],
    ctx: Context,
    settings: Settings,
) -> tuple[_Finding | None, str | None, bool]:
    """(the step's finding, a line saying why it did not apply, whether its action was
    already tried without effect). The target is the incident's, never the step's."""
    where = f"{prescriber} step {step.name!r}"
    acting = step.action in ACTION_TYPES
    target = action_target(step.action, labels) if acting else workload_target(labels)
    if target is None or (acting and not target.name):
        need = TARGET_NEEDS.get(step.action, workload_needs(labels))
        return None, f"{where}: {m.name} names no target for it: it needs {need}", False
    outside = _out_of_scope(step, target)
    if outside is not None:
        return None, f"{where}: not applied to {target.key}: the step is for {outside}", False
    if acting and (step.action, target.key) in ctx.ineffective:
        return None, None, True
    if step.condition is not None:
        facts = runbook_facts(target, inc, ctx, prescriber)
        holds = evaluate(step.condition, facts)
        if holds is not True:
            known = [f for f in facts_in(step.condition) if f in facts]
            missing = [f for f in facts_in(step.condition) if f not in facts]
            seen = ", ".join(f"{f}={facts[f]:g}" for f in known) or "no fact known"
            why = f"unknown: the context lacks {', '.join(missing)}" if holds is None else "false"
            line = f"{where}: condition {step.condition_text!r} is {why} ({seen}); not applied"
            return None, line, False
    if not acting:
        return _diagnose(step.action, m, inc, target, ctx, settings), None, False
    cond = f" (condition {step.condition_text!r} holds)" if step.condition is not None else ""
    return (
        _Finding(
            root_cause=f"{m.name} matched {prescriber}, whose step {step.name!r} prescribes "
            f"{step.action}{cond}",
            root_cause_class="prescribed",
            confidence=0.75,
            evidence=(f"pattern {m.name} firing", f"{where}{cond}"),
            action=RecommendedAction(
                type=step.action,  # type: ignore[arg-type]  # checked: in ACTION_TYPES
                target=target,
                params=dict(step.params),
                expected_impact=f"the remedy {prescriber} prescribes in step {step.name!r}",
            ),
        ),
        None,
        False,
    )


def escalates_to(on_failure: str) -> str | None:
    """``<who>`` of ``escalate_<who>``: where the step's page should go."""
    who = on_failure.removeprefix("escalate_")
    return who if who != on_failure and who else None


def failed_pages(
    incident: Incident, tried: Iterable[tuple[str, str]], settings: Settings
) -> list[tuple[str, str]]:
    """(what it says, its onFailure) of each runbook-file step whose ``onFailure`` pages
    (notify_*/escalate*), once its action on this incident's target was verified
    ineffective."""
    done = set(tried)
    out: list[tuple[str, str]] = []
    for m in incident.firing:
        prescriber, steps = settings.steps_for(m.name, m.source) or ("", ())
        for step in steps:
            if not isinstance(step, FileStep) or step.on_failure == "continue":
                continue
            target = action_target(step.action, m.labels or incident.labels)
            if target is not None and (step.action, target.key) in done:
                line = (
                    f"{prescriber} step {step.name!r}: {step.action} "
                    f"{target.key} verified ineffective; onFailure: {step.on_failure}"
                )
                out += [(line, step.on_failure)] if line not in [x for x, _ in out] else []
    return out


def _stopped(m: Member, prescriber: str, step: FileStep) -> _Finding:
    """A step's action was verified ineffective and the runbook says to page, not go on."""
    return _Finding(
        root_cause=f"{m.name}: {step.action} of {prescriber} step {step.name!r} was tried "
        f"without effect; the runbook says {step.on_failure}",
        root_cause_class="unknown",
        confidence=0.5,
        evidence=(f"pattern {m.name} firing", f"onFailure: {step.on_failure}"),
        action=None,
    )


def _unfit(found: _Finding) -> str | None:
    """Why the finding's action does not apply to its target's kind (a rollback of a
    StatefulSet, a scale of a DaemonSet), or None."""
    a = found.action
    problem = None if a is None else kind_problem(a.type, a.target.kind)
    return None if a is None or problem is None else f"{a.target.key}: {problem}"


def _untargeted(found: _Finding | None, lines: list[str]) -> _Finding | None:
    """``found``, saying which prescribed actions were not requested for want of a target."""
    if found is None or not lines:
        return found
    return replace(found, evidence=(*found.evidence, *lines))


def _remedy(
    step: str,
    prescriber: str,
    m: Member,
    inc: Incident,
    target: Target,
    ctx: Context,
    settings: Settings,
) -> _Finding | None:
    """A remedial step's finding when it applies (a diagnosis without an action for a
    scale-up that found a noisy neighbour instead); None for other steps."""
    action = CONDITIONAL_STEPS.get(step)
    if action == "rollback":
        r = recent_rollout(ctx.rollouts, target, inc.opened_at, settings.remediation.rollout_window)
        return _rollback(m, inc, target, r) if r is not None else None
    if action == "scale_up":
        sat = saturation(target, ctx)
        return _scale_up(m, target, *sat) if sat is not None else _noisy_neighbour(m, target, ctx)
    if action == "restart_workload":
        if target.name in ctx.crash_looping or target.name in ctx.oom_killed:
            return _restart(m, target, ctx)
        return None
    if action == "drain_node":
        return _node(m, ctx, drain=True)
    if step in ACTION_TYPES and (named := action_target(step, m.labels or inc.labels)):
        return _Finding(
            root_cause=f"{m.name} matched {prescriber}, which prescribes {step}",
            root_cause_class="prescribed",
            confidence=0.75,
            evidence=(f"pattern {m.name} firing",),
            action=RecommendedAction(
                type=step,
                target=named,
                expected_impact=f"the remedy {prescriber} prescribes",
            ),
        )
    return None


def _tried_lines(ctx: Context) -> tuple[str, ...]:
    return tuple(f"already tried without effect: {t} {key}" for t, key in ctx.ineffective)


def _after(found: _Finding | None, ctx: Context) -> _Finding | None:
    """``found``, saying which of the incident's remedies already failed."""
    if found is None or not ctx.ineffective:
        return found
    return replace(found, evidence=(*found.evidence, *_tried_lines(ctx)))


def _exhausted(m: Member, prescriber: str, ctx: Context) -> _Finding:
    """Every remedy of the runbook that applies was tried without effect: nothing left to
    do alone."""
    return _Finding(
        root_cause=f"{m.name}: every remedy {prescriber} prescribes was tried without effect",
        root_cause_class="unknown",
        confidence=0.5,
        evidence=(f"pattern {m.name} firing", *_tried_lines(ctx)),
        action=None,
    )


_ANY_CHECKS = (
    "check_recent_deployments",
    "check_memory_limits",
    "check_downstream_services",
    "check_node_conditions",
)


def _beyond_runbook(m: Member, inc: Incident, ctx: Context, settings: Settings) -> _Finding | None:
    """With no finding at all, every check's diagnosis, less confident and never acting:
    an escalation naming a failing dependency beats one saying "unknown"."""
    target = workload_target(m.labels or inc.labels)
    found = next(
        (f for step in _ANY_CHECKS if (f := _diagnose(step, m, inc, target, ctx, settings))),
        None,
    ) or _noisy_neighbour(m, target, ctx)
    if found is None:
        return None
    return replace(
        found,
        confidence=round(found.confidence - 0.1, 2),
        evidence=(*found.evidence, f"checked beyond the steps of pattern {m.name}"),
    )


MAX_GATHERED_LINES = 20


def runbook_evidence(ctx: Context) -> tuple[str, ...]:
    """What a matched runbook's ``spec.context.gather`` asked for, as evidence lines: its
    metrics series (redacted by the gatherer) and what could not be gathered. Shown, never
    decided on: the runbook's conditions decide."""
    lines = [
        f"gathered by {s.query} {{{', '.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}"
        f" = {s.value:g}"
        for s in ctx.metrics
        if s.query.startswith("runbook ")
    ]
    lines += [n for n in ctx.notes if n.startswith("runbook ")]
    if len(lines) > MAX_GATHERED_LINES:
        rest = len(lines) - MAX_GATHERED_LINES
        lines = [*lines[:MAX_GATHERED_LINES], f"gathered by runbooks: {rest} more lines"]
    return tuple(lines)


def analyze(incident: Incident, ctx: Context, settings: Settings, now: datetime) -> Analysis:
    findings = [
        f for m in incident.firing if (f := _for_member(m, incident, ctx, settings)) is not None
    ]
    if not findings:
        findings = [
            f
            for m in incident.firing
            if (f := _beyond_runbook(m, incident, ctx, settings)) is not None
        ]
    findings.sort(key=lambda f: -f.confidence)
    names = incident.firing_names or sorted({m.name for m in incident.members})
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
    evidence = (*evidence, *(e for e in runbook_evidence(ctx) if e not in evidence))
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
