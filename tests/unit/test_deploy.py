"""Deployment artefacts stay true to the code: rules parse, and every sre_agent_* series
the rules and the dashboard query is one the agent exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.metrics import Metrics
from tests.helpers import promtool_test

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERIES = re.compile(r"\b(sre_agent_[a-z_]+)")


def exported() -> set[str]:
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        names.add(metric.name)
        names.update(s.name for s in metric.samples)
        if metric.type == "counter":
            names.add(metric.name + "_total")
        if metric.type == "histogram":  # labelled: no samples until observed
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


def test_manifests_use_the_least_privilege_service_account() -> None:
    docs = [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "*" not in verbs and "*" not in resources
    assert not resources & {"secrets", "pods/exec", "clusterroles", "roles", "rolebindings"}
    assert not verbs & {"escalate", "bind", "impersonate"}
    for d in docs:
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            assert spec["serviceAccountName"] == "sre-agent"
            assert spec["securityContext"]["runAsNonRoot"] is True


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
