"""An in-memory stand-in for the bus, as the executor sees it (handlers.executor.Publisher).

It keeps what was published in order, so tests read results, approval requests, tombstones
and dead letters back; nothing is accepted that the real bus would refuse (unknown topics
raise, as ``streams.bus.Bus.topic`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from agent.models import ActionResult, ApprovalRequest
from agent.topics import topic


class MemoryBus:
    def __init__(self, prefix: str = "mem.") -> None:
        self.prefix = prefix
        self.sent: list[tuple[str, Any, str | None]] = []
        self.letters: list[str] = []
        self._changed = asyncio.Event()

    def topic(self, name: str) -> str:
        return topic(self.prefix, name)

    async def publish(self, topic_name: str, event: Any, key: str | None = None) -> None:
        self.sent.append(
            (topic_name, event, key if key is not None else getattr(event, "key", None))
        )
        self._changed.set()

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        for topic_name, event, key in items:
            await self.publish(topic_name, event, key)

    async def dead_letter(
        self,
        *,
        source_topic: str,
        raw: bytes | None,
        error: str,
        consumer: str,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.letters.append(error)
        self._changed.set()

    def on(self, name: str) -> list[tuple[Any, str | None]]:
        full = self.topic(name)
        return [(e, k) for t, e, k in self.sent if t == full]

    def results(self, action_id: str | None = None) -> list[ActionResult]:
        return [
            e
            for e, _ in self.on("action-results")
            if isinstance(e, ActionResult) and (action_id is None or e.action_id == action_id)
        ]

    def approvals(self) -> list[ApprovalRequest]:
        return [e for e, _ in self.on("approvals") if isinstance(e, ApprovalRequest)]

    def tombstones(self) -> list[str]:
        return [k for e, k in self.on("approvals") if e is None and k]

    async def wait_for(
        self, predicate: Callable[[MemoryBus], bool], timeout: float = 30.0, what: str = ""
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                tail = [(t, getattr(e, "message", e)) for t, e, _ in self.sent[-6:]]
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {tail}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
