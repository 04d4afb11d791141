"""Kubernetes signals as anomalies: pure functions of (state, watch event, now).

Objects are the API's JSON (plain dicts), never client model classes, so this module needs
no Kubernetes client and tests feed it literal objects. :mod:`agent.kube_watch` does the
watching and hands every event (and every re-list, as ``SYNC``) to :func:`step`.

- **Pods**: a container waiting in ``CrashLoopBackOff`` fires ``crash-looping`` until it
  runs again or the pod goes; ``restart_threshold`` restarts within ``restart_window``
  fire ``pod-restarting`` until the window no longer holds that many (see :func:`tick`).
- **Nodes**: ``Ready`` not ``True`` fires ``node-not-ready``; any other condition that is
  ``True`` (DiskPressure, MemoryPressure, PIDPressure, NetworkUnavailable and
  node-problem-detector's KernelDeadlock, ReadonlyFilesystem, ...) fires
  ``node-<condition>``. Each resolves when its condition clears or the node goes.
- **Events**: Warning events with a configured reason (BackOff, OOMKilling, ...) fire
  ``k8s-<reason>`` for the involved object, enriched with what the pod cache knows. An
  event is handled once per (uid, resourceVersion), so a resumed or re-listed watch
  repeats nothing.

Only transitions are published for pods and nodes, which is what makes a re-list after
``410 Gone`` harmless: replaying the full state yields no anomaly that was already sent.
A condition that still fires is announced again every ``refresh_every`` (see
:func:`refresh`), so the correlator does not take a lasting fault for a quiet one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from agent.labels import normalise
from agent.models import Anomaly, AnomalyStatus, Severity, fingerprint, stable_id

Obj = Mapping[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]

_NOT_NAME = re.compile(r"[^a-z0-9]+")
SEEN_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class KubeRules:
    cluster: str = "local"
    event_reasons: frozenset[str] = frozenset(
        {"BackOff", "OOMKilling", "FailedScheduling", "Unhealthy", "FailedMount"}
    )
    restart_threshold: int = 3
    restart_window: float = 600.0
    # A condition still firing is announced again this often (see refresh): a third of the
    # correlator's resolve_timeout.
    refresh_every: float = 100.0


@dataclass(frozen=True, slots=True)
class Firing:
    anomaly: Anomaly  # the firing anomaly as published (resolution reuses its identity)


@dataclass(frozen=True, slots=True)
class ContainerRestarts:
    baseline: int  # restartCount when first seen: history, not news
    samples: tuple[tuple[datetime, int], ...] = ()  # (when, restartCount) of increases


@dataclass
class KubeState:
    """Mutable by design (it is the watcher's cache), but only :func:`step`/:func:`tick`
    change it, and they read no clock."""

    pods: dict[str, Obj] = field(default_factory=dict)  # "ns/name" -> pod
    restarts: dict[str, ContainerRestarts] = field(default_factory=dict)  # "ns/pod/container"
    firing: dict[str, Firing] = field(default_factory=dict)  # fingerprint -> firing
    seen_events: OrderedDict[str, None] = field(default_factory=OrderedDict)


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def _slug(text: str) -> str:
    """'OOMKilling' -> 'oom-killing', 'KernelDeadlock' -> 'kernel-deadlock'."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", text)
    return _NOT_NAME.sub("-", words.lower()).strip("-")


def pod_labels(pod: Obj, cluster: str) -> dict[str, str]:
    meta = _meta(pod)
    labels = meta.get("labels") or {}
    out = {"namespace": str(meta.get("namespace", "")), "pod": str(meta.get("name", ""))}
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        out["node"] = str(node)
    owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping)]
    # The controller manages the pod; another owner reference (a garbage-collection
    # parent) may come first and is not what an action must act through.
    owner = next((o for o in owners if o.get("controller") is True), owners[0] if owners else None)
    if owner is not None:
        kind, name = str(owner.get("kind", "")), str(owner.get("name", ""))
        workload = name
        template_hash = labels.get("pod-template-hash")
        if kind == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
            kind, workload = "Deployment", name[: -len(template_hash) - 1]
        out["owner"] = f"{kind}/{workload}"
        out["workload"] = workload
    service = labels.get("app.kubernetes.io/name") or labels.get("app") or out.get("workload")
    if service:
        out["service"] = str(service)
    return normalise(out, cluster)


def _anomaly(
    name: str,
    status: AnomalyStatus,
    labels: Mapping[str, str],
    *,
    severity: Severity,
    now: datetime,
    starts_at: datetime | None = None,
    annotations: Mapping[str, str] | None = None,
    value: float | None = None,
) -> Anomaly:
    fp = fingerprint("kubernetes", name, labels)
    return Anomaly(
        fingerprint=fp,
        source="kubernetes",
        name=name,
        severity=severity,
        status=status,
        labels=dict(labels),
        annotations={k: v[:4000] for k, v in (annotations or {}).items()},
        starts_at=starts_at or now,
        observed_at=now,
        value=value,
        id=stable_id("kubernetes", fp, status, now.isoformat()),
    )


def _transition(state: KubeState, want: Anomaly | None, fp: str, now: datetime) -> list[Anomaly]:
    """Fire ``want`` if it is new, or resolve what fired under ``fp`` if ``want`` is None."""
    current = state.firing.get(fp)
    if want is not None:
        if current is not None:
            return []
        state.firing[fp] = Firing(want)
        return [want]
    if current is None:
        return []
    del state.firing[fp]
    return [
        replace(
            current.anomaly,
            status="resolved",
            observed_at=now,
            value=None,
            id=stable_id("kubernetes", fp, "resolved", now.isoformat()),
        )
    ]


# --- pods ------------------------------------------------------------------------------------


def _containers(pod: Obj) -> list[Obj]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _pod_step(
    state: KubeState, kind: EventType, pod: Obj, now: datetime, rules: KubeRules
) -> list[Anomaly]:
    meta = _meta(pod)
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    base = pod_labels(pod, rules.cluster)
    out: list[Anomaly] = []
    if kind == "DELETED":
        state.pods.pop(key, None)
        prefix = f"{key}/"
        for ckey in [k for k in state.restarts if k.startswith(prefix)]:
            del state.restarts[ckey]
        for fp, f in list(state.firing.items()):
            lab = f.anomaly.labels
            if (
                f.anomaly.source == "kubernetes"
                and f"{lab.get('namespace')}/{lab.get('pod')}" == key
            ) and f.anomaly.name in ("crash-looping", "pod-restarting"):
                out += _transition(state, None, fp, now)
        return out
    # Restarts of a pod we watched appear (or saw before) are news; the counts of a pod
    # first met in a (re-)list are history.
    fresh = kind == "ADDED" or key in state.pods
    state.pods[key] = pod
    for c in _containers(pod):
        cname = str(c.get("name", ""))
        labels = {**base, "container": cname}
        waiting = ((c.get("state") or {}).get("waiting") or {}).get("reason")
        count = int(c.get("restartCount") or 0)
        crash_fp = fingerprint("kubernetes", "crash-looping", labels)
        want = None
        if waiting == "CrashLoopBackOff":
            msg = str(((c.get("state") or {}).get("waiting") or {}).get("message", ""))
            want = _anomaly(
                "crash-looping",
                "firing",
                labels,
                severity="critical",
                now=now,
                annotations={"message": msg},
                value=float(count),
            )
        out += _transition(state, want, crash_fp, now)
        ckey = f"{key}/{cname}"
        hist = state.restarts.get(ckey)
        if hist is None:
            state.restarts[ckey] = ContainerRestarts(baseline=0 if fresh else count)
            hist = state.restarts[ckey]
        if count > (hist.samples[-1][1] if hist.samples else hist.baseline):
            state.restarts[ckey] = replace(hist, samples=(*hist.samples, (now, count)))
        out += _restart_check(state, ckey, labels, now, rules)
    return out


def _restart_check(
    state: KubeState, ckey: str, labels: Mapping[str, str], now: datetime, rules: KubeRules
) -> list[Anomaly]:
    hist = state.restarts[ckey]
    since = now - timedelta(seconds=rules.restart_window)
    recent = tuple(s for s in hist.samples if s[0] > since)
    older = [s for s in hist.samples if s[0] <= since]
    floor = older[-1][1] if older else hist.baseline
    state.restarts[ckey] = ContainerRestarts(baseline=floor, samples=recent)
    restarts = (recent[-1][1] - floor) if recent else 0
    fp = fingerprint("kubernetes", "pod-restarting", labels)
    want = None
    if restarts >= rules.restart_threshold:
        want = _anomaly(
            "pod-restarting",
            "firing",
            labels,
            severity="warning",
            now=now,
            value=float(restarts),
            starts_at=recent[0][0],
        )
    return _transition(state, want, fp, now)


def tick(state: KubeState, now: datetime, rules: KubeRules) -> list[Anomaly]:
    """Resolve ``pod-restarting`` whose window has emptied (call every few seconds)."""
    out: list[Anomaly] = []
    for _fp, f in list(state.firing.items()):
        a = f.anomaly
        if a.name == "pod-restarting":
            ckey = f"{a.labels['namespace']}/{a.labels['pod']}/{a.labels['container']}"
            if ckey in state.restarts:
                out += _restart_check(state, ckey, a.labels, now, rules)
    return out


def refresh(state: KubeState, now: datetime, rules: KubeRules) -> list[Anomaly]:
    """Announce again each condition that still fires and was last announced
    ``refresh_every`` ago or more (call every few seconds, after :func:`tick`).

    Transitions alone said nothing while a condition held, and the correlator resolves an
    incident none of whose members it has seen for ``resolve_timeout``: a node NotReady or
    a pod crash looping for longer than that had its incident resolved while it still
    failed. A repeat is the same anomaly observed now; the correlator takes it as liveness
    and publishes nothing."""
    out: list[Anomaly] = []
    every = timedelta(seconds=rules.refresh_every)
    for fp, f in list(state.firing.items()):
        if now - f.anomaly.observed_at < every:
            continue
        again = replace(
            f.anomaly, observed_at=now, id=stable_id("kubernetes", fp, "firing", now.isoformat())
        )
        state.firing[fp] = Firing(again)
        out.append(again)
    return out


# --- nodes -----------------------------------------------------------------------------------


def _node_problem(cond: Obj) -> tuple[str, Severity] | None:
    ctype, status = str(cond.get("type", "")), str(cond.get("status", ""))
    if ctype == "Ready":
        return ("node-not-ready", "critical") if status != "True" else None
    if status == "True":
        return f"node-{_slug(ctype)}", "warning"
    return None


def _node_step(
    state: KubeState, kind: EventType, node: Obj, now: datetime, rules: KubeRules
) -> list[Anomaly]:
    name = str(_meta(node).get("name", ""))
    labels = normalise({"node": name, "namespace": "", "service": ""}, rules.cluster)
    problems: dict[str, Anomaly] = {}
    if kind != "DELETED":
        for cond in (node.get("status") or {}).get("conditions") or []:
            found = _node_problem(cond)
            if found is None:
                continue
            aname, severity = found
            note = {"reason": str(cond.get("reason", "")), "message": str(cond.get("message", ""))}
            a = _anomaly(
                aname,
                "firing",
                {**labels, "condition": str(cond.get("type"))},
                severity=severity,
                now=now,
                annotations=note,
            )
            problems[a.fingerprint] = a
    out: list[Anomaly] = []
    for fp, a in problems.items():
        out += _transition(state, a, fp, now)
    for fp, f in list(state.firing.items()):
        lab = f.anomaly.labels
        if fp not in problems and f.anomaly.name.startswith("node-") and lab.get("node") == name:
            out += _transition(state, None, fp, now)
    return out


# --- events ----------------------------------------------------------------------------------


def _event_step(state: KubeState, event: Obj, now: datetime, rules: KubeRules) -> list[Anomaly]:
    meta = _meta(event)
    seen_key = f"{meta.get('uid', '')}@{meta.get('resourceVersion', '')}"
    if seen_key in state.seen_events:
        return []
    state.seen_events[seen_key] = None
    while len(state.seen_events) > SEEN_EVENTS:
        state.seen_events.popitem(last=False)
    reason = str(event.get("reason", ""))
    if event.get("type") != "Warning" or reason not in rules.event_reasons:
        return []
    obj = event.get("involvedObject") or {}
    kind, name = str(obj.get("kind", "")), str(obj.get("name", ""))
    ns = str(obj.get("namespace") or meta.get("namespace") or "")
    if kind == "Pod":
        pod = state.pods.get(f"{ns}/{name}")
        labels = (
            pod_labels(pod, rules.cluster)
            if pod
            else normalise({"namespace": ns, "pod": name}, rules.cluster)
        )
        if obj.get("fieldPath"):
            m = re.search(r"\{(.+?)\}", str(obj["fieldPath"]))
            if m:
                labels["container"] = m.group(1)
    elif kind == "Node":
        labels = normalise({"node": name, "namespace": "", "service": ""}, rules.cluster)
    else:
        labels = normalise({"namespace": ns, "object": f"{kind}/{name}"}, rules.cluster)
    severity: Severity = "critical" if reason in ("OOMKilling",) else "warning"
    notes = {"message": str(event.get("message", "")), "reason": reason}
    count = event.get("count") or (event.get("series") or {}).get("count") or 1
    return [
        _anomaly(
            f"k8s-{_slug(reason)}",
            "firing",
            labels,
            severity=severity,
            now=now,
            annotations=notes,
            value=float(count),
        )
    ]


# --- entry points ----------------------------------------------------------------------------


def step(
    state: KubeState, resource: str, kind: EventType, obj: Obj, now: datetime, rules: KubeRules
) -> list[Anomaly]:
    """One watch event of ``resource`` ("pods", "nodes", "events") -> anomalies to publish."""
    if resource == "pods":
        return _pod_step(state, kind, obj, now, rules)
    if resource == "nodes":
        return _node_step(state, kind, obj, now, rules)
    if resource == "events":
        return [] if kind == "DELETED" else _event_step(state, obj, now, rules)
    raise ValueError(f"unknown resource {resource!r}")


def sync(
    state: KubeState, resource: str, items: list[Obj], now: datetime, rules: KubeRules
) -> list[Anomaly]:
    """A full (re-)list: objects gone since the last one count as deleted, the rest as
    modified. Transitions only, so a re-list after 410 Gone repeats nothing."""
    out: list[Anomaly] = []
    if resource == "pods":
        listed = {f"{_meta(p).get('namespace', '')}/{_meta(p).get('name', '')}" for p in items}
        for key in [k for k in state.pods if k not in listed]:
            out += _pod_step(state, "DELETED", state.pods[key], now, rules)
    elif resource == "nodes":
        listed = {str(_meta(n).get("name", "")) for n in items}
        known = {
            f.anomaly.labels.get("node", "")
            for f in state.firing.values()
            if f.anomaly.name.startswith("node-")
        }
        for name in known - listed:
            out += _node_step(state, "DELETED", {"metadata": {"name": name}}, now, rules)
    for obj in items:
        out += step(state, resource, "MODIFIED", obj, now, rules)
    return out
