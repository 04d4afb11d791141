"""`sre-agent approvals` and `actions`: what the commands report and exit with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from agent import remediation_cli
from agent.errors import PermanentError
from agent.models import ActionResult, ActionType, ParamValue
from agent.settings import DEFAULT_CONFIG, Settings, load_settings
from handlers.executor import undo_request
from tests.unit.factories import T0, action, result_of

SETTINGS = load_settings(DEFAULT_CONFIG, env={})
STALE = (
    "approval ap1 by alice is no longer valid: Deployment/shop/checkout changed since the "
    "request (generation=4 -> generation=5)"
)


def _results_on_the_topic(monkeypatch: pytest.MonkeyPatch, result: ActionResult) -> None:
    """The action-results topic, as _wait_result would read it, holding ``result``."""

    async def wait_result(
        settings: Settings, action_id: str, since: dict[int, int], wait_s: float
    ) -> ActionResult | None:
        return result if result.action_id == action_id else None

    monkeypatch.setattr(remediation_cli, "_wait_result", wait_result)


async def test_an_approval_that_comes_back_rejected_exits_non_zero_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    req = action("rollback", action_id="a1")
    stale = replace(result_of(req, "not_applicable"), status="rejected", message=STALE)
    _results_on_the_topic(monkeypatch, stale)
    assert await remediation_cli._report(SETTINGS, "a1", {}, 30.0) == 1
    assert capsys.readouterr().err == f"rejected: {STALE}\n"
    # `approvals reject` asked for exactly that.
    done = remediation_cli.REJECTED
    assert await remediation_cli._report(SETTINGS, "a1", {}, 30.0, done) == 0
    assert capsys.readouterr().out == f"rejected: {STALE}\n"


async def test_an_approval_that_ran_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _results_on_the_topic(monkeypatch, result_of(action("rollback", action_id="a1"), "unknown"))
    assert await remediation_cli._report(SETTINGS, "a1", {}, 30.0) == 0
    assert capsys.readouterr().out.startswith("succeeded")
    assert await remediation_cli._report(SETTINGS, "other", {}, 30.0) == 1  # no result


async def test_an_approval_is_not_reported_done_by_its_action_asked_again_meanwhile(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # While `approvals approve` waited, the incident was analysed again and asked for the
    # same action: the executor recorded a duplicate of the pending request, which the
    # command took for the decision's result, exiting 0 for an approval later rejected.
    req = action("rollback", action_id="a1")
    asked_again = replace(
        result_of(req, "not_applicable"),
        status="duplicate",
        message="approval ap1 already pending since 2026-01-01T00:00:00+00:00",
    )
    stale = replace(result_of(req, "not_applicable"), status="rejected", message=STALE)
    topic_holds = [asked_again, stale]

    async def follow(*_args: Any, until: Callable[[Any], bool], **_kw: Any) -> Any | None:
        return next((r for r in topic_holds if until(r)), None)

    monkeypatch.setattr(remediation_cli, "follow", follow)
    assert await remediation_cli._report(SETTINGS, "a1", {}, 30.0) == 1
    assert capsys.readouterr().err == f"rejected: {STALE}\n"
    # A duplicate of an action already done is still the outcome it reports.
    topic_holds[:] = [asked_again, replace(stale, status="duplicate", outcome="unknown")]
    assert await remediation_cli._report(SETTINGS, "a1", {}, 30.0) == 0


async def test_actions_list_marks_undoable_exactly_what_undo_restores(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ran(type: ActionType, aid: str, prior: dict[str, ParamValue]) -> ActionResult:
        return replace(result_of(action(type, action_id=aid), "healed"), prior_state=prior)

    topic = [
        ran("restart_workload", "restart", {"restartedAt": "2024-05-01T11:00:00Z"}),
        ran("rollback", "rollback", {"revision": 6}),
        ran("scale_up", "scale", {}),
    ]

    async def results(settings: Settings) -> list[ActionResult]:
        return topic

    monkeypatch.setattr(remediation_cli, "results", results)
    assert await remediation_cli.list_actions(SETTINGS, 20) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {r.action_id for r, line in zip(topic, lines, strict=True) if "[undoable]" in line}
    assert marked == {"rollback"}
    for r in topic:
        if r.action_id in marked:
            undo_request(r, requested_by="bob", now=T0)
        else:
            with pytest.raises(PermanentError):
                undo_request(r, requested_by="bob", now=T0)
