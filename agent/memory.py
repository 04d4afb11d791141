"""Bounded memories: what a component remembers of the stream (ids seen, incidents held),
newest last, so a long-running process keeps the recent and forgets the oldest."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

_V = TypeVar("_V")

LIMIT = 10_000  # entries a memory keeps unless told otherwise


def remember(memory: OrderedDict[str, _V], key: str, value: _V, limit: int = LIMIT) -> None:
    """Set ``key`` as the newest entry, forgetting the oldest beyond ``limit``."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)
