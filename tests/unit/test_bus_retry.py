"""How long a consumer waits between attempts at an event (streams.bus.retry_wait): the
backoff doubles unless the dependency named a longer wait, and is capped; an error that
names no wait carries no hint."""

from __future__ import annotations

from agent.errors import DependencyUnavailable
from streams.bus import RETRY_ATTEMPTS, RETRY_BASE, retry_wait


def test_the_backoff_doubles_to_the_cap_and_outlasts_a_broker_restart() -> None:
    waits = [retry_wait(n, None, base=RETRY_BASE, cap=30.0) for n in range(1, RETRY_ATTEMPTS)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert 45.0 <= sum(waits) <= 90.0  # tens of seconds, not a partition held for good


def test_a_hint_is_a_floor_and_capped() -> None:
    assert retry_wait(1, 5.0, base=1.0, cap=30.0) == 5.0
    assert retry_wait(3, 0.1, base=1.0, cap=30.0) == 4.0  # "retry soon" does not shorten it
    assert retry_wait(1, 3600.0, base=1.0, cap=30.0) == 30.0


def test_an_error_naming_no_wait_has_no_hint() -> None:
    assert DependencyUnavailable("kubernetes API: connection refused").retry_after is None
    assert DependencyUnavailable("429", retry_after=3.0).retry_after == 3.0
