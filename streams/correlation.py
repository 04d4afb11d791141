"""Pure correlation: (incident state, anomaly, now) -> (new state, incident events).

No clock reads and no I/O here, so the same inputs always give the same outputs; the faust
agent in :mod:`streams.correlator` only feeds batches through these functions and writes
the results to its changelogged table and the incidents topic.

Rules:
- Anomalies group by ``group_by`` labels into one incident per group at a time.
- Dedup by fingerprint: a repeat of a known anomaly refreshes ``last_seen`` but emits
  nothing unless its status changed, so re-delivery and duplicate detectors are harmless.
- An observation older than what the incident already knows of that fingerprint cannot
  move it backwards (out-of-order delivery).
- The incident resolves when every member is resolved, or when no member has been seen for
  ``resolve_timeout`` (see :func:`expire`); a firing anomaly within ``reopen_window`` of the
  resolution reopens the same incident, later ones open a new one.
- Severity is the maximum of the firing members (of all members once resolved).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def key_of(anomaly: Anomaly, rules: CorrelationRules) -> str:
    return group_key(anomaly.labels, rules.group_by)


def _max_severity(members: Iterable[Member]) -> Severity:
    best: Severity = "info"
    for m in members:
        if SEVERITY_RANK[m.severity] > SEVERITY_RANK[best]:
            best = m.severity
    return best


def _severity(members: Sequence[Member]) -> Severity:
    firing = [m for m in members if m.status == "firing"]
    return _max_severity(firing or members)


def _member(a: Anomaly, silenced_by: str | None = None) -> Member:
    return Member(
        fingerprint=a.fingerprint,
        name=a.name,
        source=a.source,
        severity=a.severity,
        status=a.status,
        labels=a.labels,
        first_seen=a.starts_at,
        last_seen=a.observed_at,
        value=a.value,
        silenced_by=silenced_by,
    )


def _live(members: Sequence[Member], status: IncidentStatus) -> IncidentStatus:
    """``status``, unless every firing member is silenced: then the incident is silenced."""
    firing = [m for m in members if m.status == "firing"]
    if firing and all(m.silenced_by for m in firing):
        return "silenced"
    return status


def _open(a: Anomaly, key: str, rules: CorrelationRules, silenced_by: str | None) -> Incident:
    member = _member(a, silenced_by)
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
) -> tuple[Incident | None, Incident | None]:
    """Fold one anomaly into the group's state; returns (new state, event to publish or None).

    ``key`` is the anomaly's group key when the caller already computed it; ``silenced_by``
    the id of a silence matching the anomaly (it is recorded, not dropped).
    """
    key = key if key is not None else key_of(anomaly, rules)
    firing = anomaly.status == "firing"
    if state is None:
        if not firing:
            return None, None  # a resolution for something never seen: nothing to resolve
        inc = _open(anomaly, key, rules, silenced_by)
        return inc, inc
    if state.status == "resolved":
        if not firing:
            return state, None  # already resolved; a repeat resolution changes nothing
        assert state.resolved_at is not None
        if anomaly.observed_at <= state.resolved_at:
            return state, None  # a late copy of something that was already resolved
        known = next((m for m in state.members if m.fingerprint == anomaly.fingerprint), None)
        if known is not None and anomaly.observed_at < known.last_seen:
            return state, None  # older than what we know of this member: never move back
        if (anomaly.observed_at - state.resolved_at).total_seconds() > rules.reopen_window:
            inc = _open(anomaly, key, rules, silenced_by)
            return inc, inc
        return _reopen(state, anomaly, now, silenced_by)
    return _update(state, anomaly, now, silenced_by)


def _reopen(
    state: Incident, anomaly: Anomaly, now: datetime, silenced_by: str | None
) -> tuple[Incident, Incident]:
    members = _upsert(state.members, anomaly, silenced_by)
    inc = replace(
        state,
        status=_live(members, "reopened"),
        members=members,
        severity=_severity(members),
        updated_at=max(anomaly.observed_at, state.updated_at),
        revision=state.revision + 1,
        resolved_at=None,
    )
    return inc, inc


def _upsert(
    members: tuple[Member, ...], a: Anomaly, silenced_by: str | None = None
) -> tuple[Member, ...]:
    for i, m in enumerate(members):
        if m.fingerprint == a.fingerprint:
            updated = replace(
                m,
                status=a.status,
                last_seen=a.observed_at,
                value=a.value,
                severity=a.severity,
                silenced_by=silenced_by,
            )
            return (*members[:i], updated, *members[i + 1 :])
    return (*members, _member(a, silenced_by))


def _update(
    state: Incident, anomaly: Anomaly, now: datetime, silenced_by: str | None
) -> tuple[Incident, Incident | None]:
    existing = next((m for m in state.members if m.fingerprint == anomaly.fingerprint), None)
    if existing is not None:
        if anomaly.observed_at < existing.last_seen:
            return state, None  # out of order: never move a member backwards
        if existing.status == anomaly.status and existing.silenced_by == silenced_by:
            # Dedup: refresh liveness silently; nothing an operator needs to hear about.
            refreshed = _upsert(state.members, anomaly, silenced_by)
            return replace(state, members=refreshed), None
    members = _upsert(state.members, anomaly, silenced_by)
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


def expire(
    state: Incident, now: datetime, rules: CorrelationRules
) -> tuple[Incident, Incident | None]:
    """Resolve an incident none of whose members has been seen for ``resolve_timeout``."""
    if state.status == "resolved":
        return state, None
    last = max(m.last_seen for m in state.members)
    if now - last < timedelta(seconds=rules.resolve_timeout):
        return state, None
    resolved_at = last + timedelta(seconds=rules.resolve_timeout)
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
    """The first silence active at the anomaly's observation time whose matchers match."""
    for s in silences:
        if s.matches(anomaly.labels, anomaly.observed_at):
            return s.id
    return None


def correlate_batch(
    states: dict[str, Incident | None],
    anomalies: Iterable[Anomaly] | Iterable[tuple[str, Anomaly]],
    now: datetime,
    rules: CorrelationRules,
    silences: Sequence[Silence] = (),
) -> tuple[dict[str, Incident | None], list[Incident]]:
    """Fold a batch; returns only the states that changed and the events in order.

    ``anomalies`` are anomalies, or (group key, anomaly) pairs when the caller has the keys.
    Anomalies matching one of ``silences`` are folded as silenced members.
    Callers read the current state of every key in the batch into ``states`` once and write
    back the changed ones once, which is what keeps the stream hot path batched.
    """
    changed: dict[str, Incident | None] = {}
    events: list[Incident] = []
    for item in anomalies:
        k, a = item if isinstance(item, tuple) else (key_of(item, rules), item)
        current = changed[k] if k in changed else states.get(k)
        new, event = correlate(
            current,
            a,
            now,
            rules,
            key=k,
            silenced_by=silenced_by(a, silences) if silences else None,
        )
        if new is not current:
            changed[k] = new
        if event is not None:
            events.append(event)
    return changed, events


def coalesce(events: Sequence[Incident]) -> list[Incident]:
    """Drop an "updated" event when a later event of the same incident in the same batch
    supersedes it; every other transition (open, mitigating, resolved, reopened) is kept,
    so subscribers see each lifecycle step and the final state of every incident."""
    last_index = {e.id: i for i, e in enumerate(events)}
    return [e for i, e in enumerate(events) if e.status != "updated" or last_index[e.id] == i]


HELD_STATUSES = frozenset({"open", "updated"})


def publish_due(
    incident: Incident, emitted_at: datetime | None, now: datetime, rules: CorrelationRules
) -> bool:
    """Whether an incident's current state goes out now (else the timer sends it later).

    Transitions other than open/updated go out at once. A never-published incident waits
    ``group_wait`` from its opening; a published one ``group_interval`` from the last time.
    """
    if incident.status not in HELD_STATUSES:
        return True
    if emitted_at is None:
        return (now - incident.opened_at).total_seconds() >= rules.group_wait
    return (now - emitted_at).total_seconds() >= rules.group_interval


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
    """The first event of an incident says "open", even if updates joined while held."""
    if emitted_at is None and incident.status == "updated":
        return replace(incident, status="open")
    return incident


def lateness(anomaly: Anomaly, now: datetime, rules: CorrelationRules) -> float | None:
    """Seconds past the bound when the anomaly is too old to fold in, else None."""
    if rules.late_bound <= 0:
        return None
    age = (now - anomaly.observed_at).total_seconds()
    return age if age > rules.late_bound else None
