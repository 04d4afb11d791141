"""Topology absorption and inhibition: pure decisions over the cross-partition view.

Incidents are partitioned by group key, but a node-level anomaly explains pod anomalies
in every group, and an inhibition source may suppress targets anywhere. Each correlator
worker therefore holds every active *fact* (see :class:`agent.models.Fact`) from a
compacted topic, and these functions decide, for one anomaly or incident, what the view
implies. No clocks and no I/O: the caller passes ``now`` and the facts.

Topology is read from labels the detectors attach (see :mod:`agent.kube_signals`):
- pod-level: a ``pod`` label; it may name its ``node`` and its ``workload``;
- workload-level: a ``workload`` label (or kube-state-metrics' ``deployment``,
  ``statefulset``, ``daemonset``) and no ``pod``;
- node-level: a ``node`` label, no ``pod`` and no workload.
A pod-level anomaly is absorbed by the incident of a *firing* node-level anomaly of its
node, else by that of a firing workload-level anomaly of its workload (a node failure
explains more than a workload's). Once absorbed it stays routed there until it resolves,
even after the absorbing anomaly resolved (the fact then lists it in ``holds``), so each
anomaly is firing in one open incident only and never flips back; a node that recovered
takes in no new pod failure. When the absorbing anomaly appears after its pods', the
correlator's timer hands their members over (:func:`moves`).

A source that cannot see (the agent's ``prometheus-unavailable`` or
``alertmanager-unavailable``, see :data:`agent.models.BLINDING`) is a fact too: while it
fires, no worker resolves that source's anomalies its detector observed as quiet
(:func:`streams.correlation.expire`); nor, while a pattern's own query fails
(``pattern-query-failed``), that pattern's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.models import (
    BLINDING,
    Anomaly,
    AnomalySource,
    Fact,
    Incident,
    Matcher,
    Member,
    parse_matcher,
    stable_id,
)
from agent.settings import InhibitRuleSection
from streams.correlation import (
    ALERTNAME,
    MAX_AHEAD,
    NO_MARKS,
    SOURCE,
    Blind,
    Blindness,
    CorrelationRules,
    Marks,
    key_of,
    match_labels,
)

# Labels naming a workload: the Kubernetes detector's, then kube-state-metrics'.
WORKLOAD_LABELS = ("workload", "deployment", "statefulset", "daemonset")


def _workload(labels: Mapping[str, str]) -> str:
    for name in WORKLOAD_LABELS:
        if labels.get(name):
            return labels[name]
    return ""


def scope(labels: Mapping[str, str]) -> str | None:
    """ "node/<name>" or "workload/<namespace>/<name>" for an anomaly that can absorb
    others; None for pod-level and unscoped anomalies."""
    if labels.get("pod"):
        return None
    workload = _workload(labels)
    if workload:
        return f"workload/{labels.get('namespace', '')}/{workload}"
    node = labels.get("node")
    return f"node/{node}" if node else None


@dataclass(frozen=True, slots=True)
class InhibitRule:
    name: str
    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...] = ()

    @staticmethod
    def from_section(section: InhibitRuleSection) -> InhibitRule:
        # The settings boundary already validated every matcher text.
        return InhibitRule(
            name=section.name,
            source=tuple(parse_matcher(t) for t in section.source_matchers),
            target=tuple(parse_matcher(t) for t in section.target_matchers),
            equal=section.equal,
        )

    def is_source(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.source)

    def is_target(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.target)


@dataclass(frozen=True, slots=True)
class FactIndex:
    """The active facts, indexed for the per-anomaly lookups on the hot path."""

    # Firing node- and workload-level facts: they take in their pods' anomalies.
    nodes: Mapping[tuple[str, str], Fact] = field(default_factory=dict)
    workloads: Mapping[tuple[str, str, str], Fact] = field(default_factory=dict)
    # pod anomaly fingerprint -> (how, fact): absorbed by a fact since resolved, whose
    # incident still holds it firing.
    held: Mapping[str, tuple[str, Fact]] = field(default_factory=dict)
    # Per inhibition rule (by position): the firing facts matching its source side.
    sources: tuple[tuple[Fact, ...], ...] = ()
    # (source, cluster) -> its last blindness: going on (until None) or ended
    blind: Blind = field(default_factory=dict)
    # Whether any fact takes pods in: asked for every anomaly placed, so found once.
    absorbs: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "absorbs", bool(self.nodes or self.workloads or self.held))

    @property
    def empty(self) -> bool:
        return not self.absorbs and not any(self.sources)


EMPTY = FactIndex()


def active(fact: Fact, now: datetime, ttl: float) -> bool:
    """Its incident is open and was alive within ``ttl`` (the correlator's resolve_timeout):
    a fact whose last update was lost still ends when its incident would have gone quiet."""
    return fact.incident_open and now - fact.observed_at < timedelta(seconds=ttl)


def ahead(fact: Fact, now: datetime) -> bool:
    """Dated beyond the clock skew an anomaly may have (MAX_AHEAD): no worker wrote it from
    anomalies it folded. Taken as dated, it would hold what it says open until then."""
    limit = now + timedelta(seconds=MAX_AHEAD)
    return fact.observed_at > limit or (fact.last_seen is not None and fact.last_seen > limit)


def spent(fact: Fact, now: datetime, ttl: float) -> bool:
    """Whether no index will use this fact again, so a view may forget it: it has been
    inactive (see :func:`active`) for a ``ttl`` beyond the ``ttl`` that ended it, as
    :meth:`Correlator._prune_facts` forgets a fact sent. Its incident coming back publishes
    it anew, dated then. Nothing tombstones the compacted topic's facts, so every node- and
    workload-level anomaly and inhibition source ever seen stayed in every worker's view,
    and the index was rebuilt from all of them every second. A blindness is kept: an ended
    one still dates when its source saw again, and there is one per endpoint or pattern,
    not one per anomaly."""
    if blinds(fact.labels) is not None:
        return False
    last = max(fact.observed_at, fact.last_seen or fact.observed_at)
    return now - last > timedelta(seconds=2 * ttl)


def build_index(
    facts: Iterable[Fact], now: datetime, ttl: float, rules: Sequence[InhibitRule] = ()
) -> FactIndex:
    facts = [f for f in facts if not ahead(f, now)]
    live = sorted((f for f in facts if active(f, now, ttl)), key=lambda f: f.fingerprint)
    nodes: dict[tuple[str, str], Fact] = {}
    workloads: dict[tuple[str, str, str], Fact] = {}
    held: dict[str, tuple[str, Fact]] = {}
    for f in live:  # several facts of one node: the lowest fingerprint, deterministically
        cluster, where = f.labels.get("cluster", ""), scope(f.labels)
        if where is None:
            continue
        if f.status != "firing":
            # Recovered: it keeps only the pods it took in (see Fact.holds), so a later,
            # unrelated pod failure on that node is not filed under the node's blip.
            for fp in f.holds:
                held.setdefault(fp, (where, f))
        elif where.startswith("node/"):
            nodes.setdefault((cluster, f.labels["node"]), f)
        else:
            workloads.setdefault((cluster, f.labels.get("namespace", ""), _workload(f.labels)), f)
    firing = [f for f in live if f.status == "firing"]
    sources = tuple(tuple(f for f in firing if r.is_source(f.labels)) for r in rules)
    blind: dict[tuple[str, ...], Blindness] = {}
    for f in facts:
        blinded = blinds(f.labels)
        if blinded is None:
            continue
        # Blind while it fires and is repeated, else until it was last seen. Its own
        # sighting, not its incident's liveness: another agent anomaly of the incident
        # kept a blindness whose detector was gone going on for as long as it fired. An
        # ended blindness is kept (one per endpoint): a worker that was down when an
        # incident would have gone quiet still counts from when the source saw again.
        last = f.last_seen or f.observed_at  # (a fact written before last_seen was)
        until = None
        if f.status != "firing" or not active(f, now, ttl) or now - last >= timedelta(seconds=ttl):
            until = last
        source, name = blinded
        cluster = f.labels.get("cluster", "")
        seen = (source, cluster, name) if name else (source, cluster)
        blind[seen] = _merged(blind.get(seen), Blindness(since=f.first_seen, until=until))
    return FactIndex(nodes=nodes, workloads=workloads, held=held, sources=sources, blind=blind)


def blinds(labels: Mapping[str, str]) -> tuple[AnomalySource, str] | None:
    """What an agent anomaly (its match labels) says cannot be seen: (source, name) the
    anomalies of that name of the source, (source, "") every one of them; else None."""
    if labels.get(SOURCE) != "agent":
        return None
    found = BLINDING.get(labels.get(ALERTNAME, ""))
    if found is None:
        return None
    source, scope = found
    if scope is None:
        return source, ""
    name = labels.get(scope, "")
    return (source, name) if name else None


def _merged(a: Blindness | None, b: Blindness) -> Blindness:
    """Two blindnesses of one source and cluster (e.g. two endpoints): blind while either
    is, from the earlier start."""
    if a is None:
        return b
    since = None if a.since is None or b.since is None else min(a.since, b.since)
    until = None if a.until is None or b.until is None else max(a.until, b.until)
    return Blindness(since=since, until=until)


def absorber(
    labels: Mapping[str, str], index: FactIndex, *, fingerprint: str
) -> tuple[str, Fact] | None:
    """(how, fact) when a node- or workload-level incident takes this anomaly in: the one
    that already holds it, else that of a firing node-, else workload-level anomaly."""
    if not labels.get("pod"):
        return None
    kept = index.held.get(fingerprint)
    if kept is not None:
        return kept  # already absorbed: it keeps its home, never flips back
    cluster = labels.get("cluster", "")
    node = labels.get("node")
    if node:
        fact = index.nodes.get((cluster, node))
        if fact is not None:
            return f"node/{node}", fact
    workload = _workload(labels)
    if workload:
        namespace = labels.get("namespace", "")
        fact = index.workloads.get((cluster, namespace, workload))
        if fact is not None:
            return f"workload/{namespace}/{workload}", fact
    return None


def inhibited_by(
    labels: Mapping[str, str], fp: str, rules: Sequence[InhibitRule], index: FactIndex
) -> str | None:
    """ "<rule>:<source fingerprint>" of the first rule and active source inhibiting this
    anomaly (its match labels), else None.

    Alertmanager's semantics: the ``equal`` labels must have the same value on both sides
    (missing counts as empty), and an anomaly matching both sides of a rule cannot be
    inhibited by another that also matches both, nor by itself.
    """
    for rule, sources in zip(rules, index.sources, strict=False):
        if not sources or not rule.is_target(labels):
            continue
        both = rule.is_source(labels)
        for f in sources:
            if f.fingerprint == fp or (both and rule.is_target(f.labels)):
                continue
            if all(f.labels.get(k, "") == labels.get(k, "") for k in rule.equal):
                return f"{rule.name}:{f.fingerprint}"
    return None


def is_fact(labels: Mapping[str, str], topology: bool, rules: Sequence[InhibitRule]) -> bool:
    """Whether other partitions must see this anomaly (publish it as a fact)."""
    return (
        (topology and scope(labels) is not None)
        or blinds(labels) is not None
        or any(r.is_source(labels) for r in rules)
    )


def moves(incident: Incident, index: FactIndex) -> dict[str, tuple[str, Fact]]:
    """Firing members of an open incident that a node- or workload-level incident now
    takes in: fingerprint -> (how, fact). The incident hands them over (see
    :func:`streams.correlation.hand_over`); an incident is never its own absorber."""
    if incident.status == "resolved" or index.empty:
        return {}
    out: dict[str, tuple[str, Fact]] = {}
    for m in incident.members:
        if m.status != "firing":
            continue
        hit = absorber(m.labels, index, fingerprint=m.fingerprint)
        if hit is not None and hit[1].incident_key != incident.key:
            out[m.fingerprint] = hit
    return out


def as_anomaly(m: Member) -> Anomaly:
    """A member again as the anomaly that made it, to hand it to its absorber."""
    return Anomaly(
        fingerprint=m.fingerprint,
        source=m.source,
        name=m.name,
        severity=m.severity,
        status=m.status,
        labels=dict(m.labels),
        starts_at=m.first_seen,
        observed_at=m.last_seen,
        value=m.value,
        # Deterministic, so re-handing it after a crash is a duplicate, not news.
        id=stable_id("absorbed", m.fingerprint, m.last_seen.isoformat()),
    )


def facts_of(incident: Incident, topology: bool, rules: Sequence[InhibitRule]) -> list[Fact]:
    """The facts an incident's members make, from its current state."""
    out = []
    alive = None
    open_ = incident.status != "resolved"
    holds: dict[str, tuple[str, ...]] = {}  # scope -> firing members absorbed through it
    for m in incident.members:
        # Cheap test first: on the hot path nearly every member is a pod's, and with no
        # inhibition rules its match labels need not be built at all.
        if (
            not (topology and scope(m.labels) is not None)
            and not rules
            and not (m.source == "agent" and m.name in BLINDING)
        ):
            continue
        labels = match_labels(m)
        if is_fact(labels, topology, rules):
            alive = alive or max(x.last_seen for x in incident.members)
            where = scope(m.labels) if topology else None
            if where is not None and m.status != "firing" and open_ and where not in holds:
                holds[where] = tuple(
                    sorted(
                        x.fingerprint
                        for x in incident.members
                        if x.status == "firing" and x.absorbed_by == where
                    )
                )
            out.append(
                Fact(
                    fingerprint=m.fingerprint,
                    labels=labels,
                    incident_key=incident.key,
                    incident_id=incident.id,
                    status=m.status,
                    incident_open=open_,
                    observed_at=alive,
                    holds=holds.get(where, ()) if where is not None else (),
                    first_seen=m.first_seen,
                    last_seen=m.last_seen,
                )
            )
    return out


def placements(
    a: Anomaly,
    routed: tuple[str, str | None] | None,
    index: FactIndex,
    rules: CorrelationRules,
    *,
    topology: bool = True,
    inhibit: Sequence[InhibitRule] = (),
) -> list[tuple[str, Marks]]:
    """Which group(s) an anomaly is folded into, and how it is marked there.

    ``routed``: (group key, absorbed by) when another worker already decided (see
    :mod:`streams.correlator`). A firing pod-level anomaly with an absorber goes to the
    absorber's group; a resolution goes to both its own group and the absorber's, since it
    may have fired in either (in a group that never held it, it is a no-op).
    """
    inhibited = None
    if inhibit and not index.empty:
        inhibited = inhibited_by(match_labels(a), a.fingerprint, inhibit, index)
    if routed is not None:
        return [(routed[0], Marks(inhibited_by=inhibited, absorbed_by=routed[1]))]
    own = (key_of(a, rules), Marks(inhibited_by=inhibited) if inhibited else NO_MARKS)
    hit = (
        absorber(a.labels, index, fingerprint=a.fingerprint) if topology and index.absorbs else None
    )
    if hit is None:
        return [own]
    into = (hit[1].incident_key, Marks(inhibited_by=inhibited, absorbed_by=hit[0]))
    if into[0] == own[0]:
        return [into]  # already in its absorber's group: only the mark is news
    return [into] if a.status == "firing" else [own, into]
