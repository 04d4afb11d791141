"""The correlator's incident encoder gives exactly agent.codec.encode's bytes, whatever
members it re-uses from earlier revisions."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import decode, encode
from agent.models import Incident
from streams.correlation import CorrelationRules, correlate_batch
from streams.correlator import Stored
from streams.incident_json import IncidentEncoder, member_json
from streams.partitioning import MAX_REQUEST_BYTES, record_bytes, value_room
from tests.unit.factories import anomaly, at

# Short retention: revisions also drop members, which shifts the others' positions.
RULES = CorrelationRules(member_retention=5.0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["errors", "latency", "oom", "restarts"]),
            st.sampled_from(["firing", "resolved"]),
            st.sampled_from(["warning", "critical"]),
            st.sampled_from(["a", "b", "ü", 'q"x']),
            st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(min_value=1, max_value=5),
)
def test_every_revision_encodes_as_codec_does(
    steps: list[tuple[str, str, str, str, float | None]], batch: int
) -> None:
    enc = IncidentEncoder()
    state: dict[str, Incident | None] = {}
    anomalies = [
        anomaly(
            name,
            status=status,  # type: ignore[arg-type]
            severity=severity,  # type: ignore[arg-type]
            labels={"cluster": "c", "namespace": "n", "service": "s", "pod": pod},
            t=float(i),
            value=value,
        )
        for i, (name, status, severity, pod, value) in enumerate(steps)
    ]
    for i in range(0, len(anomalies), batch):
        changed, events = correlate_batch(state, anomalies[i : i + batch], at(i + 3600), RULES)
        for e in events:  # intermediate revisions: not remembered
            assert enc.encode(e, remember=False) == encode(e)
        for k, inc in changed.items():
            if inc is not None:
                assert enc.encode(inc) == encode(inc)
            state[k] = inc


def test_a_member_with_every_mark_encodes_as_codec_does() -> None:
    changed, _ = correlate_batch({}, [anomaly("errors", value=None)], at(3600), RULES)
    inc = next(i for i in changed.values() if i is not None)
    plain = inc.members[0]
    marked = replace(plain, silenced_by="s1", inhibited_by="node-down:f1", absorbed_by="node/n1")
    for m in (plain, marked, replace(marked, value=-0.0, labels={"ü": 'q"x'})):
        assert member_json(m) == encode(m)


def test_a_member_replaced_by_an_equal_object_is_encoded_afresh() -> None:
    enc = IncidentEncoder()
    changed, _ = correlate_batch({}, [anomaly("errors")], at(3600), RULES)
    inc = next(i for i in changed.values() if i is not None)
    enc.encode(inc)
    other = replace(inc, members=(replace(inc.members[0], value=7.5),), revision=2)
    assert enc.encode(other) == encode(other)


def _outage(pods: int, label_bytes: int = 0) -> Incident:
    """One incident of ``pods`` failing pods, each with a label of ``label_bytes``."""
    extra = {"note": "x" * label_bytes} if label_bytes else {}
    xs = [
        anomaly(
            "errors",
            labels={"cluster": "c", "namespace": "n", "service": "s", "pod": f"p{i}", **extra},
            t=float(i),
        )
        for i in range(pods)
    ]
    changed, _ = correlate_batch({}, xs, at(3600), RULES)
    (inc,) = changed.values()
    assert inc is not None
    return inc


def test_a_small_incident_event_is_the_incident() -> None:
    inc = _outage(3)
    assert IncidentEncoder().event(inc, 200, 1_000_000) == encode(inc)


def test_an_event_stays_within_the_record_size_whatever_its_labels() -> None:
    inc = _outage(300, label_bytes=4000)  # 200 members would be 800 KB
    raw = IncidentEncoder().event(inc, 200, 100_000)
    assert len(raw) <= 100_000
    shown = decode(Incident, raw)
    assert 0 < len(shown.members) < 200
    assert len(shown.members) + shown.omitted_members == 300
    assert replace(shown, members=inc.members, omitted_members=0) == inc
    # Nothing fits: the event still goes out, with every member counted.
    bare = decode(Incident, IncidentEncoder().event(inc, 200, 2_000))
    assert (bare.members, bare.omitted_members) == ((), 300)


def test_an_event_at_the_correlators_cap_is_a_record_its_producer_takes() -> None:
    inc = _outage(300, label_bytes=4000)  # 300 members listed would be 1.2 MB
    key = inc.key.encode()
    raw = IncidentEncoder().event(inc, 300, value_room(key))  # as the correlator asks
    assert record_bytes(raw, key) <= MAX_REQUEST_BYTES
    shown = decode(Incident, raw)
    assert 0 < len(shown.members) < 300
    assert len(shown.members) + shown.omitted_members == 300


def test_a_large_state_is_stored_compressed_and_reads_back() -> None:
    small, large = _outage(3), _outage(3000)
    for inc, compressed in ((small, False), (large, True)):
        stored = Stored(partition=2, incident=inc, emitted_at=at(5), pending=True)
        raw = stored.dump()
        assert raw.startswith(b"{") is not compressed
        assert Stored.load(raw) == stored
    raw = Stored(0, large).dump()
    assert len(raw) < len(encode(large)) / 5
    # A value written before compression existed still reads.
    plain = b'{"p":0,"e":null,"q":false,"i":%s}' % encode(large)
    assert Stored.load(plain) == Stored(0, large)


def test_the_state_of_a_group_missing_its_only_group_by_label_reads_back() -> None:
    # group_by [service], an anomaly without one: its key was "", which an incident cannot
    # carry, so the stored state failed to decode and the worker crash-looped on restore.
    rules = CorrelationRules(group_by=("service",))
    states, _ = correlate_batch({}, [anomaly(labels={"cluster": "c1"})], at(0), rules)
    [(key, inc)] = states.items()
    assert key and inc is not None and inc.key == key
    stored = Stored(0, inc, at(1), False)
    assert Stored.load(stored.dump()) == stored


def test_a_refreshed_member_re_uses_its_json_only_where_it_is_the_same() -> None:
    """A member that replaced one keeps the JSON before "last_seen" only when the fields
    there are the same objects: labels equal in another order, or the same instant in
    another zone, are written otherwise. Text that looks like the "last_seen" key, in a
    label or a mark, must not be taken for it."""
    tricky = {"cluster": "c", "last_seen": ',"last_seen":"x', "pod": 'p","last_seen":1'}
    changed, _ = correlate_batch({}, [anomaly("errors", labels=tricky)], at(3600), RULES)
    inc = next(i for i in changed.values() if i is not None)
    first = inc.members[0]
    later = at(10)
    plus_one = timezone(timedelta(hours=1))
    revisions = [
        replace(first, last_seen=later, value=2.0),  # a repeat
        replace(first, last_seen=later, silenced_by=',"last_seen":"y"'),  # a mark
        replace(first, labels=dict(reversed(list(first.labels.items())))),  # equal labels
        replace(first, first_seen=first.first_seen.astimezone(plus_one)),  # equal instant
        replace(first, status="resolved", severity="warning"),
    ]
    for n, member in enumerate(revisions, start=2):
        enc = IncidentEncoder()
        enc.encode(inc)
        other = replace(inc, members=(member,), revision=n)
        assert enc.encode(other) == encode(other)
