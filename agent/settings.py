"""One typed settings object, loaded once from YAML plus environment overrides.

Shape follows the reference's SRE agent config (``agent``, ``monitoring``, ``ai``,
``remediation``, ``patterns``) with the sections the pipeline needs added (``kafka``,
``correlation``, ``server``).

Precedence, lowest first: the file, then ``${VAR}`` / ``${VAR:-default}`` placeholders inside
it (an unset variable without a default reads as empty here, so the reference's config loads
without ``WORKSPACE_ID``; in a pattern or runbook file it is an error naming the file and the
field, agent.runbook_files), then
environment variables ``SRE_AGENT__SECTION__KEY=value`` (double underscores separate path
parts; the value is parsed as a YAML scalar, so ``0.9`` is a number and ``[a, b]`` a list).
Unknown keys are errors: a typo in a safety setting must not be silently ignored.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    SkipValidation,
    TypeAdapter,
    ValidationError,
)

from agent.codec import validation_problems
from agent.errors import ConfigError
from agent.models import (
    ACTION_TYPES,
    FOLLOW_UPS,
    INFORMATIONAL_REASONS,
    ActionType,
    AnomalySource,
    EscalationReason,
    ParamValue,
    Severity,
    parse_matcher,
)
from agent.runbook_expr import Expr
from agent.topics import CATALOG

ENV_PREFIX = "SRE_AGENT__"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config" / "agent.yaml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys: a second ``agent:`` block silently replaced the
    first, losing dry_run and the kill switch while ``config validate`` said ok."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' then overriding one of its keys is the point of it
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKey(
                        f"duplicate key {key!r} at line {line} (first at line {first[key]})"
                    )
                first[key] = line
            except TypeError:
                continue  # unhashable: the base class reports it
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing duplicate keys (DuplicateKey, a YAMLError, names the key
    and its lines). Every YAML the agent reads goes through this."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_duration(value: object) -> object:
    """'90s', '5m', '1.5h', 30 -> seconds. Anything else is left for the type check."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h)")
        return float(m.group(1)) * _UNITS[m.group(2)]
    return value


def positive_duration(text: str, flag: str) -> float:
    """A command-line duration in seconds, or a ConfigError naming ``flag``."""
    try:
        seconds = parse_duration(text)
    except ValueError as err:
        raise ConfigError([f"{flag}: {err}"]) from err
    if not isinstance(seconds, float) or seconds <= 0:
        raise ConfigError([f"{flag}: must be positive, got {text!r}"])
    return seconds


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
# How often a loop runs: 0 divided the detector's slot arithmetic by zero and ended its
# pattern loop (unaligned, it would query Prometheus without pause).
Interval = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
MIN_PROMPT_TOKENS = 4000
Port = Annotated[int, Field(ge=0, le=65535)]

# Steps a pattern may list. "context" steps gather evidence for the analyzer; conditional
# steps let the analyzer recommend the action named after "auto_"/"_if_"; plain action
# names recommend that action outright (still subject to policy).
CONTEXT_STEPS = frozenset(
    {
        "check_recent_deployments",
        "analyze_logs",
        "analyze_crash_logs",
        "check_memory_limits",
        "check_database_connections",
        "check_downstream_services",
        "check_node_conditions",
    }
)
CONDITIONAL_STEPS: Mapping[str, ActionType] = {
    "auto_rollback_if_deployment_recent": "rollback",
    "scale_up_if_cpu_high": "scale_up",
    "restart_if_crash_looping": "restart_workload",
    "drain_if_node_unhealthy": "drain_node",
}
NOTIFY_STEPS = frozenset({"notify_oncall"})
KNOWN_STEPS = CONTEXT_STEPS | set(CONDITIONAL_STEPS) | NOTIFY_STEPS | set(ACTION_TYPES)

# The reference names config updates "configuration_change" in require_approval.
ACTION_ALIASES: Mapping[str, ActionType] = {"configuration_change": "update_config"}


def _action_name(value: str) -> str:
    canonical = ACTION_ALIASES.get(value, value)
    if canonical not in ACTION_TYPES:
        raise ValueError(f"unknown action {value!r}; known: {', '.join(ACTION_TYPES)}")
    return canonical


def _step_name(value: str) -> str:
    if value not in KNOWN_STEPS:
        raise ValueError(f"unknown step {value!r}; known: {', '.join(sorted(KNOWN_STEPS))}")
    return value


ActionName = Annotated[str, AfterValidator(_action_name)]
StepName = Annotated[str, AfterValidator(_step_name)]
_STRICT = ConfigDict(extra="forbid")


Mode = Literal["autonomous", "supervised", "manual"]


@dataclass(frozen=True, slots=True)
class AgentSection:
    __pydantic_config__ = _STRICT
    name: str = "sre-agent"
    mode: Mode = "autonomous"
    cluster: str = "local"
    # Shadow mode: every decision is made and recorded, nothing touches the cluster.
    dry_run: bool = False
    # Stops all execution at once; also settable at run time (see handlers.executor).
    kill_switch: bool = False
    # While this file exists no action executes; checked before every action.
    kill_switch_file: str = ""
    # Liveness of the consumers (analyzer, executor, calibration, feeds): one that has
    # neither fetched nor finished an event this long fails /health/live, so Kubernetes
    # restarts it (0: never). Must exceed the longest single event: a drain, an analysis.
    stuck_after: Seconds = 300.0


@dataclass(frozen=True, slots=True)
class KafkaSection:
    __pydantic_config__ = _STRICT
    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]*$")] = "sre."
    client_id: str = "sre-agent"
    partitions: Annotated[int, Field(ge=1, le=1024)] = 3
    replication_factor: Annotated[int, Field(ge=1, le=7)] = 1
    # Latency matters more than batching efficiency on the control path.
    fetch_max_wait_ms: Annotated[int, Field(ge=0, le=5000)] = 10
    linger_ms: Annotated[int, Field(ge=0, le=1000)] = 5
    session_timeout_ms: Annotated[int, Field(ge=1000)] = 10000


@dataclass(frozen=True, slots=True)
class PrometheusSection:
    __pydantic_config__ = _STRICT
    url: str = "http://127.0.0.1:19090"
    timeout: Seconds = 5.0


@dataclass(frozen=True, slots=True)
class AlertmanagerSection:
    """The Alertmanager verification asks whether an alert that triggered an action still
    fires; empty: such alerts are not re-checked (the target's state decides)."""

    __pydantic_config__ = _STRICT
    url: Annotated[str, Field(pattern=r"^(https?://\S+)?$")] = ""
    timeout: Seconds = 5.0


def _workspace_id(value: str) -> str:
    if value and not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", value):
        raise ValueError(f"{value!r} is not a Log Analytics workspace id (a GUID)")
    return value


@dataclass(frozen=True, slots=True)
class AzureMonitorSection:
    """Accepted so the reference's config loads; this agent never queries Azure Monitor
    (``config validate`` warns of it). The workspace id is a Log Analytics workspace's
    GUID, or empty (its ``${WORKSPACE_ID}`` unset)."""

    __pydantic_config__ = _STRICT
    workspace_id: Annotated[str, AfterValidator(_workspace_id)] = ""


@dataclass(frozen=True, slots=True)
class MonitoringSection:
    __pydantic_config__ = _STRICT
    prometheus: PrometheusSection = field(default_factory=PrometheusSection)
    alertmanager: AlertmanagerSection = field(default_factory=AlertmanagerSection)
    evaluation_interval: Interval = 15.0
    azure_monitor: AzureMonitorSection | None = None


@dataclass(frozen=True, slots=True)
class AzureAISection:
    __pydantic_config__ = _STRICT
    endpoint: str = ""
    deployment: str = "gpt-4o"
    # The key is read from this environment variable, never stored in the file. With no
    # key, Entra ID (azure-identity's DefaultAzureCredential) is used if it is installed.
    api_key_env: str = "AZURE_AI_API_KEY"
    # REST api-version query parameter; empty: the client's default (2024-05-01-preview).
    api_version: str = ""


# Related series fetched around an incident, besides each firing pattern's own query.
# ``$namespace``, ``$workload`` and ``$service`` are replaced by the incident's (DNS-1123
# checked) names. The names below feed the analyzer's evidence; any other name is only
# shown to the LLM. Optional: ``concurrency_saturation`` (in-flight / limit),
# ``node_cpu_saturation`` (by ``node``), ``dependency_error_ratio`` (by ``dependency``).
# The pods of $workload as controllers name them: <name>-<pod-template-hash>-<suffix>
# (Deployment; the hash in the vowel-free alphabet of k8s rand.SafeEncodeString),
# <name>-<suffix> (DaemonSet, ReplicaSet, Job), <name>-<ordinal> (StatefulSet). Not
# "$workload-.*": that also matched a sibling's pods (checkout-worker-7d9f8-x2k4q is
# not checkout's), whose CPU and memory then read as the incident's workload's.
WORKLOAD_PODS = (
    "$workload-([bcdfghjklmnpqrstvwxz2456789]{1,10}-)?[a-z0-9]{5}|$workload-(0|[1-9][0-9]*)"
)
DEFAULT_CONTEXT_QUERIES: Mapping[str, str] = {
    "cpu_saturation": 'sum(rate(container_cpu_usage_seconds_total{namespace="$namespace",'
    f'pod=~"{WORKLOAD_PODS}",container!=""}}[5m])) / sum(kube_pod_container_resource_limits'
    f'{{namespace="$namespace",pod=~"{WORKLOAD_PODS}",resource="cpu"}})',
    "memory_saturation": 'max(container_memory_working_set_bytes{namespace="$namespace",'
    f'pod=~"{WORKLOAD_PODS}",container!=""}} / on (namespace, pod, container) '
    f'kube_pod_container_resource_limits{{namespace="$namespace",pod=~"{WORKLOAD_PODS}",'
    'resource="memory"})',
}


@dataclass(frozen=True, slots=True)
class AIContextSection:
    """What the analysis stage gathers for the LLM; every source is bounded."""

    __pydantic_config__ = _STRICT
    timeout: Seconds = 3.0  # per source (metrics, events, logs, config changes, rollouts)
    max_bytes: Annotated[int, Field(ge=256, le=1_000_000)] = 8192  # per source, after redaction
    log_lines: Annotated[int, Field(ge=0, le=1000)] = 50  # tail per pod
    max_pods: Annotated[int, Field(ge=0, le=20)] = 3
    max_events: Annotated[int, Field(ge=0, le=500)] = 30
    queries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CONTEXT_QUERIES))


@dataclass(frozen=True, slots=True)
class AISection:
    __pydantic_config__ = _STRICT
    enabled: bool = False
    azure_openai: AzureAISection = field(default_factory=AzureAISection)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.1
    timeout: Seconds = 20.0  # per call
    max_calls_per_minute: Annotated[int, Field(ge=0)] = 30
    max_tokens_per_minute: Annotated[int, Field(ge=0)] = 60_000
    max_output_tokens: Annotated[int, Field(ge=64, le=16_384)] = 1200
    # The prompt's bound (estimated tokens): past it the least important data is left out
    # (members past the most important, then long labels, then context), and the prompt
    # says so. The floor leaves room for the instructions and the incident's key facts.
    max_prompt_tokens: Annotated[int, Field(ge=MIN_PROMPT_TOKENS, le=1_000_000)] = 16_000
    # Retries of transient failures (timeout, 429, 5xx), with exponential backoff from
    # ``backoff`` up to ``max_backoff``; a Retry-After longer than ``max_backoff`` ends the
    # attempt at once (the rules decide) rather than stalling the stage.
    retries: Annotated[int, Field(ge=0, le=5)] = 2
    backoff: Seconds = 0.5
    max_backoff: Seconds = 10.0
    # Circuit breaker: this many consecutive failed calls open it for ``breaker_reset``.
    breaker_failures: Annotated[int, Field(ge=1, le=100)] = 5
    breaker_reset: Seconds = 60.0
    # The same incident fingerprint with unchanged evidence is not sent again within this.
    reanalysis_cooldown: Seconds = 600.0
    max_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # How long an incident waits for one of the max_concurrency call slots before the rules
    # decide it (fallback ``queue_timeout``): each call is bounded, but a large batch queued
    # behind them would otherwise hold the stage for calls x (timeout x retries) / slots.
    max_queue_wait: Seconds = 30.0
    context: AIContextSection = field(default_factory=AIContextSection)


def _namespace_pattern(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9*?\[\]!-]{1,63}", value):
        raise ValueError(
            f"{value!r} is not a namespace pattern (a namespace name with * ? [...] wildcards)"
        )
    return value


NamespacePattern = Annotated[str, AfterValidator(_namespace_pattern)]


@dataclass(frozen=True, slots=True)
class PolicyOverrideSection:
    """The policy for the namespaces ``namespaces`` match (shell patterns: ``prod-*``), say
    autonomous in staging and supervised in production. A field left out keeps the global
    value. ``dry_run`` puts these namespaces in shadow mode; it never lifts the global one,
    nor does an override lift the kill switch or any limit."""

    __pydantic_config__ = _STRICT
    namespaces: Annotated[tuple[NamespacePattern, ...], Field(min_length=1)]
    mode: Mode | None = None
    confidence_threshold: Fraction | None = None
    require_approval: tuple[ActionName, ...] | None = None
    dry_run: bool = False


# A node claim outlives drain_timeout by this much (the claim is written before the drain
# starts, its "done" after the result): a replica that died mid-drain frees its node then.
NODE_CLAIM_MARGIN = 300.0
# What the budget-claims topic keeps (agent.topics): a node claim must be read back as long
# as it holds its node, by a replica (re)starting mid-drain too.
CLAIMS_RETENTION = next(t for t in CATALOG if t.name == "budget-claims").retention_ms / 1000


@dataclass(frozen=True, slots=True)
class RemediationSection:
    __pydantic_config__ = _STRICT
    enabled: bool = True
    confidence_threshold: Fraction = 0.85
    require_approval: tuple[ActionName, ...] = ("rollback", "scale_down", "update_config")
    approval_ttl: Seconds = 3600.0
    cooldown: Seconds = 300.0
    # A rollout this recent counts as a suspect for a new error-rate incident.
    rollout_window: Seconds = 1800.0
    verify_after: Seconds = 60.0
    allowed_namespaces: tuple[str, ...] = ()  # empty: every namespace not denied
    denied_namespaces: tuple[str, ...] = ("kube-system",)
    max_actions_per_hour: Annotated[int, Field(ge=0)] = 20
    # The same budget per namespace, so one noisy namespace cannot spend everyone's.
    max_actions_per_namespace_per_hour: Annotated[int, Field(ge=0)] = 10
    # Scale actions are clamped into [min_replicas, max_replicas].
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 50
    # Blast radius: a restart/rollback may take down at most this share of a workload's
    # pods at once (at least one pod always may), and never more than its PDBs allow.
    max_restart_fraction: Fraction = 0.5
    # Nodes cordoned at once (counting those already unschedulable), for cordon and drain.
    max_nodes_cordoned: Annotated[int, Field(ge=0)] = 1
    # Drain: give up (leaving the node cordoned, naming what blocks) after this long;
    # pods get this grace period (empty: their own terminationGracePeriodSeconds).
    drain_timeout: Seconds = 120.0
    drain_grace_period: Seconds | None = None
    # Per-namespace policy, first match wins (see PolicyOverrideSection).
    overrides: tuple[PolicyOverrideSection, ...] = ()
    # Remediation loops: the same action on the same target within repeat_window needs a
    # person once it was verified not_healed/worse ineffective_after times, or once it ran
    # max_repeats times whatever the outcome (it keeps masking a cause). 0 turns one off.
    repeat_window: Seconds = 21600.0
    ineffective_after: Annotated[int, Field(ge=0)] = 2
    max_repeats: Annotated[int, Field(ge=0)] = 3

    def __post_init__(self) -> None:
        grace = self.drain_grace_period
        if grace is not None and not 1 <= grace <= self.drain_timeout:
            # 0 would skip graceful termination; past the timeout no drain could finish.
            raise ValueError(
                f"drain_grace_period: {grace:g}s is outside [1, drain_timeout="
                f"{self.drain_timeout:g}s]"
            )
        if self.node_claim_lifetime > CLAIMS_RETENTION:
            raise ValueError(
                f"drain_timeout: {self.drain_timeout:g}s is too long: a drain's "
                f"node claim must last it plus {NODE_CLAIM_MARGIN:g}s, and the budget-claims "
                f"topic keeps claims {CLAIMS_RETENTION:g}s; at most "
                f"{CLAIMS_RETENTION - NODE_CLAIM_MARGIN:g}s"
            )

    @property
    def node_claim_lifetime(self) -> float:
        """Seconds a node action's budget claim holds its node (``max_nodes_cordoned``) when
        its action never says it ended: the longest drain, and a margin."""
        return self.drain_timeout + NODE_CLAIM_MARGIN


@dataclass(frozen=True, slots=True)
class KubernetesSection:
    """Where the executor acts: the real API server or the in-process cluster."""

    __pydantic_config__ = _STRICT
    # "in-process": a simulated cluster (the lab, tests); "kubernetes": the API server.
    backend: Literal["in-process", "kubernetes"] = "in-process"
    kubeconfig: str = ""  # empty: in-cluster config, else the default kubeconfig
    request_timeout: Seconds = 10.0  # per API request
    max_workers: Annotated[int, Field(ge=1, le=64)] = 4  # threads for the sync client


def _matcher(text: str) -> str:
    parse_matcher(text)  # raises ValueError naming the matcher
    return text


MatcherText = Annotated[str, AfterValidator(_matcher)]


@dataclass(frozen=True, slots=True)
class InhibitRuleSection:
    """Alertmanager's inhibition: while an anomaly matching ``source_matchers`` fires,
    anomalies matching ``target_matchers`` with the same values of the ``equal`` labels are
    suppressed (recorded, never acted on). Matchers see the anomaly's labels plus
    ``alertname`` (the anomaly name), ``severity`` and ``source``."""

    __pydantic_config__ = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
    source_matchers: Annotated[tuple[MatcherText, ...], Field(min_length=1)]
    target_matchers: Annotated[tuple[MatcherText, ...], Field(min_length=1)]
    equal: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CorrelationSection:
    __pydantic_config__ = _STRICT
    # At least one label: an empty list (in Alertmanager, one group of everything) would
    # make one incident of the whole fleet, on one partition.
    group_by: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)] = (
        "cluster",
        "namespace",
        "service",
    )
    resolve_timeout: Seconds = 300.0
    # A resolved incident that fires again within this window is reopened, not duplicated.
    reopen_window: Seconds = 300.0
    # Anomalies observed longer ago than this (event time vs. arrival) are not folded into
    # incidents: they are recorded as late on the dead-letter topic. 0: no bound.
    late_bound: Seconds = 0.0
    # An open incident drops, at its next change, members resolved and unseen this long
    # (0: never): pods that came and went would otherwise pile up in a long-lived incident,
    # which every change rewrites whole. A resolved incident keeps all its members.
    member_retention: Seconds = 3600.0
    # An incident event carries at most this many members (firing ones first) and counts
    # the rest in omitted_members: a mass outage's incident of thousands of pods passed
    # Kafka's 1 MB record limit, and the correlator could not publish it at all.
    max_event_members: Annotated[int, Field(ge=1, le=100_000)] = 200
    # An incident holds at most this many members, so its state fits a Kafka record (10k
    # pods, 4.1 MB of JSON, store as 400 KB compressed). A new member past it makes room by
    # dropping the least recently seen resolved members; when all are firing it is
    # dead-lettered as refused.
    max_members: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    # A worker with records waiting whose offsets (or, recovering, its state's) have not
    # moved this long is stuck, whatever the cause: /health/live then fails, so Kubernetes
    # restarts it (0: never). Well above the longest batch a backlog folds (seconds).
    stuck_after: Seconds = 300.0
    # Alertmanager's meaning, timed per incident (streams.correlation.release): hold a new
    # incident's first event this long so related anomalies join it; publish updates of
    # one incident at most once per group_interval; re-publish an unchanged open incident
    # every repeat_interval (0: never). A published incident's other transitions are never
    # held; one never published that resolves is not published, and if it reopens it waits
    # out group_wait and goes out as "open".
    group_wait: Seconds = 0.0
    group_interval: Seconds = 0.0
    repeat_interval: Seconds = 0.0
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Topology: a firing node-level anomaly (labels node, no pod) takes in the anomalies of
    # pods on that node; a workload-level one (labels workload, no pod) its pods'.
    topology: bool = True
    inhibit_rules: tuple[InhibitRuleSection, ...] = ()

    def __post_init__(self) -> None:
        names = [r.name for r in self.inhibit_rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            # The rule name is what a suppressed member records: it must say which rule.
            raise ValueError(f"inhibit_rules: duplicate rule names {dupes}")


@dataclass(frozen=True, slots=True)
class ServerSection:
    __pydantic_config__ = _STRICT
    host: str = "127.0.0.1"
    port: Port = 18080


@dataclass(frozen=True, slots=True)
class PromDetectorSection:
    __pydantic_config__ = _STRICT
    # Evaluate on wall-clock multiples of each pattern's interval and query Prometheus at
    # that instant, so detector replicas publish identical anomalies (see README, HA).
    align: bool = True
    # How long after the slot the query goes out, so scrapes in flight at the slot land.
    evaluation_delay: Seconds = 1.0
    # Circuit breaker per Prometheus endpoint; the same count of consecutive failures of a
    # pattern's query raises the agent's own "pattern-query-failed" anomaly.
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    reset_timeout: Seconds = 30.0


@dataclass(frozen=True, slots=True)
class HeartbeatSection:
    """An always-firing alert (kube-prometheus' ``Watchdog``) Alertmanager sends the
    webhook as a heartbeat: without the API, nothing else tells an Alertmanager that is
    down, or a broken way from it, from one with nothing to say. It opens no incident;
    not received within ``within``, ``alertmanager-unavailable`` fires until it is."""

    __pydantic_config__ = _STRICT
    alertname: Annotated[str, Field(min_length=1, max_length=256)] = "Watchdog"
    # Longer than the heartbeat route's repeat_interval (plus group_interval), shorter than
    # correlation.resolve_timeout (checked in parse_settings): raised later, the blindness
    # comes after the incidents it should have held have resolved.
    within: Interval = 180.0


@dataclass(frozen=True, slots=True)
class AlertmanagerReceiverSection:
    __pydantic_config__ = _STRICT
    enabled: bool = False
    path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9/_.-]*$")] = "/webhooks/alertmanager"
    # The bearer token is read from this environment variable, never stored in the file.
    token_env: str = "SRE_AGENT_ALERTMANAGER_TOKEN"  # noqa: S105 - a variable name
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # With monitoring.alertmanager.url set, the alerts Alertmanager notifies these receivers
    # of (active, neither silenced nor inhibited) are announced again every third of
    # correlation.resolve_timeout: Alertmanager repeats a notification only every
    # repeat_interval (4h by default), and an incident none of whose members was seen for
    # resolve_timeout resolves. The receivers named in webhook payloads are added.
    receivers: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=256)], ...], Field(max_length=100)
    ] = ()
    # Off by default: on, a missing heartbeat route holds every Alertmanager incident of
    # the cluster open for good. Replicas behind one Service share the heartbeats they
    # receive through the heartbeats topic, and judge from the latest any received.
    heartbeat: HeartbeatSection | None = None


@dataclass(frozen=True, slots=True)
class FeedSpec:
    __pydantic_config__ = _STRICT
    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=249)]
    # "alertmanager": Alertmanager webhook payloads (or a single alert); "anomaly": Anomaly.
    format: Literal["alertmanager", "anomaly"]


@dataclass(frozen=True, slots=True)
class KubernetesDetectorSection:
    __pydantic_config__ = _STRICT
    enabled: bool = False
    kubeconfig: str = ""  # empty: in-cluster config, else the default kubeconfig
    # Server-side watch timeout: each watch ends after this long and resumes from the last
    # resourceVersion (a 410 Gone re-lists).
    watch_timeout: Seconds = 60.0
    # Lists go in pages of this many objects (limit/continue).
    list_page_size: Annotated[int, Field(ge=1, le=10000)] = 500
    event_reasons: tuple[str, ...] = (
        "BackOff",
        "OOMKilling",
        "FailedScheduling",
        "Unhealthy",
        "FailedMount",
    )
    # "pod-restarting" fires when a container restarted this often within the window.
    restart_threshold: Annotated[int, Field(ge=1)] = 3
    restart_window: Seconds = 600.0


@dataclass(frozen=True, slots=True)
class WebhookSection:
    """Where escalations are POSTed (JSON): a chat or paging integration's webhook."""

    __pydantic_config__ = _STRICT
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)]
    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    # A bearer token read from this environment variable, never stored in the file.
    token_env: str = ""
    timeout: Seconds = 5.0
    # The escalation reasons and incident severities this webhook is sent (empty: all): a
    # pager may take only what must wake someone, a chat channel everything. An escalation
    # whose severity is unknown (an undo's) goes to every webhook its reason routes to.
    # The informational reasons (healed, dry_run) go only where listed; a follow-up
    # (approval_withdrawn) goes wherever the escalation it follows (approval_requested) goes.
    reasons: tuple[EscalationReason, ...] = ()
    severities: tuple[Severity, ...] = ()
    # The levels of "unresolved" escalations this webhook is sent (empty: all), e.g. [2] for
    # a manager's pager; escalations of other reasons are not held back by it.
    levels: tuple[Annotated[int, Field(ge=1)], ...] = ()

    def takes(self, reason: str, severity: str | None = None, level: int = 1) -> bool:
        if reason in FOLLOW_UPS:
            return self.takes(FOLLOW_UPS[reason], severity, level)
        listed = reason in self.reasons
        if reason in INFORMATIONAL_REASONS and not listed:
            return False  # sent only where asked for (see agent.models)
        return (
            (not self.reasons or listed)
            and (not self.severities or severity is None or severity in self.severities)
            and (not self.levels or reason != "unresolved" or level in self.levels)
        )


@dataclass(frozen=True, slots=True)
class EscalationSection:
    __pydantic_config__ = _STRICT
    webhooks: tuple[WebhookSection, ...] = ()
    # An incident still open (not resolved or silenced) this long after it opened is
    # escalated once (0: never).
    unresolved_after: Seconds = 900.0
    # Later levels: an incident still open this long after it opened is escalated again,
    # as level 2, 3, ... (each later than the one before; [] : no later level).
    unresolved_again_after: tuple[Seconds, ...] = ()
    # An incident of one of these severities whose analysis recommends no action is
    # escalated at once, not after unresolved_after: nothing will be tried ([]: never).
    no_remedy: tuple[Severity, ...] = ("critical",)

    def __post_init__(self) -> None:
        names = [w.name for w in self.webhooks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"webhooks: duplicate names {dupes}")
        bounds = (self.unresolved_after, *self.unresolved_again_after)
        if self.unresolved_again_after and (
            self.unresolved_after <= 0 or any(a >= b for a, b in itertools.pairwise(bounds))
        ):
            raise ValueError(
                "unresolved_again_after: each must be later than unresolved_after (which "
                "must be set) and than the one before"
            )


@dataclass(frozen=True, slots=True)
class DetectorsSection:
    __pydantic_config__ = _STRICT
    prometheus: PromDetectorSection = field(default_factory=PromDetectorSection)
    kubernetes: KubernetesDetectorSection = field(default_factory=KubernetesDetectorSection)
    alertmanager: AlertmanagerReceiverSection = field(default_factory=AlertmanagerReceiverSection)
    # External topics (any Kafka client) normalised into anomalies by the detector role.
    feeds: tuple[FeedSpec, ...] = ()
    # The agent's own alerts (deploy/monitoring/self-healing-rules.yml names them all
    # SREAgent*; they carry no other mark): the webhook and the feeds ignore an alert whose
    # alertname starts with this (empty: none), so the agent never "heals" itself from them.
    own_alerts_prefix: Annotated[str, Field(max_length=256)] = "SREAgent"


def _promql(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty PromQL expression")
    if value.count("(") != value.count(")") or value.count("[") != value.count("]"):
        raise ValueError("unbalanced brackets in PromQL expression")
    return value


@dataclass(frozen=True, slots=True)
class PatternSpec:
    __pydantic_config__ = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=128)]
    condition: Annotated[str, AfterValidator(_promql)]
    actions: tuple[StepName, ...] = ()
    severity: Severity = "critical"
    # Alertmanager-style "for": the condition must hold this long before it fires.
    for_: Annotated[Seconds, Field(alias="for")] = 0.0
    interval: Interval | None = None  # default: monitoring.evaluation_interval
    description: str = ""


@dataclass(frozen=True, slots=True)
class RunbookSpec:
    """The steps for a signal the agent does not evaluate itself: an Alertmanager alert
    (``alert`` is its alertname), a Kubernetes signal, a feed's anomaly. The same steps a
    pattern's ``actions`` take. One with a ``source`` takes that source's signal over from
    a pattern of the same name; one without gives way to it (see Settings.steps_for)."""

    __pydantic_config__ = _STRICT
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=128)]
    alert: Annotated[str, Field(min_length=1, max_length=1024)]
    actions: Annotated[tuple[StepName, ...], Field(min_length=1)]
    # Only the signal from this source (None: from any).
    source: AnomalySource | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class FileStep:
    """One step of a runbook file (see agent.runbook_files), as the analyzer follows it:
    ``action`` is an allow-listed action type or a context step. The target is always the
    incident's; ``scope`` (the step's ``deployment``/``namespace`` params) only restricts
    which incidents the step applies to, it never points the action elsewhere."""

    name: str
    action: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    scope: Mapping[str, str] = field(default_factory=dict)
    condition: Expr | None = None
    condition_text: str = ""
    # "continue", or a notify_*/escalate* value as written (a page when it comes to it).
    on_success: str = "continue"
    on_failure: str = "continue"


@dataclass(frozen=True, slots=True)
class EscalationLevel:
    """A runbook file's ``spec.escalation`` level: for the incidents the runbook matches,
    it replaces the global levels (agent.escalation_watch.runbook_plan)."""

    level: int
    after: float
    channels: tuple[tuple[str, str], ...] = ()  # (channel, target)


@dataclass(frozen=True, slots=True)
class GatherItem:
    """A runbook file's ``spec.context.gather`` item, gathered (agent.context) for the
    incidents the runbook matches, besides the default context."""

    type: Literal["logs", "metrics", "events", "deployments"]
    queries: tuple[str, ...] = ()  # metrics: PromQL; logs: one LogQL query
    namespace: str = ""  # "" : every namespace of the incident's workloads
    duration: float | None = None  # events/deployments: the window before the incident


@dataclass(frozen=True, slots=True)
class FileRunbook:
    """A ``kind: Runbook`` document of ``runbook_files``: a runbook whose steps carry their
    own conditions and params. Precedence as an inline runbook's (Settings.steps_for)."""

    name: str
    alert: str
    path: str
    steps: tuple[FileStep, ...]
    source: AnomalySource | None = None
    escalation: tuple[EscalationLevel, ...] = ()
    gather: tuple[GatherItem, ...] = ()


Step = str | FileStep


@dataclass(frozen=True, slots=True)
class Settings:
    __pydantic_config__ = _STRICT
    agent: AgentSection = field(default_factory=AgentSection)
    kafka: KafkaSection = field(default_factory=KafkaSection)
    monitoring: MonitoringSection = field(default_factory=MonitoringSection)
    ai: AISection = field(default_factory=AISection)
    remediation: RemediationSection = field(default_factory=RemediationSection)
    correlation: CorrelationSection = field(default_factory=CorrelationSection)
    server: ServerSection = field(default_factory=ServerSection)
    detectors: DetectorsSection = field(default_factory=DetectorsSection)
    kubernetes: KubernetesSection = field(default_factory=KubernetesSection)
    escalation: EscalationSection = field(default_factory=EscalationSection)
    patterns: tuple[PatternSpec, ...] = ()
    runbooks: tuple[RunbookSpec, ...] = ()
    # Pattern library files ({patterns: [...]}), relative to the config file's directory.
    # A pattern in ``patterns`` replaces a library pattern of the same name.
    pattern_files: tuple[str, ...] = ()
    # Runbook files in the reference's format (kind: Runbook), or directories of them
    # (*.yaml, *.yml), relative to the config file's directory; see agent.runbook_files.
    runbook_files: tuple[str, ...] = ()
    # What runbook_files loaded: set by parse_settings, never by the file (it refuses it).
    file_runbooks: SkipValidation[tuple[FileRunbook, ...]] = ()

    def __post_init__(self) -> None:
        longest = longest_event(self)
        if 0 < self.agent.stuck_after <= longest:
            raise ValueError(
                f"agent.stuck_after: {self.agent.stuck_after:g}s would restart a consumer in "
                f"the middle of a legitimate event of up to {longest:g}s (a drain takes up to "
                "remediation.drain_timeout, an analysis up to ai.max_queue_wait plus "
                "ai.timeout x (ai.retries + 1) plus backoff); raise it, or 0 to turn liveness off"
            )

    def pattern(self, name: str) -> PatternSpec | None:
        return next((p for p in self.patterns if p.name == name), None)

    def all_runbooks(self) -> list[tuple[str, str, AnomalySource | None, tuple[Step, ...]]]:
        """(name, alert, source, steps) of every runbook: the inline ones, then the files'."""
        inline = [(r.name, r.alert, r.source, tuple[Step, ...](r.actions)) for r in self.runbooks]
        files = [(r.name, r.alert, r.source, tuple[Step, ...](r.steps)) for r in self.file_runbooks]
        return inline + files

    def steps_for(self, name: str, source: str) -> tuple[str, tuple[Step, ...]] | None:
        """(what prescribes them, the steps) for a signal of this name and source: a
        runbook written for this very source first (the most specific: the Kubernetes
        watcher's crash-looping under a `source: kubernetes` runbook), else the pattern of
        that name (the same fault, whichever source saw it), else a runbook for any
        source. Among runbooks, inline ones before runbook files'."""
        named = [r for r in self.all_runbooks() if r[1] == name]
        for book, _, src, steps in named:
            if src == source:
                return f"runbook {book}", steps
        pattern = self.pattern(name)
        if pattern is not None:
            return f"pattern {pattern.name}", pattern.actions
        for book, _, src, steps in named:
            if src is None:
                return f"runbook {book}", steps
        return None

    def file_runbook_for(self, name: str, source: str) -> FileRunbook | None:
        """The runbook file whose steps answer for this signal (see steps_for), if any."""
        found = self.steps_for(name, source)
        if found is None:
            return None
        return next((r for r in self.file_runbooks if f"runbook {r.name}" == found[0]), None)


def config_warnings(s: Settings) -> list[str]:
    """What is valid but can never do what it says: ``config validate`` prints it, and the
    agent starts anyway."""
    out: list[str] = []
    if s.monitoring.azure_monitor is not None:
        out.append(
            "monitoring.azure_monitor: accepted but not queried: this agent reads metrics "
            "from monitoring.prometheus only"
        )
    # The LLM is opt-in: a configured model with ai.enabled left out is never called.
    if not s.ai.enabled and s.ai.azure_openai != AzureAISection():
        out.append(
            "ai.azure_openai: configured but ai.enabled is false: analyses use the rule "
            "analyzer only (set ai.enabled: true to call the model)"
        )
    specs = [(f"pattern {p.name}", p.actions) for p in s.patterns]
    specs += [(f"runbook {r.name}", r.actions) for r in s.runbooks]
    for where, steps in specs:
        if "update_config" in steps:
            out.append(
                f"{where}: step update_config is never requested: no label names a "
                "ConfigMap, and a step gives no key or value to set"
            )
    for name, alert, source, _ in s.all_runbooks():
        if source is None and s.pattern(alert) is not None:
            out.append(
                f"runbook {name}: never applies: pattern {alert}'s steps answer for "
                f"{alert} from every source; give the runbook a source to take that "
                "source's signal over"
            )
    for r in s.file_runbooks:
        out += _escalation_warnings(r, s.escalation)
    return out


def _escalation_warnings(r: FileRunbook, esc: EscalationSection) -> list[str]:
    """A runbook file's escalation levels apply to the incidents it matches, and go to the
    webhooks its channels name: say where a channel or an ``escalate_<who>`` names none,
    as that page then takes the global route."""
    out: list[str] = []
    hooks = {w.name for w in esc.webhooks}
    for lv in r.escalation:
        where = f"runbook {r.name} ({r.path}): spec.escalation level {lv.level}"
        for channel, target in lv.channels:
            if channel not in hooks:
                out.append(
                    f"{where}: no escalation webhook is named {channel!r}: {target or channel} "
                    "is not notified (a webhook's name is the channel it stands for); the "
                    "level takes the global route unless another channel names one"
                )
    for st in r.steps:
        who = st.on_failure.removeprefix("escalate_")
        # Without webhooks nothing is delivered anywhere: no route to miss.
        if who != st.on_failure and who and hooks and who not in hooks:
            out.append(
                f"runbook {r.name} ({r.path}): step {st.name!r} onFailure {st.on_failure}: no "
                f"escalation webhook is named {who!r}: the page takes the global route "
                "(webhooks whose reasons take notify)"
            )
    # onSuccess notify_*: the verification's healed escalation, sent for every healed action.
    notifying = [st.name for st in r.steps if st.on_success != "continue"]
    if notifying and esc.webhooks and not any(w.takes("healed") for w in esc.webhooks):
        out.append(
            f"runbook {r.name} ({r.path}): step {notifying[0]!r} notifies on success, but no "
            "escalation webhook lists the healed reason: the healed escalation stays on the "
            "escalations topic"
        )
    return out


def longest_event(s: Settings) -> float:
    """The longest a consumer may legitimately spend on one event: a drain (the executor),
    or an LLM analysis with its retries (the analyzer; the rules are fast)."""
    ai = s.ai
    call = ai.timeout * (ai.retries + 1) + ai.max_backoff * ai.retries
    analysis = ai.max_queue_wait + call if ai.enabled else 0.0
    return max(s.remediation.drain_timeout, analysis)


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    return value


def placeholders(value: Any, path: str = "") -> list[tuple[str, str, str | None]]:
    """(field path, variable, its ``:-`` default or None) of each ``${VAR}`` placeholder in
    a parsed YAML document, as :func:`_expand` would replace them."""
    if isinstance(value, str):
        return [(path, m.group(1), m.group(2)) for m in _PLACEHOLDER.finditer(value)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in placeholders(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [
            p for k, v in value.items() for p in placeholders(v, f"{path}.{k}" if path else str(k))
        ]
    return []


def unset_placeholder(var: str, default: str | None, env: Mapping[str, str]) -> str | None:
    """What is wrong with a ``${VAR}`` placeholder of a file none of whose placeholders may
    read as empty (pattern and runbook files): its variable unset with no default; None
    when it is fine."""
    if default is not None or var in env:
        return None
    return (
        f"${{{var}}}: environment variable {var} is unset (write ${{{var}:-default}} for a default)"
    )


def _apply_env(doc: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node: Any = doc
        for part in path[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(path)}: env {name} overrides a non-mapping")
                break
            node = child
        else:
            try:
                node[path[-1]] = load_yaml(env[name])
            except yaml.YAMLError as err:
                problems.append(f"{'.'.join(path)}: env {name} is not a valid value ({err})")
    return problems


@dataclass(frozen=True, slots=True)
class PatternFile:
    __pydantic_config__ = _STRICT
    patterns: tuple[PatternSpec, ...] = ()


def _unset_in_patterns(doc: Any, env: Mapping[str, str]) -> list[str]:
    """Each ``${VAR}`` of a pattern file without a default whose variable is unset: read
    as empty, as in the config, it would silently blank a condition's label value or a
    description (the config's own placeholders may be empty; a pattern's never should)."""
    patterns = doc.get("patterns") if isinstance(doc, dict) else None
    problems: list[str] = []
    for i, item in enumerate(patterns if isinstance(patterns, list) else []):
        name = item.get("name") if isinstance(item, dict) else None
        of = f" (pattern {name!r})" if isinstance(name, str) else ""
        problems += [
            f"{path}{of}: {why}"
            for path, var, default in placeholders(item, f"patterns[{i}]")
            if (why := unset_placeholder(var, default, env)) is not None
        ]
    return problems


def _library_patterns(
    settings: Settings, env: Mapping[str, str], base_dir: Path
) -> tuple[list[PatternSpec], list[str]]:
    """The patterns of ``pattern_files`` not overridden inline, and the problems found."""
    inline = {p.name for p in settings.patterns}
    out: list[PatternSpec] = []
    seen: dict[str, str] = {}
    problems: list[str] = []
    for i, name in enumerate(settings.pattern_files):
        where = f"pattern_files[{i}]"
        path = Path(name) if Path(name).is_absolute() else base_dir / name
        try:
            doc = load_yaml(path.read_text())
        except OSError as err:
            problems.append(f"{where}: cannot read {path}: {err.strerror}")
            continue
        except yaml.YAMLError as err:
            problems.append(f"{where}: {path} is not valid YAML: {err}")
            continue
        unset = _unset_in_patterns(doc, env)
        if unset:  # expanded, the fields would read as empty strings
            problems += [f"{where} ({path}): {p}" for p in unset]
            continue
        try:
            lib = TypeAdapter(PatternFile).validate_python(_expand(doc or {}, env))
        except ValidationError as err:
            problems += [f"{where} ({path}): {p}" for p in validation_problems(err)]
            continue
        for j, p in enumerate(lib.patterns):
            if p.name in seen:
                problems.append(
                    f"{where}.patterns[{j}].name: {p.name!r} already defined in {seen[p.name]}"
                )
                continue
            seen[p.name] = str(path)
            if p.name not in inline:
                out.append(p)
    return out, problems


def parse_settings(
    doc: Any, env: Mapping[str, str] | None = None, *, base_dir: str | Path | None = None
) -> Settings:
    """Validate a parsed YAML document (plus env overrides) into Settings.

    ``base_dir`` resolves relative ``pattern_files`` and ``runbook_files`` (default: the
    shipped config directory).
    """
    env = os.environ if env is None else env
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"<root>: expected a mapping, got {type(doc).__name__}"])
    doc = _expand(doc, env)
    problems = _apply_env(doc, env)
    try:
        settings = TypeAdapter(Settings).validate_python(doc)
    except ValidationError as err:
        raise ConfigError(problems + validation_problems(err)) from err
    base = Path(base_dir) if base_dir is not None else DEFAULT_CONFIG.parent
    if settings.pattern_files:
        library, file_problems = _library_patterns(settings, env, base)
        problems += file_problems
        settings = replace(settings, patterns=settings.patterns + tuple(library))
    if "file_runbooks" in doc:  # SkipValidation: whatever it holds must go unread
        problems.append("file_runbooks: not a setting; list runbook files in runbook_files")
        settings = replace(settings, file_runbooks=())
    elif settings.runbook_files:
        # Imported here: runbook_files validates params with the policy, which imports us.
        from agent.runbook_files import load_runbook_files

        loaded, file_problems = load_runbook_files(settings, env, base)
        problems += file_problems
        settings = replace(settings, file_runbooks=tuple(loaded))
    names = [p.name for p in settings.patterns]
    problems += [
        f"patterns[{i}].name: duplicate pattern name {n!r}"
        for i, n in enumerate(names)
        if n in names[:i]
    ]
    books = [r.name for r in settings.runbooks]
    problems += [
        f"runbooks[{i}].name: duplicate runbook name {n!r}"
        for i, n in enumerate(books)
        if n in books[:i]
    ]
    problems += [
        f"runbook_files ({r.path}): metadata.name: runbook {r.name!r} is already defined"
        for i, r in enumerate(settings.file_runbooks)
        if r.name in books or r.name in [b.name for b in settings.file_runbooks[:i]]
    ]
    heartbeat = settings.detectors.alertmanager.heartbeat
    if heartbeat is not None and heartbeat.within >= settings.correlation.resolve_timeout:
        problems.append(
            f"detectors.alertmanager.heartbeat.within: {heartbeat.within:g}s must be below "
            f"correlation.resolve_timeout ({settings.correlation.resolve_timeout:g}s), or the "
            "incidents it should hold resolve before a missing heartbeat is noticed"
        )
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    path = Path(path or env.get("SRE_AGENT_CONFIG") or DEFAULT_CONFIG)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"<file>: cannot read {path}: {err.strerror}"]) from err
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"<file>: {path} is not valid YAML: {err}"]) from err
    return parse_settings(doc, env, base_dir=path.parent)
