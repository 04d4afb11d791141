"""The circuit breaker: pure transitions, driven by an injected clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.breaker import BreakerRules, BreakerState, CircuitBreaker, allow, on_failure

RULES = BreakerRules(failure_threshold=3, reset_timeout=10.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures_and_refuses_calls() -> None:
    clock = Clock()
    b = CircuitBreaker(RULES, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert not b.is_open
    assert b.allow()
    b.record_failure()
    assert b.is_open
    clock.now = 9.9
    assert not b.allow()


def test_a_success_resets_the_count() -> None:
    b = CircuitBreaker(RULES, clock=Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert not b.is_open


def test_half_open_lets_one_probe_through_and_its_result_decides() -> None:
    clock = Clock()
    b = CircuitBreaker(RULES, clock=clock)
    for _ in range(3):
        b.record_failure()
    clock.now = 10.0
    assert b.allow()  # the probe
    assert b.state.mode == "half_open"
    assert not b.allow()  # only one at a time
    b.record_failure()  # the probe failed: open again, for a full timeout
    assert b.state.mode == "open" and b.state.opened_at == 10.0
    clock.now = 15.0
    assert not b.allow()
    clock.now = 20.0
    assert b.allow()
    b.record_success()
    assert b.state == BreakerState()
    assert b.allow() and b.allow()


def test_a_lost_probe_is_replaced_after_the_timeout() -> None:
    clock = Clock()
    b = CircuitBreaker(RULES, clock=clock)
    for _ in range(3):
        b.record_failure()
    clock.now = 10.0
    assert b.allow()  # probe goes out and is cancelled: no result recorded
    clock.now = 19.0
    assert not b.allow()
    clock.now = 20.0
    assert b.allow()


@given(st.lists(st.floats(0, 5), max_size=80))
def test_a_dead_endpoint_gets_threshold_calls_then_one_per_timeout(gaps: list[float]) -> None:
    state, now, calls = BreakerState(), 0.0, 0
    for dt in gaps:
        now += dt
        state, allowed = allow(state, now, RULES)
        if allowed:
            calls += 1
            state = on_failure(state, now, RULES)
    assert calls <= RULES.failure_threshold + now // RULES.reset_timeout + 1
