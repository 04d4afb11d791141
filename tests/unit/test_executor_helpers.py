"""The executor's pure helpers: replica arithmetic and the verification match."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.models import ActionType, ParamValue
from handlers.executor import kill_switch_file, still_firing, target_replicas
from tests.unit.factories import action


@pytest.mark.parametrize(
    ("type_", "replicas", "current", "expected"),
    [
        ("scale_up", "+2", 3, 5),
        ("scale_down", "-1", 3, 2),
        ("scale_up", "5", 3, 5),
        ("scale_down", "1", 3, 1),
        ("scale_down", "-5", 3, 0),  # never below zero
        ("scale_up", 4, 1, 4),  # an int is absolute
        ("scale_up", "+0", 3, 3),
    ],
)
def test_target_replicas(
    type_: ActionType, replicas: ParamValue, current: int, expected: int
) -> None:
    act = action(type_, params={"replicas": replicas})
    assert target_replicas(act, current) == expected


def test_default_is_one_step_in_the_actions_direction() -> None:
    assert target_replicas(action("scale_up"), 3) == 4
    assert target_replicas(action("scale_down"), 3) == 2
    assert target_replicas(action("scale_down"), 0) == 0


def test_unparseable_replicas_raise() -> None:
    with pytest.raises(ValueError):
        target_replicas(action("scale_up", params={"replicas": "lots"}), 3)


@settings(max_examples=100, deadline=None)
@given(
    current=st.integers(min_value=0, max_value=1000),
    n=st.integers(min_value=-1000, max_value=1000),
)
def test_relative_and_absolute_replicas(current: int, n: int) -> None:
    relative = action("scale_up", params={"replicas": f"{n:+d}"})
    assert target_replicas(relative, current) == max(0, current + n)
    absolute = action("scale_up", params={"replicas": str(abs(n))})
    assert target_replicas(absolute, current) == abs(n)


SHOP = {"namespace": "shop", "service": "checkout"}


def test_still_firing_when_a_series_of_the_service_remains() -> None:
    samples = [{"namespace": "shop", "service": "cart"}, {**SHOP, "pod": "p1"}]
    assert still_firing(samples, SHOP)


def test_not_firing_when_only_other_services_remain() -> None:
    samples = [{"namespace": "shop", "service": "cart"}, {"namespace": "x", "service": "checkout"}]
    assert not still_firing(samples, SHOP)
    assert not still_firing([], SHOP)


def test_still_firing_matches_only_the_labels_the_action_has() -> None:
    assert still_firing([{"namespace": "shop", "service": "any"}], {"namespace": "shop"})
    assert not still_firing([{"namespace": "other"}], {"namespace": "shop", "service": ""})
    # Without identifying labels any remaining series counts as still firing.
    assert still_firing([{"service": "x"}], {})
    assert not still_firing([], {})


def test_kill_switch_file(tmp_path: Path) -> None:
    path = tmp_path / "stop"
    read = kill_switch_file(str(path))
    assert not read().kill_switch
    path.touch()
    assert read().kill_switch
    assert not kill_switch_file("")().kill_switch
