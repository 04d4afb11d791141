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
from typing import Any


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


class Stall:
    """Partitions whose offset stopped moving while records wait for it.

    The correlator watches two things with it:

    - **Table recovery** (``rearm``). faust-streaming's recovery of a table can wait
      forever after a rebalance: it seeks the changelog partition back to what it has
      applied, yet the records are fetched and never reach it (the consumer's position
      ends up past the highwater while recovery's offset has not moved; seen in 8 of 72
      rebalances on this machine, and in CI as a worker that neither forgot the partitions
      it lost nor folded the one it kept). Seeking the partition back to the next offset
      recovery needs makes it read them again; the timer restarts after each report, to
      give the seek its time.
    - **Liveness**. A worker whose committed offsets (or, in recovery, its changelog
      offsets) have not moved for ``correlation.stuck_after`` while records wait is stuck
      whatever the cause, and says so on /health/live so that it is restarted.

    :meth:`observe` is fed the offsets every few seconds and returns the (partition,
    offset after the last one passed) of those without progress for ``stall_s``.
    """

    def __init__(self, stall_s: float, *, rearm: bool = True) -> None:
        self.stall_s = stall_s
        self.rearm = rearm
        self._since: dict[Hashable, tuple[int, float]] = {}  # tp -> (offset, unmoved since)

    def observe(
        self, offsets: dict[Any, int], remaining: dict[Any, int], now: float
    ) -> list[tuple[Any, int]]:
        """``offsets``: the last offset passed per partition (-1: none); ``remaining``:
        records left to the highwater per partition; ``now``: monotonic."""
        stalled = []
        for tp, left in remaining.items():
            offset = offsets.get(tp, -1)
            if left <= 0:
                self._since.pop(tp, None)
                continue
            seen = self._since.get(tp)
            if seen is None or seen[0] != offset:
                self._since[tp] = (offset, now)
            elif now - seen[1] >= self.stall_s:
                stalled.append((tp, offset + 1))
                if self.rearm:
                    self._since[tp] = (offset, now)
        for tp in [tp for tp in self._since if tp not in remaining]:
            del self._since[tp]
        return stalled

    def reset(self) -> None:
        self._since.clear()
