"""One read of the incidents topic serves every component that replays it at start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

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
    with pytest.raises(ValueError, match=r"9000\.0s asked of a shared read of 7200\.0s"):
        await shared(9000.0)
