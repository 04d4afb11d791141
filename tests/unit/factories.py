"""Builders for unit tests: valid events and settings with one thing changed at a time."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.models import (
    ActionRequest,
    ActionResult,
    ActionType,
    Anomaly,
    AnomalySource,
    AnomalyStatus,
    Outcome,
    ParamValue,
    Severity,
    Target,
    fingerprint,
    stable_id,
)
from agent.settings import Settings, parse_settings

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHOP = {"cluster": "c1", "namespace": "shop", "service": "checkout"}


def at(seconds: float) -> datetime:
    """A fixed instant ``seconds`` after T0: tests never read the wall clock."""
    return T0 + timedelta(seconds=seconds)


def anomaly(
    name: str = "high-error-rate",
    *,
    status: AnomalyStatus = "firing",
    severity: Severity = "critical",
    labels: Mapping[str, str] | None = None,
    t: float = 0.0,
    starts: float | None = None,
    value: float | None = 1.0,
    source: AnomalySource = "prometheus",
) -> Anomaly:
    labels = dict(SHOP if labels is None else labels)
    fp = fingerprint(source, name, labels)
    return Anomaly(
        fingerprint=fp,
        source=source,
        name=name,
        severity=severity,
        status=status,
        labels=labels,
        starts_at=at(t if starts is None else starts),
        observed_at=at(t),
        value=value,
        id=stable_id("anomaly", fp, status, str(t)),
    )


# The kind each action type acts on (agent.policy.ACTION_KINDS), unless a test names one.
DEFAULT_KINDS: Mapping[str, Any] = {
    "restart_pod": "Pod",
    "cordon_node": "Node",
    "drain_node": "Node",
    "update_config": "ConfigMap",
}


def action(
    type: ActionType = "scale_up",
    *,
    namespace: str = "shop",
    name: str = "checkout",
    kind: Any = None,
    confidence: float = 0.9,
    params: Mapping[str, ParamValue] | None = None,
    approved_by: str | None = None,
    action_id: str = "act-1",
) -> ActionRequest:
    return ActionRequest(
        id=action_id,
        incident_id="inc-1",
        incident_key=f"c1/{namespace}/{name}",
        analysis_id="an-1",
        type=type,
        target=Target(
            kind=kind or DEFAULT_KINDS.get(type, "Deployment"), namespace=namespace, name=name
        ),
        confidence=confidence,
        reason="test",
        requested_at=T0,
        params=dict(params or {}),
        labels={"namespace": namespace, "service": name},
        approved_by=approved_by,
    )


def settings(doc: Mapping[str, Any] | None = None) -> Settings:
    """Settings from a document, with no environment overrides."""
    return parse_settings(dict(doc or {}), env={})


def result_of(
    req: ActionRequest, outcome: Outcome, *, rid: str | None = None, at: datetime = T0
) -> ActionResult:
    """The succeeded result of ``req`` with ``outcome`` (unknown: executed, not verified)."""
    return ActionResult(
        id=rid or f"res-{req.id}-{outcome}",
        action_id=req.id,
        incident_id=req.incident_id,
        incident_key=req.incident_key,
        type=req.type,
        target=req.target,
        status="succeeded",
        outcome=outcome,
        message="",
        started_at=at,
        finished_at=at,
    )
