"""`sre-agent incidents`: one incident's timeline from the topics' records, and the latest
state of each incident."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from agent.errors import ConfigError
from agent.incident_cli import latest, matching, timeline
from agent.models import ActionResult, Analysis, ApprovalRequest, Escalation
from agent.settings import positive_duration
from tests.fakes.incidents import OPENED, incident, member
from tests.unit.factories import action


def _at(minutes: float) -> datetime:
    return OPENED + timedelta(minutes=minutes)


def records() -> list[object]:
    opened = incident(member(), id="inc-1")
    updated = replace(opened, revision=2, status="updated", updated_at=_at(3))
    resolved = replace(opened, revision=3, status="resolved", updated_at=_at(9))
    act = replace(action("rollback"), requested_at=_at(1))
    an = Analysis(
        id="an-1",
        incident_id="inc-1",
        incident_key=opened.key,
        incident_revision=1,
        analyzer="rules",
        root_cause="bad rollout of checkout",
        root_cause_class="bad_rollout",
        confidence=0.9,
        evidence=(),
        actions=(),
        created_at=_at(1),
    )
    ask = ApprovalRequest(
        id="ap-1",
        action=act,
        action_hash=act.digest(),
        root_cause="bad rollout",
        evidence=(),
        created_at=_at(1),
        expires_at=_at(61),
        target_version="1",
    )
    done = ActionResult(
        id="res-1",
        action_id=act.id,
        incident_id="inc-1",
        incident_key=act.incident_key,
        type="rollback",
        target=act.target,
        status="succeeded",
        outcome="healed",
        message="rolled back to v1",
        started_at=_at(4),
        finished_at=_at(5),
    )
    page = Escalation(
        id="esc-1",
        incident_id="inc-1",
        incident_key=act.incident_key,
        reason="approval_requested",
        summary="rollback on Deployment/shop/checkout: approval requested",
        at=_at(1),
    )
    other = incident(member(), id="inc-2")
    # Out of order, with a repeat (two reads of one record) and another incident's record.
    return [resolved, done, page, other, an, ask, opened, updated, act, done]


def test_a_later_unresolved_level_is_named_in_the_timeline() -> None:
    inc = incident(member(), id="inc-1")
    second = Escalation.of_incident(inc, "unresolved", "open for 61 min", _at(61), (), level=2)
    first = Escalation.of_incident(inc, "unresolved", "open for 16 min", _at(16), ())
    texts = [e.text for e in timeline("inc-1", [inc, second, first]) if e.kind == "escalation"]
    assert texts == ["[unresolved] open for 16 min", "[unresolved level 2] open for 61 min"]


def test_a_timeline_is_one_incidents_records_in_time_order_once_each() -> None:
    entries = timeline("inc-1", records())
    assert [e.kind for e in entries] == [
        "incident",
        "analysis",
        "action",
        "approval",  # an approval names its incident through its action
        "escalation",
        "incident",
        "result",
        "incident",
    ]
    assert entries[0].text.startswith("rev 1 open, critical; firing: high-error-rate")
    assert entries[1].text == (
        "rules (bad_rollout, confidence 0.90): bad rollout of checkout; recommends no action"
    )
    assert entries[3].text.startswith("ap-1 asked for rollback Deployment/shop/checkout")
    assert entries[4].text == "[approval_requested] rollback on Deployment/shop/checkout: " + (
        "approval requested"
    )
    assert entries[6].text == (
        "rollback Deployment/shop/checkout succeeded/healed: rolled back to v1"
    )
    assert entries[-1].text.startswith("rev 3 resolved")
    assert timeline("inc-3", records()) == []


def test_an_incident_is_found_by_its_id_or_its_first_characters() -> None:
    values = records()
    assert matching("inc-1", values) == ["inc-1"]
    assert matching("inc", values) == ["inc-1", "inc-2"]  # ambiguous: the caller says so
    assert matching("nope", values) == []


def test_latest_keeps_each_incidents_newest_revision_newest_first() -> None:
    found = latest(records())
    assert [(i.id, i.revision) for i in found] == [("inc-1", 3), ("inc-2", 1)]


def test_since_must_be_a_positive_duration() -> None:
    assert positive_duration("90m", "--since") == 5400.0
    for bad in ("5x", "0s"):
        with pytest.raises(ConfigError, match="--since"):
            positive_duration(bad, "--since")
