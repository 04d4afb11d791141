"""Gathering the bounded context of an incident for the analyzers.

Sources, each fetched concurrently under its own timeout (``ai.context.timeout``) and byte
budget (``ai.context.max_bytes``), and redacted (:func:`agent.redaction.redact`) before it
is stored, so nothing secret reaches a prompt or a log:

- metrics: the query of each pattern firing (as raised by the detector, not a
  signal of another source named like it), restricted to the incident's series, plus the
  related queries of ``ai.context.queries`` (CPU/memory saturation, ...), via Prometheus;
- rollout history of the affected workloads, via the :class:`~handlers.cluster.Cluster`;
- Kubernetes events about the workloads, their pods and the incident's nodes, recent
  config changes, node conditions and the tail of the affected pods' logs, via a
  :class:`ClusterContext` (the in-process FakeCluster and handlers.kube.KubeCluster
  implement it; without one those sources are noted as unavailable).

The runbook file an incident's signal matches (``spec.context.gather``) adds to that: its
``metrics`` queries run as one more source (``runbook metrics``), their ``$namespace``
replaced by the incident's label, escaped for the string literal it is in
(:mod:`agent.promql_vars`; an incident without the label: noted, not gathered); its ``events``
and ``deployments`` windows (``duration`` before the incident opened, in their namespace)
narrow only the facts its own conditions read (``Context.events_signals``,
``Context.deployments_since``): every rule, runbook and the LLM read all events and rollouts
gathered; its ``logs`` LogQL query has no Loki to run on: a selector that
names the incident's workload and ``|=``/``!=`` line filters narrow that workload's pod log
tails, read from ``duration`` before the incident opened (the lines' cap and the byte budget
still apply), anything else is noted as not gathered.

A source that fails or times out leaves a note in ``Context.notes`` instead of failing the
analysis; within the logs and the events, one pod or namespace that fails leaves its own
note and the rest is kept. Logs and metrics that time out keep what they read by then, and
their note names what was not read (pods or pod listings, queries). Structured signals
(OOM kills, crash loops, node conditions) are derived from event *reasons*, which the
kubelet and controllers set, about the pods of the incident's workloads
(:func:`is_workload_pod`: not a sibling's whose name extends the workload's); event
messages and logs stay text for the LLM, never evidence for the rules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import string
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, runtime_checkable

from agent import detector
from agent.ai_answer import is_dns_name
from agent.analyzer import (
    ConfigChange,
    Context,
    KubeEvent,
    MetricSample,
    Rollout,
    Signals,
    workload_target,
)
from agent.errors import ActionFailed, AgentError
from agent.labels import service_of
from agent.models import Incident, Target
from agent.prom import Sample
from agent.promql_vars import substitute
from agent.redaction import clip, redact
from agent.runbook_expr import MAX_COUNT
from agent.settings import FileRunbook, GatherItem, Settings
from handlers.cluster import Cluster

log = logging.getLogger(__name__)

T = TypeVar("T")

CRASH_REASONS = frozenset({"BackOff", "CrashLoopBackOff"})
OOM_REASONS = frozenset({"OOMKilled", "OOMKilling"})
NODE_REASONS: Mapping[str, str] = {
    "NodeHasDiskPressure": "DiskPressure",
    "NodeHasInsufficientMemory": "MemoryPressure",
    "NodeHasInsufficientPID": "PIDPressure",
    "NodeNotReady": "NotReady",
}
MAX_TEXT = 512  # bytes of one event message or config summary
MAX_REVISIONS = MAX_COUNT  # per workload: what deployments[N] conditions can name
# A metrics query: (name, expression, workload it measures, labels a series must match, how
# a timeout note names it).
_Query = tuple[str, str, str, Mapping[str, str] | None, str]


@runtime_checkable
class ClusterContext(Protocol):
    """Read-only context from Kubernetes beyond workload state."""

    async def events(
        self, namespace: str, names: Sequence[str], *, limit: int
    ) -> Sequence[KubeEvent]:
        """Events about objects named ``names`` or ``<name>-...`` (their pods); namespace
        "" means cluster-scoped objects (nodes)."""
        ...

    async def pods(self, namespace: str, workload: str) -> Sequence[str]: ...

    async def logs(
        self, namespace: str, pod: str, *, tail: int, since: datetime | None = None
    ) -> str:
        """The last ``tail`` lines of the pod's log, of those written at ``since`` or later
        (every line when None)."""
        ...

    async def config_changes(
        self, workloads: Sequence[Target], *, since: datetime
    ) -> Sequence[ConfigChange]:
        """ConfigMaps the workloads, each read as its own kind, reference that changed
        since ``since``."""
        ...

    async def node_conditions(self, nodes: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
        """The conditions that are bad (DiskPressure, MemoryPressure, NotReady, ...)."""
        ...


class Querier(Protocol):
    async def query(self, expr: str) -> list[Sample]: ...


# --- pure helpers ---------------------------------------------------------------------------


def is_workload_pod(workload: str, pod: str) -> bool:
    """Whether ``pod`` can be one of ``workload``'s pods (or its ReplicaSets): controllers
    add at most two parts to the name (``<hash>-<suffix>``, ``<suffix>``, ``<ordinal>``,
    a CronJob's ``<time>-<suffix>``), so checkout-worker-7d9f8-x2k4q, three parts after
    "checkout-", is a sibling's pod (checkout-worker's), not checkout's."""
    rest = pod.removeprefix(f"{workload}-")
    return rest != pod and all(rest.split("-", 2)[:2]) and rest.count("-") <= 1


def owner_of(pod: str, workloads: Sequence[str]) -> str | None:
    """The workload among ``workloads`` that ``pod`` is, or is a pod of (the longest)."""
    return max((w for w in workloads if pod == w or is_workload_pod(w, pod)), key=len, default=None)


def derive_signals(
    events: Sequence[KubeEvent],
    workloads: Sequence[str],
    live: Mapping[str, Collection[str]] | None = None,
) -> Signals:
    """Crash loops, OOM kills and node conditions from event reasons (never messages).

    ``live``: each workload's pods now. An event about a pod that is gone (replaced by a
    restart or a rollout) is its past, not its present: a crash loop a restart already
    ended read, in the next incident, as a crash loop still going on. With no pods
    listed for a workload, its events all count (nothing tells which are stale)."""
    crash: set[str] = set()
    oom: set[str] = set()
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.kind == "Node" and e.reason in NODE_REASONS:
            nodes.setdefault(e.name, set()).add(NODE_REASONS[e.reason])
            continue
        # A listed pod is its owner's (owner references), whatever its name: a long-named
        # workload's pods carry a truncated prefix that owner_of cannot read.
        listed = [w for w in workloads if e.name in (live or {}).get(w, ())]
        owner = listed[0] if listed else owner_of(e.name, workloads)
        if owner is None:
            continue
        now = (live or {}).get(owner)
        if e.kind == "Pod" and now and e.name not in now:
            continue
        if e.reason in CRASH_REASONS:
            crash.add(owner)
        elif e.reason in OOM_REASONS:
            oom.add(owner)
    return Signals(
        crash_looping=tuple(sorted(crash)),
        oom_killed=tuple(sorted(oom)),
        node_conditions={n: tuple(sorted(c)) for n, c in sorted(nodes.items())},
    )


def render_query(template: str, **names: str) -> str | None:
    """``template`` with ``$namespace``/``$workload``/``$service`` replaced; None when a
    needed name is not a DNS-1123 name (so no label value can alter the PromQL)."""
    found = string.Template.pattern.findall(template)
    needed = {named or braced for _, named, braced, _ in found if named or braced}
    if any(not is_dns_name(names.get(n, "")) for n in needed):
        return None
    return string.Template(template).safe_substitute(names)


def _sample_size(s: MetricSample) -> int:
    return len(s.query) + sum(len(k) + len(v) + 6 for k, v in s.labels.items()) + 24


def within_budget(items: Sequence[T], size: Any, budget: int) -> tuple[list[T], int]:
    """The leading ``items`` whose sizes fit ``budget``, and how many were dropped."""
    out: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if used + n > budget:
            break
        out.append(item)
        used += n
    return out, len(items) - len(out)


def matches(sample_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(sample_labels.get(k) == v for k, v in service_of(labels).items())


async def rollouts_of(
    cluster: Cluster, targets: Sequence[Target]
) -> tuple[list[Rollout], list[str]]:
    """Rollout history of ``targets`` from the cluster, and notes on what failed."""
    rollouts: list[Rollout] = []
    notes: list[str] = []
    for target in sorted(targets, key=lambda t: t.key):
        if not target.name:
            continue
        try:
            w = await cluster.workload(target)
        except ActionFailed as err:
            notes.append(f"no rollout history for {target.key}: {err}")
            continue
        except AgentError as err:
            notes.append(f"cluster unavailable for {target.key}: {err}")
            continue
        ordered = sorted(w.revisions, key=lambda r: r.number)
        for prev, rev in zip([None, *ordered[:-1]], ordered, strict=True):
            rollouts.append(
                Rollout(
                    namespace=target.namespace,
                    workload=target.name,
                    revision=rev.number,
                    image=rev.image,
                    at=rev.at,
                    previous_image=prev.image if prev else None,
                    restored=rev.restored,
                )
            )
    return rollouts, notes


@dataclass(frozen=True, slots=True)
class LogQuery:
    """The part of a LogQL query the pod log tails can answer."""

    selector: Mapping[str, str]
    keep: tuple[str, ...] = ()  # |= "text": lines containing it
    drop: tuple[str, ...] = ()  # != "text": lines not containing it


_SELECTOR = re.compile(r"\s*\{(?P<body>[^{}]*)\}")
_MATCHER = re.compile(r'\s*(?P<k>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<v>"(?:[^"\\]|\\.)*")\s*(?:,|$)')
_STAGE = re.compile(r'\s*(?:(?P<op>\|=|!=)\s*(?P<text>"(?:[^"\\]|\\.)*")|\|\s*(?:json|logfmt)\b)')
# Selector labels a workload's pods answer to: the namespace, and its own name.
WORKLOAD_LABELS = frozenset({"app", "app_kubernetes_io_name", "deployment", "service"})


def parse_logql(query: str) -> LogQuery | str:
    """The selector (exact matchers) and line filters of ``query``, or why the tails
    cannot answer it. Parser stages (``| json``, ``| logfmt``) select no lines: skipped."""
    m = _SELECTOR.match(query)
    if m is None:
        return "no {...} stream selector"
    selector: dict[str, str] = {}
    body = m.group("body").strip()
    pos = 0
    while pos < len(body):
        mm = _MATCHER.match(body, pos)
        if mm is None:
            return f'selector {{{body}}}: only label="value" matchers map onto pod logs'
        selector[mm.group("k")] = json.loads(mm.group("v"))
        pos = mm.end()
    if set(selector) - WORKLOAD_LABELS - {"namespace"}:
        extra = sorted(set(selector) - WORKLOAD_LABELS - {"namespace"})
        return f"selector label {extra[0]}: only namespace and a workload's name map onto pod logs"
    keep: list[str] = []
    drop: list[str] = []
    rest, pos = query[m.end() :], 0
    while rest[pos:].strip():
        st = _STAGE.match(rest, pos)
        if st is None:
            return f"stage {rest[pos:].strip()[:40]!r}: only |= and != line filters map"
        if st.group("op"):
            (keep if st.group("op") == "|=" else drop).append(json.loads(st.group("text")))
        pos = st.end()
    return LogQuery(selector, tuple(keep), tuple(drop))


def names_workload(q: LogQuery, target: Target) -> bool:
    """Whether the query's selector picks the target's pods (and names its workload)."""
    names = {v for k, v in q.selector.items() if k in WORKLOAD_LABELS}
    return names == {target.name} and q.selector.get("namespace", target.namespace) == (
        target.namespace
    )


def filter_lines(text: str, q: LogQuery) -> str:
    return "\n".join(
        line
        for line in text.splitlines()
        if all(k in line for k in q.keep) and not any(d in line for d in q.drop)
    )


def log_windows(
    items: Sequence[GatherItem], targets: Sequence[Target], opened_at: datetime
) -> dict[tuple[str, str], datetime]:
    """(namespace, workload) -> the earliest time its pod logs are read from: the widest
    ``duration`` before the incident opened of the ``logs`` items whose selector names it
    (an item without one keeps the whole tail). Items the tails cannot answer: none."""
    widest: dict[tuple[str, str], float | None] = {}
    for item in items:
        q = parse_logql(item.queries[0]) if item.type == "logs" else None
        if not isinstance(q, LogQuery):
            continue
        for t in targets:
            if names_workload(q, t):
                key = (t.namespace, t.name)
                have = widest.get(key, 0.0)
                if item.duration is None or have is None:
                    widest[key] = None
                else:
                    widest[key] = max(have, item.duration)
    return {k: opened_at - timedelta(seconds=d) for k, d in widest.items() if d is not None}


def windows(
    items: Sequence[GatherItem], kind: str, namespaces: Collection[str], opened_at: datetime
) -> tuple[dict[str, datetime], list[str]]:
    """namespace -> the earliest time kept there (the widest window of the ``kind`` items
    naming it, or naming none), and the namespaces items name that no workload of the
    incident is in. A namespace with an item without a duration keeps everything."""
    widest: dict[str, float | None] = {}
    stray: list[str] = []
    for item in items:
        if item.type != kind:
            continue
        if item.namespace and item.namespace not in namespaces:
            stray.append(item.namespace)
            continue
        for ns in [item.namespace] if item.namespace else namespaces:
            have = widest.get(ns, 0.0)
            if item.duration is None or have is None:
                widest[ns] = None
            else:
                widest[ns] = max(have, item.duration)
    since = {ns: opened_at - timedelta(seconds=d) for ns, d in widest.items() if d is not None}
    return since, stray


def own_windows(
    books: Sequence[FileRunbook], kind: str, namespaces: Collection[str], opened_at: datetime
) -> dict[str, dict[str, datetime]]:
    """Keyed "runbook <name>": namespace -> the earliest time its ``kind`` gather items keep
    there, for the runbooks with such a window. A runbook's window is its own: it narrows
    the facts its conditions read (agent.analyzer.runbook_facts), never what the other
    rules, the other runbooks and the LLM read."""
    return {
        f"runbook {b.name}": since
        for b in books
        if (since := windows(b.gather, kind, namespaces, opened_at)[0])
    }


def within(events: Sequence[KubeEvent], since: Mapping[str, datetime]) -> list[KubeEvent]:
    """The events not older than ``since`` of their namespace (undated ones kept)."""
    return [e for e in events if e.at is None or e.at >= since.get(e.namespace, e.at)]


# --- the gatherer ---------------------------------------------------------------------------


async def _own_pods(src: ClusterContext, namespace: str, workload: str) -> Sequence[str]:
    """The workload's pods as the source lists them by owner reference. Not filtered by
    name: a long-named workload's pods carry a truncated prefix of its name."""
    return list(await src.pods(namespace, workload))


@dataclass(slots=True)
class _Parts:
    """What the sources found, merged into a Context at the end."""

    rollouts: list[Rollout] = field(default_factory=list)
    metrics: list[MetricSample] = field(default_factory=list)
    related: dict[str, dict[str, float]] = field(default_factory=dict)
    events: list[KubeEvent] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    config_changes: list[ConfigChange] = field(default_factory=list)
    node_conditions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (namespace, workload) -> the listing of its pods now: the events and the logs both
    # need it, so it is asked for once per analysis.
    pod_lists: dict[tuple[str, str], asyncio.Future[Sequence[str]]] = field(default_factory=dict)

    def pods(self, src: ClusterContext, namespace: str, workload: str) -> Awaitable[Sequence[str]]:
        key = (namespace, workload)
        if key not in self.pod_lists:
            self.pod_lists[key] = asyncio.ensure_future(_own_pods(src, namespace, workload))
        # Shielded: a job cancelled at its timeout must not cancel the other's listing.
        return asyncio.shield(self.pod_lists[key])

    def live_pods(self) -> dict[str, Sequence[str]]:
        """workload -> its pods, for the listings that succeeded."""
        return {
            name: f.result()
            for (_, name), f in self.pod_lists.items()
            if f.done() and not f.cancelled() and f.exception() is None
        }

    def owner(self, namespace: str, pod: str, workloads: Sequence[str]) -> str | None:
        """Which of ``workloads`` ``pod`` is listed for (owner references); by its name
        (owner_of) only when no listing holds it."""
        for (ns, name), f in self.pod_lists.items():
            done = f.done() and not f.cancelled() and f.exception() is None
            if ns == namespace and name in workloads and done and pod in f.result():
                return name
        return owner_of(pod, workloads)

    notes: list[str] = field(default_factory=list)
    # (namespace, workload) -> the earliest log line a runbook's logs item reads of its pods
    log_since: dict[tuple[str, str], datetime] = field(default_factory=dict)
    log_namespaces: dict[str, str] = field(default_factory=dict)  # pod -> its namespace
    # source -> what it has still to read: named in its note if it times out.
    unread: dict[str, list[str]] = field(default_factory=dict)

    def note(self, text: str) -> None:
        """Note ``text`` once: the events and the logs both see a listing that failed."""
        if text not in self.notes:
            self.notes.append(text)


class ContextGatherer:
    def __init__(
        self,
        settings: Settings,
        *,
        cluster: Cluster,
        source: ClusterContext | None = None,
        prom: Querier | None = None,
        logs: bool = True,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.source = source
        self.prom = prom
        self.logs = logs  # tails of pod logs: text for the LLM, never evidence for the rules
        self.limits = settings.ai.context

    async def gather(self, incident: Incident) -> Context:
        targets = sorted(
            {workload_target(m.labels or incident.labels) for m in incident.firing},
            key=lambda t: t.key,
        )
        targets = [t for t in targets if t.name]
        nodes = sorted({n for m in incident.members if is_dns_name(n := m.labels.get("node", ""))})
        parts = _Parts()
        books = self.runbooks(incident)
        items = [(b, g) for b in books for g in b.gather]
        namespaces = {t.namespace for t in targets}
        for kind in ("events", "deployments"):
            _, stray = windows([g for _, g in items], kind, namespaces, incident.opened_at)
            for b, g in items:
                if g.type == kind and g.namespace in stray:
                    parts.notes.append(
                        f"runbook {b.name} {kind} of namespace {g.namespace}: not gathered: "
                        "no workload of the incident is there"
                    )
        deployments_since = own_windows(books, "deployments", namespaces, incident.opened_at)
        events_since = own_windows(books, "events", namespaces, incident.opened_at)
        parts.log_since = log_windows([g for _, g in items], targets, incident.opened_at)
        jobs: list[tuple[str, Awaitable[None]]] = [
            ("rollouts", self._rollouts(targets, parts)),
            ("metrics", self._metrics(incident, targets, parts)),
        ]
        if any(g.type == "metrics" for _, g in items):
            jobs.append(("runbook metrics", self._runbook_metrics(incident, items, parts)))
        if self.source is not None:
            jobs += [
                ("events", self._events(self.source, targets, nodes, parts)),
                ("config changes", self._config(self.source, incident, targets, parts)),
                ("node conditions", self._nodes(self.source, nodes, parts)),
            ]
            if self.logs:
                jobs.append(("logs", self._logs(self.source, incident, targets, parts)))
        else:
            parts.notes.append("events, logs and config changes: no cluster context adapter")
        await asyncio.gather(*(self._bounded(name, job, parts) for name, job in jobs))
        for listing in parts.pod_lists.values():
            listing.cancel()  # one a timed-out job left running (a no-op for the rest)
        self._runbook_logs(items, targets, parts)
        workloads, live = [t.name for t in targets], parts.live_pods()
        signals = derive_signals(parts.events, workloads, live)
        node_conditions = dict(signals.node_conditions)
        for n, conditions in parts.node_conditions.items():
            node_conditions[n] = tuple(sorted({*node_conditions.get(n, ()), *conditions}))
        r = parts.related
        return Context(
            rollouts=tuple(parts.rollouts),
            deployments_since=deployments_since,
            events_signals={
                who: derive_signals(within(parts.events, since), workloads, live)
                for who, since in events_since.items()
            },
            cpu_saturation=r.get("cpu_saturation", {}),
            memory_saturation=r.get("memory_saturation", {}),
            concurrency_saturation=r.get("concurrency_saturation", {}),
            node_cpu_saturation=r.get("node_cpu_saturation", {}),
            dependency_errors=r.get("dependency_error_ratio", {}),
            crash_looping=signals.crash_looping,
            oom_killed=signals.oom_killed,
            node_conditions=node_conditions,
            unhealthy_nodes=tuple(sorted(node_conditions)),
            config_changes=tuple(parts.config_changes),
            events=tuple(parts.events),
            logs=parts.logs,
            metrics=tuple(parts.metrics),
            notes=tuple(parts.notes),
        )

    def runbooks(self, incident: Incident) -> list[FileRunbook]:
        """The runbook files the incident's firing signals match, each once."""
        found = (self.settings.file_runbook_for(m.name, m.source) for m in incident.firing)
        return list({b.name: b for b in found if b is not None}.values())

    async def _runbook_metrics(
        self, incident: Incident, items: Sequence[tuple[FileRunbook, GatherItem]], parts: _Parts
    ) -> None:
        queries = list(
            dict.fromkeys((b.name, q) for b, g in items if g.type == "metrics" for q in g.queries)
        )
        if self.prom is None:
            names = ", ".join(sorted({b for b, _ in queries}))
            parts.notes.append(f"runbook {names} metrics: not gathered: no Prometheus client")
            return
        prom = self.prom

        # One query failing (a typo, a Prometheus error, a label the incident lacks) costs
        # only its own series.
        async def one(book: str, expr: str) -> list[Sample] | str:
            rendered, problem = substitute(expr, incident.labels)
            if rendered is None:
                return f"runbook {book} metrics {expr!r}: not gathered: {problem}"
            try:
                return await prom.query(rendered)
            except AgentError as err:
                return f"runbook {book} metrics {expr!r} unavailable: {redact(str(err))[:200]}"

        results = await asyncio.gather(*(one(b, q) for b, q in queries))
        samples: list[MetricSample] = []
        for (book, expr), result in zip(queries, results, strict=True):
            if isinstance(result, str):
                parts.notes.append(result)
                continue
            # Label values come from whatever Prometheus scraped: untrusted, redacted.
            samples += [
                MetricSample(
                    query=f"runbook {book}: {expr}",
                    labels={k: clip(redact(v), MAX_TEXT) for k, v in s.labels.items()},
                    value=s.value,
                )
                for s in result
            ]
        kept, dropped = within_budget(samples, _sample_size, self.limits.max_bytes)
        parts.metrics += kept
        if dropped:
            parts.notes.append(f"runbook metrics: {dropped} series left out (budget)")

    def _runbook_logs(
        self,
        items: Sequence[tuple[FileRunbook, GatherItem]],
        targets: Sequence[Target],
        parts: _Parts,
    ) -> None:
        """Narrow the tails read to a runbook's LogQL query where it maps onto them."""
        for book, g in items:
            if g.type != "logs":
                continue
            where = f"runbook {book.name} logs {g.queries[0].strip()!r}"
            q = parse_logql(g.queries[0])
            if isinstance(q, str):
                parts.notes.append(f"{where}: not gathered: no Loki source, and {q}")
                continue
            if self.source is None or not self.logs:
                parts.notes.append(f"{where}: not gathered: pod logs are not read")
                continue
            picked = [t for t in targets if names_workload(q, t)]
            if not picked:
                parts.notes.append(
                    f"{where}: not gathered: no Loki source, and its selector names no "
                    "workload of the incident"
                )
                continue
            # A pod is its longest-named workload's among the incident's (checkout-worker's
            # pods are not checkout's, though their names start with "checkout-").
            pods = [
                p
                for p, ns in parts.log_namespaces.items()
                if any(
                    t.namespace == ns
                    and parts.owner(ns, p, [w.name for w in targets if w.namespace == ns]) == t.name
                    for t in picked
                )
            ]
            for p in pods:
                parts.logs[p] = filter_lines(parts.logs[p], q)
            if pods:
                # The window is the widest of the items naming the workload (log_windows).
                lines = f"the last {self.limits.log_lines} lines"
                starts = sorted(
                    {s for t in picked if (s := parts.log_since.get((t.namespace, t.name)))}
                )
                span = f" since {starts[0].isoformat()}" if starts else ""
                parts.notes.append(
                    f"{where}: applied to the log tails ({lines}{span}) of {', '.join(pods)}"
                )

    async def _bounded(self, name: str, job: Awaitable[None], parts: _Parts) -> None:
        try:
            async with asyncio.timeout(self.limits.timeout):
                await job
        except TimeoutError:
            unread = parts.unread.get(name)
            missing = f"; not read: {', '.join(unread)}" if unread else ""
            parts.notes.append(f"{name}: no answer within {self.limits.timeout:g}s{missing}")
        except AgentError as err:
            parts.notes.append(f"{name} unavailable: {redact(str(err))[:300]}")

    async def _rollouts(self, targets: Sequence[Target], parts: _Parts) -> None:
        rollouts, notes = await rollouts_of(self.cluster, targets)
        latest: dict[str, list[Rollout]] = {}
        for r in rollouts:
            latest.setdefault(f"{r.namespace}/{r.workload}", []).append(r)
        parts.rollouts += [r for rs in latest.values() for r in rs[-MAX_REVISIONS:]]
        parts.notes += notes

    async def _metrics(self, incident: Incident, targets: Sequence[Target], parts: _Parts) -> None:
        if self.prom is None:
            parts.notes.append("metrics: no Prometheus client")
            return
        prom = self.prom
        queries: list[_Query] = []
        # Only the detector's anomalies: a Kubernetes signal or an alert named like a
        # pattern was not seen by its condition, whose series say nothing of it.
        for name in sorted({m.name for m in incident.firing if m.source == detector.SOURCE}):
            pattern = self.settings.pattern(name)
            if pattern is not None:
                qname = f"pattern:{name}"
                queries.append((qname, pattern.condition, "", incident.labels, qname))
        service = incident.labels.get("service", "")
        for t in targets:
            for qname, template in sorted(self.limits.queries.items()):
                expr = render_query(
                    template, namespace=t.namespace, workload=t.name, service=service or t.name
                )
                if expr is None:
                    parts.notes.append(f"metrics {qname}: names of {t.key} are not DNS-1123")
                    continue
                queries.append((qname, expr, t.name, None, f"{qname} of {t.key}"))
        # Kept up to date, so that a timeout names what was not read (see _bounded).
        unread = parts.unread.setdefault("metrics", [])
        unread += [label for *_, label in queries]
        results: dict[int, list[Sample] | str] = {}

        async def one(i: int) -> None:
            qname, expr, *_, label = queries[i]
            try:
                results[i] = await prom.query(expr)
            except AgentError as err:
                results[i] = f"metrics {qname} unavailable: {redact(str(err))[:200]}"
            unread.remove(label)

        try:
            await asyncio.gather(*(one(i) for i in range(len(queries))))
        finally:
            # Also when the source times out: one query Prometheus never answers must not
            # cost the series of those it did. In the order of the queries.
            self._keep_metrics(queries, results, parts)

    def _keep_metrics(
        self,
        queries: Sequence[_Query],
        results: Mapping[int, list[Sample] | str],
        parts: _Parts,
    ) -> None:
        samples: list[MetricSample] = []
        for i, (qname, _, workload, only, _) in enumerate(queries):
            result = results.get(i)
            if result is None:
                continue
            if isinstance(result, str):
                parts.notes.append(result)
                continue
            for s in result:
                if only is not None and not matches(s.labels, only):
                    continue
                samples.append(MetricSample(query=qname, labels=dict(s.labels), value=s.value))
                by = {"node_cpu_saturation": "node", "dependency_error_ratio": "dependency"}
                if qname in by:
                    key = s.labels.get(by[qname], "")
                    if key:
                        parts.related.setdefault(qname, {})[key] = s.value
                elif not qname.startswith("pattern:"):
                    level = parts.related.setdefault(qname, {})
                    level[workload] = max(s.value, level.get(workload, s.value))
        kept, dropped = within_budget(samples, _sample_size, self.limits.max_bytes)
        parts.metrics += kept
        if dropped:
            parts.notes.append(f"metrics: {dropped} series left out (budget)")

    async def _events(
        self, src: ClusterContext, targets: Sequence[Target], nodes: Sequence[str], parts: _Parts
    ) -> None:
        found: list[KubeEvent] = []
        limit = self.limits.max_events
        # One namespace's events failing must not drop the others' (nor the nodes').
        for ns in sorted({t.namespace for t in targets}):
            names = [t.name for t in targets if t.namespace == ns]
            pods: list[str] = []
            for name in names:  # which events are about pods still there
                try:
                    pods += await parts.pods(src, ns, name)
                except AgentError as err:  # then all its events count (derive_signals)
                    parts.note(f"pods of {ns}/{name} not listed: {redact(str(err))[:200]}")
            try:
                # The pods by name too: a truncated pod name does not start with its
                # workload's.
                found += await src.events(ns, [*names, *pods], limit=limit)
            except AgentError as err:
                parts.note(f"events of namespace {ns} unavailable: {redact(str(err))[:200]}")
        if nodes:
            try:
                found += await src.events("", nodes, limit=limit)
            except AgentError as err:
                parts.note(f"events of nodes unavailable: {redact(str(err))[:200]}")
        found.sort(key=lambda e: e.at.timestamp() if e.at else 0.0, reverse=True)  # newest
        clean = [replace(e, message=clip(redact(e.message), MAX_TEXT)) for e in found[: limit or 0]]
        kept, dropped = within_budget(
            clean,
            lambda e: len(e.message.encode()) + len(e.name) + len(e.reason) + 48,
            self.limits.max_bytes,
        )
        parts.events += kept
        if dropped or len(found) > len(clean):
            parts.notes.append(f"events: {dropped + len(found) - len(clean)} left out (budget)")

    async def _logs(
        self, src: ClusterContext, incident: Incident, targets: Sequence[Target], parts: _Parts
    ) -> None:
        if not self.limits.log_lines or not self.limits.max_pods:
            return
        pods: list[tuple[str, str]] = [
            (m.labels.get("namespace", "default"), p)
            for m in incident.firing
            if is_dns_name(p := m.labels.get("pod", ""))
        ]
        # Kept up to date, so that a timeout names what was not read (see _bounded).
        unread = parts.unread.setdefault("logs", [])
        unread += [f"Pod/{ns}/{pod}" for ns, pod in pods]
        unread += [f"the pods of {t.namespace}/{t.name}" for t in targets]
        for t in targets:
            try:
                pods += [(t.namespace, p) for p in await parts.pods(src, t.namespace, t.name)]
            except AgentError as err:
                parts.note(f"pods of {t.namespace}/{t.name} not listed: {redact(str(err))[:200]}")
            unread.remove(f"the pods of {t.namespace}/{t.name}")
        pods = list(dict.fromkeys(pods))[: self.limits.max_pods]
        unread[:] = [f"Pod/{ns}/{pod}" for ns, pod in pods]
        if not pods:
            return
        share = self.limits.max_bytes // len(pods)
        texts: dict[tuple[str, str], str] = {}

        # A pod that has no log to give (ContainerCreating answers 400) costs its own tail
        # only: in a bad rollout, the pods that did start are the ones worth reading.
        async def tail(ns: str, pod: str) -> None:
            # A runbook's logs window applies to the pods of the workload its query names:
            # a pod's owner is found among all the incident's workloads, not only those
            # with a window (checkout's window is not checkout-worker's).
            owner = parts.owner(ns, pod, [t.name for t in targets if t.namespace == ns])
            since = parts.log_since.get((ns, owner)) if owner else None
            try:
                text = await src.logs(ns, pod, tail=self.limits.log_lines, since=since)
            except AgentError as err:
                parts.note(f"logs of Pod/{ns}/{pod} unavailable: {redact(str(err))[:200]}")
            else:
                # Redact first: clipping first could cut a secret's marker and leak its rest.
                texts[(ns, pod)] = clip(redact(text), share, keep="tail")
            unread.remove(f"Pod/{ns}/{pod}")

        try:
            await asyncio.gather(*(tail(ns, pod) for ns, pod in pods))
        finally:
            # Also when the source times out: one pod whose log hangs must not cost the
            # tails already read. In the order of the pods, whenever each arrived.
            for ns, pod in pods:
                if (ns, pod) in texts:
                    parts.logs[pod] = texts[(ns, pod)]
                    parts.log_namespaces[pod] = ns

    async def _config(
        self, src: ClusterContext, incident: Incident, targets: Sequence[Target], parts: _Parts
    ) -> None:
        since = incident.opened_at - timedelta(seconds=self.settings.remediation.rollout_window)
        for ns in sorted({t.namespace for t in targets}):
            changes = await src.config_changes(
                [t for t in targets if t.namespace == ns], since=since
            )
            parts.config_changes += [
                replace(c, summary=clip(redact(c.summary), MAX_TEXT)) for c in changes[:20]
            ]

    async def _nodes(self, src: ClusterContext, nodes: Sequence[str], parts: _Parts) -> None:
        if nodes:
            parts.node_conditions.update(await src.node_conditions(nodes))
