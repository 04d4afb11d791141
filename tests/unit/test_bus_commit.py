"""What a consumer commits after a batch (streams.bus.committable): never a partition a
rebalance took, nor one whose records it skipped as revoked even if it holds it again."""

from __future__ import annotations

from aiokafka import TopicPartition

from streams.bus import committable

P0, P1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_only_partitions_still_held_and_not_skipped_are_committed() -> None:
    offsets = {P0: 8, P1: 3}
    assert committable(offsets, frozenset({P0, P1})) == offsets
    assert committable(offsets, frozenset({P1})) == {P1: 3}  # P0 moved to another member
    assert committable(offsets, frozenset()) == {}
    # P0 was revoked mid-batch (its rest skipped), then given back: still not committed.
    assert committable(offsets, frozenset({P0, P1}), frozenset({P0})) == {P1: 3}
