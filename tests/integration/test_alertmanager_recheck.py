"""Verification asks a real Alertmanager (Debian's) whether an alert that triggered an
action still fires: an alert still active (silenced or not) is not healed, a resolved one
is, and an Alertmanager that cannot answer leaves the verdict to the target's state."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.alertmanager_api import AlertmanagerAPI
from agent.errors import DependencyUnavailable
from agent.metrics import Metrics
from agent.models import ActionRequest, Target
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import OPENED, action_request, incident, member
from tests.fakes.publisher import MemoryBus
from tests.fixtures.infra import http_request
from tests.unit.factories import settings as make_settings

pytestmark = pytest.mark.integration

# A namespace no other test's cluster has: the shared Alertmanager notifies every
# webhook receiver running, and an alert about shop/checkout could act on another test.
NS = f"recheck-{uuid.uuid4().hex[:8]}"
CHECKOUT = {"namespace": NS, "service": "checkout"}


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def alert(name: str, labels: dict[str, str], *, resolved: bool = False) -> dict[str, Any]:
    now = datetime.now(UTC)
    ends = now - timedelta(seconds=1) if resolved else now + timedelta(hours=1)
    return {
        "labels": {"alertname": name, **labels},
        "startsAt": iso(now - timedelta(minutes=5)),
        "endsAt": iso(ends),
    }


def silence(am: Any, matchers: Sequence[tuple[str, str]]) -> None:
    now = datetime.now(UTC)
    body = {
        "matchers": [{"name": k, "value": v, "isRegex": False} for k, v in matchers],
        "startsAt": iso(now - timedelta(minutes=1)),
        "endsAt": iso(now + timedelta(hours=1)),
        "createdBy": "test",
        "comment": "the condition still holds while muted",
    }
    status, payload = http_request("POST", f"{am.url}/api/v2/silences", body)
    assert status == 200, payload


async def test_firing_lists_the_unresolved_alerts_of_exactly_that_name(alertmanager: Any) -> None:
    uid = uuid.uuid4().hex[:8]
    # Untrusted text: a quote and a backslash in the name must not break the filter.
    name = f'Recheck"{uid}\\x'
    firing = [
        (name, {**CHECKOUT, "pod": "checkout-1"}),
        (name, {"namespace": NS, "service": "cart"}),
        (name + "2", CHECKOUT),  # another alert whose name only starts the same
    ]
    resolved = alert(name, {"namespace": NS, "service": "ledger"}, resolved=True)
    alertmanager.post_alerts([*(alert(n, labels) for n, labels in firing), resolved])
    silence(alertmanager, [("alertname", name), ("service", "cart")])
    api = AlertmanagerAPI(alertmanager.url, timeout=3)
    try:
        found = await api.firing(name)
        # The silenced one still holds; the resolved one and the other name do not count.
        assert sorted(labels["service"] for labels in found) == ["cart", "checkout"]
        assert all(labels["alertname"] == name for labels in found)
        assert await api.firing(f"Nothing{uid}") == []
    finally:
        await api.close()
        alertmanager.post_alerts([alert(n, labels, resolved=True) for n, labels in firing])


async def test_an_unreachable_alertmanager_is_a_dependency_error() -> None:
    api = AlertmanagerAPI("http://127.0.0.1:1", timeout=2)
    try:
        with pytest.raises(
            DependencyUnavailable, match=re.escape("alertmanager http://127.0.0.1:1")
        ):
            await api.firing("Any")
    finally:
        await api.close()


def rollback_for(alertname: str) -> ActionRequest:
    """A rollback of shop/checkout, triggered by an Alertmanager alert and a Kubernetes
    signal about it."""
    am = replace(member(alertname, labels={**CHECKOUT, "pod": "checkout-1"}), source="alertmanager")
    backoff = replace(member("BackOff", labels=CHECKOUT), source="kubernetes")
    inc = incident(am, backoff, labels={"cluster": "c1", **CHECKOUT})
    return action_request(inc, "rollback", Target(kind="Deployment", namespace=NS, name="checkout"))


def executor_at(alertmanager_url: str | None) -> Executor:
    cluster = FakeCluster()
    cluster.create_deployment(NS, "checkout", image="v1", replicas=2, at=OPENED)
    doc: dict[str, Any] = {"agent": {"cluster": "c1"}}
    settings = make_settings(doc)
    am = AlertmanagerAPI(alertmanager_url, timeout=2) if alertmanager_url else None
    return Executor(settings, bus=MemoryBus(), cluster=cluster, metrics=Metrics(), alertmanager=am)


async def test_an_action_is_healed_only_once_its_alert_resolved_at_alertmanager(
    alertmanager: Any,
) -> None:
    name = f"CheckoutErrors{uuid.uuid4().hex[:8]}"
    req = rollback_for(name)
    ex = executor_at(alertmanager.url)
    try:
        # Still firing for another pod of the service: the rollback did not heal it.
        alertmanager.post_alerts([alert(name, {**CHECKOUT, "pod": "checkout-2"})])
        outcome, why = await ex.verify_now(req)
        assert (outcome, why) == ("not_healed", f"{name} still firing after the action")
        assert req.firing[0].labels == CHECKOUT  # where it fired: the service, not the pod
        # Firing elsewhere only (another service) does not count against this action.
        alertmanager.post_alerts(
            [
                alert(name, {**CHECKOUT, "pod": "checkout-2"}, resolved=True),
                alert(name, {"namespace": NS, "service": "cart"}),
            ]
        )
        outcome, why = await ex.verify_now(req)
        # The Kubernetes signal is not re-checked, so the workload's state decides.
        assert outcome == "healed", why
        assert why.startswith(
            f"{name} cleared; BackOff not re-checked (a Kubernetes signal: the target's "
            "state tells); 2/2 replicas ready"
        ), why
    finally:
        alertmanager.post_alerts([alert(name, {"namespace": NS, "service": "cart"}, resolved=True)])
        await ex.stop()
        assert ex.alertmanager is not None
        await ex.alertmanager.close()


async def test_without_an_answer_from_alertmanager_the_target_decides() -> None:
    name = "CheckoutErrors"
    req = rollback_for(name)
    for url, reason in (
        ("http://127.0.0.1:1", "re-check failed: alertmanager http://127.0.0.1:1"),
        (None, "an Alertmanager alert, and monitoring.alertmanager.url is not set"),
    ):
        ex = executor_at(url)
        try:
            outcome, why = await ex.verify_now(req)
            assert outcome == "healed", why
            assert f"{name} not re-checked ({reason}" in why, why
        finally:
            await ex.stop()
            if ex.alertmanager is not None:
                await ex.alertmanager.close()
