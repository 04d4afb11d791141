"""The design reference's recording rules and dashboard, taken verbatim from it, evaluated
by Prometheus' own engine (`promtool test rules`) against what the agent exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import streams.correlator as correlator_module
from agent.metrics import Metrics
from streams.correlation import NO_MARKS, key_of
from streams.correlator import Correlator
from tests.helpers import exposition_series, promtool_test, reference_file
from tests.unit.factories import anomaly, at
from tests.unit.test_correlator_timers import Clock, Recording, take_over
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


def evaluate(
    metrics: Metrics | dict[str, Metrics], tests: list[dict[str, Any]], where: Path
) -> str | None:
    """Runs ``tests`` (promql_expr_test entries, at 5m) on the agent's exposition, with the
    reference's rules loaded exactly as it writes them; of several processes (instance ->
    metrics), each scraped with its ``instance`` label."""
    scraped = metrics if isinstance(metrics, dict) else {"": metrics}
    series = [
        {
            **s,
            "series": s["series"].replace("{", f'{{instance="{name}",', 1) if name else s["series"],
        }
        for name, m in scraped.items()
        for s in exposition_series(m.registry)
    ]
    groups = yaml.safe_load(reference_file("self-healing-rules.yaml"))["spec"]["groups"]
    (where / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    doc = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
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
    metrics.export_resolutions({"checkout": 42.0, "payments": 60.0})
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


class Producer:
    """The Kafka producer, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    async def send(self, topic: str, key: bytes | None, *rest: object) -> None:
        self.sent.append((topic, key))


class Exporting(Recording):
    """A correlator worker with its own publishing (what it counts and exports), Kafka's
    producer recorded; it owns the partitions in ``owned``."""

    def __init__(self, clock: Clock, owned: set[int]) -> None:
        super().__init__({"correlation": {"resolve_timeout": "5m"}}, clock)
        self.owned = owned
        self.producer = Producer()

        async def producer() -> Producer:
            return self.producer

        self.app.maybe_start_producer = producer  # type: ignore[method-assign]

    _emit = Correlator._emit

    def _owned_partitions(self) -> set[int]:
        return set(self.owned)


async def test_a_correlator_that_lost_a_partition_stops_exporting_its_services_mttr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker used to export the last resolution of every service it ever resolved until
    it restarted: after a rebalance the old owner's stale value and the new owner's were
    averaged by the reference's rule. Now only the owner exports it, from the takeover on."""
    clock = Clock(at(0))
    monkeypatch.setattr(correlator_module, "utcnow", lambda: clock.now)
    old, new = Exporting(clock, {0}), Exporting(clock, set())

    async def incident(c: Exporting, opened: float, resolved: float) -> None:
        for t, status in ((opened, "firing"), (resolved, "resolved")):
            a = anomaly(status=status, t=t)  # of service checkout
            c.now = at(t)
            await c._fold(0, [(key_of(a, c.rules), a, NO_MARKS)])

    mttr = "sre_agent_incident_resolution_duration_seconds"
    await incident(old, 0, 120)
    assert old.metrics.last_resolution.labels(service="checkout")._value.get() == 120
    # The partition moves: the new owner recovers it, the old one is left without it.
    new.owned = {0}
    await take_over(old, new, 200)
    old.owned = set()
    await old._recovered()
    assert mttr not in exposition(old.metrics)
    assert new.metrics.last_resolution.labels(service="checkout")._value.get() == 120
    await incident(new, 1000, 1030)
    out = evaluate(
        {"old": old.metrics, "new": new.metrics},
        [
            {
                "expr": "sre:mttr_with_selfhealing",
                "exp_samples": [
                    {"labels": 'sre:mttr_with_selfhealing{service="checkout"}', "value": 30}
                ],
            },
            {
                "expr": reference_panels()["MTTR with Self-Healing"][0],
                "exp_samples": [{"labels": "{}", "value": 30}],
            },
            {  # each resolution counted once, where it resolved
                "expr": 'sum(sre_agent_incident_resolution_seconds_count{service="checkout"})',
                "exp_samples": [{"labels": "{}", "value": 2}],
            },
        ],
        tmp_path,
    )
    assert out is None, out


def exposition(metrics: Metrics) -> set[str]:
    return {s["series"].split("{")[0] for s in exposition_series(metrics.registry)}
