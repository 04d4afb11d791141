"""Alert-driven healing, every stage real: a Prometheus alerting rule fires on a service
after a bad rollout, Alertmanager (Debian's) notifies the agent's webhook, a runbook for
that alert names the remedy, the executor rolls the Deployment back, and the verification
asks Alertmanager whether the alert still fires. No pattern of the agent's own is
configured: the alert is the only signal."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from agent.lab import SimulatedService
from agent.lab_clusters import InProcessLab
from agent.models import ActionRequest, ActionResult, Analysis, Anomaly, Incident, utcnow
from agent.runtime import Agent
from tests.fixtures.infra import WEBHOOK_PATH, WEBHOOK_PORT
from tests.helpers import make_settings, readers

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def rule(alertname: str, namespace: str) -> str:
    """The service's error ratio over 5 s windows (1 s scrapes and evaluations)."""
    sel = f'namespace="{namespace}"'
    return f"""
groups:
  - name: {alertname}
    interval: 1s
    rules:
      - alert: {alertname}
        expr: >-
          sum by (namespace, service) (rate(http_requests_total{{{sel},status=~"5.."}}[5s]))
          / sum by (namespace, service) (rate(http_requests_total{{{sel}}}[5s])) > 0.05
        labels: {{severity: critical}}
        annotations: {{summary: "checkout fails"}}
"""


async def test_an_alert_is_healed_by_its_runbook_and_verified_at_alertmanager(
    kafka_bootstrap: str,
    prometheus: Any,
    alertmanager: Any,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uid = uuid.uuid4().hex[:8]
    ns, name, alertname = f"alerts-{uid}", "checkout", f"CheckoutErrors{uid}"
    token = uuid.uuid4().hex
    monkeypatch.setenv("SRE_TEST_AM_TOKEN", token)
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        prometheus_url=prometheus.url,
        doc={
            "server": {"host": "127.0.0.1", "port": WEBHOOK_PORT},
            "detectors": {"alertmanager": {"enabled": True, "token_env": "SRE_TEST_AM_TOKEN"}},
            "monitoring": {
                "prometheus": {"url": prometheus.url, "timeout": "3s"},
                "alertmanager": {"url": alertmanager.url, "timeout": "3s"},
            },
            "remediation": {"require_approval": [], "verify_after": "15s", "cooldown": "0s"},
            "correlation": {"resolve_timeout": "60s"},
            "runbooks": [
                {
                    "name": "checkout-errors",
                    "alert": alertname,
                    "source": "alertmanager",
                    "actions": ["check_recent_deployments", "auto_rollback_if_deployment_recent"],
                }
            ],
        },
    )
    assert settings.patterns == ()  # the alert is the only signal
    lab = InProcessLab()
    await lab.setup(ns, name, image="registry.local/checkout:v1", replicas=3)
    service = SimulatedService(lab, namespace=ns, name=name)
    await service.start()
    job = f"alerts-{uid}"
    prometheus.add_target(job, f"127.0.0.1:{service.port}")
    agent = Agent(settings, roles=["all"], cluster=lab.cluster)
    t = agent.bus.topic
    try:
        await prometheus.wait_for_target_up_async(job, 30)
        await asyncio.to_thread(prometheus.add_rules, alertname, rule(alertname, ns))
        url = f"http://127.0.0.1:{WEBHOOK_PORT}{WEBHOOK_PATH}"
        await asyncio.to_thread(alertmanager.configure_webhook, url, token)
        await agent.start()
        async with readers(
            kafka_bootstrap,
            {
                "anomalies": (t("anomalies"), Anomaly),
                "incidents": (t("incidents"), Incident),
                "analyses": (t("analyses"), Analysis),
                "actions": (t("actions"), ActionRequest),
                "results": (t("action-results"), ActionResult),
            },
        ) as r:
            await lab.rollout(ns, name, image="registry.local/checkout:v2", at=utcnow())
            await r["results"].wait_for(
                lambda xs: any(x.outcome in ("healed", "not_healed") for x in xs),
                120,
                "verified rollback",
            )
            # Its own namespace's: the agent asks the shared Alertmanager for every alert
            # still firing for the receiver, other tests' included.
            await r["incidents"].wait_for(
                lambda xs: any(
                    x.status == "resolved" and x.labels.get("namespace") == ns for x in xs
                ),
                60,
                "resolution",
            )
            out = {k: list(v.items) for k, v in r.items()}
    finally:
        await service.stop()
        await agent.stop()
        await asyncio.to_thread(alertmanager.restore_webhook)
        await asyncio.to_thread(prometheus.remove_rules, alertname)
        prometheus.remove_target(job)

    firing = [
        a for a in out["anomalies"] if a.status == "firing" and a.labels.get("namespace") == ns
    ]
    assert firing and {(a.source, a.name) for a in firing} == {("alertmanager", alertname)}
    assert {a.labels["service"] for a in firing} == {name}

    ours = {i.id for i in out["incidents"] if i.labels.get("namespace") == ns}
    (analysis, *_) = [a for a in out["analyses"] if a.incident_id in ours]
    assert analysis.root_cause_class == "bad_rollout", analysis
    assert [a.type for a in analysis.actions] == ["rollback"]

    (action,) = {a.id: a for a in out["actions"] if a.incident_id in ours}.values()
    assert [(f.name, f.source) for f in action.firing] == [(alertname, "alertmanager")]
    verified = [x for x in out["results"] if x.outcome != "unknown"]
    assert [(x.outcome, x.message) for x in verified] == [("healed", f"{alertname} cleared")]

    w = await lab.cluster.workload(action.target)
    assert w.image == "registry.local/checkout:v1"
