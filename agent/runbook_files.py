"""Runbook files in the reference's format (``apiVersion: runbook.sre/v1``, ``kind:
Runbook``), validated at the boundary into :class:`agent.settings.FileRunbook`.

What is honoured, and how:

- ``spec.trigger.alert``: the signal name; ``spec.trigger.source`` (an addition) restricts
  it to one source, with the precedence of an inline runbook's ``source``.
- ``spec.steps[]``: followed in order as a runbook's steps are (the first that applies;
  the next once its action was verified not_healed/worse). ``action.type`` must be one of
  the agent's actions (:data:`ACTION_NAMES`; ``scale`` is scale_up or scale_down by the
  sign of ``params.replicas``) or a context step (diagnostic only). ``script`` and
  ``parallel`` run arbitrary commands: refused, as is any other type.
- ``action.params``: only the params the action takes, checked as the policy checks them
  (:func:`agent.policy.param_problem`). ``deployment``/``namespace``/``node``/``pod`` never
  choose the target (the incident's labels do): they restrict the step to incidents on
  that object.
- ``condition``: see :mod:`agent.runbook_expr`; parsed here, evaluated by the analyzer.
- ``onSuccess``/``onFailure``: ``continue`` (also ``monitor``: verification always watches
  an action) or ``notify_*``/``escalate*``; anything else is refused.
- ``spec.context.gather[]``: gathered for the incidents the runbook matches, besides the
  default context (see :mod:`agent.context`): ``metrics`` ``queries`` run on Prometheus
  (at most :data:`MAX_GATHER_QUERIES` a runbook), their ``$namespace`` replaced by the
  incident's, escaped (:mod:`agent.promql_vars`; another variable is refused here);
  ``events``/``deployments`` ``duration`` is the window before the incident from which the
  runbook's own conditions count them (nothing else is narrowed), ``namespace`` the one
  it applies to; ``logs`` ``query`` is LogQL: with no Loki
  source, only a selector naming the incident's workload and ``|=``/``!=`` line filters
  map onto the pod log tails read, and its ``duration`` is the window before the incident
  those tails are read from.
- ``spec.escalation[]``: levels 1, 2, ... with increasing ``after``: the unresolved levels
  of the incidents the runbook matches (agent.escalation_watch.runbook_plan), each sent to
  the escalation webhooks its ``notify`` channels name.
- ``onFailure: escalate_<who>``: the page goes to the webhook named ``<who>``, if any.
- ``${VAR}``/``${VAR:-default}`` placeholders are expanded from the environment as in the
  config, but an unset variable without a default is refused (the config's reads as
  empty: a runbook's field would silently be blank), and so is ``${namespace}`` (any query
  variable's name) in a metrics query: expanded at load time it is never the incident's
  label, which ``$namespace`` is; in a logs query, whose selector takes no variables, the
  error says to leave ``namespace=`` out (the incident's is used) or write the name, and
  in a gather item's or a step's ``namespace`` to leave the field out or write the name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from agent.ai_answer import is_dns_name
from agent.codec import validation_problems
from agent.models import ActionRequest, AnomalySource, ParamValue, Target
from agent.policy import param_problem
from agent.promql_vars import VARIABLES, slots
from agent.runbook_expr import (
    FACT_QUERIES,
    MAX_COUNT,
    Expr,
    ExprError,
    compares_in,
    fact_kind,
    facts_in,
    never_true,
    parse,
    render,
)
from agent.settings import (
    CONTEXT_STEPS,
    EscalationLevel,
    FileRunbook,
    FileStep,
    GatherItem,
    Seconds,
    Settings,
    _expand,
    load_yaml,
    placeholders,
    unset_placeholder,
)

# The reference's action names (and the agent's own) -> the agent's action type.
ACTION_NAMES: Mapping[str, str] = {
    "rollback": "rollback",
    "restart": "restart_workload",
    "restart_workload": "restart_workload",
    "restart_pod": "restart_pod",
    "scale_up": "scale_up",
    "scale_down": "scale_down",
    "cordon": "cordon_node",
    "cordon_node": "cordon_node",
    "drain": "drain_node",
    "drain_node": "drain_node",
}
SCALE = "scale"  # scale_up or scale_down by the sign of params.replicas
ARBITRARY = frozenset({"script", "parallel"})
# The params each action takes; anything else in a step is refused, not passed on.
ACTION_PARAMS: Mapping[str, frozenset[str]] = {
    "rollback": frozenset({"revision"}),
    "scale_up": frozenset({"replicas"}),
    "scale_down": frozenset({"replicas"}),
    "drain_node": frozenset({"timeout", "grace_period"}),
}
SCOPE_PARAMS = frozenset({"deployment", "namespace", "node", "pod"})
CONTINUE = frozenset({"continue", "monitor"})
_STRICT = ConfigDict(extra="forbid")
_EPOCH = datetime(2000, 1, 2, tzinfo=UTC)  # requested_at of the load-time param probe
MAX_GATHER_QUERIES = 10  # metrics queries of one runbook: each is a Prometheus call
MAX_QUERY = 2000  # characters of one gather query
_STEP = re.compile(r"spec\.steps\[[0-9]+\]\.action\.params")  # a step's params, by path
_NAME = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=128)]


@dataclass(frozen=True, slots=True)
class _Metadata:
    __pydantic_config__ = _STRICT
    name: _NAME
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Trigger:
    __pydantic_config__ = _STRICT
    alert: Annotated[str, Field(min_length=1, max_length=1024)]
    source: AnomalySource | None = None


@dataclass(frozen=True, slots=True)
class _Gather:
    __pydantic_config__ = _STRICT
    type: Literal["logs", "metrics", "events", "deployments"]
    query: str = ""
    queries: tuple[str, ...] = ()
    namespace: str = ""
    duration: Seconds | None = None


@dataclass(frozen=True, slots=True)
class _Context:
    __pydantic_config__ = _STRICT
    gather: tuple[_Gather, ...] = ()


@dataclass(frozen=True, slots=True)
class _Notify:
    __pydantic_config__ = _STRICT
    channel: Annotated[str, Field(min_length=1, max_length=64)]
    target: str = ""


@dataclass(frozen=True, slots=True)
class _Level:
    __pydantic_config__ = _STRICT
    level: Annotated[int, Field(ge=1, le=10)]
    after: Seconds
    notify: tuple[_Notify, ...] = ()


@dataclass(frozen=True, slots=True)
class _Spec:
    __pydantic_config__ = _STRICT
    trigger: _Trigger
    steps: Annotated[list[Any], Field(min_length=1)]  # each validated as a _Step
    context: _Context = field(default_factory=_Context)
    escalation: tuple[_Level, ...] = ()


@dataclass(frozen=True, slots=True)
class _Doc:
    __pydantic_config__ = _STRICT
    apiVersion: Literal["runbook.sre/v1"]  # the reference's key
    kind: Literal["Runbook"]
    metadata: _Metadata
    spec: _Spec


@dataclass(frozen=True, slots=True)
class _Action:
    __pydantic_config__ = _STRICT
    type: Annotated[str, Field(min_length=1)]
    params: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Step:
    __pydantic_config__ = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=256)]
    action: _Action
    condition: str | None = None
    on_success: Annotated[str, Field(alias="onSuccess")] = "continue"
    on_failure: Annotated[str, Field(alias="onFailure")] = "continue"


def _outcome(value: str, where: str) -> tuple[str | None, str | None]:
    """(the normalised onSuccess/onFailure value, a problem)."""
    if value in CONTINUE:
        return "continue", None
    if value.startswith(("notify_", "escalate")):
        return value, None
    return None, (
        f"{where}: {value!r} is not supported; use continue, monitor, notify_<who> or "
        "escalate[_<who>]"
    )


def _action_type(raw: _Action, where: str) -> tuple[str | None, str | None]:
    kind = raw.type
    if kind in ARBITRARY:
        return None, (
            f"{where}.type: {kind!r} runs arbitrary commands and is refused: only the "
            f"agent's allow-listed actions run ({', '.join(sorted(ACTION_NAMES))}, scale)"
        )
    if kind == SCALE:
        replicas = str(raw.params.get("replicas", "")).strip()
        if replicas[:1] not in ("+", "-"):
            return None, (
                f"{where}.params.replicas: scale needs a relative +N or -N (its sign says "
                f"up or down), got {raw.params.get('replicas')!r}; or use scale_up/scale_down"
            )
        return ("scale_up" if replicas[0] == "+" else "scale_down"), None
    if kind in ACTION_NAMES:
        return ACTION_NAMES[kind], None
    if kind in CONTEXT_STEPS:
        return kind, None
    return None, (
        f"{where}.type: unknown action {kind!r}; known: {', '.join(sorted(ACTION_NAMES))}, "
        f"scale, or a context step ({', '.join(sorted(CONTEXT_STEPS))})"
    )


def _params(
    action: str, raw: Mapping[str, ParamValue], where: str, settings: Settings
) -> tuple[dict[str, ParamValue], dict[str, str], list[str]]:
    """(the action's params, the scope params, problems)."""
    takes = ACTION_PARAMS.get(action, frozenset())
    params: dict[str, ParamValue] = {}
    scope: dict[str, str] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if key in SCOPE_PARAMS:
            if not isinstance(value, str) or not value:
                problems.append(f"{where}.params.{key}: expected a name, got {value!r}")
            else:
                scope[key] = value
        elif key in takes:
            params[key] = value
        else:
            allowed = sorted(takes | SCOPE_PARAMS)
            problems.append(
                f"{where}.params.{key}: {action} takes no such param (takes: {', '.join(allowed)})"
            )
    if action in ACTION_PARAMS and not problems:
        probe = ActionRequest(
            id="runbook-file",
            incident_id="runbook-file",
            incident_key="runbook-file",
            analysis_id="runbook-file",
            type=action,  # type: ignore[arg-type]  # an ActionType: ACTION_NAMES' values
            target=Target(kind="Deployment", name="runbook-file"),
            confidence=1.0,
            reason="load-time check",
            requested_at=_EPOCH,
            params=params,
        )
        problem = param_problem(probe, settings.remediation)
        if problem is not None:
            problems.append(f"{where}.{problem}")
    return params, scope, problems


def _never_known(condition: Expr, where: str, settings: Settings) -> list[str]:
    """A fact no analysis would ever know, or a comparison no value of it satisfies: the
    step would silently never apply."""
    problems: list[str] = []
    queries = settings.ai.context.queries
    for fact in facts_in(condition):
        query = FACT_QUERIES.get(fact)
        if query is not None and query not in queries:
            problems.append(
                f"{where}: {fact} is never gathered: ai.context.queries has no {query!r} "
                "query to read it from"
            )
    for cmp in compares_in(condition):
        if never_true(cmp):
            span = FACTS_RANGE[fact_kind(cmp.fact) or ""]
            problems.append(f"{where}: {render(cmp)} can never hold ({cmp.fact} is {span})")
    return problems


FACTS_RANGE = {
    "count": f"0 to {MAX_COUNT}: the gatherer keeps {MAX_COUNT} rollouts",
    "flag": "0 or 1",
    "percent": "never negative",
    "duration": "never negative",
}


def _step(
    raw: Any, where: str, settings: Settings, book: str = ""
) -> tuple[FileStep | None, list[str]]:
    # The arbitrary-execution types carry keys (script, actions) no step takes: say what
    # is refused, not that a key is unexpected.
    if isinstance(raw, dict) and isinstance(raw.get("action"), dict):
        kind = raw["action"].get("type")
        if kind in ARBITRARY:
            _, problem = _action_type(_Action(type=kind), f"{where}.action")
            return None, [problem or ""]
    try:
        step = TypeAdapter(_Step).validate_python(raw)
    except ValidationError as err:
        return None, [f"{where}.{p}" for p in validation_problems(err)]
    problems: list[str] = []
    action, problem = _action_type(step.action, f"{where}.action")
    if problem:
        problems.append(problem)
    params: dict[str, ParamValue] = {}
    scope: dict[str, str] = {}
    if action is not None:
        params, scope, more = _params(action, step.action.params, f"{where}.action", settings)
        problems += more
    condition = None
    if step.condition is not None:
        said = f"{where}.condition (runbook {book!r}, step {step.name!r})"
        try:
            condition = parse(step.condition)
        except ExprError as err:
            problems.append(f"{said}: {err}")
        else:
            problems += _never_known(condition, said, settings)
    on_success, problem = _outcome(step.on_success, f"{where}.onSuccess")
    problems += [problem] if problem else []
    on_failure, problem = _outcome(step.on_failure, f"{where}.onFailure")
    problems += [problem] if problem else []
    if problems or action is None or on_success is None or on_failure is None:
        return None, problems
    return (
        FileStep(
            name=step.name,
            action=action,
            params=params,
            scope=scope,
            condition=condition,
            condition_text=step.condition or "",
            on_success=on_success,
            on_failure=on_failure,
        ),
        [],
    )


def _gather(items: tuple[_Gather, ...], book: str) -> tuple[tuple[GatherItem, ...], list[str]]:
    """The gather items, or the problems found: a field an item's type does not act on is
    refused rather than silently ignored."""
    out: list[GatherItem] = []
    problems: list[str] = []
    total = 0
    for i, g in enumerate(items):
        where = f"spec.context.gather[{i}]"
        queries = tuple(q.strip() for q in ((g.query,) if g.query else ()) + g.queries)
        if g.namespace and not is_dns_name(g.namespace):
            problems.append(f"{where}.namespace: {g.namespace!r} is not a namespace name")
        if any(not q for q in queries) or any(len(q) > MAX_QUERY for q in queries):
            problems.append(f"{where}: each query is 1 to {MAX_QUERY} characters")
        if g.type == "metrics":
            if not queries:
                problems.append(f"{where}.queries: metrics needs at least one PromQL query")
            for j, q in enumerate(queries):
                if q.count("(") != q.count(")") or q.count("[") != q.count("]"):
                    problems.append(f"{where}.queries[{j}]: unbalanced brackets in PromQL")
                _, problem = slots(q)
                if problem is not None:
                    problems.append(f"{where}.queries[{j}] (runbook {book!r}): {problem}")
            for key, value in (("namespace", g.namespace), ("duration", g.duration)):
                if value:
                    problems.append(
                        f"{where}.{key}: metrics queries run at the incident's analysis: "
                        f"put the {key} in the PromQL ($namespace is the incident's)"
                    )
            total += len(queries)
        elif g.type == "logs":
            if len(queries) != 1:
                problems.append(f"{where}.query: logs needs exactly one LogQL query")
            if g.namespace:
                # Only the selector picks the pods whose tails are narrowed (context.
                # names_workload): the field would be silently ignored.
                problems.append(
                    f"{where}.namespace: logs reads the namespace from its selector: "
                    f'write {{namespace="{g.namespace}", ...}} in the query'
                )
        elif queries:
            problems.append(f"{where}.query: {g.type} takes no query (namespace, duration)")
        out.append(GatherItem(g.type, queries, g.namespace, g.duration))
    if total > MAX_GATHER_QUERIES:
        problems.append(
            f"spec.context.gather: {total} metrics queries; at most {MAX_GATHER_QUERIES} "
            "(each is a Prometheus call in every analysis the runbook matches)"
        )
    return tuple(out), problems


def parse_runbook(doc: Any, path: str, settings: Settings) -> tuple[FileRunbook | None, list[str]]:
    """One document as a runbook, or the problems found (each naming the field)."""
    try:
        book = TypeAdapter(_Doc).validate_python(doc)
    except ValidationError as err:
        return None, validation_problems(err)
    steps: list[FileStep] = []
    problems: list[str] = []
    for i, raw in enumerate(book.spec.steps):
        step, more = _step(raw, f"spec.steps[{i}]", settings, book.metadata.name)
        problems += more
        if step is not None:
            steps.append(step)
    gather, more = _gather(book.spec.context.gather, book.metadata.name)
    problems += more
    levels = book.spec.escalation
    if [lv.level for lv in levels] != list(range(1, len(levels) + 1)):
        problems.append("spec.escalation: levels must be 1, 2, ... in order")
    elif any(b.after <= a.after for a, b in itertools.pairwise(levels)) or any(
        lv.after <= 0 for lv in levels
    ):
        problems.append("spec.escalation: each level's after must be later than the one before")
    if problems:
        return None, problems
    return (
        FileRunbook(
            name=book.metadata.name,
            alert=book.spec.trigger.alert,
            source=book.spec.trigger.source,
            path=path,
            steps=tuple(steps),
            escalation=tuple(
                EscalationLevel(
                    level=lv.level,
                    after=lv.after,
                    channels=tuple((n.channel, n.target) for n in lv.notify),
                )
                for lv in book.spec.escalation
            ),
            gather=gather,
        ),
        [],
    )


def _env_problems(doc: Any, env: Mapping[str, str]) -> list[str]:
    """What the file's ``${VAR}`` placeholders would silently get wrong: an unset variable
    without a default (it would read as an empty string), and in a metrics query a
    placeholder named as a query variable (``${namespace}``: the environment's, at load
    time, never the incident's label); in a logs query or a namespace field too, the error
    saying what is allowed there."""

    def at(node: Any, *keys: str) -> Any:
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    name = at(doc, "metadata", "name")
    book = f"runbook {name!r}" if isinstance(name, str) else "runbook without a name"
    items = at(doc, "spec", "context", "gather")
    kinds = {
        f"spec.context.gather[{i}]": at(g, "type")
        for i, g in enumerate(items if isinstance(items, list) else [])
    }
    problems: list[str] = []
    for path, var, default in placeholders(doc):
        item, _, key = path.rpartition(".")
        query = key == "query" or key.startswith("queries[")
        if kinds.get(item) == "metrics" and query and var in VARIABLES:
            problems.append(
                f"{path} ({book}): ${{{var}}} is replaced from the environment when the file "
                f"loads, not by the incident's label: write ${var}"
            )
        elif kinds.get(item) == "logs" and query and var in VARIABLES:
            # A logs selector takes no variables at all (agent.context.parse_logql): its
            # label values are literal, and a namespace left out is the incident's.
            problems.append(
                f"{path} ({book}): ${{{var}}} is replaced from the environment when the file "
                f"loads, not by the incident's label, and a logs selector takes no variables: "
                f"leave {VARIABLES[var]}= out (the incident's is used) or write its name"
            )
        elif var in VARIABLES and key == "namespace" and (item in kinds or _STEP.fullmatch(item)):
            # Left out, the field means the incident's namespace(s): what ${namespace}
            # was meant to say, and expanded at load time never does.
            left_out = (
                "it applies in the incident's namespace"
                if item in kinds
                else "the step applies in the incident's namespace"
            )
            problems.append(
                f"{path} ({book}): ${{{var}}} is replaced from the environment when the file "
                f"loads, not by the incident's label: leave namespace out ({left_out}) or "
                "write its name"
            )
        elif (why := unset_placeholder(var, default, env)) is not None:
            problems.append(f"{path} ({book}): {why}")
    return problems


def _files(entry: Path) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [entry]


def load_runbook_files(
    settings: Settings, env: Mapping[str, str], base_dir: Path
) -> tuple[list[FileRunbook], list[str]]:
    """The runbooks of ``settings.runbook_files`` (files, or directories of *.yaml/*.yml),
    and the problems found, each naming the entry, the file and the field."""
    out: list[FileRunbook] = []
    problems: list[str] = []
    for i, name in enumerate(settings.runbook_files):
        entry = Path(name) if Path(name).is_absolute() else base_dir / name
        if not entry.exists():
            problems.append(f"runbook_files[{i}]: no file or directory {entry}")
            continue
        for path in _files(entry):
            where = f"runbook_files[{i}] ({path})"
            try:
                doc = load_yaml(path.read_text())
            except OSError as err:
                problems.append(f"{where}: cannot read: {err.strerror}")
                continue
            except yaml.YAMLError as err:
                problems.append(f"{where}: not valid YAML: {err}")
                continue
            unset = _env_problems(doc, env)
            if unset:  # expanded, the fields would read as empty strings
                problems += [f"{where}: {p}" for p in unset]
                continue
            book, found = parse_runbook(_expand(doc, env), str(path), settings)
            problems += [f"{where}: {p}" for p in found]
            if book is not None:
                out.append(book)
    return out, problems
