"""Incidents and contexts for the analysis tests (fixed instants, never the wall clock)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.analysis_stage import action_requests
from agent.analyzer import Context, Rollout
from agent.models import (
    ActionRequest,
    Analysis,
    Incident,
    Member,
    RecommendedAction,
    Target,
    fingerprint,
)
from agent.settings import Settings, parse_settings

OPENED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHOP = {"cluster": "c1", "namespace": "shop", "service": "checkout"}

PATTERNS = [
    {
        "name": "high-error-rate",
        "condition": 'sum by (namespace, service) (rate(http_requests_total{status=~"5.."}[5m]))'
        " / sum by (namespace, service) (rate(http_requests_total[5m])) > 0.01",
        "actions": [
            "check_recent_deployments",
            "analyze_logs",
            "auto_rollback_if_deployment_recent",
        ],
    },
    {
        "name": "high-latency",
        "condition": "histogram_quantile(0.99, sum by (namespace, service, le) "
        "(rate(http_request_duration_seconds_bucket[5m]))) > 0.5",
        "severity": "warning",
        "actions": ["check_downstream_services", "scale_up_if_cpu_high"],
    },
]


def ai_settings(**ai: Any) -> Settings:
    """LLM enabled with fast, test-sized limits; ``ai`` overrides fields of the section."""
    section: dict[str, Any] = {
        "enabled": True,
        "azure_openai": {"endpoint": "http://127.0.0.1:1", "api_key_env": "SRE_TEST_LLM_KEY"},
        "timeout": "2s",
        "retries": 1,
        "backoff": "10ms",
        "max_backoff": "2s",
        "breaker_failures": 3,
        "breaker_reset": "30s",
        "context": {"timeout": "1s", "queries": {}},
    }
    for k, v in ai.items():
        section[k] = {**section[k], **v} if isinstance(v, dict) and k in section else v
    return parse_settings(
        {"ai": section, "remediation": {"rollout_window": "30m"}, "patterns": PATTERNS}, env={}
    )


def member(
    name: str = "high-error-rate",
    *,
    status: str = "firing",
    minutes: float = 0.0,
    labels: Mapping[str, str] | None = None,
) -> Member:
    lab = {**SHOP, **(labels or {})}
    t = OPENED + timedelta(minutes=minutes)
    return Member(
        fingerprint=fingerprint("prometheus", name, lab),
        name=name,
        source="prometheus",
        severity="critical",
        status=status,  # type: ignore[arg-type]
        labels=lab,
        first_seen=t,
        last_seen=t,
        value=0.2,
    )


def incident(
    *members: Member, id: str = "inc-1", revision: int = 1, labels: Mapping[str, str] | None = None
) -> Incident:
    labels = dict(labels or SHOP)
    return Incident(
        id=id,
        key=f"{labels['cluster']}/{labels['namespace']}/{labels['service']}",
        status="open",
        severity="critical",
        labels=labels,
        members=members or (member(),),
        opened_at=OPENED,
        updated_at=OPENED,
        revision=revision,
    )


def rollout(minutes_before: float = 5, *, workload: str = "checkout", revision: int = 7) -> Rollout:
    return Rollout(
        namespace="shop",
        workload=workload,
        revision=revision,
        image=f"shop/{workload}:v{revision}",
        at=OPENED - timedelta(minutes=minutes_before),
        previous_image=f"shop/{workload}:v{revision - 1}",
    )


def bad_rollout_context(**more: Any) -> Context:
    return Context(rollouts=(rollout(5),), **more)


def action_request(inc: Incident, type_: Any, target: Target) -> ActionRequest:
    """The request the analysis stage makes of ``inc`` for one action on ``target``."""
    analysis = Analysis(
        id="an-1",
        incident_id=inc.id,
        incident_key=inc.key,
        incident_revision=inc.revision,
        analyzer="rules",
        root_cause="test",
        root_cause_class="unknown",
        confidence=0.9,
        evidence=(),
        actions=(RecommendedAction(type=type_, target=target),),
        created_at=OPENED + timedelta(minutes=1),
    )
    (req,) = action_requests(analysis, inc)
    return req
