"""Settings: the shipped files load, and every error names the path of its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.settings import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    Settings,
    load_settings,
    load_yaml,
    parse_duration,
    parse_settings,
)
from streams.correlator import rules_from

LAB_CONFIG = REPO_ROOT / "config" / "lab.yaml"
UP = {"name": "up", "condition": "up == 0"}


def _problems(doc: Any, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_settings(doc, env={} if env is None else env)
    assert info.value.problems
    return info.value.problems


def _only_problem(doc: Any, env: dict[str, str] | None = None) -> str:
    problems = _problems(doc, env)
    assert len(problems) == 1, problems
    return problems[0]


# --- the shipped files -------------------------------------------------------------------------


def test_agent_yaml_loads_with_its_documented_values() -> None:
    s = load_settings(DEFAULT_CONFIG, env={})
    assert s.agent.mode == "autonomous"
    assert s.agent.dry_run is False
    assert s.agent.kill_switch is False
    assert s.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert s.monitoring.prometheus.url == "http://127.0.0.1:19090"
    assert s.monitoring.prometheus.timeout == 5.0
    assert s.monitoring.evaluation_interval == 15.0
    assert s.ai.azure_openai.endpoint == ""
    assert s.ai.timeout == 20.0
    assert s.remediation.confidence_threshold == 0.85
    assert s.remediation.require_approval == ("rollback", "scale_down", "update_config")
    assert s.remediation.approval_ttl == 3600.0
    assert s.remediation.cooldown == 300.0
    assert s.remediation.rollout_window == 1800.0
    assert s.remediation.verify_after == 60.0
    assert s.remediation.denied_namespaces == ("kube-system",)
    assert s.correlation.resolve_timeout == 300.0
    assert s.correlation.member_retention == 3600.0
    assert rules_from(s).member_retention == 3600.0  # and the correlator folds with it
    # The reference's three patterns, then the Kubernetes library from pattern_files.
    assert [p.name for p in s.patterns] == [
        "high-error-rate",
        "high-latency",
        "pod-restart-loop",
        "crash-looping",
        "replicas-mismatch",
        "container-oom-killed",
        "node-filesystem-filling",
        "cpu-throttling",
        "hpa-maxed-out",
    ]
    assert s.pattern("high-latency") is not None
    assert s.pattern("high-latency").severity == "warning"  # type: ignore[union-attr]
    assert "scale_up_if_cpu_high" in s.pattern("high-latency").actions  # type: ignore[union-attr]
    assert s.pattern("nope") is None


def test_lab_yaml_loads_with_short_windows() -> None:
    s = load_settings(LAB_CONFIG, env={})
    assert s.agent.cluster == "lab"
    assert s.kafka.topic_prefix == "lab."
    assert s.monitoring.evaluation_interval == 2.0
    assert s.monitoring.prometheus.timeout == 3.0
    assert s.remediation.approval_ttl == 600.0
    assert s.remediation.verify_after == 25.0
    assert s.remediation.require_approval == ("rollback", "scale_down", "update_config")
    assert s.correlation.resolve_timeout == 60.0
    assert [p.name for p in s.patterns] == [
        "high-error-rate",
        "cpu-saturated",
        "pod-failing",
        "container-restarts",
    ]
    assert s.pattern("container-restarts").actions == (  # type: ignore[union-attr]
        "analyze_crash_logs",
        "restart_if_crash_looping",
    )
    assert "[20s]" in s.ai.context.queries["cpu_saturation"]
    assert "[20s]" in s.patterns[0].condition


def test_placeholders_in_the_shipped_file_take_the_environment() -> None:
    env = {"KAFKA_BOOTSTRAP": "kafka:9092", "PROMETHEUS_URL": "http://prom:9090"}
    s = load_settings(DEFAULT_CONFIG, env=env)
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.monitoring.prometheus.url == "http://prom:9090"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  name: from-env-path\n")
    assert load_settings(env={"SRE_AGENT_CONFIG": str(path)}).agent.name == "from-env-path"


def test_empty_document_gives_defaults() -> None:
    assert parse_settings(None, env={}) == Settings()
    assert parse_settings({}, env={}).remediation.require_approval == (
        "rollback",
        "scale_down",
        "update_config",
    )


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml", env={})
    (problem,) = info.value.problems
    assert problem.startswith("<file>: cannot read ")


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("agent: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (problem,) = info.value.problems
    assert problem.startswith("<file>: ") and "not valid YAML" in problem


# The reviewer's file: the second `agent:` silently replaced the first, and with it shadow
# mode and the kill switch.
_DUPLICATE_AGENT = """\
agent:
  dry_run: true
  kill_switch: true
remediation:
  enabled: true
agent:
  mode: autonomous
"""


def test_a_duplicate_key_is_refused_naming_it_and_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(_DUPLICATE_AGENT)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (problem,) = info.value.problems
    assert problem.endswith("duplicate key 'agent' at line 6 (first at line 1)")


def test_a_duplicate_key_in_a_pattern_file_or_an_env_value_is_refused(tmp_path: Path) -> None:
    lib = tmp_path / "lib.yaml"
    lib.write_text("patterns:\n  - name: a\n    condition: up == 0\n    condition: up == 1\n")
    config = tmp_path / "agent.yaml"
    config.write_text("pattern_files: [lib.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert info.value.problems == (
        f"pattern_files[0]: {lib} is not valid YAML: "
        "duplicate key 'condition' at line 4 (first at line 3)",
    )
    config.write_text("agent: {name: a}\n")
    with pytest.raises(ConfigError, match="duplicate key 'dry_run' at line 1"):
        load_settings(config, env={"SRE_AGENT__AGENT": "{dry_run: true, dry_run: false}"})


def test_an_unset_environment_variable_in_a_pattern_file_is_refused(tmp_path: Path) -> None:
    # Read as empty, as in the config, it silently ran namespace="" in every evaluation.
    lib = tmp_path / "lib.yaml"
    lib.write_text(
        "patterns:\n"
        "  - name: down\n"
        '    condition: up{namespace="${SHOP_NS}", job="${JOB:-api}"} == 0\n'
    )
    config = tmp_path / "agent.yaml"
    # The config's own placeholders stay empty when unset.
    config.write_text('pattern_files: [lib.yaml]\nmonitoring: {alertmanager: {url: "${AM}"}}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert info.value.problems == (
        f"pattern_files[0] ({lib}): patterns[0].condition (pattern 'down'): ${{SHOP_NS}}: "
        "environment variable SHOP_NS is unset (write ${SHOP_NS:-default} for a default)",
    )
    # Set (or given a default), a placeholder is expanded as before.
    loaded = load_settings(config, env={"SHOP_NS": "shop"})
    assert loaded.pattern("down") is not None
    assert loaded.pattern("down").condition == 'up{namespace="shop", job="api"} == 0'
    assert loaded.monitoring.alertmanager.url == ""


def test_yaml_merge_keys_may_still_be_overridden() -> None:
    # '<<: *base' then a key of base's is an override, not a duplicate.
    doc = load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n")
    assert doc["use"] == {"x": 3, "y": 2}


def test_non_mapping_root_is_refused() -> None:
    assert _only_problem([1, 2]) == "<root>: expected a mapping, got list"


# --- errors name the path ----------------------------------------------------------------------


def test_bad_pattern_condition_names_its_index() -> None:
    doc = {"patterns": [UP, {"name": "b", "condition": "   "}]}
    assert _only_problem(doc).startswith("patterns[1].condition: ")


def test_unbalanced_pattern_condition_is_refused() -> None:
    doc = {"patterns": [{"name": "b", "condition": "rate(x[5m]"}]}
    problem = _only_problem(doc)
    assert problem.startswith("patterns[0].condition: ") and "unbalanced" in problem


def test_bad_mode_names_agent_mode() -> None:
    problem = _only_problem({"agent": {"mode": "yolo"}})
    assert problem.startswith("agent.mode: ")


def test_unknown_action_in_require_approval_names_its_index() -> None:
    problem = _only_problem({"remediation": {"require_approval": ["rollback", "nuke"]}})
    assert problem.startswith("remediation.require_approval[1]: ")
    assert "'nuke'" in problem


def test_unknown_step_names_its_index() -> None:
    doc = {"patterns": [{**UP, "actions": ["analyze_logs", "pray"]}]}
    assert _only_problem(doc).startswith("patterns[0].actions[1]: ")


def test_bad_pattern_name_is_refused() -> None:
    doc = {"patterns": [{"name": "Has Spaces", "condition": "up"}]}
    assert _only_problem(doc).startswith("patterns[0].name: ")


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"agent": {"mood": "calm"}}, "agent.mood"),
        ({"monitoring": {"prometheus": {"uri": "x"}}}, "monitoring.prometheus.uri"),
        ({"remediation": {"confidence": 0.5}}, "remediation.confidence"),
        ({"patterns": [{**UP, "when": "now"}]}, "patterns[0].when"),
    ],
)
def test_unknown_keys_are_rejected(doc: dict[str, Any], path: str) -> None:
    assert _only_problem(doc).startswith(f"{path}: ")


def test_several_problems_are_reported_together() -> None:
    doc = {"agent": {"mode": "x"}, "remediation": {"cooldown": "soon"}, "kafka": {"partitions": 0}}
    paths = {p.split(":")[0] for p in _problems(doc)}
    assert paths == {"agent.mode", "remediation.cooldown", "kafka.partitions"}


@pytest.mark.parametrize("threshold", [1.5, -0.1])
def test_confidence_threshold_is_a_fraction(threshold: float) -> None:
    problem = _only_problem({"remediation": {"confidence_threshold": threshold}})
    assert problem.startswith("remediation.confidence_threshold: ")


def test_duplicate_pattern_names_are_rejected() -> None:
    doc = {"patterns": [UP, {"name": "other", "condition": "x"}, {**UP, "condition": "y"}]}
    assert _only_problem(doc) == "patterns[2].name: duplicate pattern name 'up'"


def test_runbooks_name_the_bad_field_and_reject_duplicate_names() -> None:
    book = {"name": "orders", "alert": "OrdersErrors", "actions": ["check_recent_deployments"]}
    steps = ["check_recent_deployments", "pray"]
    assert _only_problem({"runbooks": [{**book, "actions": steps}]}).startswith(
        "runbooks[0].actions[1]: "
    )
    assert _only_problem({"runbooks": [{**book, "actions": []}]}).startswith(
        "runbooks[0].actions: "
    )
    assert _only_problem({"runbooks": [{**book, "source": "email"}]}).startswith(
        "runbooks[0].source: "
    )
    assert _only_problem({"runbooks": [book, {**book, "alert": "Other"}]}) == (
        "runbooks[1].name: duplicate runbook name 'orders'"
    )


def test_an_empty_group_by_is_rejected_naming_the_field() -> None:
    # It used to give every anomaly the key "", which no stored state could carry: the
    # worker failed to restore its table for good.
    assert _only_problem({"correlation": {"group_by": []}}).startswith("correlation.group_by: ")
    problems = _problems({"correlation": {"group_by": ["service", ""]}})
    assert problems[0].startswith("correlation.group_by[1]: ")
    ok = parse_settings({"correlation": {"group_by": ["service"]}}, env={})
    assert ok.correlation.group_by == ("service",)


def test_inhibit_rules_name_the_bad_matcher_and_reject_duplicate_names() -> None:
    rule = {"name": "r", "source_matchers": ["a=b"], "target_matchers": ["c=d"]}
    bad = {**rule, "target_matchers": ["sev=~("]}
    problem = _problems({"correlation": {"inhibit_rules": [rule, bad]}})[0]
    assert problem.startswith("correlation.inhibit_rules[1].target_matchers[0]: ")
    assert "invalid regular expression" in problem
    dupes = _only_problem({"correlation": {"inhibit_rules": [rule, rule]}})
    assert dupes.startswith("correlation: ") and "duplicate rule names ['r']" in dupes
    ok = parse_settings({"correlation": {"inhibit_rules": [rule]}}, env={})
    assert ok.correlation.inhibit_rules[0].equal == ()


def test_configuration_change_is_an_alias_of_update_config() -> None:
    s = parse_settings({"remediation": {"require_approval": ["configuration_change"]}}, env={})
    assert s.remediation.require_approval == ("update_config",)


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("45", 45.0),
        (" 10 s ", 10.0),
    ],
)
def test_durations_are_parsed(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    s = parse_settings({"remediation": {"cooldown": text}}, env={})
    assert s.remediation.cooldown == pytest.approx(seconds)


def test_numeric_durations_are_seconds() -> None:
    assert parse_settings({"remediation": {"cooldown": 42}}, env={}).remediation.cooldown == 42.0


def test_pattern_for_and_interval_are_durations() -> None:
    s = parse_settings({"patterns": [{**UP, "for": "2m", "interval": "30s"}]}, env={})
    assert s.patterns[0].for_ == 120.0
    assert s.patterns[0].interval == 30.0
    assert parse_settings({"patterns": [UP]}, env={}).patterns[0].interval is None


@pytest.mark.parametrize("text", ["5 minutes", "m5", "-5s", "1e3s", ""])
def test_bad_durations_name_the_field(text: str) -> None:
    problem = _only_problem({"remediation": {"cooldown": text}})
    assert problem.startswith("remediation.cooldown: ")


@settings(max_examples=100, deadline=None)
@given(n=st.integers(min_value=0, max_value=10**6), unit=st.sampled_from(["s", "m", "h", "d"]))
def test_duration_is_amount_times_unit(n: int, unit: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == n * factor


# --- placeholders and the environment ----------------------------------------------------------


def test_placeholder_default_applies_when_variable_unset() -> None:
    s = parse_settings({"kafka": {"bootstrap_servers": "${KB:-broker:9092}"}}, env={})
    assert s.kafka.bootstrap_servers == "broker:9092"


def test_placeholder_takes_the_variable_when_set() -> None:
    s = parse_settings({"kafka": {"bootstrap_servers": "${KB:-broker:9092}"}}, env={"KB": "k:1"})
    assert s.kafka.bootstrap_servers == "k:1"


def test_placeholder_without_default_is_empty_and_works_inside_text_and_lists() -> None:
    doc = {
        "ai": {"azure_openai": {"endpoint": "https://${HOST}/v1${MISSING}"}},
        "remediation": {"denied_namespaces": ["${NS:-kube-system}", "x-${SUFFIX}"]},
    }
    s = parse_settings(doc, env={"HOST": "ai.example", "SUFFIX": "prod"})
    assert s.ai.azure_openai.endpoint == "https://ai.example/v1"
    assert s.remediation.denied_namespaces == ("kube-system", "x-prod")


def test_env_override_is_parsed_as_a_number() -> None:
    env = {"SRE_AGENT__REMEDIATION__CONFIDENCE_THRESHOLD": "0.9"}
    s = parse_settings({"remediation": {"confidence_threshold": 0.5}}, env=env)
    assert s.remediation.confidence_threshold == 0.9
    assert isinstance(s.remediation.confidence_threshold, float)


def test_env_override_beats_file_and_placeholder() -> None:
    doc = {"agent": {"mode": "${MODE:-autonomous}"}}
    env = {"MODE": "supervised", "SRE_AGENT__AGENT__MODE": "manual"}
    assert parse_settings(doc, env=env).agent.mode == "manual"


def test_env_override_parses_lists_and_booleans_and_creates_sections() -> None:
    env = {
        "SRE_AGENT__REMEDIATION__REQUIRE_APPROVAL": "[scale_up, configuration_change]",
        "SRE_AGENT__AGENT__KILL_SWITCH": "true",
    }
    s = parse_settings({}, env=env)
    assert s.remediation.require_approval == ("scale_up", "update_config")
    assert s.agent.kill_switch is True


def test_env_override_of_a_bad_value_names_the_path() -> None:
    env = {"SRE_AGENT__REMEDIATION__CONFIDENCE_THRESHOLD": "1.7"}
    assert _only_problem({}, env).startswith("remediation.confidence_threshold: ")


def test_env_override_of_an_unknown_key_is_rejected() -> None:
    env = {"SRE_AGENT__REMEDIATION__CONFIDENCE_TRESHOLD": "0.9"}
    assert _only_problem({}, env).startswith("remediation.confidence_treshold: ")


def test_env_override_through_a_scalar_is_reported() -> None:
    problems = _problems({"agent": "oops"}, {"SRE_AGENT__AGENT__MODE": "manual"})
    assert "agent.mode: env SRE_AGENT__AGENT__MODE overrides a non-mapping" in problems


def test_variables_without_the_prefix_are_ignored() -> None:
    env = {"SRE_AGENT_MODE": "manual", "AGENT__MODE": "manual", "SRE_AGENT__": "x"}
    assert parse_settings({}, env=env).agent.mode == "autonomous"


def test_parse_settings_does_not_mutate_the_document() -> None:
    doc = {"agent": {"mode": "${M:-manual}"}}
    parse_settings(doc, env={"SRE_AGENT__AGENT__CLUSTER": "x"})
    assert doc == {"agent": {"mode": "${M:-manual}"}}


@pytest.mark.parametrize(
    ("doc", "longest"),
    [
        ({"agent": {"stuck_after": "2m"}}, "120s"),  # the default drain_timeout
        ({"agent": {"stuck_after": "5m"}, "remediation": {"drain_timeout": "10m"}}, "600s"),
        (
            {
                "agent": {"stuck_after": "100s"},
                "ai": {"enabled": True, "timeout": "30s", "retries": 2, "max_backoff": "10s"},
                "remediation": {"drain_timeout": "30s"},
            },
            "140s",  # 30 s slot wait + 30 s x 3 attempts + 10 s x 2 backoffs
        ),
    ],
)
def test_consumer_liveness_must_outlast_the_longest_legitimate_event(
    doc: dict[str, Any], longest: str
) -> None:
    problem = _only_problem(doc)
    assert problem.startswith("<root>: Value error, agent.stuck_after: ")
    assert f"a legitimate event of up to {longest}" in problem


def test_consumer_liveness_can_be_turned_off_or_set_past_the_longest_event() -> None:
    assert parse_settings({"agent": {"stuck_after": 0}}, env={}).agent.stuck_after == 0
    ok = {"agent": {"stuck_after": "121s"}, "ai": {"enabled": True}}
    assert parse_settings(ok, env={}).agent.stuck_after == 121


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"monitoring": {"evaluation_interval": "0s"}}, "monitoring.evaluation_interval"),
        ({"monitoring": {"evaluation_interval": 0}}, "monitoring.evaluation_interval"),
        (
            {"patterns": [{"name": "p", "condition": "up == 0", "interval": "0s"}]},
            "patterns[0].interval",
        ),
        (
            {"patterns": [{"name": "p", "condition": "up == 0", "interval": "0ms"}]},
            "patterns[0].interval",
        ),
    ],
)
def test_an_evaluation_interval_of_0_is_refused(doc: Any, field: str) -> None:
    # 0 was accepted, then ended the pattern loop with ZeroDivisionError at its first slot.
    assert _only_problem(doc) == f"{field}: Input should be greater than 0"


def test_the_prompt_bound_leaves_room_for_the_key_facts() -> None:
    problem = _only_problem({"ai": {"max_prompt_tokens": 3999}})
    assert problem.startswith("ai.max_prompt_tokens: ") and "4000" in problem
    ok = parse_settings({"ai": {"max_prompt_tokens": 4000}}, env={})
    assert ok.ai.max_prompt_tokens == 4000
