"""Runbook files in the reference's format: validated at load time (errors name the file
and the field), refused where they would run anything outside the allow-list, and followed
by the rule analyzer step by step."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.analysis_stage import failure_escalation
from agent.analyzer import Context, MetricSample, Rollout, analyze
from agent.errors import ConfigError
from agent.models import Incident, Member, Target, fingerprint
from agent.policy import revision_param
from agent.runbook_expr import parse
from agent.settings import (
    DEFAULT_CONFIG,
    EscalationLevel,
    FileStep,
    GatherItem,
    Settings,
    config_warnings,
    load_settings,
)
from tests.unit.factories import SHOP, at

REFERENCE = Path(__file__).resolve().parent.parent / "fixtures" / "reference_runbook.yaml"
SHIPPED = load_settings(DEFAULT_CONFIG, env={})
OPENED = at(3600)
CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")


def _config(tmp_path: Path, *books: dict[str, Any], extra: str = "") -> Path:
    d = tmp_path / "runbooks"
    d.mkdir(exist_ok=True)
    for i, book in enumerate(books):
        (d / f"book{i}.yaml").write_text(yaml.safe_dump(book))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"runbook_files: [runbooks]\n{extra}")
    return cfg


def book(*steps: dict[str, Any], name: str = "orders", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "runbook.sre/v1",
        "kind": "Runbook",
        "metadata": {"name": name},
        "spec": {"trigger": {"alert": "CheckoutErrors"}, "steps": list(steps), **spec},
    }


def step(kind: str = "rollback", condition: str | None = None, **more: Any) -> dict[str, Any]:
    params = more.pop("params", {})
    out: dict[str, Any] = {"name": f"do {kind}", "action": {"type": kind, "params": params}}
    if condition is not None:
        out["condition"] = condition
    return {**out, **more}


def problems(tmp_path: Path, *books: dict[str, Any], extra: str = "") -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, *books, extra=extra), env={})
    return err.value.problems


def test_the_references_example_verbatim_is_refused_for_its_script_and_parallel_steps(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"runbook_files: [{REFERENCE}]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    where = f"runbook_files[0] ({REFERENCE})"
    assert [p.split(" runs ")[0] for p in err.value.problems] == [
        f"{where}: spec.steps[1].action.type: 'script'",
        f"{where}: spec.steps[2].action.type: 'parallel'",
    ]
    assert all("arbitrary commands and is refused" in p for p in err.value.problems)


def test_the_shipped_adapted_example_loads() -> None:
    (orders,) = SHIPPED.file_runbooks
    assert (orders.name, orders.alert, orders.source) == (
        "high-error-rate",
        "OrderServiceHighErrorRate",
        None,
    )
    assert [(s.action, dict(s.params), dict(s.scope)) for s in orders.steps] == [
        ("rollback", {}, {"deployment": "order-service", "namespace": "order-service"}),
        ("check_database_connections", {}, {}),
        ("check_downstream_services", {}, {}),
        ("scale_up", {"replicas": "+2"}, {"deployment": "order-service"}),
    ]
    assert orders.steps[0].condition == parse("deployments.count > 0 AND deployments[0].age < 30m")
    assert [(s.on_success, s.on_failure) for s in orders.steps] == [
        ("notify_success", "continue"),
        ("continue", "escalate_database"),
        ("continue", "continue"),
        ("continue", "continue"),  # monitor: verification always watches
    ]
    assert orders.gather == (
        GatherItem("logs", ('{app="order-service"} |= "error" | json',), duration=900.0),
        GatherItem(
            "metrics",
            (
                'rate(http_requests_total{app="order-service",status=~"5.."}[5m])',
                "histogram_quantile(0.99, rate(http_request_duration_seconds_bucket"
                '{app="order-service"}[5m]))',
                'rate(http_requests_total{app="order-service"}[5m])',
            ),
        ),
        GatherItem("events", namespace="order-service", duration=1800.0),
        GatherItem("deployments", namespace="order-service", duration=3600.0),
    )
    # The reference's levels and times (its channels name no webhook of the shipped config).
    assert orders.escalation == (EscalationLevel(1, 300.0), EscalationLevel(2, 900.0))
    assert config_warnings(SHIPPED) == []


def test_a_rollback_step_to_revision_0_loads_as_the_previous_revision(tmp_path: Path) -> None:
    # The reference's rollback takes revision 0 for "the previous one".
    settings = load_settings(_config(tmp_path, book(step(params={"revision": 0}))), env={})
    ((only,),) = [b.steps for b in settings.file_runbooks]
    assert (only.action, revision_param(only.params)) == ("rollback", None)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (
            step(condition="cpu > 80"),
            "spec.steps[0].condition (runbook 'orders', step 'do rollback'): at position 1: ",
        ),
        (step(condition="cpu_utilization >"), "at position 18: expected a number"),
        (step("scale", params={"replicas": 3}), "spec.steps[0].action.params.replicas: scale "),
        (step("scale", params={"replicas": "+9"}), "action.params.replicas: a scale_up moves"),
        (step("scale_down", params={"replicas": "+1"}), "a scale_down moves by -1..-5"),
        (step(params={"revision": "latest"}), "action.params.revision: expected a positive"),
        (step(params={"image": "evil:1"}), "action.params.image: rollback takes no such param"),
        (step(params={"namespace": 3}), "action.params.namespace: expected a name"),
        (step("update_config"), "spec.steps[0].action.type: unknown action 'update_config'"),
        (step("kubectl"), "spec.steps[0].action.type: unknown action 'kubectl'"),
        (step(onFailure="isolate_and_fallback"), "onFailure: 'isolate_and_fallback' is not"),
        (step(onSuccess="page_everyone"), "spec.steps[0].onSuccess: 'page_everyone'"),
        (step(script="rm -rf /"), "spec.steps[0].script: Unexpected keyword"),
    ],
)
def test_a_bad_step_is_refused_naming_the_file_and_field(
    tmp_path: Path, bad: dict[str, Any], says: str
) -> None:
    (problem,) = problems(tmp_path, book(bad))
    assert problem.startswith(f"runbook_files[0] ({tmp_path / 'runbooks' / 'book0.yaml'}): ")
    assert says in problem


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ({"type": "metrics"}, "gather[0].queries: metrics needs at least one PromQL query"),
        ({"type": "metrics", "queries": ["rate(x[5m]"]}, "gather[0].queries[0]: unbalanced"),
        ({"type": "metrics", "queries": ["up"], "duration": "5m"}, "gather[0].duration: metrics"),
        ({"type": "metrics", "queries": ["up"] * 11}, "11 metrics queries; at most 10"),
        ({"type": "logs", "duration": "5m"}, "gather[0].query: logs needs exactly one LogQL"),
        ({"type": "events", "query": "x"}, "gather[0].query: events takes no query"),
        (
            {"type": "logs", "query": '{app="checkout"}', "namespace": "shop"},
            "gather[0].namespace: logs reads the namespace from its selector: "
            'write {namespace="shop"',
        ),
        ({"type": "events", "namespace": "Not A Name"}, "gather[0].namespace: 'Not A Name'"),
        ({"type": "traces"}, "spec.context.gather[0].type"),
        (
            {"type": "metrics", "queries": ["up", 'up{app="$service"}']},
            "gather[0].queries[1] (runbook 'orders'): unknown variable $service (known: "
            "$namespace)",
        ),
        (
            {"type": "metrics", "queries": ["up{namespace=$namespace}"]},
            "gather[0].queries[0] (runbook 'orders'): $namespace is outside a string literal",
        ),
        (
            {"type": "metrics", "queries": ["up{namespace=`$namespace`}"]},
            "gather[0].queries[0] (runbook 'orders'): $namespace is in a `raw` string",
        ),
    ],
)
def test_a_gather_item_is_refused_where_nothing_would_act_on_it(
    tmp_path: Path, item: dict[str, Any], says: str
) -> None:
    (problem,) = problems(tmp_path, book(step(), context={"gather": [item]}))
    assert says in problem


@pytest.mark.parametrize("written", ["${namespace}", "${namespace:-shop}"])
def test_a_metrics_query_placeholder_named_as_a_query_variable_is_refused(
    tmp_path: Path, written: str
) -> None:
    # Expanded from the environment at load time, it would never be the incident's
    # namespace: unset, the query silently read namespace="".
    query = f'rate(http_requests_total{{namespace="{written}"}}[5m])'
    gather = [{"type": "metrics", "queries": ["up", query]}]
    cfg = _config(tmp_path, book(step(), context={"gather": gather}))
    for env in ({}, {"namespace": "shop"}):
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, env=env)
        assert list(err.value.problems) == [
            f"runbook_files[0] ({tmp_path / 'runbooks' / 'book0.yaml'}): "
            "spec.context.gather[0].queries[1] (runbook 'orders'): ${namespace} is replaced "
            "from the environment when the file loads, not by the incident's label: "
            "write $namespace"
        ]


@pytest.mark.parametrize("written", ["${namespace}", "${namespace:-shop}"])
def test_a_logs_query_placeholder_named_as_a_query_variable_says_what_is_allowed(
    tmp_path: Path, written: str
) -> None:
    # Unset, it used to be refused as a generic unset variable; set (or defaulted), the
    # selector silently named the environment's namespace, never the incident's.
    query = f'{{namespace="{written}", app="checkout"}} |= "error"'
    gather = [{"type": "logs", "query": query}]
    cfg = _config(tmp_path, book(step(), context={"gather": gather}))
    for env in ({}, {"namespace": "shop"}):
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, env=env)
        assert list(err.value.problems) == [
            f"runbook_files[0] ({tmp_path / 'runbooks' / 'book0.yaml'}): "
            "spec.context.gather[0].query (runbook 'orders'): ${namespace} is replaced "
            "from the environment when the file loads, not by the incident's label, and a "
            "logs selector takes no variables: leave namespace= out (the incident's is "
            "used) or write its name"
        ]


@pytest.mark.parametrize(
    ("field", "where", "left_out"),
    [
        ("gather", "spec.context.gather[0].namespace", "it applies in the incident's namespace"),
        (
            "step",
            "spec.steps[0].action.params.namespace",
            "the step applies in the incident's namespace",
        ),
    ],
)
def test_a_namespace_field_placeholder_named_as_a_query_variable_says_what_is_allowed(
    tmp_path: Path, field: str, where: str, left_out: str
) -> None:
    # Unset, it read as a generic unset variable; set, the field silently named the
    # environment's namespace where the author meant the incident's.
    if field == "gather":
        doc = book(step(), context={"gather": [{"type": "events", "namespace": "${namespace}"}]})
    else:
        doc = book(step(params={"namespace": "${namespace}"}))
    cfg = _config(tmp_path, doc)
    for env in ({}, {"namespace": "shop"}):
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, env=env)
        assert list(err.value.problems) == [
            f"runbook_files[0] ({tmp_path / 'runbooks' / 'book0.yaml'}): {where} (runbook "
            "'orders'): ${namespace} is replaced from the environment when the file loads, "
            f"not by the incident's label: leave namespace out ({left_out}) or write its name"
        ]


def test_an_unset_environment_variable_in_a_runbook_file_is_refused(tmp_path: Path) -> None:
    scoped = step(params={"deployment": "${DEPLOYMENT}", "namespace": "${NS:-shop}"})
    cfg = _config(tmp_path, book(scoped))
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert list(err.value.problems) == [
        f"runbook_files[0] ({tmp_path / 'runbooks' / 'book0.yaml'}): "
        "spec.steps[0].action.params.deployment (runbook 'orders'): ${DEPLOYMENT}: "
        "environment variable DEPLOYMENT is unset (write ${DEPLOYMENT:-default} for a default)"
    ]
    # Set (or given a default), a placeholder is expanded as in the config.
    (loaded,) = load_settings(cfg, env={"DEPLOYMENT": "checkout"}).file_runbooks
    assert dict(loaded.steps[0].scope) == {"deployment": "checkout", "namespace": "shop"}


def test_the_rules_show_what_a_runbook_gathered_as_evidence(tmp_path: Path) -> None:
    settings = following(tmp_path, *ESCALATING)
    gathered = MetricSample("runbook orders: rate(x[5m])", {"app": "checkout"}, 0.25)
    note = "runbook orders logs '{a=~\"b\"}': not gathered: no Loki source, and ..."
    ctx = Context(rollouts=(rollout(10),), metrics=(gathered,), notes=(note,))
    an = analyze(INCIDENT, ctx, settings, OPENED)
    assert an.actions  # the evidence is shown, and decides nothing
    assert "gathered by runbook orders: rate(x[5m]) {app=checkout} = 0.25" in an.evidence
    assert note in an.evidence


@pytest.mark.parametrize(
    ("condition", "says"),
    [
        # The reference's kind of fact no context source gives: refused, never false.
        ("restarts > 3", "at position 1: unknown fact 'restarts'"),
        ("deployments.restarts > 3", "unknown fact 'deployments.restarts'"),
        ("deployments[5].age < 30m", "unknown fact 'deployments[5].age'"),
        # Known facts the default ai.context.queries never gather.
        (
            "concurrency_utilization > 80",
            "concurrency_utilization is never gathered: "
            "ai.context.queries has no 'concurrency_saturation' query",
        ),
        ("dependency_error_rate > 50", "has no 'dependency_error_ratio' query"),
        # Comparisons no value of the fact satisfies.
        (
            "deployments.count > 5",
            "deployments.count > 5.0 can never hold (deployments.count "
            "is 0 to 5: the gatherer keeps 5 rollouts)",
        ),
        ("crash_looping == 2", "crash_looping == 2.0 can never hold"),
        ("cpu_utilization < 0 OR crash_looping == 1", "cpu_utilization < 0.0 can never hold"),
    ],
)
def test_a_condition_that_could_never_be_known_is_refused_at_load(
    tmp_path: Path, condition: str, says: str
) -> None:
    (problem,) = problems(tmp_path, book(step(condition=condition)))
    where = "spec.steps[0].condition (runbook 'orders', step 'do rollback'): "
    assert where in problem and says in problem


def test_a_fact_whose_query_is_configured_loads(tmp_path: Path) -> None:
    queries = (
        "ai: {context: {queries: {concurrency_saturation: 'inflight{pod=~\"$workload-.*\"}'}}}\n"
    )
    dependency = step(condition="concurrency_utilization > 80")
    settings = load_settings(_config(tmp_path, book(dependency), extra=queries), env={})
    assert settings.file_runbooks[0].steps[0].condition is not None
    assert problems(tmp_path, book(step(condition="cpu_utilization > 80")), extra=queries)


def test_loaded_runbooks_cannot_be_written_in_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("file_runbooks: [{name: x}]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert list(err.value.problems) == [
        "file_runbooks: not a setting; list runbook files in runbook_files"
    ]


def test_a_runbook_file_may_not_reuse_an_inline_runbooks_name(tmp_path: Path) -> None:
    inline = "runbooks: [{name: orders, alert: x, actions: [notify_oncall]}]\n"
    (problem,) = problems(tmp_path, book(step()), extra=inline)
    assert "metadata.name: runbook 'orders' is already defined" in problem


LEVELS = [
    {"level": 1, "after": "5m", "notify": [{"channel": "pager", "target": "x"}]},
    {"level": 2, "after": "1h", "notify": [{"channel": "slack", "target": "#sre"}]},
]
HOOKS = (
    "escalation: {webhooks: [{name: pager, url: 'https://p.example/h'},"
    " {name: database, url: 'https://d.example/h'}]}\n"
)


def test_channels_and_escalate_targets_naming_no_webhook_are_warned_of(tmp_path: Path) -> None:
    dba = step(onFailure="escalate_database")
    nobody = {**step("restart"), "name": "bounce", "onFailure": "escalate_dba"}
    settings = load_settings(
        _config(tmp_path, book(dba, nobody, escalation=LEVELS), extra=HOOKS), env={}
    )
    warnings = config_warnings(settings)
    assert len(warnings) == 2
    assert "level 2: no escalation webhook is named 'slack': #sre is not notified" in warnings[0]
    assert (
        "step 'bounce' onFailure escalate_dba: no escalation webhook is named 'dba'"
        in (warnings[1])
    )
    assert "the page takes the global route" in warnings[1]


@pytest.mark.parametrize(
    ("levels", "says"),
    [
        ([{"level": 2, "after": "5m"}], "levels must be 1, 2, ... in order"),
        ([{"level": 1, "after": "1h"}, {"level": 2, "after": "5m"}], "each level's after must"),
    ],
)
def test_escalation_levels_out_of_order_are_refused(
    tmp_path: Path, levels: list[dict[str, Any]], says: str
) -> None:
    (problem,) = problems(tmp_path, book(step(), escalation=levels))
    assert f"spec.escalation: {says}" in problem


def test_a_failed_steps_escalate_who_page_goes_to_that_webhook(tmp_path: Path) -> None:
    dba = {**ESCALATING[0], "onFailure": "escalate_database"}
    settings = load_settings(_config(tmp_path, book(dba), extra=HOOKS), env={})
    tried = (("rollback", CHECKOUT.key),)
    an = analyze(INCIDENT, Context(rollouts=(rollout(10),), ineffective=tried), settings, OPENED)
    page = failure_escalation(INCIDENT, an, settings, tried)
    assert page is not None and page.channels == ("database",)
    other = {**ESCALATING[0], "onFailure": "escalate_dba"}  # no such webhook: global route
    settings = load_settings(_config(tmp_path, book(other), extra=HOOKS), env={})
    page = failure_escalation(INCIDENT, an, settings, tried)
    assert page is not None and page.channels == ()


# The analyzer following a runbook file.


def alert(name: str = "CheckoutErrors") -> Member:
    return Member(
        fingerprint=fingerprint("alertmanager", name, SHOP),
        name=name,
        source="alertmanager",
        severity="critical",
        status="firing",
        labels=dict(SHOP),
        first_seen=OPENED,
        last_seen=OPENED,
        value=1.0,
    )


INCIDENT = Incident(
    id="inc-1",
    key="c1/shop/checkout",
    status="open",
    severity="critical",
    labels=dict(SHOP),
    members=(alert(),),
    opened_at=OPENED,
    updated_at=OPENED,
    revision=1,
)


def rollout(minutes_before: float) -> Rollout:
    return Rollout(
        namespace="shop",
        workload="checkout",
        revision=7,
        image="shop/checkout:v7",
        at=OPENED - timedelta(minutes=minutes_before),
        previous_image="shop/checkout:v6",
    )


def following(tmp_path: Path, *steps: dict[str, Any]) -> Settings:
    return load_settings(_config(tmp_path, book(*steps)), env={})


ESCALATING = (
    step("rollback", "deployments.count > 0 AND deployments[0].age < 30m"),
    step("scale", "cpu_utilization > 80 OR memory_utilization > 85", params={"replicas": "+2"}),
)


def test_a_step_whose_condition_holds_acts_on_the_incidents_target(tmp_path: Path) -> None:
    settings = following(tmp_path, *ESCALATING)
    an = analyze(INCIDENT, Context(rollouts=(rollout(10),)), settings, OPENED)
    assert [(a.type, a.target, dict(a.params)) for a in an.actions] == [("rollback", CHECKOUT, {})]
    assert "condition 'deployments.count > 0 AND deployments[0].age < 30m' holds" in an.root_cause


def test_a_step_whose_condition_fails_does_nothing_and_says_why(tmp_path: Path) -> None:
    settings = following(tmp_path, *ESCALATING)
    an = analyze(INCIDENT, Context(rollouts=(rollout(45),), cpu_saturation={}), settings, OPENED)
    assert an.actions == ()
    line = (
        "runbook orders step 'do rollback': condition 'deployments.count > 0 AND "
        "deployments[0].age < 30m' is false (deployments.count=1, deployments[0].age=2700); "
        "not applied"
    )
    assert line in an.evidence
    # cpu/memory were not gathered: unknown, not false.
    assert any(
        "condition 'cpu_utilization > 80 OR memory_utilization > 85' is unknown: the context "
        "lacks cpu_utilization, memory_utilization" in e
        for e in an.evidence
    )


def test_after_a_step_verified_not_healed_the_next_is_taken(tmp_path: Path) -> None:
    settings = following(tmp_path, *ESCALATING)
    ctx = Context(rollouts=(rollout(10),), cpu_saturation={"checkout": 0.95})
    tried = replace(ctx, ineffective=(("rollback", CHECKOUT.key),))
    an = analyze(INCIDENT, tried, settings, OPENED)
    assert [(a.type, a.target, dict(a.params)) for a in an.actions] == [
        ("scale_up", CHECKOUT, {"replicas": "+2"})
    ]
    assert f"already tried without effect: rollback {CHECKOUT.key}" in an.evidence


def test_on_failure_escalate_stops_the_runbook_instead_of_the_next_step(tmp_path: Path) -> None:
    first = {**ESCALATING[0], "onFailure": "escalate_database"}
    settings = following(tmp_path, first, ESCALATING[1])
    ctx = Context(rollouts=(rollout(10),), cpu_saturation={"checkout": 0.95})
    an = analyze(
        INCIDENT, replace(ctx, ineffective=(("rollback", CHECKOUT.key),)), settings, OPENED
    )
    assert an.actions == ()
    assert "the runbook says escalate_database" in an.root_cause


def test_a_step_scoped_to_another_workload_never_acts_on_this_one(tmp_path: Path) -> None:
    scoped = step("rollback", params={"deployment": "order-service", "namespace": "shop"})
    settings = following(tmp_path, scoped)
    an = analyze(INCIDENT, Context(rollouts=(rollout(10),)), settings, OPENED)
    assert an.actions == ()
    assert (
        "runbook orders step 'do rollback': not applied to Deployment/shop/checkout: the step "
        "is for deployment order-service, not checkout"
    ) in an.evidence
    mine = step("rollback", params={"deployment": "checkout", "namespace": "shop"})
    settings = following(tmp_path, mine)
    an = analyze(INCIDENT, Context(rollouts=(rollout(10),)), settings, OPENED)
    assert [(a.type, a.target) for a in an.actions] == [("rollback", CHECKOUT)]


def test_an_unreadable_rollout_history_makes_deployment_facts_unknown(tmp_path: Path) -> None:
    settings = following(tmp_path, step("rollback", "deployments.count == 0"))
    ctx = Context(notes=(f"no rollout history for {CHECKOUT.key}: forbidden",))
    an = analyze(INCIDENT, ctx, settings, OPENED)
    assert an.actions == ()
    assert any("the context lacks deployments.count" in e for e in an.evidence)


def test_steps_for_returns_the_file_runbooks_steps(tmp_path: Path) -> None:
    settings = following(tmp_path, step())
    found = settings.steps_for("CheckoutErrors", "alertmanager")
    assert found is not None
    assert found[0] == "runbook orders"
    assert [s.action for s in found[1] if isinstance(s, FileStep)] == ["rollback"]


def test_on_success_notify_warns_when_no_webhook_takes_healed(tmp_path: Path) -> None:
    hooks = "escalation: {webhooks: [{name: pager, url: 'https://p.example/h'}]}\n"
    notifying = step(onSuccess="notify_success")
    settings = load_settings(_config(tmp_path, book(notifying), extra=hooks), env={})
    (warning,) = config_warnings(settings)
    assert "step 'do rollback' notifies on success, but no escalation webhook lists" in warning
    hooks = (
        "escalation: {webhooks: [{name: chat, url: 'https://c.example/h', reasons: [healed]}]}\n"
    )
    settings = load_settings(_config(tmp_path, book(notifying), extra=hooks), env={})
    assert config_warnings(settings) == []
