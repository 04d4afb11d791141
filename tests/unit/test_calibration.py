"""Calibration tally: predicted confidence per action against verified outcomes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.calibration import CalibrationTracker, confidence_bucket
from agent.metrics import Metrics
from agent.models import ActionResult
from streams.bus import Envelope
from tests.unit.factories import action, result_of


def result(
    action_id: str, outcome: str, *, rid: str = "r1", type: str = "scale_up"
) -> ActionResult:
    a = action(type, action_id=action_id)  # type: ignore[arg-type]
    return result_of(a, outcome, rid=rid)  # type: ignore[arg-type]


def env(value: object) -> Envelope:
    return Envelope("t", 0, 0, None, value)


def count(m: Metrics, **labels: str) -> float:
    return m.registry.get_sample_value("sre_agent_confidence_outcomes_total", labels) or 0.0


@pytest.mark.parametrize(
    ("confidence", "bucket"),
    [
        (0.0, "0.00-0.50"),
        (0.5, "0.50-0.70"),
        (0.849, "0.70-0.85"),
        (0.85, "0.85-0.95"),
        (0.95, "0.95-1.00"),
        (1.0, "0.95-1.00"),
    ],
)
def test_buckets_split_at_the_approval_threshold(confidence: float, bucket: str) -> None:
    assert confidence_bucket(confidence) == bucket


async def test_verified_outcomes_are_tallied_by_predicted_confidence() -> None:
    m = Metrics()
    t = CalibrationTracker(metrics=m)
    await t.handle(
        [
            env(action("scale_up", action_id="a1", confidence=0.9)),
            env(action("rollback", action_id="a2", confidence=0.6)),
            env(result("a1", "unknown", rid="r0")),  # executed, not yet verified: not counted
            env(result("a1", "healed", rid="r1")),
            env(result("a2", "not_healed", rid="r2", type="rollback")),
            env(result("a2", "not_healed", rid="r2", type="rollback")),  # redelivered: once
            env(result("zz", "healed", rid="r3")),  # prediction unknown here: skipped
        ]
    )
    assert count(m, action="scale_up", confidence_bucket="0.85-0.95", outcome="healed") == 1
    assert count(m, action="rollback", confidence_bucket="0.50-0.70", outcome="not_healed") == 1
    assert t.predicted("a1") == 0.9 and t.predicted("zz") is None


async def test_a_later_request_for_the_same_action_id_updates_the_prediction() -> None:
    m = Metrics()
    t = CalibrationTracker(metrics=m)
    first = action("scale_up", action_id="a1", confidence=0.9)
    await t.handle([env(first), env(replace(first, confidence=0.4)), env(result("a1", "worse"))])
    assert count(m, action="scale_up", confidence_bucket="0.00-0.50", outcome="worse") == 1


async def test_a_restart_seeds_the_predictions_of_recent_actions() -> None:
    m = Metrics()
    asked: list[float] = []

    async def recent(seconds: float) -> list[Envelope]:
        asked.append(seconds)
        return [env(action("scale_up", action_id="before-restart", confidence=0.9))]

    t = CalibrationTracker(metrics=m, actions=recent)
    await t.start()
    await t.handle([env(result("before-restart", "healed", rid="r1"))])
    assert asked == [6 * 3600.0]
    assert count(m, action="scale_up", confidence_bucket="0.85-0.95", outcome="healed") == 1
