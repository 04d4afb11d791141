"""A circuit breaker per dependency endpoint, so a dead Prometheus is not hammered.

closed     calls pass; ``failure_threshold`` consecutive failures open the circuit.
open       calls are refused until ``reset_timeout`` has passed since it opened.
half_open  one probe call passes at a time; its success closes the circuit, its failure re-opens it.

The transitions are pure functions of (state, now); :class:`CircuitBreaker` only holds the
state and reads the injected clock (the event loop's by default), so tests drive time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

BreakerMode = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerState:
    mode: BreakerMode = "closed"
    failures: int = 0  # consecutive
    opened_at: float | None = None
    probe_at: float | None = None  # when the half-open probe in flight went out


@dataclass(frozen=True, slots=True)
class BreakerRules:
    failure_threshold: int = 3
    reset_timeout: float = 30.0


def allow(state: BreakerState, now: float, rules: BreakerRules) -> tuple[BreakerState, bool]:
    """May a call go out now? Returns the new state (open -> half_open after the timeout)."""
    if state.mode == "closed":
        return state, True
    if state.mode == "open":
        assert state.opened_at is not None
        if now - state.opened_at < rules.reset_timeout:
            return state, False
        return replace(state, mode="half_open", probe_at=now), True
    if state.probe_at is not None and now - state.probe_at < rules.reset_timeout:
        return state, False  # one probe at a time (a lost probe is replaced after the timeout)
    return replace(state, probe_at=now), True


def on_success(state: BreakerState) -> BreakerState:
    return BreakerState()


def on_failure(state: BreakerState, now: float, rules: BreakerRules) -> BreakerState:
    failures = state.failures + 1
    if state.mode == "half_open" or failures >= rules.failure_threshold:
        return BreakerState(mode="open", failures=failures, opened_at=now)
    return replace(state, failures=failures)


class CircuitBreaker:
    def __init__(self, rules: BreakerRules, *, clock: Callable[[], float]) -> None:
        self.rules = rules
        self.clock = clock
        self.state = BreakerState()

    @property
    def is_open(self) -> bool:
        """Open or probing: the endpoint is considered down."""
        return self.state.mode != "closed"

    def allow(self) -> bool:
        self.state, ok = allow(self.state, self.clock(), self.rules)
        return ok

    def record_success(self) -> None:
        self.state = on_success(self.state)

    def record_failure(self) -> None:
        self.state = on_failure(self.state, self.clock(), self.rules)
