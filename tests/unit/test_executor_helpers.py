"""The executor's pure helpers: replica arithmetic and the verification re-check."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.models import ActionType, Anomaly, AnomalyStatus, Firing, ParamValue
from handlers.executor import kill_switch_file, target_replicas
from handlers.verification import (
    NO_ALERTMANAGER,
    NO_PATTERN,
    NO_PROMETHEUS,
    NO_REPORT,
    fires_at,
    plan_recheck,
    recheck_verdict,
    reported,
    to_recheck,
)
from tests.unit.factories import T0, action, anomaly


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


def test_fires_at_a_series_where_it_fired() -> None:
    series = [{"namespace": "shop", "service": "cart"}, {**SHOP, "pod": "p1"}]
    assert fires_at(series, SHOP)


def test_not_firing_when_only_other_places_remain() -> None:
    series = [{"namespace": "shop", "service": "cart"}, {"namespace": "x", "service": "checkout"}]
    assert not fires_at(series, SHOP)
    assert not fires_at([], SHOP)
    assert not fires_at([{"node": "n2"}], {"node": "n1"})


def test_fires_at_matches_only_the_labels_it_names() -> None:
    assert fires_at([{"namespace": "shop", "service": "any"}], {"namespace": "shop"})
    # Where nothing identifies the place, any remaining series counts as still firing.
    assert fires_at([{"service": "x"}], {})
    assert not fires_at([], {})


def test_a_request_of_an_earlier_version_rechecks_its_patterns_in_its_service() -> None:
    old = replace(action(), trigger=("b", "a"))
    assert to_recheck(old) == (Firing("b", SHOP), Firing("a", SHOP))
    new = replace(old, firing=(Firing("a", {"node": "n1"}),))
    assert to_recheck(new) == (Firing("a", {"node": "n1"}),)


def test_each_part_of_a_trigger_is_rechecked_where_it_came_from() -> None:
    firing = [
        Firing("errors", SHOP, "prometheus"),
        Firing("errors", {"node": "n1"}, "prometheus"),
        Firing("legacy", SHOP),  # an earlier request: no source, a pattern
        Firing("gone", SHOP, "prometheus"),  # no longer configured
        Firing("KubeDown", SHOP, "alertmanager"),
        Firing("BackOff", SHOP, "kubernetes"),
        Firing("ext", SHOP, "feed"),
    ]
    plan = plan_recheck(firing, has_pattern=lambda n: n in ("errors", "legacy"), alertmanager=True)
    assert plan.prometheus == {"errors": (SHOP, {"node": "n1"}), "legacy": (SHOP,)}
    assert plan.alertmanager == {"KubeDown": (SHOP,)}
    assert [name for name, _ in plan.unchecked] == ["gone", "BackOff", "ext"]
    assert dict(plan.unchecked)["gone"] == NO_PATTERN
    assert "Kubernetes" in dict(plan.unchecked)["BackOff"]
    # Without an Alertmanager or a Prometheus to ask, those parts are not re-checked either.
    bare = plan_recheck(firing, has_pattern=lambda n: n == "errors", prometheus=False)
    assert bare.prometheus == {} and bare.alertmanager == {}
    assert dict(bare.unchecked)["errors"] == NO_PROMETHEUS
    assert dict(bare.unchecked)["KubeDown"] == NO_ALERTMANAGER
    # A feed's signal, when the caller can read what the feed reported since the action.
    fed = plan_recheck(firing, has_pattern=lambda n: False, feeds=True)
    assert fed.feed == {"ext": (SHOP,)} and "ext" not in dict(fed.unchecked)


SINCE = T0


def said(
    status: AnomalyStatus,
    seconds: float,
    *,
    name: str = "ext",
    pod: str = "p1",
    service: str = "shop-svc",
) -> Anomaly:
    """A feed's report of ``name`` on one pod, observed ``seconds`` after SINCE."""
    labels = {"namespace": "shop", "service": service, "pod": pod}
    return anomaly(name, status=status, labels=labels, t=seconds, source="feed")


PLACE = {"namespace": "shop", "service": "shop-svc"}


@pytest.mark.parametrize(
    ("reports", "verdict"),
    [
        ([], ([], [], [("ext", NO_REPORT)])),
        ([said("resolved", 5)], ([], ["ext"], [])),
        ([said("resolved", 5), said("firing", 9)], (["ext"], [], [])),
        ([said("firing", 5), said("resolved", 9)], ([], ["ext"], [])),
        # Another pod of the service still says firing: not cleared.
        ([said("resolved", 5), said("firing", 3, pod="p2")], (["ext"], [], [])),
        # Before the action, another service, another source: none of them news.
        (
            [
                said("resolved", 0),
                said("resolved", -10),
                said("resolved", 5, service="cart"),
                replace(said("resolved", 5), source="prometheus"),
            ],
            ([], [], [("ext", NO_REPORT)]),
        ),
        # The same instant: firing wins.
        ([said("resolved", 5), said("firing", 5)], (["ext"], [], [])),
    ],
)
def test_a_feed_signal_is_judged_by_its_latest_reports_since_the_action(
    reports: list[Anomaly], verdict: object
) -> None:
    assert reported({"ext": (PLACE,)}, reports, SINCE) == verdict


def test_a_signal_fired_at_two_places_clears_when_it_cleared_at_both() -> None:
    places = {"ext": (PLACE, {**PLACE, "service": "cart"})}
    one = [said("resolved", 5)]
    assert reported(places, one, SINCE) == ([], [], [("ext", NO_REPORT)])
    both = [*one, said("resolved", 6, service="cart")]
    assert reported(places, both, SINCE) == ([], ["ext"], [])


reports_st = st.lists(
    st.builds(
        said,
        st.sampled_from(["firing", "resolved"]),
        st.integers(-20, 20),
        pod=st.sampled_from(["p1", "p2"]),
        service=st.sampled_from(["shop-svc", "cart"]),
    ),
    max_size=12,
)


@given(reports_st, st.randoms())
def test_the_order_reports_arrive_in_does_not_change_the_verdict(
    reports: list[Anomaly], rnd: Random
) -> None:
    shuffled = list(reports)
    rnd.shuffle(shuffled)
    places = {"ext": (PLACE,)}
    assert reported(places, shuffled, SINCE) == reported(places, reports, SINCE)


@given(reports_st, reports_st)
def test_reports_from_before_the_action_never_change_the_verdict(
    reports: list[Anomaly], older: list[Anomaly]
) -> None:
    before = [
        replace(a, observed_at=SINCE - (a.observed_at - SINCE) - timedelta(seconds=21))
        for a in older
    ]
    assert all(a.observed_at <= SINCE for a in before)
    places = {"ext": (PLACE,)}
    assert reported(places, [*before, *reports], SINCE) == reported(places, reports, SINCE)


@pytest.mark.parametrize(
    ("still", "cleared", "unchecked", "verdict"),
    [
        ([], [], [], None),
        ([], ["a", "b"], [], ("healed", "a, b cleared")),
        (["b"], ["a"], [("k", "why")], ("not_healed", "b still firing after the action")),
        ([], [], [("k", "why")], ("unknown", "k not re-checked (why)")),
        ([], ["a"], [("k", "why")], ("unknown", "a cleared; k not re-checked (why)")),
        (
            [],
            ["a"],
            [("k", "one"), ("l", "two"), ("m", "one")],
            ("unknown", "a cleared; k, m not re-checked (one); l not re-checked (two)"),
        ),
    ],
)
def test_recheck_verdict(
    still: list[str], cleared: list[str], unchecked: list[tuple[str, str]], verdict: object
) -> None:
    assert recheck_verdict(still, cleared, unchecked) == verdict


def test_kill_switch_file(tmp_path: Path) -> None:
    path = tmp_path / "stop"
    read = kill_switch_file(str(path))
    assert not read().kill_switch
    path.touch()
    assert read().kill_switch
    assert not kill_switch_file("")().kill_switch
