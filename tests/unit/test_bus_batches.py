"""How the bus cuts a partition's anomalies into batch records (streams.partitioning): in
order, within the count and byte bounds, and in exactly the bytes agent.codec.encode gives
the AnomalyBatch."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import encode
from agent.models import Anomaly, AnomalyBatch, stable_id
from streams.partitioning import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    MAX_REQUEST_BYTES,
    Encoded,
    anomaly_records,
    batch_record,
    chunks,
    decode_anomalies,
    oversized,
    record_bytes,
)
from tests.unit.factories import SHOP, anomaly

# Sizes around the bounds: typical anomalies, and ones with large annotations.
_SIZES = st.lists(st.one_of(st.integers(200, 2000), st.integers(100_000, 700_000)), max_size=1200)


@settings(max_examples=100, deadline=None)
@given(_SIZES)
def test_chunks_keep_order_and_bounds(sizes: list[int]) -> None:
    items: list[Encoded] = [(b"x" * n, f"id{i}", "k") for i, n in enumerate(sizes)]
    cut = chunks(items)
    assert [x for c in cut for x in c] == items
    for c in cut:
        assert c
        assert len(c) <= MAX_BATCH
        if len(c) > 1:
            assert sum(len(v) + 1 for v, _, _ in c) <= MAX_BATCH_BYTES + 1
    # Greedy: a chunk is cut only when the next item would not fit.
    for c, nxt in itertools.pairwise(cut):
        size = sum(len(v) + 1 for v, _, _ in c)
        assert len(c) == MAX_BATCH or size + len(nxt[0][0]) > MAX_BATCH_BYTES


def test_a_batch_record_is_the_batch_as_codec_encodes_it() -> None:
    anomalies = [anomaly("a"), anomaly("b", labels={**SHOP, "pod": "p1"}), anomaly("c")]
    chunk: list[Encoded] = [(encode(a), a.id, "k") for a in anomalies]
    raw = batch_record(chunk)
    batch_id = stable_id("batch", *(a.id for a in anomalies))
    assert raw == encode(AnomalyBatch(anomalies=tuple(anomalies), id=batch_id))
    assert decode_anomalies(raw) == (anomalies, [])


def _with_notes(name: str, size: int) -> Anomaly:
    """An anomaly whose JSON is a little over ``size`` bytes (annotations of 4096 chars)."""
    notes = {f"n{i}": "x" * 4096 for i in range(size // 4096 + 1)}
    return replace(anomaly(name, labels={**SHOP, "pod": name}), annotations=notes)


def test_an_anomaly_that_fits_alone_fits_every_record_that_carries_it() -> None:
    # A source checks each anomaly alone (oversized); the records are what Kafka checks.
    big = _with_notes("big", MAX_REQUEST_BYTES - 20_000)
    assert oversized(big, "shop/cart") is None
    mid = [_with_notes(f"mid{i}", 300_000) for i in range(4)]
    small = [anomaly(f"s{i}", labels={**SHOP, "pod": f"s{i}"}) for i in range(600)]
    keyed = [(a, "shop/cart") for a in [*small[:300], *mid, big, *small[300:]]]
    records = anomaly_records(keyed, partitions=1)
    assert len(records) > 3
    assert all(record_bytes(v, k) <= MAX_REQUEST_BYTES for _, v, k in records)
    assert [a for _, v, _ in records for a in decode_anomalies(v)[0]] == [a for a, _ in keyed]


def test_an_anomaly_no_record_can_carry_is_named_with_its_size() -> None:
    huge = _with_notes("huge", MAX_REQUEST_BYTES + 100)
    size = record_bytes(encode(huge), b"shop/cart")
    assert size > MAX_REQUEST_BYTES
    assert oversized(huge, "shop/cart") == (
        f"the anomaly is {size} bytes as a Kafka record, over the limit of {MAX_REQUEST_BYTES}"
    )
