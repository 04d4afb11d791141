"""Spending limits for a paid dependency: a per-minute budget and the retry backoff.

Both read an injected clock (the event loop's in production), so tests drive time. The
circuit breaker next to them lives in :mod:`agent.breaker`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Minute:
    index: int
    calls: int = 0
    tokens: int = 0


class MinuteBudget:
    """At most ``max_calls`` calls and ``max_tokens`` tokens per clock minute.

    A call first :meth:`reserve` s its estimated tokens; once the dependency reports the real
    usage, :meth:`settle` corrects the count. Fixed minute buckets (not a sliding window):
    simple to reason about, and at worst twice the rate across a minute boundary.
    """

    def __init__(self, *, max_calls: int, max_tokens: int, clock: Callable[[], float]) -> None:
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.clock = clock
        self._minute = _Minute(index=self._index())

    def _index(self) -> int:
        return int(self.clock() // 60)

    def _current(self) -> _Minute:
        index = self._index()
        if index != self._minute.index:
            self._minute = _Minute(index=index)
        return self._minute

    @property
    def calls(self) -> int:
        return self._current().calls

    @property
    def tokens(self) -> int:
        return self._current().tokens

    def reserve(self, tokens: int) -> str | None:
        """Take one call and ``tokens``; or return why not ("calls" or "tokens")."""
        m = self._current()
        if m.calls + 1 > self.max_calls:
            return "calls"
        if m.tokens + tokens > self.max_tokens:
            return "tokens"
        m.calls += 1
        m.tokens += tokens
        return None

    def settle(self, reserved: int, used: int) -> None:
        """Replace a reservation by the real usage (if still in the same minute)."""
        m = self._current()
        m.tokens = max(0, m.tokens - reserved + used)


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None = None
) -> float | None:
    """Seconds before retry number ``attempt`` (0-based): exponential from ``base``, at
    least what the server asked for. None when the server asks for more than ``cap``:
    waiting that long would stall the stage, so the caller gives up instead."""
    if retry_after is not None and retry_after > cap:
        return None
    delay: float = min(cap, base * 2.0**attempt)
    return max(delay, retry_after or 0.0)
