"""group_wait / group_interval / repeat_interval, in Alertmanager's meaning (pure part)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.models import Incident
from streams.correlation import CorrelationRules, as_published, publish_due, release, repeat_due
from tests.unit.factories import at

RULES = CorrelationRules(group_wait=10, group_interval=60, repeat_interval=3600)


def incident(status: str = "open") -> Incident:
    return Incident(
        id="i",
        key="c/ns/svc",
        status=status,  # type: ignore[arg-type]
        severity="warning",
        labels={},
        members=(),
        opened_at=at(0),
        updated_at=at(0),
    )


def test_a_new_incident_waits_group_wait() -> None:
    assert not publish_due(incident(), None, at(9), RULES)
    assert publish_due(incident(), None, at(10), RULES)


def test_updates_go_out_at_most_once_per_group_interval() -> None:
    upd = incident("updated")
    assert not publish_due(upd, at(10), at(69), RULES)
    assert publish_due(upd, at(10), at(70), RULES)


@pytest.mark.parametrize("status", ["resolved", "reopened", "silenced", "mitigating"])
def test_transitions_are_never_held(status: str) -> None:
    assert publish_due(incident(status), at(10), at(11), RULES)
    # Never published, a reopened or silenced incident is new to subscribers: it waits
    # group_wait (see test_correlator_timers).
    if status not in ("reopened", "silenced"):
        assert publish_due(incident(status), None, at(1), RULES)
    else:
        assert not publish_due(incident(status), None, at(1), RULES)


def test_a_never_published_incident_that_reopens_waits_group_wait_and_opens() -> None:
    reopened = incident("reopened")
    assert not publish_due(reopened, None, at(9), RULES)
    assert publish_due(reopened, None, at(10), RULES)
    assert release(reopened, None, at(10), RULES) == (
        replace(reopened, status="open"),
        at(10),
        False,
    )


def test_a_never_published_incident_that_resolves_is_not_published() -> None:
    assert release(incident("resolved"), None, at(1), RULES) == (None, None, False)
    assert release(incident("resolved"), at(0), at(1), RULES) == (
        incident("resolved"),
        at(1),
        False,
    )


def test_zero_timers_publish_everything_at_once() -> None:
    rules = CorrelationRules()
    assert publish_due(incident(), None, at(0), rules)
    assert publish_due(incident("updated"), at(5), at(5), rules)


def test_repeat_interval() -> None:
    assert not repeat_due(incident("updated"), at(0), at(3599), RULES)
    assert repeat_due(incident("updated"), at(0), at(3600), RULES)
    assert not repeat_due(incident("resolved"), at(0), at(9999), RULES)
    assert not repeat_due(incident(), None, at(9999), RULES)  # never published: group_wait's job
    assert not repeat_due(incident(), at(0), at(9999), replace(RULES, repeat_interval=0))


def test_the_first_published_event_says_open() -> None:
    assert as_published(incident("updated"), None).status == "open"
    assert as_published(incident("updated"), at(1)).status == "updated"
    assert as_published(incident("resolved"), None).status == "resolved"
