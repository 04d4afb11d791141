"""Turning an LLM's answer into an Analysis, safely. Pure functions.

1. :func:`parse_answer`: the reply must be one JSON object matching the answer schema;
   otherwise :class:`InvalidAnswer` (reason ``invalid_json`` or ``schema_violation``).
2. :func:`vet_actions`: each recommended action must be an allow-listed type on a target
   of the right kind inside the incident's :class:`Scope` (its namespace, its workloads
   and their pods, its nodes, the config maps its workloads use), outside the denied
   namespaces, with sane parameters and a rollback plan. Anything else is rejected with a
   reason, recorded in the Analysis and never published as an action request.
3. :func:`evidence_confidence`: the agent's own checks of each accepted action (for a
   rollback: a rollout within the window before the incident and errors that began after
   it; for a scale-up: CPU or concurrency saturation; ...), combined with the model's
   self-reported score by :func:`combine_confidence`. Both parts are kept in the Analysis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Literal

import orjson
from pydantic import ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from agent.analyzer import (
    SATURATED,
    Context,
    RootCauseClass,
    recent_config_change,
    recent_rollout,
    saturation,
    workload_owner,
    workload_target,
)
from agent.codec import validation_problems
from agent.errors import PermanentError
from agent.labels import WORKLOAD_LABELS
from agent.models import (
    ACTION_TYPES,
    Analysis,
    Incident,
    ParamValue,
    RecommendedAction,
    Target,
    TargetKind,
    stable_id,
)
from agent.policy import MAX_SCALE_STEP, kind_problem
from agent.settings import Settings

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_RELATIVE = re.compile(r"^[+-]\d{1,3}$")
_ABSOLUTE = re.compile(r"^\d{1,3}$")
MAX_STEP = MAX_SCALE_STEP  # a scale changes the replica count by at most this much
MAX_REPLICAS = 50  # an absolute scale target above this is refused
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")  # Kubernetes' ConfigMap key syntax
MAX_CONFIG_VALUE = 4096  # a setting, not a file: a person reads it before approving
TAINTED_CAP = 0.5  # confidence cap when the same answer also proposed rejected actions
MODEL_WEIGHT = 0.4  # share of the model's self-report in the combined confidence
NEUTRAL = 0.5  # evidence confidence when the agent has no check for the claim

WORKLOAD_ACTIONS = frozenset({"rollback", "scale_up", "scale_down", "restart_workload"})


def is_dns_name(value: str) -> bool:
    return 0 < len(value) <= 253 and _DNS1123.match(value) is not None


# --- 1. parsing -----------------------------------------------------------------------------


class InvalidAnswer(PermanentError):
    """The LLM's reply is not a valid answer; ``reason`` says how."""

    reason: str

    def __init__(self, reason: Literal["invalid_json", "schema_violation"], detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


Text = Annotated[str, Field(max_length=2000)]


@dataclass(frozen=True, slots=True)
class ProposedTarget:
    __pydantic_config__ = ConfigDict(extra="ignore")
    kind: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(max_length=253)]
    namespace: Annotated[str, Field(max_length=253)] = ""


@dataclass(frozen=True, slots=True)
class ProposedParams:
    __pydantic_config__ = ConfigDict(extra="ignore")
    # Strict: lax coercion would read true as replicas 1 or revision 1, and "3" as 3.
    replicas: StrictStr | StrictInt | None = None
    revision: StrictInt | None = None
    # update_config's: without them the policy denies it, so a config change the model
    # proposes (the reference's "configuration update", approved by a human) never
    # reached the person who would approve it.
    key: StrictStr | None = None
    value: StrictStr | None = None


@dataclass(frozen=True, slots=True)
class ProposedAction:
    """Types and kinds are free strings here: the allow-list is checked per action, so one
    bad action is rejected and recorded instead of discarding the whole answer."""

    __pydantic_config__ = ConfigDict(extra="ignore")
    type: Annotated[str, Field(max_length=64)]
    target: ProposedTarget
    expected_impact: Text
    rollback_plan: Text
    params: ProposedParams = field(default_factory=ProposedParams)

    def describe(self) -> str:
        t = self.target
        where = f"{t.kind}/{t.namespace}/{t.name}" if t.namespace else f"{t.kind}/{t.name}"
        return f"{self.type} {where}"[:300]


@dataclass(frozen=True, slots=True)
class Answer:
    __pydantic_config__ = ConfigDict(extra="ignore")
    root_cause: Annotated[str, Field(min_length=1, max_length=1000)]
    root_cause_class: RootCauseClass
    # Strict: a number (an integer is one); lax coercion would read true as 1.0, the
    # highest claim, and "0.9" as 0.9.
    confidence: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
    actions: Annotated[tuple[ProposedAction, ...], Field(max_length=5)]
    evidence: Annotated[tuple[Text, ...], Field(max_length=20)] = ()


_ANSWER = TypeAdapter(Answer)
_FENCED = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def parse_answer(content: str) -> Answer:
    m = _FENCED.match(content)  # some models wrap JSON in a Markdown fence anyway
    text = m.group(1) if m else content
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise InvalidAnswer("invalid_json", f"not JSON ({err})") from err
    if not isinstance(obj, dict):
        raise InvalidAnswer(
            "schema_violation", f"<root>: expected an object, got {type(obj).__name__}"
        )
    try:
        return _ANSWER.validate_python(obj)
    except ValidationError as err:
        raise InvalidAnswer("schema_violation", "; ".join(validation_problems(err)[:5])) from err


# --- 2. scope and vetting -------------------------------------------------------------------

# How controllers name their pods: generateName appends 5 characters of this alphabet
# (k8s.io/apimachinery rand.SafeEncodeString) to a base cut at 63 - 5 characters; a
# Deployment's base is "<name>-<pod-template-hash>-", the hash (of a uint32) in the same
# alphabet, up to 10 characters.
_SAFE = frozenset("bcdfghjklmnpqrstvwxz2456789")
_SUFFIX = 5
_BASE_MAX = 58
_HASH_MAX = 10
_GENERATE_NAME = frozenset({"DaemonSet", "ReplicaSet", "Job"})
_POD_NAMES = {
    "Deployment": "{name}-<pod-template-hash>-<suffix>",
    "StatefulSet": "{name}-<ordinal>",
    **dict.fromkeys(_GENERATE_NAME, "{name}-<suffix>"),
}


def _safe(s: str) -> bool:
    return bool(s) and all(c in _SAFE for c in s)


def _deployment_pod(name: str, pod: str) -> bool:
    base, suffix = pod[:-_SUFFIX], pod[-_SUFFIX:]
    if len(pod) <= _SUFFIX or len(base) > _BASE_MAX or not _safe(suffix):
        return False
    prefix = f"{name}-"
    if len(prefix) >= _BASE_MAX:  # the hash was cut off entirely
        return base == prefix[:_BASE_MAX]
    if not base.startswith(prefix):
        return False
    rest = base[len(prefix) :]
    pod_template_hash = rest.removesuffix("-")
    if not (len(pod_template_hash) <= _HASH_MAX and _safe(pod_template_hash)):
        return False
    return rest.endswith("-") or len(base) == _BASE_MAX  # else cut in the hash


def is_pod_of(kind: str, name: str, pod: str) -> bool:
    """Whether ``pod`` is named as the pods of workload ``kind`` ``name`` are. A name
    prefix is not enough: ``api-gateway-7d9f8-x2k4q`` belongs to Deployment api-gateway,
    not to Deployment api."""
    if kind == "Deployment":
        return _deployment_pod(name, pod)
    if kind == "StatefulSet":
        ordinal = pod.removeprefix(f"{name}-")
        return (
            ordinal != pod
            and ordinal.isascii()
            and ordinal.isdigit()
            and (ordinal == "0" or not ordinal.startswith("0"))
        )
    if kind in _GENERATE_NAME:
        base, suffix = pod[:-_SUFFIX], pod[-_SUFFIX:]
        return len(pod) > _SUFFIX and base == f"{name}-"[:_BASE_MAX] and _safe(suffix)
    return False


@dataclass(frozen=True, slots=True)
class Scope:
    """The objects an analysis of one incident may act on."""

    namespaces: frozenset[str]
    workloads: frozenset[tuple[str, str, str]]  # (kind, namespace, name)
    pods: frozenset[tuple[str, str]]  # (namespace, name) named by members
    nodes: frozenset[str]
    config_maps: frozenset[tuple[str, str]]  # (namespace, name)
    denied_namespaces: frozenset[str] = frozenset()
    # (type, target key) verified not to heal this incident: not proposed again.
    ineffective: frozenset[tuple[str, str]] = frozenset()

    def lines(self) -> list[str]:
        """The scope for the trusted part of the prompt (every name DNS-1123 checked)."""
        out = [f"{k} {ns}/{n}" for k, ns, n in sorted(self.workloads)]
        out += [f"Pod {ns}/{n}" for ns, n in sorted(self.pods)]
        out += [
            f"Pod {ns}/{_POD_NAMES[k].format(name=n)} (pods of that {k})"
            for k, ns, n in sorted(self.workloads)
            if k in _POD_NAMES
        ]
        out += [f"Node {n}" for n in sorted(self.nodes)]
        out += [f"ConfigMap {ns}/{n}" for ns, n in sorted(self.config_maps)]
        return out

    def owns_pod(self, namespace: str, name: str) -> bool:
        if (namespace, name) in self.pods:
            return True
        return any(ns == namespace and is_pod_of(k, w, name) for k, ns, w in self.workloads)


def incident_scope(incident: Incident, ctx: Context, settings: Settings) -> Scope:
    """Targets within the incident's namespace, service (its workloads and their pods) and
    nodes, as named by the incident's and its members' labels."""
    namespaces: set[str] = set()
    shown: dict[tuple[str, str], str] = {}  # (namespace, name) -> kind the labels show
    guessed: dict[tuple[str, str], str] = {}
    pods: set[tuple[str, str]] = set()
    nodes: set[str] = set()
    for labels in (incident.labels, *(m.labels for m in incident.members)):
        ns = labels.get("namespace") or "default"
        if not is_dns_name(ns):
            continue
        namespaces.add(ns)
        # The kind the evidence shows (the pod's owner), never a guess the model may pick.
        target = workload_target(labels)
        if is_dns_name(target.name):
            key = (ns, target.name)
            (shown if workload_owner(labels) is not None else guessed)[key] = target.kind
        for label, kind in WORKLOAD_LABELS:
            if is_dns_name(labels.get(label, "")):
                shown[(ns, labels[label])] = kind
        if is_dns_name(labels.get("pod", "")):
            pods.add((ns, labels["pod"]))
        if is_dns_name(labels.get("node", "")):
            nodes.add(labels["node"])
    # A name only a service label gives is taken to be a Deployment, unless other evidence
    # of the incident shows what it is (a StatefulSet's pods failing, its alert unlabelled).
    workloads = {(k, ns, n) for (ns, n), k in {**guessed, **shown}.items()}
    names = {(ns, n) for _, ns, n in workloads}
    config_maps = {
        (c.namespace, c.name)
        for c in ctx.config_changes
        if c.kind == "ConfigMap"
        and is_dns_name(c.name)
        and any((c.namespace, w) in names for w in c.used_by)
    }
    return Scope(
        namespaces=frozenset(namespaces),
        workloads=frozenset(workloads),
        pods=frozenset(pods),
        nodes=frozenset(nodes),
        config_maps=frozenset(config_maps),
        denied_namespaces=frozenset(settings.remediation.denied_namespaces),
        ineffective=frozenset(ctx.ineffective),
    )


@dataclass(frozen=True, slots=True)
class Rejection:
    action: str  # "type Kind/namespace/name"
    reason: str  # short, for the metric label
    detail: str

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}"[:500]


def _params(a: ProposedAction) -> tuple[dict[str, ParamValue], str | None]:
    """Executor parameters of ``a``, or the reason they are refused."""
    out: dict[str, ParamValue] = {}
    p = a.params
    if a.type in ("scale_up", "scale_down") and p.replicas is not None:
        raw = str(p.replicas).strip()
        if _RELATIVE.match(raw):
            # The sign, not the value: "-0" on a scale_down is no move down.
            if (
                raw[0] != ("+" if a.type == "scale_up" else "-")
                or not 1 <= abs(int(raw)) <= MAX_STEP
            ):
                return out, f"replicas {raw!r}: a {a.type} moves by 1..{MAX_STEP} that way"
        elif not _ABSOLUTE.match(raw) or int(raw) > MAX_REPLICAS:
            return out, f"replicas {raw!r}: expected +N, -N or a count up to {MAX_REPLICAS}"
        elif a.type == "scale_up" and int(raw) == 0:
            return out, f"replicas {raw!r}: a scale_up to 0 is never up"
        # An absolute count's direction and step are checked against the current count
        # when the executor decides (agent.policy.scale_problem).
        out["replicas"] = raw
    if a.type == "update_config":
        if p.key is None or p.value is None:
            return out, "update_config names the key to set and its value"
        if not _CONFIG_KEY.fullmatch(p.key):
            return out, f"key {p.key[:80]!r}: not a ConfigMap key"
        if len(p.value) > MAX_CONFIG_VALUE:
            return out, f"value of {len(p.value)} chars: over {MAX_CONFIG_VALUE}"
        out["key"], out["value"] = p.key, p.value
    if a.type == "rollback" and p.revision is not None:
        if p.revision < 0:
            return out, f"revision {p.revision}: must be positive, or 0 for the previous one"
        if p.revision > 0:  # 0 is the previous revision, as no revision is (the reference's)
            out["revision"] = p.revision
    return out, None


def _check(a: ProposedAction, scope: Scope) -> tuple[str, str] | None:
    """(reason, detail) when ``a`` must not run; None when it may."""
    t = a.target
    if a.type not in ACTION_TYPES:
        return "not_allowed", f"action type {a.type!r} is not in the allow-list"
    if (problem := kind_problem(a.type, t.kind)) is not None:
        return "wrong_kind", problem
    if t.kind == "Node":
        if t.name not in scope.nodes:
            return "out_of_scope", f"node {t.name!r} is not one of the incident's nodes"
    else:
        if t.namespace in scope.denied_namespaces:
            return "denied_namespace", f"namespace {t.namespace!r} is denied"
        if t.namespace not in scope.namespaces:
            return "out_of_scope", f"namespace {t.namespace!r} is not the incident's"
        if t.kind == "Pod":
            in_scope = scope.owns_pod(t.namespace, t.name)
        elif t.kind == "ConfigMap":
            in_scope = (t.namespace, t.name) in scope.config_maps
        else:
            in_scope = (t.kind, t.namespace, t.name) in scope.workloads
        if not in_scope:
            return "out_of_scope", f"{t.kind} {t.namespace}/{t.name} is not in the incident"
    if not a.rollback_plan.strip():
        return "no_rollback_plan", "no rollback plan given"
    kind: TargetKind = t.kind  # type: ignore[assignment]  # checked above
    key = Target(kind=kind, namespace="" if kind == "Node" else t.namespace, name=t.name).key
    if (a.type, key) in scope.ineffective:
        return "already_ineffective", f"{a.type} {key} was verified not to heal this incident"
    return None


def vet_actions(
    proposed: Sequence[ProposedAction], scope: Scope
) -> tuple[list[RecommendedAction], list[Rejection]]:
    """Split proposed actions into allowed ones (in order, without repeats) and rejections."""
    accepted: list[RecommendedAction] = []
    rejected: list[Rejection] = []
    for a in proposed:
        problem = _check(a, scope)
        params: dict[str, ParamValue] = {}
        if problem is None:
            params, bad = _params(a)
            problem = ("bad_params", bad) if bad else None
        if problem is not None:
            rejected.append(Rejection(a.describe(), *problem))
            continue
        kind: TargetKind = a.target.kind  # type: ignore[assignment]  # checked above
        action = RecommendedAction(
            type=a.type,  # type: ignore[arg-type]  # checked above
            target=Target(
                kind=kind,
                name=a.target.name,
                namespace="" if kind == "Node" else a.target.namespace,
            ),
            params=params,
            expected_impact=a.expected_impact[:500],
            rollback_plan=a.rollback_plan[:500],
        )
        if all((x.type, x.target) != (action.type, action.target) for x in accepted):
            accepted.append(action)
    return accepted, rejected


# --- 3. confidence --------------------------------------------------------------------------


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def action_evidence(
    action: RecommendedAction, incident: Incident, ctx: Context, settings: Settings
) -> tuple[float, str]:
    """The agent's own support for ``action`` (0..1) and a line saying why."""
    t, window = action.target, settings.remediation.rollout_window
    if action.type == "rollback":
        r = recent_rollout(ctx.rollouts, t, incident.opened_at, window)
        rose = r is not None and any(
            m.status == "firing" and m.first_seen >= r.at for m in incident.members
        )
        score = 0.1 + (0.5 if r else 0.0) + (0.35 if rose else 0.0)
        detail = f"rollout within {window / 60:.0f} min before: {_yes(r is not None)}, "
        detail += f"errors began after it: {_yes(rose)}"
    elif action.type == "scale_up":
        sat = saturation(t, ctx)
        levels = [
            v
            for v in (ctx.cpu_saturation.get(t.name), ctx.concurrency_saturation.get(t.name))
            if v is not None
        ]
        top = max(levels, default=None)
        score = 0.9 if sat else (0.45 if top is not None and top >= SATURATED - 0.15 else 0.15)
        detail = f"cpu/concurrency saturation: {'unknown' if top is None else f'{top:.2f}'}"
    elif action.type == "scale_down":
        score, detail = 0.3, "no check: scaling down rarely heals"
    elif action.type in ("restart_workload", "restart_pod"):
        name = t.name if action.type == "restart_workload" else _owner(t, ctx)
        bad = name in ctx.crash_looping or name in ctx.oom_killed
        score = 0.8 if bad else 0.3
        detail = f"crash looping or OOM-killed: {_yes(bad)}"
    elif action.type in ("drain_node", "cordon_node"):
        conditions = ctx.node_conditions.get(t.name, ())
        bad = bool(conditions) or t.name in ctx.unhealthy_nodes
        score = 0.85 if bad else 0.1
        detail = f"node condition bad: {', '.join(conditions) or _yes(bad)}"
    else:  # update_config
        lo = incident.opened_at - timedelta(seconds=window)
        hi = incident.opened_at + timedelta(seconds=60)
        recent = any(
            (c.namespace, c.name) == (t.namespace, t.name) and lo <= c.at <= hi
            for c in ctx.config_changes
        )
        score = 0.8 if recent else 0.2
        detail = f"changed within {window / 60:.0f} min before: {_yes(recent)}"
    return round(min(score, 0.95), 3), f"check {action.type} {t.key}: {detail} -> {score:.2f}"


def _owner(t: Target, ctx: Context) -> str:
    names = [*ctx.crash_looping, *ctx.oom_killed]
    return max((n for n in names if t.name.startswith(f"{n}-")), key=len, default=t.name)


def class_evidence(
    cls: str, incident: Incident, ctx: Context, settings: Settings
) -> tuple[float, str]:
    """Support for a root-cause class when no action is proposed."""
    target = workload_target(incident.labels)
    window = settings.remediation.rollout_window
    checks = {
        "bad_rollout": recent_rollout(ctx.rollouts, target, incident.opened_at, window) is not None,
        "config_change": recent_config_change(
            ctx.config_changes, target, incident.opened_at, window
        )
        is not None,
        "saturation": saturation(target, ctx) is not None,
        "memory_leak": bool(ctx.oom_killed)
        or any(v >= 0.95 for v in ctx.memory_saturation.values()),
        "crash_loop": bool(ctx.crash_looping),
        "dependency_outage": any(v >= 0.5 for v in ctx.dependency_errors.values()),
        "node_failure": bool(ctx.node_conditions) or bool(ctx.unhealthy_nodes),
        "node_disk_pressure": any("DiskPressure" in c for c in ctx.node_conditions.values()),
        "noisy_neighbour": any(v >= 0.9 for v in ctx.node_cpu_saturation.values()),
    }
    if cls not in checks:
        return NEUTRAL, f"check {cls}: no check -> {NEUTRAL:.2f}"
    score = 0.75 if checks[cls] else 0.25
    return score, f"check {cls}: signal present: {_yes(checks[cls])} -> {score:.2f}"


def evidence_confidence(
    actions: Sequence[RecommendedAction],
    cls: str,
    incident: Incident,
    ctx: Context,
    settings: Settings,
) -> tuple[float, tuple[str, ...]]:
    """The weakest action's support (all of an analysis' actions share one confidence)."""
    if not actions:
        score, line = class_evidence(cls, incident, ctx, settings)
        return score, (line,)
    checked = [action_evidence(a, incident, ctx, settings) for a in actions]
    return min(s for s, _ in checked), tuple(line for _, line in checked)


def combine_confidence(model: float, evidence: float, *, tainted: bool = False) -> float:
    """Never above the model's own claim, pulled toward the agent's evidence; capped when the
    answer also proposed something that had to be rejected (it may have been steered)."""
    combined = min(model, MODEL_WEIGHT * model + (1 - MODEL_WEIGHT) * evidence)
    if tainted:
        combined = min(combined, TAINTED_CAP)
    # Rounded down: rounding must never lift a score over a threshold.
    return math.floor(max(0.0, min(1.0, combined)) * 1000) / 1000


def to_analysis(
    answer: Answer,
    incident: Incident,
    ctx: Context,
    settings: Settings,
    *,
    accepted: Sequence[RecommendedAction],
    rejected: Iterable[Rejection],
    now: datetime,
    notes: Sequence[str] = (),
) -> Analysis:
    rejected = list(rejected)
    ev, checks = evidence_confidence(accepted, answer.root_cause_class, incident, ctx, settings)
    final = combine_confidence(answer.confidence, ev, tainted=bool(rejected))
    evidence = (
        *(f"model: {e[:300]}" for e in answer.evidence[:10]),
        *checks,
        f"confidence: model {answer.confidence:.2f}, evidence {ev:.2f} -> {final:.2f}"
        + (" (capped: the answer also proposed rejected actions)" if rejected else ""),
        *notes,
    )
    return Analysis(
        id=stable_id("analysis", incident.id, str(incident.revision), "llm"),
        incident_id=incident.id,
        incident_key=incident.key,
        incident_revision=incident.revision,
        analyzer="llm",
        root_cause=answer.root_cause[:1000],
        root_cause_class=answer.root_cause_class,
        confidence=final,
        evidence=evidence,
        actions=tuple(accepted),
        created_at=now,
        model_confidence=answer.confidence,
        evidence_confidence=ev,
        rejected_actions=tuple(str(r) for r in rejected),
    )
