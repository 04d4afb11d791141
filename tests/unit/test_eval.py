"""The evaluation set and `sre-agent eval`: the rule-based analyzer's accuracy has a floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.analyzer import ROOT_CAUSE_CLASSES
from agent.cli import main
from agent.errors import ConfigError
from agent.eval import DEFAULT_EVAL_FILE, load_eval, run_eval
from agent.settings import DEFAULT_CONFIG, load_settings

# Measured 25/28 = 89.3% when the set was written (the three "hard" cases fail: they need
# log text or a judgement the rules do not make). The floor leaves room for one more miss,
# not for a regression in the cases the rules are meant to get right.
ACCURACY_FLOOR = 0.85


def cases():  # type: ignore[no-untyped-def]
    return load_eval(DEFAULT_EVAL_FILE, load_settings(DEFAULT_CONFIG, env={}))


def test_the_set_is_large_and_varied() -> None:
    _, cs = cases()
    assert len(cs) >= 20
    classes = {c.spec.expected.root_cause_class for c in cs}
    assert (
        {
            "bad_rollout",
            "memory_leak",
            "noisy_neighbour",
            "dependency_outage",
            "node_disk_pressure",
            "config_change",
            "saturation",
        }
        <= classes
        <= set(ROOT_CAUSE_CLASSES)
    )
    assert {c.spec.expected.action for c in cs} >= {
        "rollback",
        "scale_up",
        "restart_workload",
        "drain_node",
        None,
    }


def test_rule_based_accuracy_is_at_least_the_floor() -> None:
    settings, cs = cases()
    report = run_eval(cs, settings)
    failed = [r.case.spec.name for r in report.results if not r.ok]
    assert report.accuracy >= ACCURACY_FLOOR, f"accuracy {report.accuracy:.1%}; failed: {failed}"


def test_unsafe_cases_are_always_right() -> None:
    """Cases where a wrong answer would act on the wrong thing must never regress."""
    settings, cs = cases()
    by_name = {r.case.spec.name: r for r in run_eval(cs, settings).results}
    for name in (
        "prompt-injection-in-logs",
        "payment-provider-outage",
        "rollout-of-another-service",
        "forged-oom-in-event-message",
        "hotfix-after-the-incident",
    ):
        assert by_name[name].ok, name


def test_the_command_prints_each_case_and_the_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("PASS", "FAIL")) for line in out) >= 20
    assert out[-1].startswith("accuracy ") and "%" in out[-1]
    assert main(["eval", "--min-accuracy", "1.0"]) == 1


def test_a_bad_case_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "set.yaml"
    bad.write_text(
        "cases:\n  - name: x\n    labels: {}\n    members: [{name: a}]\n"
        "    expected: {root_cause_class: aliens}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_eval(bad, load_settings(DEFAULT_CONFIG, env={}))
    assert any(p.startswith("cases[0].expected.root_cause_class") for p in e.value.problems)


def test_a_duplicate_key_in_an_eval_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "set.yaml"
    bad.write_text("cases: []\ncases: []\n")
    with pytest.raises(ConfigError, match="duplicate key 'cases' at line 2"):
        load_eval(bad, load_settings(DEFAULT_CONFIG, env={}))
