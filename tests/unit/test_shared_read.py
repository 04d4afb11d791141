"""One read of the incidents topic serves every component that replays it at start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from streams.bus import Envelope
from streams.replay import SharedRead


async def test_the_components_share_one_read_of_the_longest_window() -> None:
    asked: list[float] = []
    records = [Envelope("t.incidents", 0, 0, "k", None)]

    async def read(seconds: float) -> Iterable[Envelope]:
        asked.append(seconds)
        await asyncio.sleep(0.01)
        return records

    shared = SharedRead(read, 7200.0, users=2)
    first, second = await asyncio.gather(shared(3600.0), shared(4500.0))
    assert asked == [7200.0] and first is records and second is records
    # Both had it: it is let go, and a later start reads afresh.
    assert await shared(60.0) is records and asked == [7200.0, 7200.0]


async def test_a_longer_window_is_read_on_its_own() -> None:
    """The unresolved watch learns at start that it must reach back further (a long
    silence): it reads alone, and the others still share the usual read."""
    asked: list[float] = []

    async def read(seconds: float) -> Iterable[Envelope]:
        asked.append(seconds)
        return [Envelope("t.incidents", 0, len(asked), "k", None)]

    shared = SharedRead(read, 7200.0, users=2)
    longer, usual = await shared(9000.0), await shared(3600.0)
    assert asked == [9000.0, 7200.0] and longer != usual
    assert await shared(60.0) is not usual and asked[-1] == 7200.0  # both had theirs
