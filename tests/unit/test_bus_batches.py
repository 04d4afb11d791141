"""How the bus cuts a partition's anomalies into batch records (streams.partitioning): in
order, within the count and byte bounds, and in exactly the bytes agent.codec.encode gives
the AnomalyBatch."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import encode
from agent.models import AnomalyBatch, stable_id
from streams.partitioning import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    Encoded,
    batch_record,
    chunks,
    decode_anomalies,
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
