"""`sre-agent config validate` and the promtool check (Prometheus' own parser, run locally)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from agent.cli import main, promtool_problems
from agent.settings import (
    DEFAULT_CONFIG,
    PatternSpec,
    Settings,
    load_settings,
)
from tests.helpers import reference_file

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _settings(*conditions: str) -> Settings:
    # Built directly, bypassing the settings' own bracket check, to reach promtool.
    return Settings(
        patterns=tuple(PatternSpec(name=f"p{i}", condition=c) for i, c in enumerate(conditions))
    )


@pytest.fixture(autouse=True)
def _promtool_installed() -> None:
    assert Path(PROMTOOL).exists(), "promtool is part of the dev environment"


@pytest.mark.parametrize(
    "expr",
    [
        "rate(http_requests_total[5m]",
        "sum by (x) (foo",
        "foo{a=}",
        "rate(foo[5x])",
        "foo >",
        "sum by (x) foo)(",
    ],
)
def test_invalid_promql_yields_one_line_naming_the_pattern(expr: str) -> None:
    problems = promtool_problems(_settings(expr), promtool=PROMTOOL)
    assert len(problems) == 1
    assert problems[0].startswith("patterns[0].condition: invalid PromQL: ")
    assert "\n" not in problems[0]
    assert len(problems[0]) > len("patterns[0].condition: invalid PromQL: ")


def test_unclosed_parenthesis_is_explained() -> None:
    (problem,) = promtool_problems(_settings("sum by (x) (foo"), promtool=PROMTOOL)
    assert "unclosed left parenthesis" in problem


def test_bad_duration_is_explained() -> None:
    # promtool says 'parse error: bad duration syntax: "5"'; the detail must keep the
    # explanation, not only what follows the first "x: " (here the end of "syntax: ").
    (problem,) = promtool_problems(_settings("rate(foo[5x])"), promtool=PROMTOOL)
    assert "bad duration syntax" in problem


@pytest.mark.parametrize(
    "expr",
    [
        "rate(http_requests_total[5m])",
        "sum by (x) (foo)",
        'sum by (namespace, service) (rate(http_requests_total{status=~"5.."}[5m])) > 0.01',
        "histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 0.5",
        "up == 0",
    ],
)
def test_valid_promql_yields_nothing(expr: str) -> None:
    assert promtool_problems(_settings(expr), promtool=PROMTOOL) == []


def test_only_the_bad_pattern_is_named() -> None:
    problems = promtool_problems(
        _settings("up == 0", "foo{a=}", "rate(x[1m])", "sum(("), promtool=PROMTOOL
    )
    assert [p.split(":")[0] for p in problems] == ["patterns[1].condition", "patterns[3].condition"]


def test_shipped_config_passes_promtool() -> None:
    from agent.settings import load_settings

    assert promtool_problems(load_settings(DEFAULT_CONFIG, env={}), promtool=PROMTOOL) == []


def test_without_promtool_the_check_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert promtool_problems(_settings("foo{a=}")) == []


# --- main(["config", "validate", FILE]) ----------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return str(path)


def test_validate_ok_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runbook = "runbooks:\n  - {name: r, alert: A, actions: [notify_oncall]}\n"
    path = _write(tmp_path, "patterns:\n  - name: a\n    condition: up == 0\n" + runbook)
    assert main(["config", "validate", path, "--no-env"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok (1 patterns, 1 runbooks)"
    assert err == ""


def test_validate_warns_of_a_step_that_can_never_be_requested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runbook = (
        "runbooks:\n  - {name: r, alert: A, actions: [check_recent_deployments, update_config]}\n"
    )
    path = _write(tmp_path, runbook)
    assert main(["config", "validate", path, "--no-env"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok (0 patterns, 1 runbooks)"
    assert err.startswith("warning: runbook r: step update_config is never requested")


def test_validate_warns_of_a_runbook_a_pattern_answers_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "patterns:\n  - name: a\n    condition: up == 0\nrunbooks:\n"
        "  - {name: p, alert: a, source: prometheus, actions: [notify_oncall]}\n"
        "  - {name: any, alert: a, actions: [notify_oncall]}\n"
        "  - {name: k, alert: a, source: kubernetes, actions: [notify_oncall]}\n",
    )
    assert main(["config", "validate", path, "--no-env"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok (1 patterns, 3 runbooks)"
    # Only the runbook for any source never applies: the pattern answers for every source
    # it does not name; those naming a source take it over.
    assert [line.split(":")[:2] for line in err.splitlines()] == [["warning", " runbook any"]]
    assert "never applies" in err


def test_validate_shipped_config_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(DEFAULT_CONFIG), "--no-env"]) == 0
    # The reference's three patterns plus the six of the Kubernetes library.
    assert "ok (9 patterns, 1 runbooks)" in capsys.readouterr().out


def test_validate_prints_one_stderr_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "agent:\n  mode: yolo\n  colour: red\nremediation:\n  require_approval: [nuke]\n",
    )
    assert main(["config", "validate", path, "--no-env"]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "agent.mode",
        "agent.colour",
        "remediation.require_approval[0]",
    ]
    assert out == ""


def test_validate_refuses_a_duplicate_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "agent:\n  kill_switch: true\nagent:\n  mode: autonomous\n")
    assert main(["config", "validate", path, "--no-env"]) == 1
    assert "duplicate key 'agent' at line 3 (first at line 1)" in capsys.readouterr().err


def test_validate_reports_invalid_promql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "patterns:\n"
        "  - name: ok\n    condition: up == 0\n"
        "  - name: bad\n    condition: 'foo{a=}'\n",
    )
    assert main(["config", "validate", path, "--no-env"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("patterns[1].condition: invalid PromQL: ")


def test_validate_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(tmp_path / "nope.yaml"), "--no-env"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("<file>: cannot read ")


def test_validate_applies_env_overrides_unless_no_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "agent:\n  mode: manual\n")
    monkeypatch.setenv("SRE_AGENT__AGENT__MODE", "yolo")
    assert main(["config", "validate", path]) == 1
    assert capsys.readouterr().err.startswith("agent.mode: ")
    assert main(["config", "validate", path, "--no-env"]) == 0


def test_an_unknown_lab_experiment_is_refused_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["lab", "--experiment", "oom"]) == 64
    err = capsys.readouterr().err
    assert "unknown experiment 'oom'; known: bad-rollout, crash-loop, traffic-surge" in err


def reference_config() -> str:
    """The reference's config.yaml, as its ConfigMap holds it (placeholders included)."""
    config_map = yaml.safe_load(reference_file("config.yaml"))
    text: str = config_map["data"]["config.yaml"]
    return text


WORKSPACE = "0b4c5a3e-1f2d-4e6a-9b8c-7d6e5f4a3b2c"


def test_the_reference_config_loads_with_a_warning_for_each_unused_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKSPACE_ID", WORKSPACE)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://shop.openai.azure.com")
    path = _write(tmp_path, reference_config())
    assert main(["config", "validate", path]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok (3 patterns, 0 runbooks)"
    assert err.splitlines() == [
        "warning: monitoring.azure_monitor: accepted but not queried: this agent reads "
        "metrics from monitoring.prometheus only",
        "warning: ai.azure_openai: configured but ai.enabled is false: analyses use the "
        "rule analyzer only (set ai.enabled: true to call the model)",
    ]
    settings = load_settings(path)
    azure_monitor = settings.monitoring.azure_monitor
    assert azure_monitor is not None and azure_monitor.workspace_id == WORKSPACE
    assert not settings.ai.enabled, "the LLM is never enabled implicitly"
    assert settings.ai.azure_openai.endpoint == "https://shop.openai.azure.com"


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("{workspace_id: not-a-guid}", "monitoring.azure_monitor.workspace_id"),
        ("{workspace: x}", "monitoring.azure_monitor.workspace"),
    ],
)
def test_a_wrong_azure_monitor_section_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, problem: str
) -> None:
    path = _write(tmp_path, f"monitoring:\n  azure_monitor: {section}\n")
    assert main(["config", "validate", path, "--no-env"]) == 1
    assert capsys.readouterr().err.startswith(problem)
