"""Deployment artefacts stay true to the code: rules parse, and every sre_agent_* series
the rules and the dashboard query is one the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.metrics import Metrics
from agent.models import Target
from agent.runtime import prometheus_gates_readiness
from agent.settings import load_settings, parse_duration
from tests.helpers import promtool_test

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERIES = re.compile(r"\b(sre_agent_[a-z_]+)")


def exported() -> set[str]:
    """Names of the series a scrape stores. Not a histogram's own name: only its _bucket,
    _sum and _count exist, so a query of the bare name finds nothing."""
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        names.update(s.name for s in metric.samples)
        if metric.type == "counter":  # labelled: no samples until counted
            names.add(metric.name + "_total")
        if metric.type == "gauge":
            names.add(metric.name)
        if metric.type == "histogram":
            names.update(metric.name + sfx for sfx in ("_sum", "_count", "_bucket"))
    return names


def queried() -> dict[str, str]:
    found: dict[str, str] = {}
    rules = yaml.safe_load((DEPLOY / "monitoring" / "self-healing-rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in SERIES.findall(rule["expr"]):
                found[name] = rule.get("record") or rule.get("alert")
    dash = json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in SERIES.findall(target["expr"]):
                found[name] = panel["title"]
    return found


def test_rules_and_dashboard_query_only_exported_series() -> None:
    missing = {n: where for n, where in queried().items() if n not in exported()}
    assert not missing, f"queried but never exported: {missing}"
    assert "sre_agent_remediation_total" in queried()


def test_rules_parse_with_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian package prometheus) is required: run scripts/system-deps.sh")
    path = DEPLOY / "monitoring" / "self-healing-rules.yml"
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def manifests() -> list[dict[str, Any]]:
    return [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]


def cluster_role(name: str) -> dict[str, Any]:
    return next(
        d for d in manifests() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name
    )


def allowed(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(api group, resource, verb) the role grants."""
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


READS = {"get", "list", "watch"}
# Which ServiceAccount a pod running a role runs under (deploy/rbac.yaml).
ACCOUNTS = {
    "detector": "sre-agent-detector",
    "correlator": "sre-agent-correlator",
    "analyzer": "sre-agent-analyzer",
    "executor": "sre-agent-executor",
}
# What each role asks of the API server, by the code that asks it. The completeness check
# below fails when handlers/kube.py starts using a resource that is not listed here.
DETECTOR_NEEDS = {  # agent/kube_watch.py: list then watch, all namespaces
    ("", r, v) for r in ("pods", "nodes", "events") for v in ("list", "watch")
}
ANALYZER_NEEDS = {  # agent/context.py through KubeCluster's reads
    ("apps", "deployments", "get"),  # rollout history; config_changes' references
    ("apps", "statefulsets", "get"),
    ("apps", "daemonsets", "get"),
    ("apps", "replicasets", "list"),  # a Deployment's revisions
    ("apps", "controllerrevisions", "list"),  # a StatefulSet's or DaemonSet's revisions
    ("", "events", "list"),
    ("", "pods", "list"),
    ("", "pods/log", "get"),
    ("", "configmaps", "list"),
    ("", "nodes", "get"),  # node_conditions
}
EXECUTOR_READS = {  # handlers/kube.py: the reads around and after the writes
    ("apps", "deployments", "get"),
    ("apps", "statefulsets", "get"),
    ("apps", "daemonsets", "get"),
    ("apps", "replicasets", "get"),  # a pod's owner, in footprint
    ("apps", "replicasets", "list"),
    ("apps", "controllerrevisions", "list"),  # a StatefulSet's or DaemonSet's rollback
    ("", "pods", "get"),
    ("", "pods", "list"),  # a workload's restarts, a node's pods
    ("", "nodes", "get"),
    ("", "nodes", "list"),  # cordoned nodes, in footprint
    ("", "configmaps", "get"),
    ("autoscaling", "horizontalpodautoscalers", "get"),
    ("autoscaling", "horizontalpodautoscalers", "list"),
    ("policy", "poddisruptionbudgets", "list"),
}
PATH = re.compile(
    r"/api/v1/(?:namespaces/[^/\"]+/)?(?P<core>[a-z]+)(?:/[^/\"]+/(?P<sub>[a-z]+))?"
    r"|/apis/(?P<group>[a-z.]+)/v\w+/(?:namespaces/[^/\"]+/)?(?P<res>[a-z]+|\{[^}]+\})"
)


def adapter_resources() -> set[tuple[str, str]]:
    """(group, resource) of every API path template in handlers/kube.py."""
    from handlers.kube import WORKLOAD_RESOURCES

    source = (Path(__file__).resolve().parents[2] / "handlers" / "kube.py").read_text()
    found: set[tuple[str, str]] = set()
    for m in PATH.finditer(source):
        if m["core"]:
            found.add(("", m["core"] + (f"/{m['sub']}" if m["sub"] else "")))
        elif m["res"].startswith("{"):  # a workload's or a pod owner's kind
            found.update((m["group"], r) for r in (*WORKLOAD_RESOURCES.values(), "replicasets"))
        else:
            found.add((m["group"], m["res"]))
    return found


def adapter_writes() -> set[tuple[str, str, str]]:
    """What the actions write: a patch of each kind they target, and evictions."""
    from handlers.kube import _hpa_path, _path

    paths = [
        _path(Target(kind=k, namespace="ns", name="x"))
        for k in ("Deployment", "StatefulSet", "DaemonSet", "Pod", "ConfigMap")
    ]
    paths += [_path(Target(kind="Node", name="x")), _hpa_path("ns", "x")]
    writes = {("", "pods/eviction", "create")}
    for path in paths:
        m = PATH.search(path)
        assert m is not None, path
        writes.add((m["group"] or "", m["core"] or m["res"], "patch"))
    return writes


def test_each_role_runs_under_its_own_service_account() -> None:
    docs = manifests()
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    seen = set()
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        args = container["args"]
        roles = [args[i + 1] for i, a in enumerate(args) if a == "--role"]
        # One role a pod: a pod running the executor with anything else would lend that
        # role the executor's writes.
        assert len(roles) == 1, f"{d['metadata']['name']}: {roles}"
        role = roles[0]
        seen.add(role)
        assert spec["serviceAccountName"] == ACCOUNTS[role], d["metadata"]["name"]
        assert ACCOUNTS[role] in accounts
        if role == "correlator":
            assert spec["automountServiceAccountToken"] is False
            assert accounts[ACCOUNTS[role]]["automountServiceAccountToken"] is False
    assert seen == set(ACCOUNTS)


def test_each_account_is_bound_to_its_own_role_and_the_correlator_to_none() -> None:
    bound = {
        (s["namespace"], s["name"]): d["roleRef"]["name"]
        for d in manifests()
        if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
        for s in d["subjects"]
    }
    assert bound == {
        ("sre-agent", "sre-agent-detector"): "sre-agent-detector",
        ("sre-agent", "sre-agent-analyzer"): "sre-agent-analyzer",
        ("sre-agent", "sre-agent-executor"): "sre-agent-executor",
    }


def test_only_the_executor_role_writes_and_none_reaches_secrets_or_rbac() -> None:
    roles = [d for d in manifests() if d["kind"] in ("ClusterRole", "Role")]
    assert {r["metadata"]["name"] for r in roles} == {
        "sre-agent-detector",
        "sre-agent-analyzer",
        "sre-agent-executor",
    }
    for role in roles:
        grants = allowed(role)
        verbs = {v for _, _, v in grants}
        resources = {r for _, r, _ in grants}
        assert "*" not in verbs and "*" not in resources
        assert not resources & {"secrets", "pods/exec", "clusterroles", "roles", "rolebindings"}
        assert not verbs & {"escalate", "bind", "impersonate", "delete", "deletecollection"}
        if role["metadata"]["name"] != "sre-agent-executor":
            assert verbs <= READS, role["metadata"]["name"]


def test_the_read_roles_grant_exactly_what_their_role_reads() -> None:
    assert allowed(cluster_role("sre-agent-detector")) == DETECTOR_NEEDS
    assert allowed(cluster_role("sre-agent-analyzer")) == ANALYZER_NEEDS


def test_the_executor_role_covers_every_write_of_the_adapter_and_nothing_more() -> None:
    grants = allowed(cluster_role("sre-agent-executor"))
    assert adapter_writes() <= grants
    assert grants == adapter_writes() | EXECUTOR_READS


def test_every_resource_the_adapter_calls_is_in_a_role_table() -> None:
    """A new API path in handlers/kube.py must be granted (and listed above) too."""
    listed = {(g, r) for g, r, _ in ANALYZER_NEEDS | EXECUTOR_READS | adapter_writes()}
    assert adapter_resources() - listed == set()
    assert ("", "pods/eviction") in adapter_resources()


def test_the_correlator_has_a_writable_tmp_under_a_read_only_root() -> None:
    """faust creates its data directory at start (under the temp dir, see
    streams.correlator): with a read-only root filesystem that needs a mounted /tmp."""
    docs = [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    checked = 0
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod["containers"]:
            args = " ".join(c.get("args", []))
            if not re.search(r"--role (\S*,)?(correlator|all)\b", args):
                continue
            checked += 1
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in volumes, f"{d['metadata']['name']}: no writable /tmp"
    assert checked >= 1


def test_the_budget_claims_alert_fires_on_repeated_failures_not_on_one(tmp_path: Path) -> None:
    """Evaluated by Prometheus' own engine (`promtool test rules`) on series written out
    minute by minute."""
    series = 'sre_agent_budget_claims_total{result="unavailable",instance="executor-0"}'
    alert = {
        "exp_labels": {"severity": "critical", "instance": "executor-0"},
        "exp_annotations": {
            "summary": "executor executor-0 cannot claim budget units on the budget-claims "
            "topic; its actions are retried, not executed"
        },
    }
    doc = {
        "rule_files": [str(DEPLOY / "monitoring" / "self-healing-rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {  # one claim failed (a broker restart): nothing
                "interval": "1m",
                "input_series": [{"series": series, "values": "0 1 1 1 1 1 1 1 1 1 1 1"}],
                "alert_rule_test": [
                    {
                        "eval_time": f"{m}m",
                        "alertname": "SREAgentBudgetClaimsUnavailable",
                        "exp_alerts": [],
                    }
                    for m in (2, 5, 10)
                ],
            },
            {  # every retry fails: the executor has stopped healing
                "interval": "1m",
                "input_series": [{"series": series, "values": "0+2x12"}],
                "alert_rule_test": [
                    {
                        "eval_time": "1m",
                        "alertname": "SREAgentBudgetClaimsUnavailable",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "SREAgentBudgetClaimsUnavailable",
                        "exp_alerts": [alert],
                    },
                ],
            },
        ],
    }
    out = promtool_test(doc, tmp_path)
    assert out is None, out


def test_the_detectors_serve_the_alertmanager_webhook_behind_its_service() -> None:
    """The webhook is on in the detector's pods, with its token from an optional Secret, behind a
    Service that reaches their HTTP port; and that Service keeps its endpoints while
    Prometheus is down (the detector's readiness, which routes it, does not ask it)."""
    docs = manifests()
    (detector,) = (
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "sre-agent-detector"
    )
    pod = detector["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    # The settings the container's config and environment make (the Secret's value aside).
    env = {**config["data"], **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    settings = load_settings(
        DEPLOY.parent / "config" / "agent.yaml", {**env, **dict.fromkeys(secrets, "x")}
    )
    am = settings.detectors.alertmanager
    assert am.enabled and am.token_env in secrets
    assert secrets[am.token_env]["name"] == "sre-agent-alertmanager-token"
    # The pods start without it (their other detectors run); the webhook then takes
    # nothing and keeps them unready (tests/unit/test_webhook_token.py).
    assert secrets[am.token_env]["optional"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.server.port and settings.server.host == "0.0.0.0"
    (service,) = (
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "sre-agent-webhooks"
    )
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert not prometheus_gates_readiness(["detector"])


def test_the_detectors_replicas_judge_alertmanagers_heartbeat_together() -> None:
    """Off until the replicas shared it: behind the Service Alertmanager's notification
    reaches one detector, and the other raised a false blindness. On now, expected sooner
    than Alertmanager's incidents would resolve as quiet and later than the route of
    deploy/monitoring/alertmanager.yml sends it (tests/unit/test_compose.py checks that
    route with amtool)."""
    docs = manifests()
    (detector,) = (
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "sre-agent-detector"
    )
    (container,) = detector["spec"]["template"]["spec"]["containers"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    env = {**config["data"], **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    settings = load_settings(DEPLOY.parent / "config" / "agent.yaml", env)
    beat = settings.detectors.alertmanager.heartbeat
    assert detector["spec"]["replicas"] > 1
    assert beat is not None and beat.alertname == "Watchdog"
    route = yaml.safe_load((DEPLOY / "monitoring" / "alertmanager.yml").read_text())["route"]
    [watchdog] = [r for r in route["routes"] if 'alertname="Watchdog"' in r["matchers"]]
    every = max(
        parse_duration(watchdog["group_interval"]), parse_duration(watchdog["repeat_interval"])
    )
    assert 2 * every < beat.within < settings.correlation.resolve_timeout


def test_every_replicated_role_has_a_budget_that_keeps_one_and_lets_one_go() -> None:
    # Without a PodDisruptionBudget a node drain (the agent's own drain action
    # included) may evict both replicas of a role at once.
    docs = manifests()
    budgets = {
        tuple(sorted(d["spec"]["selector"]["matchLabels"].items())): d["spec"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    for d in docs:
        if d["kind"] != "Deployment" or d["spec"]["replicas"] < 2:
            continue
        replicas = d["spec"]["replicas"]
        budget = budgets.get(tuple(sorted(d["spec"]["selector"]["matchLabels"].items())))
        assert budget is not None, f"{d['metadata']['name']}: no PodDisruptionBudget"
        kept = budget.get("minAvailable", replicas - budget.get("maxUnavailable", replicas))
        assert 1 <= kept < replicas, f"{d['metadata']['name']}: keeps {kept} of {replicas}"


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    # Every pod already meets it; enforced, a later edit that drops it is refused.
    (namespace,) = [d for d in manifests() if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
