"""Holes in a partition's delivered offsets are found, never folded past."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.delivery import DeliveryGuard, Stall

P = "anomalies-0"


def test_in_order_records_leave_no_hole() -> None:
    guard = DeliveryGuard()
    assert [guard.hole(P, o, 13) for o in (13, 14, 15)] == [range(0)] * 3


def test_a_hole_after_the_committed_offset() -> None:
    guard = DeliveryGuard()
    assert guard.hole(P, 14, 13) == range(13, 14)
    assert guard.hole(P, 15, 13) == range(0)


def test_a_hole_mid_stream() -> None:
    guard = DeliveryGuard()
    for o in range(12, 23):
        assert not guard.hole(P, o, 12)
    assert guard.hole(P, 26, 12) == range(23, 26)


def test_records_read_again_after_a_seek_are_no_hole() -> None:
    guard = DeliveryGuard()
    for o in range(10):
        guard.hole(P, o, 0)
    assert not guard.hole(P, 4, 0)  # the fold and faust's acks dedup them
    assert guard.hole(P, 11, 0) == range(10, 11)  # still measured from the furthest one


def test_no_commit_known_means_no_hole_until_a_record_is_seen() -> None:
    guard = DeliveryGuard()
    assert not guard.hole(P, 7, None)
    assert guard.hole(P, 9, None) == range(8, 9)


def test_partitions_are_independent_and_reset_forgets_them() -> None:
    guard = DeliveryGuard()
    assert not guard.hole("a", 0, None)
    assert not guard.hole("b", 3, 3)
    assert guard.hole("a", 2, None) == range(1, 2)
    guard.reset()
    assert not guard.hole("a", 2, 2)  # a new assignment starts at its commit


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=50), st.lists(st.booleans(), min_size=1, max_size=60))
def test_holes_plus_deliveries_cover_the_log_in_order(committed: int, drops: list[bool]) -> None:
    """Whatever faust drops, folding each hole before the record that revealed it folds
    every offset up to the last one delivered, in order."""
    guard = DeliveryGuard()
    log = list(range(committed, committed + len(drops)))
    delivered = [o for o, dropped in zip(log, drops, strict=True) if not dropped]
    folded: list[int] = []
    for offset in delivered:
        folded += list(guard.hole(P, offset, committed))
        folded.append(offset)
    assert folded == (log[: log.index(delivered[-1]) + 1] if delivered else [])


# --- a table recovery that stopped moving ---------------------------------------------------

C = "changelog-1"


def test_a_recovery_without_progress_for_the_stall_time_is_sought_back() -> None:
    stall = Stall(stall_s=10)
    assert stall.observe({C: -1}, {C: 6}, now=0) == []
    assert stall.observe({C: -1}, {C: 6}, now=9.9) == []
    assert stall.observe({C: -1}, {C: 6}, now=10) == [(C, 0)]
    # The seek gets its own stall time before another.
    assert stall.observe({C: -1}, {C: 6}, now=15) == []
    assert stall.observe({C: -1}, {C: 6}, now=20) == [(C, 0)]


def test_a_recovery_that_moves_or_is_done_is_left_alone() -> None:
    stall = Stall(stall_s=10)
    for t, offset in enumerate((-1, 3, 7, 12)):  # slow, but moving
        assert stall.observe({C: offset}, {C: 20 - offset}, now=9.0 * t) == []
    assert stall.observe({C: 19}, {C: 0}, now=100) == []  # caught up
    assert stall.observe({C: 19}, {C: 0}, now=200) == []


def test_a_partition_that_left_recovery_starts_afresh() -> None:
    stall = Stall(stall_s=10)
    stall.observe({C: 4}, {C: 2}, now=0)
    stall.observe({}, {}, now=5)  # another rebalance: not being recovered any more
    assert stall.observe({C: 4}, {C: 2}, now=12) == []  # unmoved since 12, not since 0
    assert stall.observe({C: 4}, {C: 2}, now=22) == [(C, 5)]


def test_a_liveness_watch_keeps_reporting_until_the_partition_moves() -> None:
    watch = Stall(stall_s=10, rearm=False)
    assert watch.observe({C: 4}, {C: 3}, now=0) == []
    assert watch.observe({C: 4}, {C: 3}, now=10) == [(C, 5)]
    assert watch.observe({C: 4}, {C: 3}, now=12) == [(C, 5)]  # still stuck: no new grace
    assert watch.observe({C: 6}, {C: 1}, now=14) == []  # moved: a fresh timer
    assert watch.observe({C: 6}, {C: 1}, now=23.9) == []
    assert watch.observe({C: 6}, {C: 0}, now=30) == []  # nothing waits: never stuck
