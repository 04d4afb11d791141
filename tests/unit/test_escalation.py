"""Escalations: a notify_oncall step escalates its incident once, with what the analysis
found; what a webhook receives names the escalation and hides secrets."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import orjson
import pytest

from agent.analysis_stage import no_remedy_escalation, notify_escalation
from agent.errors import ConfigError
from agent.models import Analysis, Escalation, RecommendedAction, SwitchChange, SwitchName, Target
from agent.notifier import payload
from tests.fakes.incidents import OPENED, PATTERNS, incident, member
from tests.unit.factories import settings as make_settings

CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")
PAGED = {
    "name": "payments-down",
    "condition": "up == 0",
    "actions": ["check_downstream_services", "notify_oncall"],
}


def analysis(*actions: RecommendedAction) -> Analysis:
    return Analysis(
        id="an-1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        incident_revision=1,
        analyzer="rules",
        root_cause="payments fail",
        root_cause_class="dependency_outage",
        confidence=0.7,
        evidence=("calls to payments: 90% errors",),
        actions=actions,
        created_at=OPENED + timedelta(minutes=1),
    )


def test_a_notify_oncall_step_escalates_its_incident_with_the_analysis() -> None:
    settings = make_settings({"patterns": [*PATTERNS, PAGED]})
    inc = incident(member("payments-down"), member())
    e = notify_escalation(
        inc, analysis(RecommendedAction(type="scale_up", target=CHECKOUT)), settings
    )
    assert e is not None
    assert (e.reason, e.incident_id, e.service) == ("notify", inc.id, "checkout")
    assert e.summary == "c1/shop/checkout: payments fail"
    assert e.details[:3] == (
        "notify_oncall is a step of payments-down",
        "rules analysis, confidence 0.70",
        "action: scale_up Deployment/shop/checkout",
    )
    # The same incident escalates under the same id, whatever the analysis.
    again = notify_escalation(inc, analysis(), settings)
    assert again is not None and again.id == e.id and "no action" in again.details
    # No step asks for it (or the member asking is resolved): nothing.
    assert notify_escalation(incident(member()), analysis(), settings) is None
    resolved = incident(member("payments-down", status="resolved"), member())
    assert notify_escalation(resolved, analysis(), settings) is None


def test_a_severe_incident_with_no_action_to_take_escalates_at_once() -> None:
    inc = incident(member(), member("payments-down"))
    refused = replace(analysis(), rejected_actions=("delete_namespace: not an allowed action",))
    e = no_remedy_escalation(inc, refused, ("critical",))
    assert e is not None
    assert (e.reason, e.incident_id, e.service) == ("no_remedy", inc.id, "checkout")
    assert e.severity == "critical"  # the incident's: webhooks route on it
    assert e.summary == "c1/shop/checkout: payments fail; no action to take"
    assert e.details == (
        "critical, firing: high-error-rate, payments-down",
        "rules analysis, confidence 0.70",
        "refused: delete_namespace: not an allowed action",
        "calls to payments: 90% errors",
    )
    # Stable per incident, whatever the analysis says next.
    assert no_remedy_escalation(inc, analysis(), ("critical",)).id == e.id  # type: ignore[union-attr]
    # Not when something will be tried, nor below the severities, nor with them empty.
    acting = analysis(RecommendedAction(type="scale_up", target=CHECKOUT))
    assert no_remedy_escalation(inc, acting, ("critical",)) is None
    assert no_remedy_escalation(inc, analysis(), ("warning",)) is None
    assert no_remedy_escalation(inc, analysis(), ()) is None
    # Nor when nothing fires that is not suppressed (silenced, or all resolved).
    quiet = incident(replace(member(), silenced_by="s-1"))
    assert no_remedy_escalation(quiet, analysis(), ("critical",)) is None
    gone = incident(member(status="resolved"))
    assert no_remedy_escalation(gone, analysis(), ("critical",)) is None


def test_a_runbook_can_ask_for_the_on_call_too() -> None:
    book = {"name": "pay", "alert": "PaymentsDown", "actions": ["notify_oncall"]}
    settings = make_settings({"runbooks": [book]})
    assert notify_escalation(incident(member("PaymentsDown")), analysis(), settings) is not None


def test_a_webhook_gets_the_escalation_for_a_human_with_secrets_redacted() -> None:
    e = Escalation(
        id="esc-1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        reason="action_failed",
        summary="rollback on Deployment/shop/checkout: action failed",
        at=OPENED,
        action_id="a-1",
        target="Deployment/shop/checkout",
        service="checkout",
        details=("failed: GET https://admin:hunter2@api.internal/x refused",),
    )
    doc = orjson.loads(payload(e))
    assert (doc["id"], doc["reason"], doc["action_id"]) == ("esc-1", "action_failed", "a-1")
    assert doc["at"] == "2024-05-01T12:00:00Z"
    assert doc["text"].startswith("[action_failed] rollback on Deployment/shop/checkout")
    assert doc["severity"] is None
    assert "hunter2" not in payload(e).decode()
    # With the incident's severity, the headline says it.
    critical = orjson.loads(payload(replace(e, severity="critical")))
    assert critical["text"].startswith("[action_failed, critical] rollback on")


def test_a_webhook_takes_the_reasons_and_severities_it_names_or_all() -> None:
    pager = {
        "name": "pager",
        "url": "http://pager.example/h",
        "reasons": ["no_remedy", "worse"],
        "severities": ["critical"],
    }
    hooks = {"webhooks": [{"name": "chat", "url": "http://chat.example/h"}, pager]}
    chat, pager = make_settings({"escalation": hooks}).escalation.webhooks
    assert all(chat.takes(r, "info") for r in ("notify", "no_remedy", "approval_expired"))
    assert [r for r in ("notify", "no_remedy", "worse") if pager.takes(r, "critical")] == [
        "no_remedy",
        "worse",
    ]
    assert not pager.takes("worse", "warning")
    assert pager.takes("worse", None)  # unknown severity (an undo's): not dropped
    bad = {"webhooks": [{"name": "pager", "url": "http://p.example/h", "reasons": ["sev1"]}]}
    with pytest.raises(ConfigError, match=r"escalation\.webhooks\[0\]\.reasons\[0\]"):
        make_settings({"escalation": bad})


def test_a_webhook_takes_the_unresolved_levels_it_names_and_every_other_reason() -> None:
    manager = {"name": "manager", "url": "http://pager.example/m", "levels": [2, 3]}
    (hook,) = make_settings({"escalation": {"webhooks": [manager]}}).escalation.webhooks
    assert [n for n in (1, 2, 3, 4) if hook.takes("unresolved", "critical", n)] == [2, 3]
    assert hook.takes("no_remedy", "critical")  # levels are of "unresolved" only
    bad = {"webhooks": [{"name": "m", "url": "http://p.example/h", "levels": [0]}]}
    with pytest.raises(ConfigError, match=r"escalation\.webhooks\[0\]\.levels\[0\]"):
        make_settings({"escalation": bad})


def test_later_unresolved_levels_must_come_later() -> None:
    ok = make_settings(
        {"escalation": {"unresolved_after": "15m", "unresolved_again_after": ["1h", "4h"]}}
    )
    assert ok.escalation.unresolved_again_after == (3600.0, 14400.0)
    for doc in (
        {"unresolved_after": "15m", "unresolved_again_after": ["10m"]},
        {"unresolved_after": "15m", "unresolved_again_after": ["1h", "1h"]},
        {"unresolved_after": "0s", "unresolved_again_after": ["1h"]},
    ):
        with pytest.raises(ConfigError, match="unresolved_again_after: each must be later"):
            make_settings({"escalation": doc})


def test_a_later_level_says_so_in_the_headline_and_the_body() -> None:
    inc = incident(member())
    e = Escalation.of_incident(inc, "unresolved", "open for 61 min", OPENED, (), level=2)
    body = orjson.loads(payload(e))
    assert body["level"] == 2 and body["text"].startswith("[unresolved level 2, critical] ")
    first = orjson.loads(payload(replace(e, level=1)))
    assert first["level"] == 1 and first["text"].startswith("[unresolved, critical] ")


def test_informational_reasons_go_only_where_they_are_listed() -> None:
    hooks = [
        {"name": "pager", "url": "http://pager.example/h"},
        {"name": "chat", "url": "http://chat.example/h", "reasons": ["healed", "dry_run", "worse"]},
    ]
    pager, chat = make_settings({"escalation": {"webhooks": hooks}}).escalation.webhooks
    assert not pager.takes("healed", "critical") and not pager.takes("dry_run", "critical")
    assert pager.takes("worse", "critical")  # everything else, by default
    assert chat.takes("healed", "critical") and chat.takes("dry_run", None)
    assert not chat.takes("no_remedy", "critical")


@pytest.mark.parametrize(
    ("name", "on", "namespace", "summary"),
    [
        ("kill_switch", True, "", "kill_switch ON: no action executes"),
        ("kill_switch", False, "", "kill_switch off: actions execute again, within the policy"),
        (
            "dry_run",
            True,
            "payments",
            "dry_run ON in namespace payments: actions are decided and recorded, never applied",
        ),
    ],
)
def test_a_switch_change_is_announced_as_an_informational_escalation(
    name: SwitchName, on: bool, namespace: str, summary: str
) -> None:
    change = SwitchChange(
        id="chg-1",
        name=name,
        on=on,
        by="alice",
        reason="db migration",
        at=OPENED,
        namespace=namespace,
    )
    e = Escalation.of_switch(change)
    assert (e.reason, e.summary, e.severity) == ("switch", summary, None)
    assert (
        e.id
        == Escalation.of_switch(change).id
        != Escalation.of_switch(replace(change, id="chg-2")).id
    )
    body = orjson.loads(payload(e))
    assert "by alice" in body["text"] and "db migration" in body["text"]
    hooks = [
        {"name": "pager", "url": "http://pager.example/h"},
        {"name": "chat", "url": "http://chat.example/h", "reasons": ["switch"]},
    ]
    pager, chat = make_settings({"escalation": {"webhooks": hooks}}).escalation.webhooks
    assert chat.takes(e.reason, e.severity) and not pager.takes(e.reason, e.severity)


def test_a_withdrawal_goes_where_the_approval_request_went() -> None:
    hooks = [
        {"name": "asks", "url": "http://a.example/h", "reasons": ["approval_requested"]},
        {"name": "pager", "url": "http://p.example/h", "reasons": ["worse"]},
        {"name": "chat", "url": "http://c.example/h"},
    ]
    asks, pager, chat = make_settings({"escalation": {"webhooks": hooks}}).escalation.webhooks
    assert asks.takes("approval_withdrawn", "critical") and chat.takes("approval_withdrawn")
    assert not pager.takes("approval_withdrawn", "critical")
