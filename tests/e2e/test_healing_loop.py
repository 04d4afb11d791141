"""The healing loop, every stage real: Prometheus scrapes a service whose 5xx rate rises
after a rollout of its Deployment on the real control plane; the detector, faust
correlator, analyzer and executor heal it through a real Kafka broker, and the rollback
is a real `kubectl rollout undo` on the API server."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest

from agent.lab import SimulatedService
from agent.lab_kube import KubeLab
from agent.models import (
    ActionRequest,
    ActionResult,
    Analysis,
    Anomaly,
    ApprovalRequest,
    Escalation,
    Incident,
    Target,
)
from agent.runtime import Agent
from handlers.kube import KubeCluster
from tests.helpers import lab_settings, readers

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.k8s]


def metric(agent: Agent, metric_name: str, /, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(metric_name, labels)
    return value or 0.0


def deploy(k8s_cluster: Any, namespace: str, name: str) -> None:
    doc = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.local/checkout:v1"}]},
            },
        },
    }
    path = k8s_cluster.state_dir / f"e2e-{namespace}-{name}.json"
    path.write_text(json.dumps(doc))
    k8s_cluster.kubectl_run("apply", "-f", str(path))


async def _scenario(
    kafka_bootstrap: str,
    prometheus: Any,
    topic_prefix: str,
    k8s_cluster: Any,
    namespace: str,
    *,
    require_approval: tuple[str, ...],
) -> dict[str, Any]:
    settings = lab_settings(kafka_bootstrap, topic_prefix, prometheus.url)
    settings = replace(
        settings,
        remediation=replace(
            settings.remediation, require_approval=require_approval, verify_after=25.0
        ),
    )
    name = f"checkout-{uuid.uuid4().hex[:6]}"
    target = Target(kind="Deployment", namespace=namespace, name=name)
    deploy(k8s_cluster, namespace, name)
    cluster = KubeCluster(kubeconfig=str(k8s_cluster.kubeconfig))
    # The lab's view of the same cluster: which pods serve, from which node.
    service = SimulatedService(KubeLab(cluster, nodes=0), namespace=namespace, name=name)
    await service.start()
    prometheus.add_target(name, f"127.0.0.1:{service.port}")
    agent = Agent(settings, roles=["all"], cluster=cluster)
    t = agent.bus.topic
    try:
        await prometheus.wait_for_target_up_async(name, 30)
        await agent.start()
        async with readers(
            kafka_bootstrap,
            {
                "anomalies": (t("anomalies"), Anomaly),
                "incidents": (t("incidents"), Incident),
                "analyses": (t("analyses"), Analysis),
                "actions": (t("actions"), ActionRequest),
                "approvals": (t("approvals"), ApprovalRequest),
                "results": (t("action-results"), ActionResult),
                "escalations": (t("escalations"), Escalation),
            },
        ) as r:
            k8s_cluster.kubectl_run(
                "set",
                "image",
                f"deployment/{name}",
                "app=registry.local/checkout:v2",
                "-n",
                namespace,
            )
            if require_approval:
                await r["results"].wait_for(
                    lambda xs: any(x.status == "pending_approval" for x in xs),
                    90,
                    "pending approval",
                )
                await r["approvals"].wait_for(lambda xs: len(xs) >= 1, 10, "approval request")
            else:
                await r["results"].wait_for(
                    lambda xs: any(x.outcome == "healed" for x in xs), 120, "verified healing"
                )
                await r["incidents"].wait_for(
                    lambda xs: any(x.status == "resolved" for x in xs), 60, "resolution"
                )
                await r["escalations"].wait_for(
                    lambda xs: any(x.reason == "healed" for x in xs), 10, "the healed report"
                )
            return {
                "agent": agent,
                "cluster": cluster,
                "target": target,
                "name": name,
                "workload": await cluster.workload(target),
                **{k: list(v.items) for k, v in r.items()},
            }
    finally:
        await service.stop()  # before the agent closes the cluster client it reads
        await agent.stop()
        prometheus.remove_target(name)


async def test_bad_rollout_is_rolled_back_and_verified(
    kafka_bootstrap: str, prometheus: Any, topic_prefix: str, k8s_cluster: Any, k8s_namespace: str
) -> None:
    out = await _scenario(
        kafka_bootstrap, prometheus, topic_prefix, k8s_cluster, k8s_namespace, require_approval=()
    )
    name, agent = out["name"], out["agent"]

    firing = [a for a in out["anomalies"] if a.status == "firing"]
    assert firing and all(a.name == "high-error-rate" for a in firing)
    assert {a.labels["service"] for a in firing} == {name}
    assert len({a.fingerprint for a in firing}) == 1  # one fault, one fingerprint
    assert any(a.status == "resolved" for a in out["anomalies"])

    incidents = out["incidents"]
    assert len({i.id for i in incidents}) == 1, "dedup: repeats must not open new incidents"
    assert incidents[0].status == "open"
    # The executor's rollback marks the incident as being mitigated until it resolves.
    statuses = [i.status for i in incidents]
    assert "mitigating" in statuses
    assert statuses.index("mitigating") < statuses.index("resolved")
    assert incidents[-1].status == "resolved"
    assert incidents[-1].resolved_at is not None

    analysis = out["analyses"][0]
    assert analysis.analyzer == "rules"
    assert analysis.root_cause_class == "bad_rollout"
    assert analysis.confidence >= 0.85
    assert [(a.type, a.target) for a in analysis.actions] == [("rollback", out["target"])]

    assert len(out["actions"]) == 1
    results = out["results"]
    executed = [x for x in results if x.status == "succeeded" and x.outcome == "unknown"]
    verified = [x for x in results if x.outcome == "healed"]
    assert len(executed) == 1 and len(verified) == 1
    assert executed[0].prior_state == {"revision": 2, "image": "registry.local/checkout:v2"}
    # Reported for the channels that ask, and nothing escalated: it healed.
    reports = [(e.reason, e.action_id) for e in out["escalations"]]
    assert reports == [("healed", out["actions"][0].id)]

    w = out["workload"]
    assert w.image == "registry.local/checkout:v1"
    assert w.revision == 3
    assert out["actions"][0].id in w.applied_action_ids

    assert (
        metric(
            agent, "sre_agent_remediation_total", service=name, action="rollback", result="success"
        )
        == 1
    )
    assert (
        metric(
            agent,
            "sre_agent_remediation_verified_total",
            service=name,
            action="rollback",
            outcome="healed",
        )
        == 1
    )
    assert (
        metric(
            agent,
            "sre_agent_anomalies_total",
            source="prometheus",
            name="high-error-rate",
            status="firing",
        )
        >= 1
    )
    assert metric(agent, "sre_agent_incidents_total", status="open") == 1
    assert metric(agent, "sre_agent_incident_resolution_seconds_count", service=name) == 1
    assert metric(agent, "sre_agent_incident_resolution_duration_seconds", service=name) > 0


async def test_rollback_requiring_approval_is_queued_not_executed(
    kafka_bootstrap: str, prometheus: Any, topic_prefix: str, k8s_cluster: Any, k8s_namespace: str
) -> None:
    out = await _scenario(
        kafka_bootstrap,
        prometheus,
        topic_prefix,
        k8s_cluster,
        k8s_namespace,
        require_approval=("rollback",),
    )
    name, agent = out["name"], out["agent"]
    approval = out["approvals"][0]
    assert approval.action.type == "rollback"
    assert approval.action.target == out["target"]
    assert approval.action_hash == approval.action.digest()
    assert approval.expires_at > approval.created_at
    assert not any(x.status == "succeeded" for x in out["results"])
    w = out["workload"]
    assert (w.image, w.revision) == ("registry.local/checkout:v2", 2), "nothing executed"
    assert (
        metric(
            agent,
            "sre_agent_remediation_decisions_total",
            service=name,
            action="rollback",
            result="pending_approval",
        )
        == 1
    )
    assert (
        metric(
            agent, "sre_agent_remediation_total", service=name, action="rollback", result="success"
        )
        == 0
    )
