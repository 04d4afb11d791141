"""The design reference's recording rules and dashboard, taken verbatim from it, evaluated
by Prometheus' own engine (`promtool test rules`) against what the agent exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from agent.metrics import Metrics
from tests.helpers import exposition_series, promtool_test, reference_file
from tests.unit.test_deploy import DEPLOY, exported

SERIES = re.compile(r"\b(sre_agent_[a-z_]+)")


def reference_rules() -> dict[str, str]:
    """The reference's PrometheusRule: recorded name -> expression."""
    doc = yaml.safe_load(reference_file("self-healing-rules.yaml"))
    return {r["record"]: r["expr"] for g in doc["spec"]["groups"] for r in g["rules"]}


def reference_panels() -> dict[str, list[str]]:
    """The reference's dashboard: panel title -> its expressions."""
    doc = json.loads(reference_file("dashboard.json"))
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in doc["dashboard"]["panels"]}


def flat(expr: str) -> str:
    return " ".join(expr.split())


def evaluate(metrics: Metrics, tests: list[dict[str, Any]], where: Path) -> str | None:
    """Runs ``tests`` (promql_expr_test entries, at 5m) on the agent's exposition, with the
    reference's rules loaded exactly as it writes them."""
    groups = yaml.safe_load(reference_file("self-healing-rules.yaml"))["spec"]["groups"]
    (where / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    doc = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": exposition_series(metrics.registry),
                "promql_expr_test": [{"eval_time": "5m", **t} for t in tests],
            }
        ],
    }
    return promtool_test(doc, where)


def test_the_reference_mttr_rule_and_panel_return_the_last_resolution(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.incident_resolved("checkout", 300.0)
    metrics.incident_resolved("checkout", 42.0)
    metrics.incident_resolved("payments", 60.0)
    panel = reference_panels()["MTTR with Self-Healing"]
    assert panel == ["avg(sre_agent_incident_resolution_duration_seconds)"]
    out = evaluate(
        metrics,
        [
            {
                "expr": "sre:mttr_with_selfhealing",
                "exp_samples": [
                    {"labels": 'sre:mttr_with_selfhealing{service="checkout"}', "value": 42},
                    {"labels": 'sre:mttr_with_selfhealing{service="payments"}', "value": 60},
                ],
            },
            {"expr": panel[0], "exp_samples": [{"labels": "{}", "value": 51}]},
            # The distribution stays, under its own name, for quantiles and windowed means.
            {
                "expr": 'sre_agent_incident_resolution_seconds_count{service="checkout"}',
                "exp_samples": [
                    {
                        "labels": 'sre_agent_incident_resolution_seconds_count{service="checkout"}',
                        "value": 2,
                    }
                ],
            },
        ],
        tmp_path,
    )
    assert out is None, out


def test_every_series_the_reference_queries_is_one_the_agent_exposes() -> None:
    exprs = [*reference_rules().values()] + [e for es in reference_panels().values() for e in es]
    queried = {name for expr in exprs for name in SERIES.findall(expr)}
    assert "sre_agent_incident_resolution_duration_seconds" in queried
    assert queried - exported() == set()


def test_deploy_keeps_the_reference_rules_and_panels_unchanged() -> None:
    deployed = yaml.safe_load((DEPLOY / "monitoring" / "self-healing-rules.yml").read_text())
    rules = {
        r["record"]: r["expr"] for g in deployed["groups"] for r in g["rules"] if "record" in r
    }
    for name, expr in reference_rules().items():
        if SERIES.search(expr):  # the app's own (resilience4j) rules are not the agent's
            assert flat(rules[name]) == flat(expr), name
    dash = json.loads((DEPLOY / "monitoring" / "dashboard.json").read_text())
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in dash["panels"]}
    for title, exprs in reference_panels().items():
        if any(SERIES.search(e) for e in exprs):
            assert panels[title] == exprs, title
