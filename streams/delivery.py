"""Holes in what faust hands the correlator, and reading them from Kafka directly.

The fail-over test caught faust-streaming (0.11) handing a worker that had just taken a
partition over its records with one missing: its fetch loop drops a record whose hand-over
to the stream races the flow suspension of a rebalance, and moves its read offset past it.
The correlator never saw the record; worse, faust's commit logic takes an acked offset one
past the committed one as contiguous, so the hole was committed and the anomaly lost for
good. Seeking faust back does not help: records fetched before the seek move its read
offset on again, and it drops the re-read ones as already read.

So the correlator checks that each partition's offsets follow on from the committed offset
and from each other, and reads a hole's records itself (:func:`streams.replay.read_range`):
they are folded before the record that revealed the hole and acked as faust's own, so
faust's commits cover them only once folded. Offsets that hold no record (transaction
markers) simply yield nothing.
"""

from __future__ import annotations

from collections.abc import Hashable


class DeliveryGuard:
    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}  # partition -> next offset expected

    def reset(self) -> None:
        """Forget every partition (after a rebalance: positions restart at the commit)."""
        self._next.clear()

    def hole(self, partition: Hashable, offset: int, committed: int | None) -> range:
        """The offsets missing before ``offset`` (empty when the record follows on, or is
        one read again after a seek, which the fold and faust's acks dedup)."""
        expected = self._next.get(partition, committed)
        self._next[partition] = max(offset + 1, expected or 0)
        if expected is None or offset <= expected:
            return range(0)
        return range(expected, offset)
