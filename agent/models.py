"""The event model: frozen dataclasses that travel on Kafka as JSON.

Every event carries an ``id``, a ``schema_version``, timezone-aware UTC timestamps and the
key it is partitioned by (``key``). Objects are immutable inside the process; validation
happens once, at the boundary, in :mod:`agent.codec`.

Wire names are the field names. Unknown fields are ignored on decode so that a newer
producer can add fields without breaking an older consumer (schema evolution); a changed
meaning bumps ``schema_version``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Annotated, Any, Literal

from msgspec import Meta
from pydantic import AwareDatetime, Field

SCHEMA_VERSION = 1

Confidence = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# String and time constraints are declared twice, for pydantic (every boundary) and for
# msgspec (the correlator's hot path, see agent.codec.FastDecoder), which must reject
# whatever pydantic rejects: tests/unit/test_codec.py holds the two to that.
NonEmpty = Annotated[str, Field(min_length=1, max_length=1024), Meta(min_length=1, max_length=1024)]
Labels = Mapping[
    Annotated[str, Field(max_length=256), Meta(max_length=256)],
    Annotated[str, Field(max_length=4096), Meta(max_length=4096)],
]
Time = Annotated[datetime, Meta(tz=True), AwareDatetime]  # timezone-aware
# Bounded: an integer beyond 64 bits (msgspec reads one) could not be written back by orjson.
Version = Annotated[int, Field(ge=1, le=2**31 - 1), Meta(ge=1, le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1), Meta(ge=0, le=2**31 - 1)]

Severity = Literal["info", "warning", "critical"]
AnomalyStatus = Literal["firing", "resolved"]
AnomalySource = Literal["prometheus", "kubernetes", "alertmanager", "feed", "agent"]
# "silenced": every firing member is suppressed (matches a silence or is inhibited by an
# active source anomaly); recorded, never analysed or acted on.
IncidentStatus = Literal["open", "updated", "mitigating", "resolved", "reopened", "silenced"]
# Nothing is to be done about an incident in these: it is not acted on nor escalated.
CLOSED_STATUSES: frozenset[str] = frozenset({"resolved", "silenced"})
ActionType = Literal[
    "rollback",
    "scale_up",
    "scale_down",
    "restart_workload",
    "restart_pod",
    "cordon_node",
    "drain_node",
    "update_config",
]
TargetKind = Literal["Deployment", "StatefulSet", "DaemonSet", "Pod", "Node", "ConfigMap"]
# The controllers whose pods the workload actions act on, through the controller itself.
WORKLOAD_KINDS: tuple[TargetKind, ...] = ("Deployment", "StatefulSet", "DaemonSet")
ResultStatus = Literal[
    "succeeded",  # executed, effect applied
    "failed",  # executed and the cluster refused or errored
    "denied",  # policy refused it
    "pending_approval",  # queued on the approvals topic
    "rejected",  # a human rejected it, or the approval expired
    "dry_run",  # shadow mode: would have executed
    "duplicate",  # this action id was already applied to the target
]
Outcome = Literal["healed", "not_healed", "worse", "unknown", "not_applicable"]
Decision = Literal["approve", "reject"]

ACTION_TYPES: tuple[ActionType, ...] = (
    "rollback",
    "scale_up",
    "scale_down",
    "restart_workload",
    "restart_pod",
    "cordon_node",
    "drain_node",
    "update_config",
)
SEVERITY_RANK: Mapping[str, int] = {"info": 0, "warning": 1, "critical": 2}


# The window an anomaly's times must fall in. Year 1 (Go's zero time, what a client sends for
# "unset") overflows the correlator's date arithmetic and crash-looped it; year 9999 made
# every later real observation of the anomaly look stale. Static, so decoding stays pure;
# the correlator also refuses an observed_at far ahead of its own clock (see
# streams.correlation.earliness), which allows for clock skew.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)


def outside_window(value: datetime) -> str | None:
    """What is wrong with an anomaly's time, or None when it is inside the window."""
    if value.tzinfo is None or EARLIEST <= value < LATEST:
        return None
    return (
        f"must be from {EARLIEST:%Y-%m-%d} to before {LATEST:%Y-%m-%d} (UTC), "
        f"got {value.isoformat()}"
    )


def check_window(name: str, value: datetime) -> None:
    """Raise ValueError naming the field when an anomaly's time is outside the window."""
    if (problem := outside_window(value)) is not None:
        raise ValueError(f"{name}: {problem}")


def utcnow() -> datetime:
    """Wall-clock time for *stamping events* at the edges; decision logic takes ``now``."""
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def stable_id(*parts: str) -> str:
    """A deterministic id: the same inputs always give the same id (idempotency keys)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16)
    return digest.hexdigest()


def fingerprint(source: str, name: str, labels: Mapping[str, str]) -> str:
    """Stable across replicas and restarts: depends only on what identifies the anomaly."""
    items = "\x1e".join(f"{k}={labels[k]}" for k in sorted(labels))
    return stable_id(source, name, items)


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One observation that something is wrong (or, with status resolved, no longer is)."""

    fingerprint: NonEmpty
    source: AnomalySource
    name: NonEmpty
    severity: Severity
    status: AnomalyStatus
    labels: Labels
    starts_at: Time
    observed_at: Time
    # Untrusted free text (alert annotations, event messages): data, never instructions.
    annotations: Labels = field(default_factory=dict)
    value: float | None = None
    id: NonEmpty = field(default_factory=new_id)
    schema_version: Version = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # JSON has no Infinity/NaN: orjson would write null and the value would vanish.
        value = self.value
        if value is not None and not math.isfinite(value):
            raise ValueError(f"value: must be finite, got {value!r}")
        # Run for every anomaly decoded: both times inside the window is one chained
        # comparison, a third of the cost of the two checks. Anything else (a naive time
        # cannot be compared) takes them, which name the problem.
        starts, observed = self.starts_at, self.observed_at
        try:
            inside = EARLIEST <= starts < LATEST and EARLIEST <= observed < LATEST
        except TypeError:  # not comparable (naive): the checks decide, as they did
            inside = False
        if inside:
            return
        check_window("starts_at", starts)
        check_window("observed_at", observed)

    @property
    def key(self) -> str:
        """Correlation key: anomalies of one service land on one partition."""
        return group_key(self.labels, ("cluster", "namespace", "service"))


@dataclass(frozen=True, slots=True)
class AnomalyBatch:
    """Several anomalies of one partition in one record (detectors publish per evaluation).

    Kafka's per-record cost in a stream processor dwarfs the per-anomaly work, so producers
    that observe many anomalies at once send them together. Every anomaly in a batch belongs
    to the partition the batch is written to (see :mod:`streams.partitioning`).
    """

    anomalies: tuple[Anomaly, ...]
    id: NonEmpty = field(default_factory=new_id)
    schema_version: Version = SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Mitigation:
    """An action was applied for an incident: it is now "mitigating".

    Published by the executor on the anomalies topic, keyed by the incident key, so it is
    ordered with the group's anomalies and reaches the worker that owns the incident.
    """

    incident_id: NonEmpty
    incident_key: NonEmpty
    action_id: NonEmpty
    at: Time
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.incident_key


# The key of a group whose every value is empty and that has no "/" to show for it (one
# group_by label): no escaped key is "%00", as "%" is only ever written as %25 or %2F.
EMPTY_KEY = "%00"


# group_by -> the values of those labels, in one C call (KeyError when one is missing):
# asked for every anomaly, it is half the cost of a comprehension of label.get calls.
# A few entries at most: group_by comes from the settings.
_GETTERS: dict[tuple[str, ...], Callable[[Mapping[str, str]], Sequence[str]]] = {}


def _getter(by: tuple[str, ...]) -> Callable[[Mapping[str, str]], Sequence[str]]:
    # itemgetter of one name gives the value, not a tuple; of none, an error
    getter: Callable[[Mapping[str, str]], Sequence[str]] = (
        itemgetter(*by) if len(by) > 1 else functools.partial(_plain_values, by)
    )
    if len(_GETTERS) < 64:
        _GETTERS[by] = getter
    return getter


def _plain_values(by: tuple[str, ...], labels: Mapping[str, str]) -> list[str]:
    return [labels[k] for k in by]


def group_key(labels: Mapping[str, str], by: tuple[str, ...]) -> str:
    """The group's values joined by "/", each with "%" and "/" percent-escaped, so
    distinct value tuples never share a key ({cluster: eu/prod, namespace: shop} and
    {cluster: eu, namespace: prod/shop} did). A key whose values hold neither is the plain
    join, as it always was: the state and partition of existing groups do not move."""
    values: Sequence[str]
    try:
        if type(labels) is not dict:  # a subclass's __missing__ would answer for absent ones
            raise KeyError
        values = (_GETTERS.get(by) or _getter(by))(labels)
    except KeyError:  # a label missing counts as empty
        get = labels.get
        values = [get(k, "") for k in by]
    key = "/".join(values)
    if key and "%" not in key and key.count("/") == len(by) - 1:
        return key
    escaped = "/".join([v.replace("%", "%25").replace("/", "%2F") for v in values])
    return escaped or EMPTY_KEY


@dataclass(frozen=True, slots=True)
class Member:
    """An anomaly as remembered inside an incident."""

    fingerprint: NonEmpty
    name: NonEmpty
    source: AnomalySource
    severity: Severity
    status: AnomalyStatus
    labels: Labels
    first_seen: Time
    last_seen: Time
    value: float | None = None
    silenced_by: str | None = None  # id of the silence matching it when last seen
    # "<rule>:<source fingerprint>" of the inhibition rule suppressing it when last seen
    inhibited_by: str | None = None
    # "node/<name>" or "workload/<namespace>/<name>": the topology anomaly whose incident
    # took this (pod-level) anomaly in
    absorbed_by: str | None = None

    @property
    def suppressed(self) -> bool:
        return bool(self.silenced_by or self.inhibited_by)


@dataclass(frozen=True, slots=True)
class Incident:
    """A group of correlated anomalies; each change is published as a new revision."""

    id: NonEmpty
    key: NonEmpty
    status: IncidentStatus
    severity: Severity
    labels: Labels  # the group labels (cluster, namespace, service)
    members: tuple[Member, ...]
    opened_at: Time
    updated_at: Time
    revision: int = 1
    resolved_at: Time | None = None
    # Set when the incident was closed because a node- or workload-level incident took its
    # anomalies in: the id of that incident.
    absorbed_into: str | None = None
    schema_version: Version = SCHEMA_VERSION
    # Members left out of this event to keep it within a Kafka record (see
    # correlation.max_event_members); the correlator's state holds them all.
    omitted_members: Count = 0

    @property
    def firing(self) -> tuple[Member, ...]:
        """Firing members that are not suppressed: what analysis and actions consider."""
        return tuple(m for m in self.members if m.status == "firing" and not m.suppressed)

    @property
    def firing_names(self) -> list[str]:
        """The names of what fires (see :attr:`firing`), sorted, each once."""
        return sorted({m.name for m in self.firing})


# The correlator builds a Member for nearly every anomaly it folds and an Incident for each
# change. A frozen dataclass's __init__ sets each field through object.__setattr__, about
# 3x the cost of setting its slots directly. These build the object as an instance of a
# plain slotted twin of the class (same slots, so the same memory layout), whose fields
# are set as cheaply as any attribute, then make it the frozen class: about half the cost
# of setting the frozen class's slots through their descriptors. Same objects as the
# constructors give (tests/unit/test_models.py holds them to every field); hot path only.
_new = object.__new__


class _MemberDraft:
    __slots__ = Member.__slots__


class _IncidentDraft:
    __slots__ = Incident.__slots__


def new_member(
    fingerprint: str,
    name: str,
    source: AnomalySource,
    severity: Severity,
    status: AnomalyStatus,
    labels: Mapping[str, str],
    first_seen: datetime,
    last_seen: datetime,
    value: float | None,
    silenced_by: str | None,
    inhibited_by: str | None,
    absorbed_by: str | None,
) -> Member:
    """``Member(...)`` with every field given, for the hot path."""
    m: Any = _new(_MemberDraft)
    m.fingerprint = fingerprint
    m.name = name
    m.source = source
    m.severity = severity
    m.status = status
    m.labels = labels
    m.first_seen = first_seen
    m.last_seen = last_seen
    m.value = value
    m.silenced_by = silenced_by
    m.inhibited_by = inhibited_by
    m.absorbed_by = absorbed_by
    m.__class__ = Member
    return m  # type: ignore[no-any-return]


def new_incident(
    id: str,
    key: str,
    status: IncidentStatus,
    severity: Severity,
    labels: Mapping[str, str],
    members: tuple[Member, ...],
    opened_at: datetime,
    updated_at: datetime,
    revision: int,
    resolved_at: datetime | None,
    absorbed_into: str | None,
    schema_version: int,
    omitted_members: int,
) -> Incident:
    """``Incident(...)`` with every field given, for the hot path."""
    inc: Any = _new(_IncidentDraft)
    inc.id = id
    inc.key = key
    inc.status = status
    inc.severity = severity
    inc.labels = labels
    inc.members = members
    inc.opened_at = opened_at
    inc.updated_at = updated_at
    inc.revision = revision
    inc.resolved_at = resolved_at
    inc.absorbed_into = absorbed_into
    inc.schema_version = schema_version
    inc.omitted_members = omitted_members
    inc.__class__ = Incident
    return inc  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Target:
    kind: TargetKind
    name: NonEmpty
    namespace: str = ""

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


ParamValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class RecommendedAction:
    type: ActionType
    target: Target
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    expected_impact: str = ""
    rollback_plan: str = ""


@dataclass(frozen=True, slots=True)
class Analysis:
    id: NonEmpty
    incident_id: NonEmpty
    incident_key: NonEmpty
    incident_revision: int
    analyzer: Literal["rules", "llm"]
    root_cause: NonEmpty
    root_cause_class: NonEmpty
    confidence: Confidence
    evidence: tuple[str, ...]
    actions: tuple[RecommendedAction, ...]
    created_at: Time
    # Why the final confidence is what it is: model score and the agent's own checks.
    model_confidence: Confidence | None = None
    evidence_confidence: Confidence | None = None
    fallback_reason: str | None = None
    rejected_actions: tuple[str, ...] = ()
    # The evidence it was made on (agent.analysis_stage.evidence_key): every analyzer
    # replica reads the analyses, and none makes another on the same evidence.
    basis: str | None = None
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.incident_key


@dataclass(frozen=True, slots=True)
class Firing:
    """A condition that fired, and where: verification re-runs it and looks there only.
    ``labels`` name where it fired: the namespace and service of a pod, workload or service
    anomaly (its replacement pods count, so not the pod), or the node of a node-level one.
    ``source`` says where to re-run it; None in requests of earlier versions, which re-run
    it as a Prometheus pattern."""

    name: NonEmpty
    labels: Labels = field(default_factory=dict)
    source: AnomalySource | None = None


@dataclass(frozen=True, slots=True)
class ActionRequest:
    id: NonEmpty  # idempotency key, deterministic from (analysis, position)
    incident_id: NonEmpty
    incident_key: NonEmpty
    analysis_id: NonEmpty
    type: ActionType
    target: Target
    confidence: Confidence
    reason: str
    requested_at: Time
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    labels: Labels = field(default_factory=dict)  # the incident's group labels
    trigger: tuple[str, ...] = ()  # names of what fired (see firing)
    # What verification re-checks; empty in requests of earlier versions, which re-check
    # ``trigger`` within ``labels``.
    firing: tuple[Firing, ...] = ()
    approved_by: str | None = None
    # The incident's severity when the action was asked for: its escalations carry it, for
    # routing. None in requests of earlier versions and in undos.
    severity: Severity | None = None
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        """Keyed by target so one target's actions are serialized on one partition."""
        return self.target.key

    def digest(self) -> str:
        """Hash of what would be executed; an approval must name the same hash."""
        params = "\x1e".join(f"{k}={self.params[k]!r}" for k in sorted(self.params))
        return stable_id(self.id, self.type, self.target.key, params)


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    id: NonEmpty
    action: ActionRequest
    action_hash: NonEmpty
    root_cause: str
    evidence: tuple[str, ...]
    created_at: Time
    expires_at: Time
    # The target's spec version when asked (handlers.cluster.Cluster.version); an approved
    # action runs only if it is unchanged. Empty: not pinned (older requests).
    target_version: str = ""
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.id


@dataclass(frozen=True, slots=True)
class ApprovalDecision:
    id: NonEmpty
    request_id: NonEmpty
    action_hash: NonEmpty
    decision: Decision
    decided_by: NonEmpty
    decided_at: Time
    reason: str = ""
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.request_id


@dataclass(frozen=True, slots=True)
class ActionResult:
    id: NonEmpty
    action_id: NonEmpty
    incident_id: NonEmpty
    incident_key: NonEmpty
    type: ActionType
    target: Target
    status: ResultStatus
    outcome: Outcome
    message: str
    started_at: Time
    finished_at: Time
    prior_state: Mapping[str, Any] = field(default_factory=dict)
    service: str = ""
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.target.key


MatchOp = Literal["=", "!=", "=~", "!~"]


@dataclass(frozen=True, slots=True)
class Matcher:
    """Alertmanager's label matcher: equality or a fully anchored regular expression."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(max_length=1024)]
    op: MatchOp = "="

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as err:
                raise ValueError(
                    f"value: invalid regular expression {self.value!r}: {err}"
                ) from err

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        hit = re.fullmatch(self.value, actual) is not None
        return hit if self.op == "=~" else not hit


_MATCHER = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(=~|!~|!=|=)(.*)$")


def parse_matcher(text: str) -> Matcher:
    """'service=checkout', 'namespace=~shop-.*', 'env!=dev' -> Matcher.

    Raises ValueError naming the matcher text.
    """
    m = _MATCHER.match(text)
    if m is None:
        raise ValueError(
            f"matcher {text!r}: expected NAME=VALUE, NAME!=VALUE, NAME=~RE or NAME!~RE"
        )
    try:
        return Matcher(name=m.group(1), op=m.group(2), value=m.group(3))  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"matcher {text!r}: {err}") from err


@dataclass(frozen=True, slots=True)
class Fact:
    """An anomaly every correlator worker must see, whatever partition folds it: a node- or
    workload-level anomaly (it absorbs its pods' anomalies) or an inhibition source.

    Published on the compacted correlation-facts topic keyed by fingerprint, from the state
    of its incident. It routes pod anomalies to that incident while the anomaly fires (then
    only those it ``holds``, while the incident is open), and inhibits while it fires;
    either way only until ``resolve_timeout`` after ``observed_at`` unless refreshed, so a
    lost update cannot keep it alive.
    """

    fingerprint: NonEmpty
    labels: Labels  # match labels: the anomaly's labels plus alertname, severity, source
    incident_key: NonEmpty
    incident_id: NonEmpty
    status: AnomalyStatus  # the anomaly's
    incident_open: bool  # False once its incident resolved: the fact ends there
    observed_at: Time  # when its incident last saw any member (its liveness)
    # Once the anomaly resolved (its incident still open): the pod anomalies the incident
    # took in through it that still fire. Only those stay routed there, until they resolve;
    # a node that recovered takes in no new pod failure.
    holds: tuple[NonEmpty, ...] = ()
    # The anomaly's own first and last sighting (``observed_at`` is its incident's): when
    # a source went blind and when it saw again, for a fact of :data:`BLINDING`.
    first_seen: Time | None = None
    last_seen: Time | None = None
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.fingerprint


# The agent's own anomalies that say a source cannot see (name -> that source, and the
# label naming the one anomaly name it cannot see, None: every one): while one fires, an
# anomaly it covers that stops being repeated may still fire unseen, so the correlator does
# not resolve it as quiet (see streams.correlation.expire). A pattern whose own query fails
# sees nothing of its series, though Prometheus answers every other pattern.
BLINDING: Mapping[str, tuple[AnomalySource, str | None]] = {
    "prometheus-unavailable": ("prometheus", None),
    "pattern-query-failed": ("prometheus", "pattern"),
    # The receiver cannot ask Alertmanager what still fires (agent.webhook): nothing
    # repeats its alerts, and Alertmanager itself resends only every repeat_interval.
    "alertmanager-unavailable": ("alertmanager", None),
}

# A blindness is the observer's: a detector labels its own anomalies with its agent.cluster,
# but a series it reads may name another cluster (Thanos, Mimir, federation). Such an
# anomaly carries the observer's cluster in this label too, so that detector's blindness
# covers it and another cluster's does not. Not part of its fingerprint: it says who saw
# the anomaly, not which one it is.
OBSERVER = "agent_cluster"


def observer(labels: Mapping[str, str]) -> str:
    """The agent.cluster of the detector that observed an anomaly with these labels."""
    return labels.get(OBSERVER) or labels.get("cluster", "")


def observed(labels: dict[str, str], cluster: str) -> dict[str, str]:
    """``labels`` of an anomaly naming another cluster than its detector's, ``cluster``,
    with that one (see :data:`OBSERVER`): its blindness is what covers them. The detector's
    word: a label of that name the series or alert has is replaced."""
    if labels.get("cluster") == cluster and OBSERVER not in labels:
        return labels
    return {**labels, OBSERVER: cluster}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A detector replica received Alertmanager's heartbeat (``detectors.alertmanager.
    heartbeat``, see agent.webhook) at ``seen_at``.

    Published on the compacted heartbeats topic keyed by :attr:`key`: Alertmanager's
    notification reaches one replica behind the webhooks' Service, and every replica judges
    the heartbeat missing from the latest time any of them received it.
    """

    cluster: Annotated[str, Field(max_length=1024)]  # the receiver's agent.cluster
    alertname: NonEmpty
    seen_at: Time
    replica: Annotated[str, Field(max_length=256)] = ""  # who received it, for the operator
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return heartbeat_key(self.cluster, self.alertname)


def heartbeat_key(cluster: str, alertname: str) -> str:
    return f"{cluster}/{alertname}"


@dataclass(frozen=True, slots=True)
class Silence:
    """Anomalies matching every matcher between starts_at and ends_at are silenced."""

    id: NonEmpty
    matchers: Annotated[tuple[Matcher, ...], Field(min_length=1)]
    starts_at: Time
    ends_at: Time
    created_by: NonEmpty
    comment: str
    created_at: Time
    schema_version: Version = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at: must be after starts_at")

    @property
    def key(self) -> str:
        return self.id

    def active(self, at: datetime) -> bool:
        return self.starts_at <= at < self.ends_at

    def matches(self, labels: Mapping[str, str], at: datetime) -> bool:
        return self.active(at) and all(m.matches(labels) for m in self.matchers)


SwitchName = Literal["kill_switch", "dry_run"]
NAMESPACE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"  # a DNS label, or "" for all


@dataclass(frozen=True, slots=True)
class SwitchChange:
    """An operator turning a run-time switch on or off for every executor replica at once
    (``sre-agent switches``), for the whole cluster or, with ``namespace``, for the
    targets in one namespace (a change freeze); the compacted switches topic keeps the
    latest per switch and scope."""

    id: NonEmpty
    name: SwitchName
    on: bool
    by: NonEmpty
    reason: Annotated[str, Field(max_length=1024)]
    at: Time
    namespace: Annotated[str, Field(max_length=63, pattern=NAMESPACE_PATTERN)] = ""
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return f"{self.name}/{self.namespace}" if self.namespace else self.name

    def describe(self) -> str:
        state = "on" if self.on else "off"
        scope = f" for namespace {self.namespace}" if self.namespace else ""
        why = f": {self.reason}" if self.reason else ""
        at = self.at.isoformat(timespec="seconds")
        return f"turned {state}{scope} by {self.by} at {at}{why}"


@dataclass(frozen=True, slots=True)
class BudgetClaim:
    """An executor replica claiming a unit of the hourly action budgets for an action it is
    about to execute, or giving it back (``released``: the action changed nothing). The
    claims topic has one partition: its order is the order every replica grants claims
    in, so two replicas deciding at the same instant cannot both spend the last unit.

    A node action (cordon, drain) also claims its node (``node``), with the nodes its
    replica saw cordoned (``cordoned``): until ``done`` (or released), it counts as
    cordoned for every later claim, so two replicas cannot each cordon the last node
    ``max_nodes_cordoned`` allows."""

    action_id: NonEmpty
    namespace: Annotated[str, Field(max_length=63)]
    at: Time
    by: str = ""  # the replica (its Kafka client id), for the record
    released: bool = False
    node: str = ""
    cordoned: tuple[str, ...] = ()
    done: bool = False  # the node action ended, having changed the cluster: it keeps its unit
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.action_id


EscalationReason = Literal[
    "action_failed",  # the cluster refused or errored
    "denied",  # a safety limit (cooldown, budget, blast radius, params) held the action back
    "not_healed",  # verified: the trigger still fires after the action
    "worse",  # verified: the action made the workload worse
    "approval_requested",  # an action waits for a human's approval
    "approval_expired",  # nobody decided in time
    "approval_stale",  # approved, but the target or incident changed meanwhile
    "approval_withdrawn",  # its incident closed before anyone decided: nothing to do
    "notify",  # a pattern's or runbook's notify_oncall step
    "no_remedy",  # a severe incident the analysis recommends no action for
    "unresolved",  # still open escalation.unresolved_after after it opened
    # Informational: what the agent did, for a channel that asks for it (see below).
    "healed",  # verified: the action healed what fired
    "dry_run",  # shadow mode: what the agent would have done
    "switch",  # someone turned the kill switch or dry run on or off (sre-agent switches)
]
# Reasons that report rather than ask a human for anything: a webhook is sent them only
# when its `reasons` lists them, never by default (a pager must not page on a success).
INFORMATIONAL_REASONS: frozenset[str] = frozenset({"healed", "dry_run", "switch"})
# A follow-up that says an earlier escalation needs nothing more: it is routed as the one it
# follows, so it reaches whoever was asked.
FOLLOW_UPS: dict[str, EscalationReason] = {"approval_withdrawn": "approval_requested"}


@dataclass(frozen=True, slots=True)
class Escalation:
    """Something a human must look at now (or, of an informational reason, what the agent
    did, for the channels that ask); the notifier delivers it to the configured webhooks.
    ``id`` is stable per (incident or action, reason): a repeat is the same escalation, and
    receivers dedupe on it."""

    id: NonEmpty
    incident_id: NonEmpty
    incident_key: NonEmpty
    reason: EscalationReason
    summary: NonEmpty
    at: Time
    action_id: str | None = None
    target: str = ""  # Kind/namespace/name of the action's target
    service: str = ""
    details: tuple[str, ...] = ()
    severity: Severity | None = None  # the incident's, when known: webhooks route on it
    schema_version: Version = SCHEMA_VERSION
    # Of an "unresolved" escalation: 1 at escalation.unresolved_after, 2, 3, ... at each
    # of escalation.unresolved_again_after (webhooks route on it); 1 for other reasons.
    level: Version = 1
    # The webhooks (by name) a runbook file routes it to; empty: every webhook that takes
    # its reason, severity and level.
    channels: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.incident_key

    @property
    def label(self) -> str:
        """The reason as people read it: a later level of ``unresolved`` is named."""
        return f"{self.reason} level {self.level}" if self.level > 1 else self.reason

    @classmethod
    def of_switch(cls, change: SwitchChange) -> Escalation:
        """The announcement of a switch change, for the channels that take "switch": the
        agent stopped (or resumed) acting, or went into (or out of) shadow mode. Keyed by
        the switch and its scope; one per change."""
        state = "ON" if change.on else "off"
        scope = f" in namespace {change.namespace}" if change.namespace else ""
        effect = {
            ("kill_switch", True): "no action executes",
            ("kill_switch", False): "actions execute again, within the policy",
            ("dry_run", True): "actions are decided and recorded, never applied",
            ("dry_run", False): "actions are applied again, within the policy",
        }[(change.name, change.on)]
        return cls(
            id=stable_id("escalation", "switch", change.id),
            incident_id=change.id,
            incident_key=f"switches/{change.key}",
            reason="switch",
            summary=f"{change.name} {state}{scope}: {effect}"[:500],
            at=change.at,
            details=(f"{change.name} {change.describe()}",),
        )

    @classmethod
    def of_incident(
        cls,
        incident: Incident,
        reason: EscalationReason,
        summary: str,
        at: datetime,
        details: tuple[str, ...],
        level: int = 1,
    ) -> Escalation:
        """An incident's escalation (not an action's): one per (incident, reason, level)."""
        return cls(
            # Level 1 keeps the id it had before there were levels.
            id=stable_id("escalation", incident.id, reason, *([str(level)] if level > 1 else [])),
            incident_id=incident.id,
            incident_key=incident.key,
            reason=reason,
            summary=summary[:500],
            at=at,
            service=incident.labels.get("service", ""),
            severity=incident.severity,
            details=details,
            level=level,
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be decoded or processed, kept with the reason."""

    id: NonEmpty
    source_topic: str
    error: str
    raw: str  # the original bytes, as UTF-8 text, or base64 if binary
    raw_encoding: Literal["utf-8", "base64"]
    failed_at: Time
    consumer: str = ""
    partition: int | None = None
    offset: int | None = None
    # A record too big for a letter keeps only its first bytes in ``raw``: this many were
    # dropped from its end. The whole is at partition/offset of the source topic, and
    # ``raw_sha256`` (of all of its bytes) tells it is the one.
    raw_dropped: int = 0
    raw_sha256: str = ""
    schema_version: Version = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return self.source_topic
