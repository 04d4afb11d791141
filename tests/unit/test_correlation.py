"""Pure correlation: dedup, ordering, resolution, reopening, expiry, severity, batching."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.models import (
    SEVERITY_RANK,
    Anomaly,
    AnomalyStatus,
    Incident,
    Matcher,
    Member,
    Severity,
    Silence,
    fingerprint,
)
from streams import correlation
from streams.correlation import (
    NO_MARKS,
    Blindness,
    CorrelationRules,
    Keyed,
    Marks,
    Positions,
    coalesce,
    correlate,
    correlate_batch,
    earliness,
    expire,
    for_event,
    key_of,
    mark_mitigating,
    match_labels,
    refuses,
)
from tests.fakes.incidents import OPENED, incident, member
from tests.unit.factories import SHOP, anomaly, at

RULES = CorrelationRules(resolve_timeout=300.0, reopen_window=300.0)
NOW = at(100_000)  # correlation must not depend on it
CHECKOUT = {"cluster": "c1", "namespace": "shop", "service": "checkout"}
CART = {"cluster": "c1", "namespace": "shop", "service": "cart"}
# Like the detector: a pattern's severity is fixed, so one fingerprint has one severity.
PATTERNS: dict[str, Severity] = {"errors": "critical", "latency": "warning", "restarts": "info"}

States = dict[str, Incident | None]


def fold(
    anomalies: Iterable[Anomaly],
    states: States | None = None,
    rules: CorrelationRules = RULES,
    trail: dict[str, Incident] | None = None,
) -> tuple[States, list[Incident]]:
    """The reference semantics: one correlate() call per anomaly, in order. ``trail``
    gets the last state of each incident (see :func:`as_batch`)."""
    states = dict(states or {})
    events: list[Incident] = []
    for a in anomalies:
        k = key_of(a, rules)
        new, event = correlate(states.get(k), a, NOW, rules)
        if new is not None or k in states:
            states[k] = new
        if new is not None and trail is not None:
            trail[new.id] = new
        if event is not None:
            events.append(event)
    return states, events


def as_batch(events: list[Incident], trail: dict[str, Incident]) -> list[Incident]:
    """The events correlate_batch reports for the same fold: coalesced, each "updated"
    one showing its incident as the batch left it (its last state in ``trail``)."""
    out = []
    for e in coalesce(events):
        if e.status == "updated":
            last = trail[e.id]
            assert last.revision == e.revision  # later, only members' liveness moved
            e = last
        out.append(e)
    return out


def fold_batch(
    anomalies: Iterable[Anomaly], states: States | None = None, rules: CorrelationRules = RULES
) -> tuple[States, list[Incident]]:
    """What correlate_batch must return for the same anomalies, by the reference fold."""
    trail: dict[str, Incident] = {}
    states, events = fold(anomalies, states, rules, trail)
    return states, as_batch(events, trail)


def steps(
    xs: Iterable[Anomaly], rules: CorrelationRules
) -> Iterator[tuple[Anomaly, Incident | None, Incident | None, Incident | None]]:
    """fold(), one anomaly at a time: (anomaly, its group's state before, after, event)."""
    states: States = {}
    for a in xs:
        k = key_of(a, rules)
        old = states.get(k)
        new, event = correlate(old, a, NOW, rules)
        states[k] = new
        yield a, old, new, event


def one(*anomalies: Anomaly) -> tuple[Incident | None, list[Incident]]:
    states, events = fold(anomalies)
    (key,) = {key_of(a, RULES) for a in anomalies}
    return states.get(key), events


def _expected_severity(inc: Incident) -> Severity:
    pool = inc.firing or inc.members
    return max((m.severity for m in pool), key=lambda s: SEVERITY_RANK[s])


# --- strategies ----------------------------------------------------------------------------------


_NAMES = sorted(PATTERNS)
_STATUSES: tuple[AnomalyStatus, ...] = ("firing", "resolved")
_SHAPES = len(_NAMES) * len(_STATUSES) * 2


@functools.cache
def _decode(n: int) -> Anomaly:
    # One integer per anomaly keeps generation cheap: (time, name, status, service).
    t, shape = divmod(n, _SHAPES)
    name = _NAMES[shape % len(_NAMES)]
    status = _STATUSES[shape // len(_NAMES) % 2]
    labels = CHECKOUT if shape < _SHAPES // 2 else CART
    value = (0.1, 0.5, 2.0)[t % 3]
    return anomaly(name, severity=PATTERNS[name], status=status, labels=labels, t=t, value=value)


def anomalies(max_t: int = 2000) -> st.SearchStrategy[Anomaly]:
    return st.integers(min_value=0, max_value=(max_t + 1) * _SHAPES - 1).map(_decode)


streams = st.lists(anomalies(), max_size=20)
# Mostly in time order, as a detector publishes them, with occasional stragglers.
ordered_streams = streams.map(lambda xs: sorted(xs, key=lambda a: a.observed_at))


# --- examples ------------------------------------------------------------------------------------


def test_an_observation_far_ahead_of_the_clock_is_refused_skew_is_not() -> None:
    # An observed_at far in the future would make every later real observation of the
    # fingerprint look stale: the incident would never resolve.
    assert earliness(anomaly(t=600), at(0)) is None  # clock skew
    assert earliness(anomaly(t=-3600), at(0)) is None
    assert earliness(anomaly(t=86400), at(0)) == 86400


def test_first_firing_anomaly_opens_an_incident() -> None:
    a = anomaly("errors", t=10, value=0.3)
    state, events = one(a)
    assert events == [state]
    assert state is not None
    assert state.status == "open"
    assert state.key == "c1/shop/checkout"
    assert state.labels == CHECKOUT
    assert state.opened_at == state.updated_at == at(10)
    assert state.revision == 1
    assert state.resolved_at is None
    (m,) = state.members
    assert (m.fingerprint, m.status, m.first_seen, m.last_seen, m.value) == (
        a.fingerprint,
        "firing",
        at(10),
        at(10),
        0.3,
    )


def test_resolution_of_an_unknown_anomaly_is_ignored() -> None:
    assert one(anomaly(status="resolved")) == (None, [])


def test_incident_id_is_deterministic_for_replays() -> None:
    a = anomaly("errors", t=5)
    assert one(a)[0].id == one(a)[0].id  # type: ignore[union-attr]
    assert one(a)[0].id != one(anomaly("errors", t=6))[0].id  # type: ignore[union-attr]


def test_group_labels_missing_from_the_anomaly_are_empty() -> None:
    state, _ = one(anomaly(labels={"service": "x"}))
    assert state is not None
    assert state.key == "//x"
    assert state.labels == {"cluster": "", "namespace": "", "service": "x"}


def test_duplicate_refreshes_liveness_silently() -> None:
    first = anomaly("errors", t=0, value=0.2)
    state, events = one(first, anomaly("errors", t=60, value=0.4))
    assert len(events) == 1
    assert state is not None
    (m,) = state.members
    assert m.last_seen == at(60)
    assert m.value == 0.4
    assert m.first_seen == at(0)
    assert state.revision == 1


def test_second_anomaly_of_the_group_updates_the_incident() -> None:
    state, events = one(anomaly("errors", t=0), anomaly("latency", severity="warning", t=30))
    assert [e.status for e in events] == ["open", "updated"]
    assert state is not None
    assert [m.name for m in state.members] == ["errors", "latency"]
    assert state.revision == 2
    assert state.updated_at == at(30)


def test_different_services_get_different_incidents() -> None:
    states, events = fold([anomaly(labels=CHECKOUT), anomaly(labels=CART)])
    assert len(events) == 2
    assert events[0].id != events[1].id
    assert set(states) == {"c1/shop/checkout", "c1/shop/cart"}


def test_group_by_is_configurable() -> None:
    rules = CorrelationRules(group_by=("namespace",))
    states, events = fold([anomaly(labels=CHECKOUT), anomaly("latency", labels=CART)], rules=rules)
    assert list(states) == ["shop"]
    assert [e.status for e in events] == ["open", "updated"]


def test_out_of_order_resolution_does_not_move_a_member_backwards() -> None:
    state, events = one(
        anomaly("errors", t=0),
        anomaly("errors", t=100),
        anomaly("errors", status="resolved", t=50),  # older than what we know
    )
    assert len(events) == 1
    assert state is not None
    assert state.status == "open"
    assert state.members[0].status == "firing"
    assert state.members[0].last_seen == at(100)


def test_stale_firing_cannot_reopen_over_a_newer_resolution() -> None:
    # latency is known resolved as of t=100 (a dedup refresh); errors' resolution arrives
    # late (t=50) and resolves the incident. A firing copy of latency observed at t=60 is
    # older than what the incident knows of latency, so it must not move it backwards.
    state, _ = one(
        anomaly("errors", t=0),
        anomaly("latency", severity="warning", t=10),
        anomaly("latency", severity="warning", status="resolved", t=20),
        anomaly("latency", severity="warning", status="resolved", t=100),
        anomaly("errors", status="resolved", t=50),
    )
    assert state is not None
    assert state.status == "resolved"
    latency = next(m for m in state.members if m.name == "latency")
    assert latency.last_seen == at(100)
    new, event = correlate(state, anomaly("latency", severity="warning", t=60), NOW, RULES)
    assert event is None
    assert new == state


def test_all_members_resolved_resolves_the_incident() -> None:
    state, events = one(
        anomaly("errors", t=0),
        anomaly("latency", severity="warning", t=10),
        anomaly("errors", status="resolved", t=20),
        anomaly("latency", severity="warning", status="resolved", t=40),
    )
    assert [e.status for e in events] == ["open", "updated", "updated", "resolved"]
    assert state is not None
    assert state.status == "resolved"
    assert state.resolved_at == at(40)
    assert state.updated_at == at(40)
    assert all(m.status == "resolved" for m in state.members)
    assert state.severity == "critical"  # of all members once resolved


def test_repeat_resolution_and_late_copies_change_nothing() -> None:
    resolved, _ = one(anomaly(t=0), anomaly(status="resolved", t=10))
    assert resolved is not None
    assert correlate(resolved, anomaly(status="resolved", t=20), NOW, RULES) == (resolved, None)
    assert correlate(resolved, anomaly(t=10), NOW, RULES) == (resolved, None)
    assert correlate(resolved, anomaly(t=5), NOW, RULES) == (resolved, None)


def test_firing_within_reopen_window_reopens_the_same_incident() -> None:
    resolved, _ = one(anomaly(t=0), anomaly(status="resolved", t=10))
    assert resolved is not None
    state, event = correlate(resolved, anomaly(t=10 + 300), NOW, RULES)
    assert event is state
    assert state is not None
    assert state.id == resolved.id
    assert state.status == "reopened"
    assert state.resolved_at is None
    assert state.revision == resolved.revision + 1
    assert state.members[0].status == "firing"
    assert state.opened_at == at(0)


def test_firing_after_reopen_window_opens_a_new_incident() -> None:
    resolved, _ = one(anomaly(t=0), anomaly(status="resolved", t=10))
    assert resolved is not None
    state, event = correlate(resolved, anomaly("latency", t=10 + 301), NOW, RULES)
    assert event is state
    assert state is not None
    assert state.id != resolved.id
    assert state.status == "open"
    assert state.revision == 1
    assert [m.name for m in state.members] == ["latency"]
    assert state.opened_at == at(311)


def test_reopen_window_is_inclusive() -> None:
    resolved, _ = one(anomaly(t=0), anomaly(status="resolved", t=10))
    assert resolved is not None
    at_edge, _ = correlate(resolved, anomaly(t=310), NOW, RULES)
    just_after, _ = correlate(resolved, anomaly(t=310.5), NOW, RULES)
    assert at_edge is not None and just_after is not None
    assert at_edge.id == resolved.id
    assert just_after.id != resolved.id


def test_expire_resolves_after_quiet_and_not_before() -> None:
    state, _ = one(anomaly("errors", t=0), anomaly("latency", severity="warning", t=100))
    assert state is not None
    assert expire(state, at(100 + 299), RULES) == (state, None)
    expired, event = expire(state, at(100 + 300), RULES)
    assert event is expired
    assert expired.status == "resolved"
    assert expired.resolved_at == at(400)
    assert expired.updated_at == at(400)
    assert expired.revision == state.revision + 1
    assert all(m.status == "resolved" for m in expired.members)
    # The resolution time is the timeout boundary, not when expire() happened to run.
    late, _ = expire(state, at(5000), RULES)
    assert late.resolved_at == at(400)
    assert expire(expired, at(9000), RULES) == (expired, None)


def test_expire_severity_is_of_all_members_once_resolved() -> None:
    # A critical member already resolved, a warning one still firing: warning while open.
    state, _ = one(
        anomaly("errors", t=0),
        anomaly("latency", severity="warning", t=10),
        anomaly("errors", status="resolved", t=20),
    )
    assert state is not None
    assert state.severity == "warning"
    expired, _ = expire(state, at(1000), RULES)
    # Resolved by the timeout or by the last member, the same members give the same severity.
    by_member, _ = correlate(
        state, anomaly("latency", severity="warning", status="resolved", t=30), NOW, RULES
    )
    assert by_member is not None
    assert by_member.severity == "critical"
    assert expired.severity == by_member.severity


def test_severity_follows_firing_members() -> None:
    state, _ = one(
        anomaly("latency", severity="warning", t=0),
        anomaly("errors", severity="critical", t=10),
    )
    assert state is not None
    assert state.severity == "critical"
    state, _ = correlate(state, anomaly("errors", status="resolved", t=20), NOW, RULES)
    assert state is not None
    assert state.severity == "warning"


def test_mitigating_survives_updates_until_resolution() -> None:
    state, _ = one(anomaly("errors", t=0))
    assert state is not None
    mitigating, event = mark_mitigating(state, at(5))
    assert event is mitigating
    assert mitigating.status == "mitigating"
    assert mitigating.revision == 2
    assert mark_mitigating(mitigating, at(6)) == (mitigating, None)
    updated, _ = correlate(mitigating, anomaly("latency", severity="warning", t=10), NOW, RULES)
    assert updated is not None
    assert updated.status == "mitigating"
    resolved, _ = fold(
        [anomaly("errors", status="resolved", t=20), anomaly("latency", status="resolved", t=30)],
        {updated.key: updated},
    )
    final = resolved[updated.key]
    assert final is not None
    assert final.status == "resolved"
    assert mark_mitigating(final, at(40)) == (final, None)


def test_correlate_ignores_now() -> None:
    a = anomaly()
    assert correlate(None, a, at(0), RULES) == correlate(None, a, at(99_999), RULES)


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(streams)
def test_duplicates_are_idempotent(xs: list[Anomaly]) -> None:
    once_states, once_events = fold(xs)
    twice_states, twice_events = fold(a for x in xs for a in (x, x))
    assert twice_states == once_states
    assert twice_events == once_events


@settings(max_examples=200, deadline=None)
@given(streams, anomalies())
def test_redelivering_any_anomaly_right_away_emits_nothing(xs: list[Anomaly], a: Anomaly) -> None:
    states, _ = fold([*xs, a])
    k = key_of(a, RULES)
    again, event = correlate(states.get(k), a, NOW, RULES)
    assert event is None
    assert again == states.get(k)


@settings(max_examples=200, deadline=None)
@given(streams)
def test_a_fingerprint_belongs_to_exactly_one_incident(xs: list[Anomaly]) -> None:
    states: States = {}
    for a in xs:
        k = key_of(a, RULES)
        new, event = correlate(states.get(k), a, NOW, RULES)
        states[k] = new
        owners: dict[str, list[str]] = {}
        for key, inc in states.items():
            if inc is None:
                continue
            assert inc.key == key
            fps = [m.fingerprint for m in inc.members]
            assert len(fps) == len(set(fps)), "one member per fingerprint"
            for fp in fps:
                owners.setdefault(fp, []).append(inc.id)
        assert all(len(ids) == 1 for ids in owners.values())
        if event is not None:
            assert event is new
            assert a.fingerprint in {m.fingerprint for m in event.members}


@settings(max_examples=200, deadline=None)
@given(streams)
def test_members_never_move_backwards(xs: list[Anomaly]) -> None:
    for a, old, new, _ in steps(xs, RULES):
        if old is None or new is None or new.id != old.id:
            continue
        before = {m.fingerprint: m for m in old.members}
        for m in new.members:
            prev = before.get(m.fingerprint)
            if prev is None:
                continue
            assert m.last_seen >= prev.last_seen
            assert m.first_seen == prev.first_seen
            if prev.last_seen > a.observed_at and m.fingerprint == a.fingerprint:
                assert m == prev, "an older observation changed a member"
        assert new.revision >= old.revision
        assert new.opened_at == old.opened_at


@settings(max_examples=200, deadline=None)
@given(streams)
def test_resolved_exactly_when_all_members_resolved(xs: list[Anomaly]) -> None:
    states: States = {}
    for a in xs:
        k = key_of(a, RULES)
        new, _ = correlate(states.get(k), a, NOW, RULES)
        states[k] = new
        if new is None:
            continue
        all_resolved = all(m.status == "resolved" for m in new.members)
        assert (new.status == "resolved") == all_resolved
        assert (new.resolved_at is not None) == all_resolved
        if new.resolved_at is not None:
            assert new.resolved_at >= new.opened_at
            assert new.updated_at == new.resolved_at


@settings(max_examples=200, deadline=None)
@given(streams, st.integers(min_value=1, max_value=900))
def test_reopen_keeps_the_id_only_within_the_window(xs: list[Anomaly], gap: int) -> None:
    states, _ = fold(xs)
    for inc in states.values():
        if inc is None or inc.status != "resolved" or inc.resolved_at is None:
            continue
        fp_member = inc.members[0]
        # After the member's last observation too: a repeat of its resolution may have
        # been seen later than the incident resolved, and a member never moves back.
        since = max(inc.resolved_at, fp_member.last_seen)
        t = (since - at(0)).total_seconds() + gap
        a = anomaly(
            fp_member.name,
            severity=fp_member.severity,
            labels=fp_member.labels,
            t=t,
        )
        new, event = correlate(inc, a, NOW, RULES)
        assert event is new
        assert new is not None
        if (a.observed_at - inc.resolved_at).total_seconds() <= RULES.reopen_window:
            assert (new.id, new.status, new.revision) == (inc.id, "reopened", inc.revision + 1)
        else:
            assert new.id != inc.id
            assert (new.status, new.revision, len(new.members)) == ("open", 1, 1)


@settings(max_examples=200, deadline=None)
@given(ordered_streams, st.integers(min_value=0, max_value=600))
def test_expire_resolves_only_after_the_quiet_period(xs: list[Anomaly], quiet: int) -> None:
    states, _ = fold(xs)
    for inc in states.values():
        if inc is None:
            continue
        last = max(m.last_seen for m in inc.members)
        new, event = expire(inc, last + (at(quiet) - at(0)), RULES)
        if inc.status == "resolved" or quiet < RULES.resolve_timeout:
            assert (new, event) == (inc, None)
        else:
            assert event is new
            assert new.status == "resolved"
            assert new.id == inc.id
            assert new.resolved_at == last + (at(RULES.resolve_timeout) - at(0))
            assert all(m.status == "resolved" for m in new.members)


def test_a_blind_source_resolves_nothing_as_quiet_and_quiet_counts_from_when_it_sees() -> None:
    """Prometheus unreachable from t=145 to t=10000: the pattern's detector repeats
    nothing, which is no news while it cannot see."""
    state, _ = one(anomaly("errors", t=100))
    assert state is not None
    blind = {("prometheus", "c1"): Blindness(since=at(145))}
    assert expire(state, at(10_000), RULES, blind) == (state, None)
    seeing = {("prometheus", "c1"): Blindness(since=at(145), until=at(10_000))}
    assert expire(state, at(10_299), RULES, seeing) == (state, None)
    resolved, event = expire(state, at(10_300), RULES, seeing)
    assert event is resolved and resolved.resolved_at == at(10_300)
    # Blindness of another cluster or source, or one that began after the incident had
    # gone quiet, changes nothing.
    for other in (
        {("prometheus", "c2"): Blindness()},
        {("kubernetes", "c1"): Blindness()},
        {("prometheus", "c1"): Blindness(since=at(400))},
    ):
        resolved, _ = expire(state, at(10_000), RULES, other)
        assert resolved.resolved_at == at(400)


def _sourced(a: Anomaly, kube: bool) -> Anomaly:
    if not kube:
        return a
    return replace(a, source="kubernetes", fingerprint=fingerprint("kubernetes", a.name, a.labels))


mixed_streams = st.lists(st.builds(_sourced, anomalies(), st.booleans()), max_size=20).map(
    lambda xs: sorted(xs, key=lambda a: a.observed_at)
)
_times = st.integers(min_value=0, max_value=3000).map(at)


@settings(max_examples=200, deadline=None)
@given(
    mixed_streams,
    st.sampled_from([("prometheus", "c1"), ("kubernetes", "c1"), ("prometheus", "c2")]),
    st.none() | _times,
    st.none() | _times,
    st.integers(min_value=0, max_value=4000).map(at),
)
def test_blindness_only_delays_quiet_resolution_to_after_the_source_sees_again(
    xs: list[Anomaly],
    where: tuple[str, str],
    since: Any,
    until: Any,
    now: Any,
) -> None:
    blind = {where: Blindness(since=since, until=until)}
    timeout = timedelta(seconds=RULES.resolve_timeout)
    states, _ = fold(xs)
    for inc in states.values():
        if inc is None or inc.status == "resolved":
            continue
        plain, _ = expire(inc, now, RULES)
        new, event = expire(inc, now, RULES, blind)
        # Firing members of the blind source whose quiet would have ended after it went
        # blind: they may fire unseen until it sees again.
        covered = [
            m
            for m in inc.members
            if m.status == "firing"
            and (m.source, m.labels["cluster"]) == where
            and (since is None or since < m.last_seen + timeout)
        ]
        alive = max(m.last_seen for m in inc.members)
        if covered and until is None:
            assert (new, event) == (inc, None), "resolved as quiet while its source was blind"
            continue
        if covered:
            alive = max(alive, until)
        if now - alive < timeout:
            assert (new, event) == (inc, None)
            continue
        # Resolved as the timer would, counting from when the source saw again: never
        # before the incident would have resolved anyway.
        assert event is new and new.status == "resolved"
        assert new.resolved_at == alive + timeout
        assert plain.resolved_at is not None and new.resolved_at >= plain.resolved_at
        assert all(m.status == "resolved" for m in new.members)


@settings(max_examples=200, deadline=None)
@given(
    mixed_streams,
    st.sampled_from(_NAMES),
    st.sampled_from(["c1", "c2"]),
    st.none() | _times,
    st.none() | _times,
    st.integers(min_value=0, max_value=4000).map(at),
)
def test_a_patterns_blindness_delays_quiet_resolution_of_that_patterns_members_only(
    xs: list[Anomaly], name: str, cluster: str, since: Any, until: Any, now: Any
) -> None:
    """While one pattern's query fails, Prometheus answers the others: its own firing
    members count as alive until it answers again, every other member as they would."""
    blind = {("prometheus", cluster, name): Blindness(since=since, until=until)}
    timeout = timedelta(seconds=RULES.resolve_timeout)
    states, _ = fold(xs)
    for inc in states.values():
        if inc is None or inc.status == "resolved":
            continue
        plain, _ = expire(inc, now, RULES)
        new, event = expire(inc, now, RULES, blind)
        covered = [
            m
            for m in inc.members
            if m.status == "firing"
            and (m.source, m.labels["cluster"], m.name) == ("prometheus", cluster, name)
            and (since is None or since < m.last_seen + timeout)
        ]
        if not covered:
            assert (new, event) == expire(inc, now, RULES), "another pattern's members held"
            continue
        if until is None:
            assert (new, event) == (inc, None), "resolved as quiet while its query failed"
            continue
        alive = max(until, *(m.last_seen for m in inc.members))
        if now - alive < timeout:
            assert (new, event) == (inc, None)
            continue
        assert event is new and new.status == "resolved"
        assert new.resolved_at == alive + timeout
        assert plain.resolved_at is not None and new.resolved_at >= plain.resolved_at


@settings(max_examples=200, deadline=None)
@given(streams)
def test_severity_is_max_of_firing_members(xs: list[Anomaly]) -> None:
    states: States = {}
    for a in xs:
        k = key_of(a, RULES)
        new, _ = correlate(states.get(k), a, NOW, RULES)
        states[k] = new
        if new is not None:
            assert new.severity == _expected_severity(new)


@settings(max_examples=200, deadline=None)
@given(streams, st.data())
def test_batch_equals_folding_one_by_one(xs: list[Anomaly], data: st.DataObject) -> None:
    # Start from a state reached by an arbitrary prefix, then batch the rest.
    cut = data.draw(st.integers(min_value=0, max_value=len(xs)))
    initial, _ = fold(xs[:cut])
    expected_states, expected_events = fold_batch(xs[cut:], initial)
    changed, events = correlate_batch(dict(initial), xs[cut:], NOW, RULES)
    assert events == expected_events
    assert {**initial, **changed} == expected_states
    for k in changed:
        assert any(key_of(a, RULES) == k for a in xs[cut:])


_MARKS = (
    NO_MARKS,
    Marks(inhibited_by="node-down:f1"),
    Marks(absorbed_by="node/n1"),
    Marks(silenced_by="s0", absorbed_by="workload/shop/checkout"),
)
# Active from t=500 to t=1500 on the checkout service only.
_SILENCE = Silence(
    id="s1",
    matchers=(Matcher("service", "checkout"),),
    starts_at=at(500),
    ends_at=at(1500),
    created_by="alice",
    comment="maintenance",
    created_at=at(0),
)
_SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")


@st.composite
def keyed_items(draw: st.DrawFn) -> Keyed:
    """What the correlator feeds the fold: a group key (sometimes an absorber's), the
    anomaly (with severities that change between repeats) and the topology marks."""
    # Often close in time: equal timestamps are where order rules (<= vs <) differ.
    a = draw(st.one_of(anomalies(30), anomalies()))
    a = replace(a, severity=draw(st.sampled_from(_SEVERITIES)))
    key = draw(st.sampled_from((key_of(a, RULES), "c1/infra/node-n1")))
    return key, a, draw(st.sampled_from(_MARKS))


@settings(max_examples=300, deadline=None)
@given(st.lists(keyed_items(), max_size=30), st.data(), st.booleans())
def test_batch_with_marks_and_silences_equals_folding_one_by_one(
    items: list[Keyed], data: st.DataObject, silenced: bool
) -> None:
    silences = [_SILENCE] if silenced else []

    def reference(xs: list[Keyed], initial: States) -> tuple[States, list[Incident]]:
        states, events, trail = dict(initial), [], {}
        for k, a, marks in xs:
            labels = match_labels(a)
            hit = next((s.id for s in silences if s.matches(labels, a.observed_at)), None)
            new, event = correlate(
                states.get(k), a, NOW, RULES, key=k, silenced_by=hit, marks=marks
            )
            if new is not None or k in states:
                states[k] = new
            if new is not None:
                trail[new.id] = new
            if event is not None:
                events.append(event)
        return states, as_batch(events, trail)

    cut = data.draw(st.integers(min_value=0, max_value=len(items)))
    initial, _ = reference(items[:cut], {})
    expected_states, expected_events = reference(items[cut:], initial)
    changed, events = correlate_batch(dict(initial), items[cut:], NOW, RULES, silences)
    assert events == expected_events
    assert {**initial, **changed} == expected_states
    assert all(changed[k] is not initial.get(k) for k in changed)


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(0, 40), max_size=4), st.lists(st.booleans(), max_size=5))
def test_batches_sharing_a_positions_memo_equal_folding_one_by_one(
    xs: list[Anomaly], cuts: list[int], expiring: list[bool]
) -> None:
    """The correlator keeps member positions from batch to batch; between its batches the
    timer may expire incidents (new revisions of the same incident)."""
    bounds = [0, *sorted(c for c in cuts if c <= len(xs)), len(xs)]
    chunks = [xs[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    later = NOW + timedelta(seconds=RULES.resolve_timeout * 100)
    expected: States = {}
    got: States = {}
    memo: Positions = {}
    for n, chunk in enumerate(chunks):
        expected, expected_events = fold_batch(chunk, expected)
        changed, events = correlate_batch(dict(got), chunk, NOW, RULES, positions=memo)
        got = {**got, **changed}
        assert events == expected_events
        assert got == expected
        if n < len(expiring) and expiring[n]:
            for states in (expected, got):
                for k, inc in states.items():
                    if inc is not None:
                        states[k] = expire(inc, later, RULES)[0]


def test_a_stale_positions_memo_is_not_trusted() -> None:
    inc, _ = correlate(None, anomaly("errors"), NOW, RULES)
    assert inc is not None
    inc, _ = correlate(inc, anomaly("latency", t=1), NOW, RULES)
    assert inc is not None
    errors, latency = (m.fingerprint for m in inc.members)
    # Positions of another incident or revision (as many members, the last one alike)
    stale = {"someone-else": 0, latency: 1}
    for memo in (
        {inc.key: ("another-incident", inc.revision, stale)},
        {inc.key: (inc.id, inc.revision - 1, stale)},
    ):
        _check_not_trusted(inc, memo, errors, latency)


def _check_not_trusted(inc: Incident, memo: Positions, errors: str, latency: str) -> None:
    resolve = [anomaly("errors", status="resolved", t=2)]
    changed, events = correlate_batch({inc.key: inc}, resolve, NOW, RULES, positions=memo)
    assert [e.status for e in events] == ["updated"]
    new = changed[inc.key]
    assert new is not None
    assert [(m.fingerprint, m.status) for m in new.members] == [
        (errors, "resolved"),
        (latency, "firing"),
    ]


# --- member retention -----------------------------------------------------------------------

RETAINING = replace(RULES, member_retention=60.0)
# Within a few retention periods, so members outlive it, come back and resolve around it.
retention_streams = st.lists(anomalies(400), max_size=30)


@settings(max_examples=300, deadline=None)
@given(retention_streams)
def test_an_open_incident_drops_long_resolved_members_and_a_resolved_one_keeps_all(
    xs: list[Anomaly],
) -> None:
    for a, old, new, event in steps(xs, RETAINING):
        if event is None or new is None:
            continue
        assert a.fingerprint in {m.fingerprint for m in new.members}
        before = (
            {m.fingerprint for m in old.members} if old is not None and old.id == new.id else set()
        )
        dropped = before - {m.fingerprint for m in new.members}
        if new.status == "resolved":
            assert not dropped, "a resolved incident keeps its members"
        horizon = new.updated_at - timedelta(seconds=RETAINING.member_retention)
        for m in new.members:
            if new.status != "resolved" and m.fingerprint != a.fingerprint:
                assert m.status == "firing" or m.last_seen >= horizon
        for fp in dropped:
            (m,) = [m for m in old.members if m.fingerprint == fp]  # type: ignore[union-attr]
            assert m.status == "resolved" and m.last_seen < horizon
        fps = [m.fingerprint for m in new.members]
        assert len(fps) == len(set(fps))


@settings(max_examples=300, deadline=None)
@given(retention_streams, st.lists(st.integers(0, 40), max_size=4))
def test_retention_folds_the_same_in_batches(xs: list[Anomaly], cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(xs)), len(xs)]
    expected, got, memo = {}, {}, {}  # type: ignore[var-annotated]
    for lo, hi in itertools.pairwise(bounds):
        expected, expected_events = fold_batch(xs[lo:hi], expected, RETAINING)
        changed, events = correlate_batch(dict(got), xs[lo:hi], NOW, RETAINING, positions=memo)
        got = {**got, **changed}
        assert events == expected_events
        assert got == expected


def test_an_incident_that_resolves_keeps_members_resolved_long_before() -> None:
    xs = [
        anomaly("errors", t=0),
        anomaly("latency", severity="warning", t=1),
        anomaly("errors", status="resolved", t=10),
        anomaly("latency", severity="warning", status="resolved", t=200),  # 190 s later
    ]
    expected, _ = fold(xs, rules=RETAINING)
    for states in (expected, correlate_batch({}, xs, NOW, RETAINING)[0]):
        (inc,) = states.values()
        assert inc is not None
        assert inc.status == "resolved"
        assert [m.name for m in inc.members] == ["errors", "latency"]


def test_a_pod_that_came_and_went_long_ago_leaves_the_open_incident() -> None:
    rules = replace(RULES, member_retention=600.0)
    old = anomaly("errors", labels={**CHECKOUT, "pod": "checkout-1"}, t=0)
    gone = replace(old, status="resolved", observed_at=at(60))
    live = anomaly("errors", labels={**CHECKOUT, "pod": "checkout-2"}, t=30)
    again = replace(live, observed_at=at(1000))  # a repeat: no change, nothing dropped yet
    later = anomaly("latency", severity="warning", labels=CHECKOUT, t=1000)
    states, events = fold([old, live, gone, again], rules=rules)
    (inc,) = (s for s in states.values() if s is not None)
    assert len(inc.members) == 2
    states, events = fold([later], states, rules)
    (inc,) = (s for s in states.values() if s is not None)
    assert {m.labels.get("pod") for m in inc.members} == {"checkout-2", None}
    assert events[-1].status == "updated"
    # the dropped member's last state is in the revision published when it resolved
    back = replace(old, observed_at=at(1100))
    states, events = fold([back], states, rules)
    (inc,) = (s for s in states.values() if s is not None)
    assert inc.members[-1].fingerprint == old.fingerprint
    assert inc.members[-1].first_seen == back.starts_at


@contextlib.contextmanager
def tallied() -> Iterator[None]:
    """Groups keep tallies from their first member on (normally only large groups do), so
    the properties, whose groups stay small, hold that path to the reference too."""
    old, correlation.TALLY_FROM = correlation.TALLY_FROM, 0
    try:
        yield
    finally:
        correlation.TALLY_FROM = old


def test_the_batch_properties_hold_for_groups_that_keep_tallies() -> None:
    with tallied():
        test_batch_equals_folding_one_by_one()
        test_batch_with_marks_and_silences_equals_folding_one_by_one()
        test_batches_sharing_a_positions_memo_equal_folding_one_by_one()
        test_retention_folds_the_same_in_batches()
        test_a_full_group_folds_the_same_in_batches()


def in_two_batches(first: list[Anomaly], second: list[Anomaly]) -> tuple[States, list[Incident]]:
    """The states the second batch changed and its events, once checked against the
    reference folding both one by one."""
    expected, _ = fold(first + second, rules=RETAINING)
    got, _ = correlate_batch({}, first, NOW, RETAINING)
    changed, events = correlate_batch(dict(got), second, NOW, RETAINING)
    assert changed == expected
    return changed, events


@pytest.mark.parametrize("tally", [False, True])
def test_a_later_batch_drops_an_old_resolved_member_listed_after_a_recent_one(
    tally: bool,
) -> None:
    # Members in insertion order: "a" resolved recently, "b" long ago. A batch that starts
    # from this state must still see that "b" is past retention.
    pod = functools.partial(anomaly, "errors")
    a, b, c = ({**CHECKOUT, "pod": p} for p in ("a", "b", "c"))
    first = [pod(labels=a, t=0), pod(labels=b, t=1), pod(labels=c, t=2)]
    first += [pod(labels=b, status="resolved", t=50), pod(labels=a, status="resolved", t=100)]
    second = [anomaly("latency", severity="warning", labels=CHECKOUT, t=150)]
    with tallied() if tally else contextlib.nullcontext():
        changed, _ = in_two_batches(first, second)
        (inc,) = changed.values()
        assert inc is not None
        assert [m.labels.get("pod") for m in inc.members] == ["a", "c", None]


def test_a_mass_outage_folds_to_one_incident_of_every_pod() -> None:
    pods = [anomaly("errors", labels={**CHECKOUT, "pod": f"p{i}"}, t=i) for i in range(3000)]
    resolutions = [replace(a, status="resolved", observed_at=at(4000)) for a in pods[::2]]
    got, events = in_two_batches(pods, resolutions)
    (inc,) = got.values()
    assert inc is not None
    assert len(inc.members) == 3000
    assert sum(m.status == "firing" for m in inc.members) == 1500
    assert events[-1] == inc


def test_a_copy_as_old_as_the_resolution_never_reopens_but_a_new_anomaly_does() -> None:
    # errors resolves at slot 10 while latency starts firing in the same slot, and the
    # resolution is folded first: the firing copy of errors is late, latency is news.
    xs = [anomaly("errors", t=0), anomaly("errors", status="resolved", t=10)]
    xs += [anomaly("errors", t=10), anomaly("latency", severity="warning", t=10)]
    expected, events = fold_batch(xs)
    changed, batch_events = correlate_batch({}, xs, NOW, RULES)
    assert (changed, batch_events) == (expected, events)
    assert [e.status for e in events] == ["open", "resolved", "reopened"]
    inc = changed[key_of(xs[0], RULES)]
    assert inc is not None and inc.resolved_at is None
    assert [(m.name, m.status) for m in inc.members] == [
        ("errors", "resolved"),
        ("latency", "firing"),
    ]
    assert inc.updated_at == at(10)  # the revision never goes back in time


def test_a_one_shot_event_delivered_after_the_resolution_reopens_the_incident() -> None:
    # The incident went quiet and expired (resolved as of t=300); a Kubernetes OOMKilling
    # event observed at t=200 arrives afterwards. It only ever fires, once: dropping it
    # would lose it for good.
    state, _ = one(anomaly("errors", t=0))
    assert state is not None
    expired, _ = expire(state, at(360), RULES)
    assert expired.resolved_at == at(300)
    oom = anomaly("k8s-oomkilling", severity="warning", source="kubernetes", t=200)
    new, event = correlate(expired, oom, NOW, RULES)
    assert event is new and new is not None
    assert (new.id, new.status) == (state.id, "reopened")
    assert [m.fingerprint for m in new.firing] == [oom.fingerprint]
    # A copy of what the incident already knows resolved is still only a late copy.
    assert correlate(expired, anomaly("errors", t=0), NOW, RULES) == (expired, None)


@settings(max_examples=300, deadline=None)
@given(streams)
def test_a_firing_anomaly_is_never_lost(xs: list[Anomaly]) -> None:
    # After a firing anomaly, its group's incident knows its fingerprint at least as of
    # that observation: it was folded in, or the incident already knew it as late or later.
    states: States = {}
    for a in xs:
        k = key_of(a, RULES)
        new, _ = correlate(states.get(k), a, NOW, RULES)
        states[k] = new
        if a.status != "firing":
            continue
        assert new is not None
        (m,) = [m for m in new.members if m.fingerprint == a.fingerprint]
        assert m.last_seen >= a.observed_at


def test_a_severity_change_of_a_member_updates_the_incident() -> None:
    state, events = one(
        anomaly("latency", severity="warning", t=0),
        anomaly("latency", severity="critical", t=10),
    )
    assert state is not None
    assert [e.status for e in events] == ["open", "updated"]
    assert state.severity == "critical"
    assert state.members[0].severity == "critical"


@settings(max_examples=200, deadline=None)
@given(streams)
def test_events_are_revisions_of_their_incident(xs: list[Anomaly]) -> None:
    _, events = fold(xs)
    last: dict[str, int] = {}
    for e in events:
        if e.id in last:
            assert e.revision == last[e.id] + 1
        else:
            assert e.revision == 1
            assert e.status == "open"
        last[e.id] = e.revision


def test_a_batch_returns_only_changed_states() -> None:
    untouched = one(anomaly(labels=CART))[0]
    changed, events = correlate_batch(
        {"c1/shop/cart": untouched}, [anomaly(labels=CHECKOUT)], NOW, RULES
    )
    assert list(changed) == ["c1/shop/checkout"]
    assert len(events) == 1
    assert correlate_batch({}, [anomaly(status="resolved")], NOW, RULES) == ({}, [])


def test_a_batch_that_changes_nothing_returns_no_states() -> None:
    resolved, _ = one(anomaly(t=0), anomaly(status="resolved", t=10))
    assert resolved is not None
    states: States = {resolved.key: resolved}
    late = [anomaly(t=5), anomaly(status="resolved", t=20)]  # a late copy, a repeat
    assert correlate_batch(states, late, NOW, RULES) == ({}, [])


def test_member_refresh_keeps_the_incident_otherwise_unchanged() -> None:
    state, _ = one(anomaly("errors", t=0))
    assert state is not None
    refreshed, event = correlate(state, anomaly("errors", t=30), NOW, RULES)
    assert event is None
    assert refreshed == replace(state, members=(replace(state.members[0], last_seen=at(30)),))


# --- the bound on members -------------------------------------------------------------------

CAPPED = replace(RULES, max_members=2)  # the streams hold three fingerprints per group
# Close in time and mostly in order: members fire, resolve and come back within the reopen
# window, where the bound bites.
_close = st.lists(anomalies(40), max_size=30)
capped_streams = st.one_of(_close, _close.map(lambda xs: sorted(xs, key=lambda a: a.observed_at)))


def fold_refusing(
    xs: Iterable[Anomaly], states: States, rules: CorrelationRules
) -> tuple[States, list[Incident], list[Anomaly]]:
    """fold_batch(), and the anomalies it refused."""
    states, events, refused = dict(states), [], []
    trail: dict[str, Incident] = {}
    for a in xs:
        if refuses(states.get(key_of(a, rules)), a, rules):
            refused.append(a)
        states, more = fold([a], states, rules, trail)
        events += more
    return states, as_batch(events, trail), refused


@settings(max_examples=300, deadline=None)
@given(capped_streams, st.lists(st.integers(0, 40), max_size=4))
def test_a_full_group_folds_the_same_in_batches(xs: list[Anomaly], cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(xs)), len(xs)]
    expected: States = {}
    got: States = {}
    memo: Positions = {}
    for lo, hi in itertools.pairwise(bounds):
        expected, expected_events, expected_refused = fold_refusing(xs[lo:hi], expected, CAPPED)
        refused: list[Keyed] = []
        changed, events = correlate_batch(
            dict(got), xs[lo:hi], NOW, CAPPED, positions=memo, refused=refused
        )
        got = {**got, **changed}
        assert events == expected_events
        assert got == expected
        assert [a for _, a, _ in refused] == expected_refused
        assert all(k == key_of(a, CAPPED) for k, a, _ in refused)


@settings(max_examples=300, deadline=None)
@given(capped_streams)
def test_a_full_incident_drops_resolved_members_first_and_refuses_only_when_all_fire(
    xs: list[Anomaly],
) -> None:
    for a, old, new, event in steps(xs, CAPPED):
        if new is not None:
            assert len(new.members) <= CAPPED.max_members
        if refuses(old, a, CAPPED):
            assert old is not None and (new, event) == (old, None)
            assert all(m.status == "firing" for m in old.members)
            continue
        if old is None or new is None or old.id != new.id:
            continue
        kept = {m.fingerprint for m in new.members}
        assert a.status == "resolved" or kept >= {a.fingerprint} or event is None
        for m in old.members:
            if m.fingerprint not in kept:
                assert m.status == "resolved", "only resolved members make room"


@pytest.mark.parametrize("tally", [False, True])
def test_a_member_dropped_for_room_no_longer_counts_for_severity(tally: bool) -> None:
    xs = [anomaly("errors", t=0), anomaly("latency", severity="warning", t=1)]
    xs += [replace(a, status="resolved", observed_at=at(2 + i)) for i, a in enumerate(xs)]
    flap = anomaly("restarts", severity="info", t=4)  # reopens: "errors" makes room
    xs += [flap, replace(flap, status="resolved", observed_at=at(5))]
    with tallied() if tally else contextlib.nullcontext():
        changed, events = correlate_batch({}, xs, NOW, CAPPED)
    assert (changed, events) == fold_batch(xs, rules=CAPPED)
    (inc,) = changed.values()
    assert inc is not None
    assert [m.name for m in inc.members] == ["latency", "restarts"]
    assert (inc.status, inc.severity) == ("resolved", "warning")


@pytest.mark.parametrize("tally", [False, True])
def test_a_mass_outage_beyond_the_bound_drops_the_oldest_resolved_then_refuses(
    tally: bool,
) -> None:
    rules = replace(RULES, max_members=20)
    pods = [anomaly("errors", labels={**CHECKOUT, "pod": f"p{i}"}, t=i) for i in range(40)]
    # p0, p1, p2 resolve, p2 first: least recently seen is not first in member order
    gone = [replace(a, status="resolved", observed_at=at(100 - i)) for i, a in enumerate(pods[:3])]
    first, rest = [*pods[:20], *gone, pods[20]], pods[21:]
    with tallied() if tally else contextlib.nullcontext():
        expected, _, _ = fold_refusing(first, {}, rules)
        got, _ = correlate_batch({}, first, NOW, rules)
        assert got == expected
        (inc,) = got.values()
        assert inc is not None
        # p20 needed room: the two least recently seen resolved (a tenth of 20: p2, p1) went
        assert [m.labels["pod"] for m in inc.members if m.status == "resolved"] == ["p0"]
        expected, _, expected_refused = fold_refusing(rest, expected, rules)
        refused: list[Keyed] = []
        changed, _ = correlate_batch(got, rest, NOW, rules, refused=refused)
    assert changed == expected
    (inc,) = changed.values()
    assert inc is not None
    # p21 fit beside p0; p22 made it go; from then on all 20 fire and p23.. are refused.
    assert [m.labels["pod"] for m in inc.members] == [f"p{i}" for i in range(3, 23)]
    assert [a for _, a, _ in refused] == expected_refused == pods[23:]


# --- events of large incidents ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["firing", "resolved"]), st.booleans(), st.integers(0, 50)),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=0, max_value=45),
)
def test_an_event_lists_at_most_the_limit_firing_and_recent_first(
    shapes: list[tuple[str, bool, int]], limit: int
) -> None:
    members = []
    for i, (status, silenced, t) in enumerate(shapes):
        a = anomaly("errors", labels={**CHECKOUT, "pod": f"p{i}"}, t=t)
        (m,) = fold([a])[0][key_of(a, RULES)].members  # type: ignore[union-attr]
        members.append(replace(m, status=status, silenced_by="s1" if silenced else None))
    inc = replace(one(anomaly("errors", labels=CHECKOUT))[0], members=tuple(members))  # type: ignore[arg-type]
    shown = for_event(inc, limit)
    if len(members) <= limit:
        assert shown is inc
        return
    assert len(shown.members) == limit
    assert shown.omitted_members == len(members) - limit
    positions = [members.index(m) for m in shown.members]
    assert positions == sorted(positions), "members keep their incident order"
    assert replace(shown, members=inc.members, omitted_members=0) == inc

    def rank(m: Member) -> tuple[bool, bool, float]:
        return (m.status != "firing", m.suppressed, -m.last_seen.timestamp())

    left_out = [m for m in members if m not in shown.members]
    if shown.members and left_out:
        assert max(map(rank, shown.members)) <= min(map(rank, left_out))


def test_the_mttr_gauge_is_the_latest_resolution_on_the_partitions_a_worker_owns() -> None:
    def resolved(service: str, opened: int, after: int) -> Incident:
        inc = incident(member(), labels={**SHOP, "service": service})
        start = OPENED + timedelta(minutes=opened)
        end = start + timedelta(minutes=after)
        return replace(inc, status="resolved", opened_at=start, resolved_at=end)

    noted = correlation.note_resolutions(
        {}, [(resolved("checkout", 0, 2), 0), (resolved("checkout", 10, 5), 1)]
    )
    noted = correlation.note_resolutions(
        noted,
        [(resolved("payments", 0, 1), 2), (resolved("checkout", 0, 9), 1)],  # re-published
    )
    assert correlation.last_resolutions(noted) == {"checkout": 300.0, "payments": 60.0}
    # Partition 1 moved away: checkout's latest here is partition 0's; payments' is gone.
    kept = correlation.owned_resolutions(noted, {0})
    assert correlation.last_resolutions(kept) == {"checkout": 120.0}
    assert correlation.owned_resolutions(noted, ()) == {}


def _live_as_before(members: list[Member], status: str) -> str:
    """correlation._live before its single pass: the reference."""
    firing = [m for m in members if m.status == "firing"]
    if firing and all(m.suppressed for m in firing):
        return "silenced"
    return status


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["firing", "resolved"]),
            st.sampled_from([None, "", "silence-1"]),  # "" is no silence, as None is
            st.sampled_from([None, "", "rule:fp"]),
        ),
        max_size=8,
    ),
    st.sampled_from(["updated", "reopened", "mitigating"]),
)
def test_an_incident_is_silenced_exactly_as_before_the_single_pass(
    specs: list[tuple[str, str | None, str | None]], status: str
) -> None:
    members = [
        replace(
            member(f"m{i}", status=s),
            silenced_by=silenced,
            inhibited_by=inhibited,
        )
        for i, (s, silenced, inhibited) in enumerate(specs)
    ]
    got = correlation._live(members, status)  # type: ignore[arg-type]
    assert got == _live_as_before(members, status)
