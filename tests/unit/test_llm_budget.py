"""Per-minute budget, backoff and Retry-After parsing: pure, on a driven clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.budget import MinuteBudget, backoff_delay
from agent.chat import (
    LLMInvalidResponse,
    LLMRateLimited,
    LLMTimeout,
    failure_reason,
    parse_retry_after,
)
from agent.errors import DependencyUnavailable, PermanentError


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_calls_are_limited_per_minute_and_the_next_minute_starts_afresh() -> None:
    clock = Clock(60 * 100)
    b = MinuteBudget(max_calls=2, max_tokens=10_000, clock=clock)
    assert b.reserve(10) is None and b.reserve(10) is None
    assert b.reserve(10) == "calls"
    clock.t += 59
    assert b.reserve(10) == "calls"
    clock.t += 1
    assert b.reserve(10) is None and b.calls == 1


def test_tokens_are_reserved_then_settled_to_the_real_usage() -> None:
    b = MinuteBudget(max_calls=100, max_tokens=1000, clock=Clock())
    assert b.reserve(800) is None
    assert b.reserve(300) == "tokens"
    b.settle(800, 200)  # the call used far less than estimated
    assert b.tokens == 200
    assert b.reserve(300) is None


def test_zero_budget_refuses_everything() -> None:
    assert MinuteBudget(max_calls=0, max_tokens=10, clock=Clock()).reserve(1) == "calls"


@given(st.integers(0, 10), st.floats(0.01, 5), st.floats(0.1, 60), st.none() | st.floats(0, 120))
def test_backoff_is_bounded_and_honours_retry_after(
    attempt: int, base: float, cap: float, retry_after: float | None
) -> None:
    d = backoff_delay(attempt, base=base, cap=cap, retry_after=retry_after)
    if retry_after is not None and retry_after > cap:
        assert d is None
    else:
        assert d is not None
        assert d <= max(cap, retry_after or 0)
        assert d >= (retry_after or 0)


def test_backoff_doubles() -> None:
    assert [backoff_delay(n, base=0.5, cap=10) for n in range(6)] == [0.5, 1, 2, 4, 8, 10]


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"x-ms-retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"Retry-After": format_datetime(NOW - timedelta(seconds=30), usegmt=True)}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, NOW) == expected


def test_failure_reasons() -> None:
    assert failure_reason(LLMRateLimited("x", retry_after=3)) == "rate_limited"
    assert failure_reason(LLMTimeout("x")) == "timeout"
    assert failure_reason(LLMInvalidResponse("x")) == "invalid_response"
    assert failure_reason(DependencyUnavailable("x")) == "unavailable"
    assert failure_reason(PermanentError("x")) == "error"
