"""Partition placement and batch decoding of the anomalies topic."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import encode
from agent.errors import InvalidEvent
from agent.metrics import Metrics
from agent.models import AnomalyBatch, Incident, group_key
from streams.correlation import coalesce
from streams.correlator import Correlator
from streams.partitioning import (
    MAX_BATCH,
    MAX_REQUEST_BYTES,
    anomaly_records,
    decode_anomalies,
    partition_for,
    partitioner,
    record_bytes,
    value_room,
)
from tests.helpers import make_settings
from tests.unit.factories import anomaly, at


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60), st.integers(min_value=1, max_value=64))
def test_partition_matches_kafkas_default_partitioner(key: str, partitions: int) -> None:
    expected = DefaultPartitioner()(key.encode(), list(range(partitions)), [])
    assert partition_for(key, partitions) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.lists(st.integers(0, 99), min_size=1, max_size=12, unique=True))
def test_the_producer_partitioner_is_kafkas_default_for_keyed_records(
    key: bytes, partitions: list[int]
) -> None:
    expected = DefaultPartitioner()(key, partitions, partitions[:1])
    assert partitioner(key, partitions, partitions[:1]) == expected
    assert partitioner(None, partitions, partitions[:1]) == partitions[0]  # only available one


def test_batches_hold_one_partition_each_and_are_bounded() -> None:
    by = ("cluster", "namespace", "service")
    anomalies = [
        anomaly(f"p{i}", labels={"cluster": "c", "namespace": "n", "service": f"svc-{i % 7}"})
        for i in range(1200)
    ]
    records = anomaly_records([(a, group_key(a.labels, by)) for a in anomalies], 3)
    seen = 0
    for p, value, _ in records:
        chunk, problems = decode_anomalies(value)
        assert problems == []
        assert 0 < len(chunk) <= MAX_BATCH
        seen += len(chunk)
        for a in chunk:
            key = "/".join(a.labels.get(k, "") for k in by)
            assert partition_for(key, 3) == p
    assert seen == len(anomalies)


def test_well_formed_records_decode_to_their_anomalies() -> None:
    good = [anomaly("a"), anomaly("b", status="resolved")]
    assert decode_anomalies(encode(AnomalyBatch(anomalies=tuple(good)))) == (good, [])
    assert decode_anomalies(encode(good[1])) == ([good[1]], [])


def test_a_bad_item_in_a_batch_is_isolated() -> None:
    good = [anomaly("a"), anomaly("b")]
    doc = orjson.loads(encode(AnomalyBatch(anomalies=tuple(good))))
    doc["anomalies"].insert(1, {**doc["anomalies"][0], "status": "exploded"})
    decoded, bad = decode_anomalies(orjson.dumps(doc))
    assert decoded == good
    assert len(bad) == 1
    error, raw = bad[0]
    assert "anomalies[1].status" in error
    assert orjson.loads(raw)["status"] == "exploded"


@pytest.mark.parametrize(
    ("field", "when"),
    [
        ("starts_at", "0001-01-01T00:00:00Z"),  # Go's zero time: overflowed the fold
        ("observed_at", "0001-01-01T00:00:00Z"),
        ("observed_at", "9999-12-31T23:59:59Z"),  # made every later observation stale
        ("observed_at", "1999-12-31T23:59:59Z"),
        ("starts_at", "2100-01-01T00:00:00Z"),
    ],
)
def test_an_anomaly_time_outside_the_window_is_dead_lettered_not_folded(
    field: str, when: str
) -> None:
    good = anomaly("a")
    bad = {**orjson.loads(encode(anomaly("b"))), field: when}
    # Alone (the msgspec fast path) and in a batch (item by item): refused, naming the field.
    with pytest.raises(InvalidEvent, match=f"{field}: must be from 2000-01-01"):
        decode_anomalies(orjson.dumps(bad))
    doc = orjson.loads(encode(AnomalyBatch(anomalies=(good,))))
    doc["anomalies"].append(bad)
    decoded, problems = decode_anomalies(orjson.dumps(doc))
    assert decoded == [good]
    [(error, _)] = problems
    assert f"anomalies[1].<root>: Value error, {field}: must be from" in error


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{nope", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"anomalies": 3}', "anomalies: expected a list"),
    ],
)
def test_unreadable_records_are_refused_whole(raw: bytes, problem: str) -> None:
    with pytest.raises(InvalidEvent, match=problem):
        decode_anomalies(raw)


def _incident(iid: str, status: str, revision: int) -> Incident:
    return Incident(
        id=iid,
        key=iid,
        status=status,  # type: ignore[arg-type]
        severity="warning",
        labels={},
        members=(),
        opened_at=at(0),
        updated_at=at(revision),
        revision=revision,
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from("ab"),
            st.sampled_from(["open", "updated", "mitigating", "resolved", "reopened"]),
        ),
        max_size=30,
    )
)
def test_coalesce_keeps_transitions_and_final_states(steps: list[tuple[str, str]]) -> None:
    events = [_incident(i, s, n) for n, (i, s) in enumerate(steps)]
    out = coalesce(events)
    assert [e for e in events if e.status != "updated"] == [e for e in out if e.status != "updated"]
    for iid in {e.id for e in events}:
        assert [e for e in events if e.id == iid][-1] == [e for e in out if e.id == iid][-1]
    assert out == [e for e in events if e in out]  # order preserved


def test_mitigation_records_are_recognised_and_validated() -> None:
    from agent.models import Mitigation
    from streams.partitioning import decode_mitigation

    m = Mitigation(incident_id="i1", incident_key="c/shop/cart", action_id="a1", at=at(5))
    raw = encode({"mitigation": m})
    assert decode_mitigation(raw) == m
    assert decode_anomalies(raw) == ([], [])  # not an anomaly, not an error either
    assert decode_mitigation(encode(anomaly("a"))) is None
    assert decode_mitigation(b'{"mitigation": ') is None  # left to decode_anomalies to report
    with pytest.raises(InvalidEvent, match="incident_id"):
        decode_mitigation(b'{"mitigation": {"incident_key": "k", "action_id": "a", "at": "x"}}')


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4000))
def test_a_value_that_fills_the_room_of_its_key_makes_a_record_the_producers_take(
    key: bytes,
) -> None:
    # The correlator caps its incident events and changelog writes this way: a check that
    # passed what the producer refuses failed the fold at every retry.
    value = b"x" * value_room(key)
    assert record_bytes(value, key) <= MAX_REQUEST_BYTES  # aiokafka's own measure


def test_the_correlators_producer_takes_what_its_checks_pass() -> None:
    corr = Correlator(make_settings("127.0.0.1:1", "unused."), metrics=Metrics())
    assert corr.app.conf.producer_max_request_size == MAX_REQUEST_BYTES
