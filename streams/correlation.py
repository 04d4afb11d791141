"""Pure correlation: (incident state, anomaly, now) -> (new state, incident events).

No clock reads and no I/O here, so the same inputs always give the same outputs; the faust
agent in :mod:`streams.correlator` only feeds batches through these functions and writes
the results to its changelogged table and the incidents topic.

Rules:
- Anomalies group by ``group_by`` labels into one incident per group at a time.
- Dedup by fingerprint: a repeat of a known anomaly refreshes ``last_seen`` but emits
  nothing unless its status, severity or marks changed, so re-delivery and duplicate
  detectors are harmless.
- An observation older than what the incident already knows of that fingerprint cannot
  move it backwards (out-of-order delivery). In a resolved incident, whose members are
  all resolved, a firing observation no newer than its member is such a late copy; any
  other firing anomaly reopens it, even one observed before the resolution.
- The incident resolves when every member is resolved, or when no member has been seen for
  ``resolve_timeout`` (see :func:`expire`; a member whose source could not see counts as
  seen until it saw again); a firing anomaly within ``reopen_window`` of the
  resolution reopens the same incident, later ones open a new one.
- Severity is the maximum of the firing members (of all members once resolved).
- An open incident drops, at its next change, members resolved and unseen for
  ``member_retention`` (0: never): a long-lived incident of a service whose pods come and
  go would otherwise grow without bound, and every change rewrites all of it. Their last
  state stays in the revisions already published; a resolved incident keeps its members.
- An incident holds at most ``max_members`` members (0: no bound), so its state always
  fits a Kafka record. A new member that would exceed it first makes room: resolved
  members go, least recently seen first, a tenth of the bound at a time. When the bound
  is all firing members, the new anomaly is refused: the caller records it elsewhere
  (the correlator dead-letters it), the incident does not change.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from agent.models import (
    SEVERITY_RANK,
    Anomaly,
    Incident,
    IncidentStatus,
    Member,
    Severity,
    Silence,
    group_key,
    new_incident,
    new_member,
    observer,
    stable_id,
)


@dataclass(frozen=True, slots=True)
class CorrelationRules:
    group_by: tuple[str, ...] = ("cluster", "namespace", "service")
    resolve_timeout: float = 300.0
    reopen_window: float = 300.0
    group_wait: float = 0.0
    group_interval: float = 0.0
    repeat_interval: float = 0.0
    late_bound: float = 0.0
    member_retention: float = 0.0
    max_members: int = 0


@dataclass(frozen=True, slots=True)
class Marks:
    """Why an anomaly is folded the way it is, decided from the cross-partition view
    (:mod:`streams.topology`): recorded on its member."""

    silenced_by: str | None = None
    inhibited_by: str | None = None
    absorbed_by: str | None = None


NO_MARKS = Marks()
Keyed = tuple[str, Anomaly, Marks]  # (group key, anomaly, marks): one item of a batch


def key_of(anomaly: Anomaly, rules: CorrelationRules) -> str:
    return group_key(anomaly.labels, rules.group_by)


# Silence and inhibition matchers see these alongside the anomaly's labels (its own labels
# win): the agent's patterns and Kubernetes signals carry their name in ``name``, not in a
# label, so ``alertname=high-error-rate`` would otherwise match nothing.
ALERTNAME, SEVERITY, SOURCE = "alertname", "severity", "source"


def match_labels(a: Anomaly | Member) -> dict[str, str]:
    out = dict(a.labels)
    out.setdefault(ALERTNAME, a.name)
    out.setdefault(SEVERITY, a.severity)
    out.setdefault(SOURCE, a.source)
    return out


RANKED: tuple[Severity, ...] = tuple(sorted(SEVERITY_RANK, key=SEVERITY_RANK.__getitem__))  # type: ignore[arg-type]


def _max_severity(members: Iterable[Member]) -> Severity:
    best: Severity = "info"
    for m in members:
        if SEVERITY_RANK[m.severity] > SEVERITY_RANK[best]:
            best = m.severity
    return best


def _severity(members: Sequence[Member]) -> Severity:
    firing = [m for m in members if m.status == "firing"]
    return _max_severity(firing or members)


def _member(a: Anomaly, marks: Marks = NO_MARKS) -> Member:
    return new_member(
        a.fingerprint,
        a.name,
        a.source,
        a.severity,
        a.status,
        a.labels,
        a.starts_at,
        a.observed_at,
        a.value,
        marks.silenced_by,
        marks.inhibited_by,
        marks.absorbed_by,
    )


def _retained(
    members: Sequence[Member], at: datetime, keep: str, rules: CorrelationRules
) -> list[Member] | None:
    """The members an open incident keeps at a change at ``at``, or None when it keeps
    them all. ``keep``: the fingerprint of the anomaly that made the change, which its
    event must show."""
    if rules.member_retention <= 0:
        return None
    horizon = at - timedelta(seconds=rules.member_retention)
    # Nearly every change drops nothing: look before building a new list.
    if all(m.status == "firing" or m.last_seen >= horizon for m in members):
        return None
    kept = [
        m
        for m in members
        if m.status == "firing" or m.last_seen >= horizon or m.fingerprint == keep
    ]
    return kept if len(kept) < len(members) else None


def _room(members: Sequence[Member], cap: int) -> list[Member] | None:
    """The members once there is room for one more under ``cap``, or None when only
    firing members fill it (the new one is refused). Makes room a tenth of the bound at a
    time: a mass outage's next new pods then find room without a scan each."""
    if cap <= 0 or len(members) < cap:
        return list(members)
    resolved = [i for i, m in enumerate(members) if m.status == "resolved"]
    if len(members) - len(resolved) >= cap:
        return None
    need = len(members) - (cap - max(1, cap // 10))
    oldest = sorted(resolved, key=lambda i: (members[i].last_seen, i))[:need]
    gone = set(oldest)
    return [m for i, m in enumerate(members) if i not in gone]


def _with_room(
    members: tuple[Member, ...], anomaly: Anomaly, cap: int
) -> tuple[Member, ...] | None:
    """``members``, with room made for ``anomaly`` when it would be a new member (see
    :func:`_room`); None when it is refused."""
    if any(m.fingerprint == anomaly.fingerprint for m in members):
        return members
    room = _room(members, cap)
    return tuple(room) if room is not None else None


def refuses(state: Incident | None, anomaly: Anomaly, rules: CorrelationRules) -> bool:
    """Whether :func:`correlate` refuses this anomaly: a new firing member of a live
    incident whose ``max_members`` are all firing."""
    return (
        rules.max_members > 0
        and state is not None
        and state.status != "resolved"
        and anomaly.status == "firing"
        and len(state.members) >= rules.max_members
        and all(m.fingerprint != anomaly.fingerprint for m in state.members)
        and sum(m.status == "firing" for m in state.members) >= rules.max_members
    )


def _live(members: Sequence[Member], status: IncidentStatus) -> IncidentStatus:
    """``status``, unless every firing member is suppressed (silenced or inhibited): then
    the incident is silenced."""
    # One pass that stops at the first loud firing member (nearly always an early one):
    # the fold asks this at every change of a group below TALLY_FROM members.
    firing = False
    for m in members:
        if m.status == "firing":
            if not (m.silenced_by or m.inhibited_by):  # Member.suppressed, without a call
                return status
            firing = True
    return "silenced" if firing else status


def _open(a: Anomaly, key: str, rules: CorrelationRules, marks: Marks) -> Incident:
    member = _member(a, marks)
    return Incident(
        # Deterministic: replaying the same anomaly after a crash opens the same incident.
        id=stable_id(key, a.fingerprint, a.observed_at.isoformat()),
        key=key,
        status=_live((member,), "open"),
        severity=a.severity,
        labels={k: a.labels.get(k, "") for k in rules.group_by},
        members=(member,),
        opened_at=a.observed_at,
        updated_at=a.observed_at,
    )


def correlate(
    state: Incident | None,
    anomaly: Anomaly,
    now: datetime,
    rules: CorrelationRules,
    key: str | None = None,
    silenced_by: str | None = None,
    marks: Marks = NO_MARKS,
) -> tuple[Incident | None, Incident | None]:
    """Fold one anomaly into the group's state; returns (new state, event to publish or None).

    ``key`` is the anomaly's group key when the caller already computed it (an absorbed
    anomaly's is its absorber's); ``silenced_by`` the id of a silence matching the anomaly
    and ``marks`` the rest of why it is suppressed or where it was absorbed (recorded on the
    member, never dropped).
    """
    key = key if key is not None else key_of(anomaly, rules)
    if silenced_by is not None:
        marks = replace(marks, silenced_by=silenced_by)
    firing = anomaly.status == "firing"
    if state is None:
        if not firing:
            return None, None  # a resolution for something never seen: nothing to resolve
        inc = _open(anomaly, key, rules, marks)
        return inc, inc
    if state.status == "resolved":
        if not firing:
            return state, None  # already resolved; a repeat resolution changes nothing
        assert state.resolved_at is not None
        known = next((m for m in state.members if m.fingerprint == anomaly.fingerprint), None)
        if known is not None and anomaly.observed_at <= known.last_seen:
            # A late copy: the incident knows this anomaly resolved at or after it fired.
            return state, None
        # Anything else is news, even when observed before the resolution (a pattern that
        # started in the slot another resolved, a one-shot Kubernetes event delivered
        # late): dropping it would lose it for good while it fires.
        if (anomaly.observed_at - state.resolved_at).total_seconds() > rules.reopen_window:
            inc = _open(anomaly, key, rules, marks)
            return inc, inc
        return _reopen(state, anomaly, rules, marks)
    return _update(state, anomaly, rules, marks)


def _reopen(
    state: Incident, anomaly: Anomaly, rules: CorrelationRules, marks: Marks
) -> tuple[Incident, Incident | None]:
    members = _with_room(state.members, anomaly, rules.max_members)
    if members is None:
        # Not reached: a resolved incident's members are all resolved. Refused rather
        # than asserted, so a state written otherwise cannot crash the fold for good.
        return state, None
    members = _upsert(members, anomaly, marks)
    changed_at = max(anomaly.observed_at, state.updated_at)
    kept = _retained(members, changed_at, anomaly.fingerprint, rules)
    members = tuple(kept) if kept is not None else members
    inc = replace(
        state,
        status=_live(members, "reopened"),
        members=members,
        severity=_severity(members),
        updated_at=changed_at,
        revision=state.revision + 1,
        resolved_at=None,
        absorbed_into=None,
    )
    return inc, inc


def _upsert(members: tuple[Member, ...], a: Anomaly, marks: Marks = NO_MARKS) -> tuple[Member, ...]:
    for i, m in enumerate(members):
        if m.fingerprint == a.fingerprint:
            updated = _with(m, a, marks.silenced_by, marks.inhibited_by, marks.absorbed_by)
            return (*members[:i], updated, *members[i + 1 :])
    return (*members, _member(a, marks))


def _unchanged(m: Member, a: Anomaly, marks: Marks) -> bool:
    """A repeat that only refreshes liveness: same status, severity and marks."""
    return (
        m.status == a.status
        and m.severity == a.severity
        and m.silenced_by == marks.silenced_by
        and m.inhibited_by == marks.inhibited_by
        and m.absorbed_by == marks.absorbed_by
    )


def _with(
    m: Member, a: Anomaly, silenced: str | None, inhibited: str | None, absorbed: str | None
) -> Member:
    """``m`` as last seen in ``a`` (identity, labels and first_seen stay). Built directly:
    dataclasses.replace costs several times more, and this runs for every repeat."""
    return new_member(
        m.fingerprint,
        m.name,
        m.source,
        a.severity,
        a.status,
        m.labels,
        m.first_seen,
        a.observed_at,
        a.value,
        silenced,
        inhibited,
        absorbed,
    )


def _update(
    state: Incident, anomaly: Anomaly, rules: CorrelationRules, marks: Marks
) -> tuple[Incident, Incident | None]:
    existing = next((m for m in state.members if m.fingerprint == anomaly.fingerprint), None)
    if existing is None and anomaly.status == "resolved":
        # A resolution of something this incident never held (e.g. one fanned out to both
        # a pod's own group and its absorber): nothing to resolve here.
        return state, None
    if existing is not None:
        if anomaly.observed_at < existing.last_seen:
            return state, None  # out of order: never move a member backwards
        if _unchanged(existing, anomaly, marks):
            # Dedup: refresh liveness silently; nothing an operator needs to hear about.
            refreshed = _upsert(state.members, anomaly, marks)
            return replace(state, members=refreshed), None
    members = _with_room(state.members, anomaly, rules.max_members)
    if members is None:
        return state, None  # refused (see refuses): the bound is all firing members
    members = _upsert(members, anomaly, marks)
    changed_at = max(anomaly.observed_at, state.updated_at)
    if all(m.status == "resolved" for m in members):
        inc = replace(
            state,
            status="resolved",
            members=members,
            severity=_severity(members),
            updated_at=changed_at,
            resolved_at=changed_at,
            revision=state.revision + 1,
        )
        return inc, inc
    kept = _retained(members, changed_at, anomaly.fingerprint, rules)
    members = tuple(kept) if kept is not None else members
    status = _live(members, "mitigating" if state.status == "mitigating" else "updated")
    inc = replace(
        state,
        status=status,
        members=members,
        severity=_severity(members),
        updated_at=changed_at,
        revision=state.revision + 1,
    )
    return inc, inc


def mark_mitigating(state: Incident, at: datetime) -> tuple[Incident, Incident | None]:
    """An action is in flight for this incident."""
    if state.status in ("resolved", "mitigating"):
        return state, None
    inc = replace(state, status="mitigating", updated_at=at, revision=state.revision + 1)
    return inc, inc


def hand_over(
    state: Incident, moved: Mapping[str, tuple[str, str]], at: datetime
) -> tuple[Incident, Incident | None]:
    """Members a node- or workload-level incident took in (fingerprint -> (how, absorbing
    incident id)) leave this one: they stay as members, resolved here and marked with where
    they went, so each anomaly is firing in one incident only. When no firing member is
    left, the incident resolves with ``absorbed_into`` naming where its anomalies went."""
    if state.status == "resolved" or not moved:
        return state, None
    members = tuple(
        replace(m, status="resolved", absorbed_by=moved[m.fingerprint][0])
        if m.fingerprint in moved
        else m
        for m in state.members
    )
    at = max(at, state.updated_at)
    if any(m.status == "firing" for m in members):
        inc = replace(
            state,
            status=_live(members, "mitigating" if state.status == "mitigating" else "updated"),
            members=members,
            severity=_severity(members),
            updated_at=at,
            revision=state.revision + 1,
        )
        return inc, inc
    inc = replace(
        state,
        status="resolved",
        members=members,
        # Of all members now, as when the last member or resolve_timeout resolves it.
        severity=_severity(members),
        updated_at=at,
        resolved_at=at,
        absorbed_into=next(iter(moved.values()))[1],
        revision=state.revision + 1,
    )
    return inc, inc


@dataclass(frozen=True, slots=True)
class Blindness:
    """A source that could not see in a cluster (Prometheus unreachable): blind from
    ``since`` (None: not known) until ``until`` (None: still blind)."""

    since: datetime | None = None
    until: datetime | None = None


# (source, cluster) -> the last blindness to every anomaly of the source there;
# (source, cluster, name) -> to those of that name only (a pattern whose query fails). The
# cluster is the blind detector's: it covers what it observed (agent.models.observer),
# whichever cluster its series name.
Blind = Mapping[tuple[str, ...], Blindness]
NOT_BLIND: Blind = {}


def _alive_at(m: Member, blind: Blind, timeout: timedelta, now: datetime) -> datetime:
    """When a member was last known to be alive: its last sighting, unless its source (or
    the source for its name) went blind before the member would have gone quiet. A blind
    source cannot repeat what still fires, so its silence is no news: the member counts as
    alive until the source sees again (now, while it is still blind)."""
    if m.status != "firing":
        return m.last_seen
    cluster = observer(m.labels)  # the blindness is its observer's, not its series'
    alive = m.last_seen
    for where in ((m.source, cluster), (m.source, cluster, m.name)):
        b = blind.get(where)
        if b is None or (b.since is not None and b.since >= m.last_seen + timeout):
            continue
        alive = max(alive, now if b.until is None else b.until)
    return alive


def expire(
    state: Incident, now: datetime, rules: CorrelationRules, blind: Blind = NOT_BLIND
) -> tuple[Incident, Incident | None]:
    """Resolve an incident none of whose members has been seen for ``resolve_timeout``,
    counting a member whose source was blind as alive until the source saw again."""
    if state.status == "resolved":
        return state, None
    timeout = timedelta(seconds=rules.resolve_timeout)
    last = max(m.last_seen for m in state.members)
    if now - last < timeout:
        return state, None
    if blind:  # only ever later: looked at when the incident would resolve without it
        last = max(_alive_at(m, blind, timeout, now) for m in state.members)
        if now - last < timeout:
            return state, None
    resolved_at = last + timeout
    members = tuple(replace(m, status="resolved") for m in state.members)
    inc = replace(
        state,
        status="resolved",
        members=members,
        severity=_severity(members),
        updated_at=resolved_at,
        resolved_at=resolved_at,
        revision=state.revision + 1,
    )
    return inc, inc


def silenced_by(anomaly: Anomaly, silences: Iterable[Silence]) -> str | None:
    """The first silence active at the anomaly's observation time whose matchers match its
    :func:`match_labels`, as inhibition rules' do."""
    labels = None
    for s in silences:
        if not s.active(anomaly.observed_at):
            continue
        if labels is None:  # built once, and only when a silence is active
            labels = match_labels(anomaly)
        if s.matches(labels, anomaly.observed_at):
            return s.id
    return None


# A group keeps tallies of its members from this size on (see _Group._count).
TALLY_FROM = 64

# group key -> (incident id, revision, fingerprint -> position of its member) of the
# group's state at the end of a batch, kept by the caller for the next (see correlate_batch).
Positions = dict[str, tuple[str, int, dict[str, int]]]


class _Refused(Exception):  # control flow inside this module, not an AgentError
    """The anomaly would exceed the group's ``max_members`` (see :func:`refuses`)."""


class _Group:
    """One group's state while a batch is folded: the incident, with its members in a list
    indexed by fingerprint, so a repeat costs a dict lookup and one new Member instead of a
    scan and copies of the member tuple and the incident. Local to :func:`correlate_batch`,
    which returns only frozen incidents; it must fold as :func:`correlate` does one anomaly
    at a time, its events coalesced (tests/unit/test_correlation.py holds it to that).

    An "updated" revision is built only when the batch is done with it: a later change of
    the same incident in the batch supersedes its event (see :func:`coalesce`), and most
    changes are updates, so building each was most of the cost of a change. Its event
    keeps its place in ``events`` and shows the incident as the batch left it.
    """

    __slots__ = (
        "absorbed_into",
        "counted",
        "dirty",
        "events",
        "firing",
        "floor",
        "floored",
        "fresh",
        "inc",
        "index",
        "loud",
        "members",
        "pending",
        "ranks",
        "resolved_at",
        "revision",
        "severity",
        "status",
        "updated_at",
    )

    def __init__(
        self,
        inc: Incident | None,
        events: list[Incident | None],
        known: dict[str, int] | None = None,
    ) -> None:
        self.events = events  # the batch's events, shared by its groups
        self.pending: int | None = None  # where in events this incident's update goes
        self._load(inc, known)
        self.dirty = False  # differs from the state the batch started with

    def _load(self, inc: Incident | None, known: dict[str, int] | None = None) -> None:
        self.inc = inc
        if inc is not None:
            # The current revision's own fields; self.inc is built from them when due.
            self.status: IncidentStatus = inc.status
            self.updated_at = inc.updated_at
            self.revision = inc.revision
            self.resolved_at = inc.resolved_at
            self.absorbed_into = inc.absorbed_into
            self.severity: Severity | None = inc.severity  # None: to be found from members
        self.members: list[Member] = list(inc.members) if inc is not None else []
        # The positions the last batch left for this very revision: building them anew
        # was a third of a small batch.
        self.index = known if known is not None and self._holds(known) else self._positions()
        self.fresh = True  # self.inc is the current revision, with the members list
        # Tallies are kept only for a large group (see _count), from its first change on.
        self.counted = False
        # A lower bound of resolved members' last_seen (None: no resolved member), found
        # at the first retention check and then kept up by upsert: retention need not scan
        # the members at each change while nothing resolved is older than its horizon.
        self.floor: datetime | None = None
        self.floored = False

    def _count(self) -> None:
        """Tallies that answer severity, "all resolved" and "all suppressed" without a scan
        of the members. Each change scanned them all, so a mass outage (thousands of new
        pods in one group) folded in quadratic time; below ``TALLY_FROM`` members the scans
        are cheaper than keeping tallies, and nearly every group is that small."""
        self.counted = True
        self.firing = 0  # firing members
        self.loud = 0  # firing members not suppressed
        # members per severity rank: [firing ranks..., all members' ranks...]
        self.ranks = [0] * (2 * len(SEVERITY_RANK))
        for m in self.members:
            self._tally(m, 1)

    def _tally(self, m: Member, sign: int) -> None:
        rank = SEVERITY_RANK[m.severity]
        self.ranks[len(SEVERITY_RANK) + rank] += sign
        if m.status == "firing":
            self.firing += sign
            self.ranks[rank] += sign
            if not m.suppressed:
                self.loud += sign

    def _severity(self) -> Severity:
        """:func:`_severity` of the members."""
        if not self.counted:
            return _severity(self.members)
        n = len(SEVERITY_RANK)
        ranks = self.ranks[:n] if self.firing else self.ranks[n:]
        for rank in range(n - 1, 0, -1):
            if ranks[rank]:
                return RANKED[rank]
        return RANKED[0]

    def _live(self, status: IncidentStatus, loud: bool = False) -> IncidentStatus:
        """:func:`_live` of the members. ``loud``: the change just made a member firing and
        not suppressed, so the incident is not silenced, known without a scan."""
        if loud:
            return status
        if not self.counted:
            return _live(self.members, status)
        return "silenced" if self.firing and not self.loud else status

    def _all_resolved(self) -> bool:
        if self.counted:
            return not self.firing
        return all(m.status == "resolved" for m in self.members)

    def _positions(self) -> dict[str, int]:
        return {m.fingerprint: i for i, m in enumerate(self.members)}

    def _holds(self, index: dict[str, int]) -> bool:
        """A sanity check of remembered positions: as many entries as members, and the
        last member where it says."""
        members = self.members
        return len(index) == len(members) and (
            not members or index.get(members[-1].fingerprint) == len(members) - 1
        )

    def reset(self, inc: Incident) -> None:
        """A new incident replaces the group's state; its opening is an event."""
        self._settle()
        self._load(inc)
        self.dirty = True
        self.events.append(inc)

    def _floor(self) -> datetime | None:
        if not self.floored:
            resolved = [m.last_seen for m in self.members if m.status == "resolved"]
            self.floor = min(resolved) if resolved else None
            self.floored = True
        return self.floor

    def retain(self, at: datetime, keep: str, rules: CorrelationRules) -> None:
        """Drop what an open incident no longer keeps (see :func:`_retained`)."""
        if rules.member_retention <= 0:
            return
        floor = self._floor()
        if floor is None or floor >= at - timedelta(seconds=rules.member_retention):
            return  # nothing resolved is old enough to drop
        kept = _retained(self.members, at, keep, rules)
        if kept is not None:
            self.members = kept
            self.index = self._positions()  # a new dict: the memo of positions moves on
        self.floored = False  # the bound was low: find the exact one of what is kept
        if self.counted:
            self._count()  # the tallies of what is kept

    def make_room(self, cap: int) -> None:
        """Room for one more member under ``cap`` (see :func:`_room`), or _Refused."""
        if cap <= 0 or len(self.members) < cap:
            return
        if self.counted and self.firing >= cap:
            raise _Refused  # known without a scan: a mass outage refuses pods at this rate
        room = _room(self.members, cap)
        if room is None:
            raise _Refused
        self.members = room
        self.index = self._positions()
        if self.counted:
            self._count()
        self.fresh = False
        self.dirty = True

    def upsert(self, a: Anomaly, marks: Marks, i: int | None) -> None:
        """Write ``a`` as its member at ``i``, its position, which the caller looked up
        (making room moves members, never one of this fingerprint)."""
        if not self.counted and len(self.members) >= TALLY_FROM:
            self._count()  # before the change, which the tallies then follow
        if i is None:
            self.index[a.fingerprint] = len(self.members)
            new = _member(a, marks)
            self.members.append(new)
        else:
            m = self.members[i]
            new = self.members[i] = _with(
                m, a, marks.silenced_by, marks.inhibited_by, marks.absorbed_by
            )
            if self.counted:
                self._tally(m, -1)
        if self.counted:
            self._tally(new, 1)
        if (
            self.floored
            and new.status == "resolved"
            and (self.floor is None or new.last_seen < self.floor)
        ):
            self.floor = new.last_seen
        self.fresh = False
        self.dirty = True

    def _build(self) -> Incident:
        """The current revision, with the current members. Built directly, as :func:`_with`
        is: dataclasses.replace costs several times more."""
        inc = self.inc
        assert inc is not None
        if self.severity is None:
            self.severity = self._severity()
        self.inc = new_incident(
            inc.id,
            inc.key,
            self.status,
            self.severity,
            inc.labels,
            tuple(self.members),
            inc.opened_at,
            self.updated_at,
            self.revision,
            self.resolved_at,
            self.absorbed_into,
            inc.schema_version,
            0,
        )
        self.fresh = True
        return self.inc

    def _settle(self) -> None:
        """Give the pending update its event: the incident as it stands now."""
        if self.pending is not None:
            self.events[self.pending] = self.result()
            self.pending = None

    def change(
        self,
        status: IncidentStatus,
        updated_at: datetime,
        resolved_at: datetime | None,
        absorbed_into: str | None,
    ) -> None:
        """A transition: the next revision, with the current members, and its event."""
        self.status = status
        self.updated_at = updated_at
        self.resolved_at = resolved_at
        self.absorbed_into = absorbed_into
        self.revision += 1
        self.severity = None
        self.fresh = False
        if self.pending is not None:
            self.events[self.pending] = None  # superseded by this one (see coalesce)
            self.pending = None
        if status == "updated":
            self.pending = len(self.events)
            self.events.append(None)  # its place; filled once the batch is done with it
        else:
            self.events.append(self._build())

    def result(self) -> Incident | None:
        """The group's current state (members refreshed since the last transition
        included; a refresh changes only liveness, nothing an event announces)."""
        return self.inc if self.fresh else self._build()

    def fold(self, a: Anomaly, key: str, rules: CorrelationRules, marks: Marks) -> None:
        """:func:`correlate`, in place; its event goes to ``events``."""
        firing = a.status == "firing"
        if self.inc is None:
            if firing:
                self.reset(_open(a, key, rules, marks))
            return
        i = self.index.get(a.fingerprint)
        known = self.members[i] if i is not None else None
        if self.status == "resolved":
            resolved_at = self.resolved_at
            assert resolved_at is not None
            if not firing or (known is not None and a.observed_at <= known.last_seen):
                return  # as in correlate: only a copy the incident knows resolved is late
            if (a.observed_at - resolved_at).total_seconds() > rules.reopen_window:
                self.reset(_open(a, key, rules, marks))
                return
            if known is None:
                self.make_room(rules.max_members)  # all members are resolved: room is made
            self.upsert(a, marks, i)
            changed_at = max(a.observed_at, self.updated_at)
            self.retain(changed_at, a.fingerprint, rules)
            loud = not (marks.silenced_by or marks.inhibited_by)
            self.change(self._live("reopened", loud), changed_at, None, None)
            return
        if known is None and not firing:
            return
        if known is not None:
            if a.observed_at < known.last_seen:
                return
            if _unchanged(known, a, marks):
                assert i is not None
                # _with(known, a, <its own marks>), without the call: nearly every repeat
                # comes here.
                self.members[i] = new_member(
                    known.fingerprint,
                    known.name,
                    known.source,
                    a.severity,
                    a.status,
                    known.labels,
                    known.first_seen,
                    a.observed_at,
                    a.value,
                    known.silenced_by,
                    known.inhibited_by,
                    known.absorbed_by,
                )
                self.fresh = False
                self.dirty = True
                return
        else:
            self.make_room(rules.max_members)
        self.upsert(a, marks, i)
        changed_at = max(a.observed_at, self.updated_at)
        # A firing member was just written: not all resolved, and when it is not
        # suppressed, not silenced either, both known without a scan of the members.
        if not firing and self._all_resolved():
            self.change("resolved", changed_at, changed_at, self.absorbed_into)
            return
        self.retain(changed_at, a.fingerprint, rules)
        loud = firing and not (marks.silenced_by or marks.inhibited_by)
        status = self._live("mitigating" if self.status == "mitigating" else "updated", loud)
        self.change(status, changed_at, self.resolved_at, self.absorbed_into)


def correlate_batch(
    states: dict[str, Incident | None],
    anomalies: Iterable[Anomaly] | Iterable[tuple[str, Anomaly]] | Iterable[Keyed],
    now: datetime,
    rules: CorrelationRules,
    silences: Sequence[Silence] = (),
    positions: Positions | None = None,
    refused: list[Keyed] | None = None,
) -> tuple[dict[str, Incident | None], list[Incident]]:
    """Fold a batch; returns only the states that changed and the events in order.

    The result of :func:`correlate` one anomaly at a time, its events coalesced (see
    :func:`coalesce`), at a fraction of the cost. An "updated" event shows its incident as
    the batch left it: the revision it announces, with the liveness of its members as of
    the end of the batch (a refresh changes nothing else), so it is the stored state.
    ``anomalies`` are anomalies, or (group key, anomaly) pairs when the caller has the keys,
    or (group key, anomaly, marks) triples when the caller decided topology and inhibition.
    Anomalies matching one of ``silences`` are folded as silenced members.
    Callers read the current state of every key in the batch into ``states`` once and write
    back the changed ones once, which is what keeps the stream hot path batched.
    ``positions``: a memo the caller keeps from batch to batch; an entry is used only for
    the revision it was made for, so the result never depends on it.
    ``refused``: gets the anomalies :func:`refuses` (the group is full), for the caller to
    record; they change nothing.
    """
    del now  # correlation depends on event time only
    groups: dict[str, _Group] = {}
    events: list[Incident | None] = []
    for item in anomalies:
        marks = NO_MARKS
        if isinstance(item, Anomaly):
            k, a = key_of(item, rules), item
        elif len(item) == 3:
            k, a, marks = item
        else:
            k, a = item
        if silences and (silence := silenced_by(a, silences)) is not None:
            marks = replace(marks, silenced_by=silence)
        g = groups.get(k)
        if g is None:
            inc = states.get(k)
            memo = positions.get(k) if positions is not None else None
            known = (
                memo[2]
                if memo is not None and inc is not None and memo[:2] == (inc.id, inc.revision)
                else None
            )
            g = groups[k] = _Group(inc, events, known)
        try:
            g.fold(a, k, rules, marks)
        except _Refused:
            if refused is not None:
                refused.append((k, a, marks))
    changed: dict[str, Incident | None] = {}
    for k, g in groups.items():
        if g.dirty:
            changed[k] = g.result()
            g._settle()  # the same object as the state: encoded once, for both
        if positions is not None and g.inc is not None:
            positions[k] = (g.inc.id, g.inc.revision, g.index)
    return changed, [e for e in events if e is not None]


def coalesce(events: Sequence[Incident]) -> list[Incident]:
    """Drop an "updated" event when a later event of the same incident in the same batch
    supersedes it; every other transition (open, mitigating, resolved, reopened) is kept,
    so subscribers see each lifecycle step and the final state of every incident. The rule
    :func:`correlate_batch` applies as it folds (the tests hold it to this function)."""
    last_index = {e.id: i for i, e in enumerate(events)}
    return [e for i, e in enumerate(events) if e.status != "updated" or last_index[e.id] == i]


HELD_STATUSES = frozenset({"open", "updated"})
# What a never-published incident's first event says "open" for: an incident that
# resolved unpublished and reopened is news to every subscriber.
FIRST_STATUSES = frozenset({"open", "updated", "reopened"})
# What a never-published incident waits group_wait in: one opened by a silenced anomaly
# too (its first event says "silenced" if it still is), or a loud anomaly joining it a
# moment later waited group_interval as the update of a published incident.
WAITING_STATUSES = FIRST_STATUSES | {"silenced"}


def publish_due(
    incident: Incident, emitted_at: datetime | None, now: datetime, rules: CorrelationRules
) -> bool:
    """Whether an incident's current state goes out now (else the timer sends it later).

    Transitions other than open/updated go out at once. A never-published incident waits
    ``group_wait`` from its opening, a reopened or silenced one too (to its subscribers
    it opens now, see :func:`as_published`); a published one ``group_interval`` from the
    last time.
    """
    if emitted_at is None and incident.status in WAITING_STATUSES:
        return (now - incident.opened_at).total_seconds() >= rules.group_wait
    if incident.status not in HELD_STATUSES:
        return True
    return emitted_at is None or (now - emitted_at).total_seconds() >= rules.group_interval


def repeat_due(
    incident: Incident, emitted_at: datetime | None, now: datetime, rules: CorrelationRules
) -> bool:
    """An unchanged, still-open incident is re-published every ``repeat_interval``."""
    return (
        rules.repeat_interval > 0
        and emitted_at is not None
        and incident.status != "resolved"
        and (now - emitted_at).total_seconds() >= rules.repeat_interval
    )


def as_published(incident: Incident, emitted_at: datetime | None) -> Incident:
    """The first event of an incident says "open", even if updates joined while held, or
    it resolved and reopened before anyone was told."""
    if emitted_at is None and incident.status in FIRST_STATUSES - {"open"}:
        return replace(incident, status="open")
    return incident


def release(
    event: Incident, emitted_at: datetime | None, now: datetime, rules: CorrelationRules
) -> tuple[Incident | None, datetime | None, bool]:
    """What becomes of an incident's new state: (the event to publish now or None,
    when the incident was last published, whether a state is held back for the timer).
    ``emitted_at`` is this incident's, never an earlier incident's of the same group.
    An incident never published that resolves is not published at all, as Alertmanager
    sends nothing for a group resolved within group_wait: nobody was told it opened."""
    if emitted_at is None and event.status == "resolved":
        return None, None, False
    if publish_due(event, emitted_at, now, rules):
        return as_published(event, emitted_at), now, False
    return None, emitted_at, True


def for_event(incident: Incident, limit: int) -> Incident:
    """The incident as its event shows it: at most ``limit`` members, those firing and not
    suppressed first, then the most recently seen, kept in their incident order; the rest
    are counted in ``omitted_members``. Alertmanager's webhook ``max_alerts`` does the
    same: a mass outage's thousands of members would not fit in a Kafka record."""
    members = incident.members
    if len(members) <= limit:
        return incident

    def rank(i: int) -> tuple[bool, bool, float, int]:
        m = members[i]
        return (m.status != "firing", m.suppressed, -m.last_seen.timestamp(), i)

    shown = sorted(heapq.nsmallest(limit, range(len(members)), key=rank))
    return replace(
        incident,
        members=tuple(members[i] for i in shown),
        omitted_members=len(members) - len(shown),
    )


# How far ahead of the correlator's clock an observation may be: the clocks of detectors and
# feed producers drift by seconds, not this. Beyond it the observation would make every
# later real one of its fingerprint look stale, so its incident would never resolve.
MAX_AHEAD = 600.0


def earliness(anomaly: Anomaly, now: datetime) -> float | None:
    """Seconds the anomaly was observed ahead of ``now`` when beyond MAX_AHEAD, else None."""
    ahead = (anomaly.observed_at - now).total_seconds()
    return ahead if ahead > MAX_AHEAD else None


def lateness(anomaly: Anomaly, now: datetime, rules: CorrelationRules) -> float | None:
    """Seconds past the bound when the anomaly is too old to fold in, else None."""
    if rules.late_bound <= 0:
        return None
    age = (now - anomaly.observed_at).total_seconds()
    return age if age > rules.late_bound else None


# service -> partition -> (resolved_at, seconds open) of the last resolution there.
Resolutions = Mapping[str, Mapping[int, tuple[datetime, float]]]


def note_resolutions(
    resolutions: Resolutions, resolved: Iterable[tuple[Incident, int]]
) -> dict[str, dict[int, tuple[datetime, float]]]:
    """``resolutions`` with those of the ``resolved`` incidents (each with its partition);
    one earlier than its partition's last (a re-published state) changes nothing."""
    out = {s: dict(parts) for s, parts in resolutions.items()}
    for incident, partition in resolved:
        if incident.resolved_at is None:
            continue
        seconds = (incident.resolved_at - incident.opened_at).total_seconds()
        parts = out.setdefault(incident.labels.get("service", ""), {})
        held = parts.get(partition)
        if held is None or held[0] <= incident.resolved_at:
            parts[partition] = (incident.resolved_at, seconds)
    return out


def owned_resolutions(
    resolutions: Resolutions, owned: Iterable[int]
) -> dict[str, dict[int, tuple[datetime, float]]]:
    """Only the resolutions on ``owned`` partitions: a worker that lost a partition no
    longer speaks for its services."""
    keep = set(owned)
    out = {s: {p: e for p, e in parts.items() if p in keep} for s, parts in resolutions.items()}
    return {s: parts for s, parts in out.items() if parts}


def last_resolutions(resolutions: Resolutions) -> dict[str, float]:
    """Each service's MTTR gauge value: how long its latest resolution took."""
    return {s: max(parts.values())[1] for s, parts in resolutions.items() if parts}
