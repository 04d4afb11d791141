"""Kubernetes signals (pure) and the list/watch loop against a scripted API (410 Gone)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from agent.kube_signals import KubeRules, KubeState, refresh, step, sync, tick
from agent.kube_watch import ResourceWatch
from streams.correlation import CorrelationRules, correlate, expire
from tests.unit.factories import at

RULES = KubeRules(cluster="c1", restart_threshold=3, restart_window=600)


def pod(
    name: str = "cart-6d4f9-x2x4z", *, restarts: int = 0, waiting: str | None = None, rv: str = "1"
) -> dict[str, Any]:
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "resourceVersion": rv,
            "labels": {"pod-template-hash": "6d4f9"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "cart-6d4f9"}],
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "containerStatuses": [{"name": "app", "restartCount": restarts, "state": state}]
        },
    }


def node(name: str = "n1", **conditions: str) -> dict[str, Any]:
    conds = [{"type": t, "status": s} for t, s in {"Ready": "True", **conditions}.items()]
    return {"metadata": {"name": name}, "status": {"conditions": conds}}


def names(anomalies: list[Any]) -> list[tuple[str, str]]:
    return [(a.name, a.status) for a in anomalies]


def test_pod_labels_name_the_workload_behind_the_replicaset() -> None:
    s = KubeState()
    [a] = step(s, "pods", "ADDED", pod(waiting="CrashLoopBackOff"), at(0), RULES)
    assert a.labels == {
        "cluster": "c1",
        "namespace": "shop",
        "pod": "cart-6d4f9-x2x4z",
        "node": "n1",
        "owner": "Deployment/cart",
        "workload": "cart",
        "service": "cart",
        "container": "app",
    }


def test_crash_loop_fires_once_and_resolves_when_running_or_deleted() -> None:
    s = KubeState()
    assert names(step(s, "pods", "ADDED", pod(waiting="CrashLoopBackOff"), at(0), RULES)) == [
        ("crash-looping", "firing")
    ]
    assert step(s, "pods", "MODIFIED", pod(waiting="CrashLoopBackOff"), at(5), RULES) == []
    assert names(step(s, "pods", "MODIFIED", pod(), at(9), RULES)) == [
        ("crash-looping", "resolved")
    ]
    step(s, "pods", "MODIFIED", pod(waiting="CrashLoopBackOff"), at(10), RULES)
    assert names(step(s, "pods", "DELETED", pod(), at(11), RULES)) == [
        ("crash-looping", "resolved")
    ]


def test_restarts_within_the_window_fire_and_the_window_emptying_resolves() -> None:
    s = KubeState()
    step(s, "pods", "ADDED", pod(restarts=0), at(0), RULES)
    out = []
    for i in (1, 2, 3):
        out += step(s, "pods", "MODIFIED", pod(restarts=i), at(i * 60), RULES)
    assert names(out) == [("pod-restarting", "firing")]
    assert out[0].value == 3 and out[0].starts_at == at(60)
    assert tick(s, at(600), RULES) == []
    assert names(tick(s, at(661), RULES)) == [("pod-restarting", "resolved")]


def test_a_condition_that_still_fires_is_announced_again_every_refresh() -> None:
    rules = KubeRules(cluster="c1", refresh_every=100)
    s = KubeState()
    [fired] = step(s, "pods", "ADDED", pod(waiting="CrashLoopBackOff"), at(0), rules)
    step(s, "nodes", "ADDED", node(Ready="False"), at(50), rules)
    assert refresh(s, at(99), rules) == []
    [again] = refresh(s, at(100), rules)  # the pod's; the node's is 50 s younger
    assert again.fingerprint == fired.fingerprint and again.status == "firing"
    assert again.starts_at == fired.starts_at and again.observed_at == at(100)
    assert again.id != fired.id  # a new observation, not a redelivery of the first
    assert refresh(s, at(149), rules) == []
    assert names(refresh(s, at(150), rules)) == [("node-not-ready", "firing")]
    # What resolves it is the condition clearing, as before, under the same identity.
    [resolved] = step(s, "pods", "MODIFIED", pod(), at(160), rules)
    assert (resolved.fingerprint, resolved.status) == (fired.fingerprint, "resolved")
    assert [a.name for a in refresh(s, at(400), rules)] == ["node-not-ready"]


def test_refreshes_keep_a_lasting_fault_open_in_the_correlator() -> None:
    """A pod crash looping for an hour: announced once, its incident was resolved as quiet
    after resolve_timeout; announced every third of it, the incident stays open."""
    corr = CorrelationRules(resolve_timeout=300)
    rules = KubeRules(cluster="c1", refresh_every=corr.resolve_timeout / 3)
    s = KubeState()
    [fired] = step(s, "pods", "ADDED", pod(waiting="CrashLoopBackOff"), at(0), rules)
    once, _ = correlate(None, fired, at(0), corr)
    kept = once
    for t in range(5, 3600, 5):  # the watcher's tick
        for a in refresh(s, at(t), rules):
            kept, event = correlate(kept, a, at(t), corr)
            assert event is None  # liveness only: nothing announced downstream
        assert kept is not None
        kept, gone = expire(kept, at(t), corr)
        assert gone is None, f"resolved at {t}s while the pod still crash loops"
    assert once is not None
    _, gone = expire(once, at(3600), corr)
    assert gone is not None and gone.status == "resolved"  # without refreshes


def test_restart_counts_met_in_a_list_are_history() -> None:
    s = KubeState()
    assert sync(s, "pods", [pod(restarts=40)], at(0), RULES) == []
    assert step(s, "pods", "MODIFIED", pod(restarts=41), at(1), RULES) == []


def test_node_conditions() -> None:
    s = KubeState()
    assert step(s, "nodes", "ADDED", node(DiskPressure="False"), at(0), RULES) == []
    out = step(s, "nodes", "MODIFIED", node(Ready="Unknown", KernelDeadlock="True"), at(1), RULES)
    assert sorted(names(out)) == [("node-kernel-deadlock", "firing"), ("node-not-ready", "firing")]
    assert {a.labels["node"] for a in out} == {"n1"}
    assert next(a for a in out if a.name == "node-not-ready").severity == "critical"
    out = step(
        s, "nodes", "MODIFIED", node(KernelDeadlock="False", PIDPressure="True"), at(2), RULES
    )
    assert sorted(names(out)) == [
        ("node-kernel-deadlock", "resolved"),
        ("node-not-ready", "resolved"),
        ("node-pid-pressure", "firing"),
    ]
    # The node vanished while we were not watching: the re-list resolves what it had.
    assert names(sync(s, "nodes", [], at(3), RULES)) == [("node-pid-pressure", "resolved")]


def test_events_fire_once_per_version_and_only_for_configured_warnings() -> None:
    s = KubeState()
    step(s, "pods", "ADDED", pod(), at(0), RULES)
    ev = {
        "metadata": {"uid": "u1", "resourceVersion": "7", "namespace": "shop"},
        "type": "Warning",
        "reason": "BackOff",
        "message": "Back-off restarting",
        "involvedObject": {
            "kind": "Pod",
            "name": "cart-6d4f9-x2x4z",
            "namespace": "shop",
            "fieldPath": "spec.containers{app}",
        },
        "count": 4,
    }
    [a] = step(s, "events", "ADDED", ev, at(1), RULES)
    assert (a.name, a.value, a.labels["service"], a.labels["container"]) == (
        "k8s-back-off",
        4.0,
        "cart",
        "app",
    )
    assert step(s, "events", "ADDED", ev, at(2), RULES) == []  # replayed: nothing
    assert sync(s, "events", [ev], at(3), RULES) == []  # re-listed: nothing
    assert (
        len(
            step(
                s,
                "events",
                "MODIFIED",
                {**ev, "metadata": {**ev["metadata"], "resourceVersion": "8"}},
                at(4),
                RULES,
            )
        )
        == 1
    )
    normal = {**ev, "type": "Normal", "metadata": {"uid": "u2", "resourceVersion": "9"}}
    assert step(s, "events", "ADDED", normal, at(5), RULES) == []


# --- the list/watch loop -----------------------------------------------------------------------


class Resp:
    def __init__(
        self, lines: list[dict[str, Any]] | None = None, data: Any = None, status: int = 200
    ) -> None:
        self.lines, self.status = lines or [], status
        self.data = orjson.dumps(data) if data is not None else b""

    done: threading.Event | None = None

    def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
        for line in self.lines:
            yield orjson.dumps(line) + b"\n"
        if self.done is not None:
            self.done.set()  # the agent stops after this watch

    def release_conn(self) -> None:
        pass


def test_watch_resumes_from_the_last_version_and_relists_on_410() -> None:
    stopping = threading.Event()
    calls: list[dict[str, Any]] = []
    obj = lambda name, rv: {"metadata": {"name": name, "resourceVersion": rv}}  # noqa: E731
    script = [
        Resp(data={"metadata": {"resourceVersion": "10"}, "items": [obj("a", "9")]}),
        Resp(
            [
                {"type": "ADDED", "object": obj("b", "11")},
                {"type": "BOOKMARK", "object": obj("", "12")},
            ]
        ),  # then the server times out
        Resp([{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}]),
        Resp(
            data={"metadata": {"resourceVersion": "20"}, "items": [obj("a", "9"), obj("b", "11")]}
        ),
        Resp(status=410, data={"kind": "Status", "code": 410}),  # 410 as an HTTP status too
        Resp(data={"metadata": {"resourceVersion": "30"}, "items": []}),
        Resp([{"type": "DELETED", "object": obj("b", "31")}]),
    ]

    script[-1].done = stopping

    def list_fn(**kwargs: Any) -> Resp:
        calls.append(kwargs)
        return script[len(calls) - 1]

    emitted: list[tuple[str, str, Any]] = []
    w = ResourceWatch("pods", list_fn, timeout=5, emit=emitted.append, stopping=stopping)
    w.run()
    assert [(k, len(p) if k == "SYNC" else p["metadata"]["name"]) for _, k, p in emitted] == [
        ("SYNC", 1),
        ("ADDED", "b"),
        ("SYNC", 2),
        ("SYNC", 0),
        ("DELETED", "b"),
    ]
    watches = [c.get("resource_version") for c in calls if c.get("watch")]
    assert watches == ["10", "12", "20", "30"]  # resumed after the bookmark, re-listed on 410
    assert all(
        c["allow_watch_bookmarks"] and c["timeout_seconds"] == 5 for c in calls if c.get("watch")
    )
    assert dict(w.stats) == {"lists": 3, "pages": 3, "watches": 4, "gone": 2}


def test_a_malformed_reply_or_event_is_retried_naming_the_field_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A KeyError or AttributeError ended the watch thread: the detector died for a reply
    # a proxy or a broken API server garbled. Each is a retried error naming the field.
    stopping = threading.Event()
    obj = {"metadata": {"name": "a", "resourceVersion": "11"}}
    script = [
        Resp(data={"items": []}),  # no metadata
        Resp(data=[1]),
        Resp(data={"metadata": {"resourceVersion": "10"}, "items": {"a": 1}}),
        Resp(data={"metadata": {"resourceVersion": "10"}, "items": []}),
        Resp([[1]]),  # type: ignore[list-item]  # a line that is no object
        Resp([{"type": "ADDED", "object": [1]}]),
        Resp([{"type": "ADDED", "object": {"metadata": "x"}}]),
        Resp([{"type": "ADDED", "object": obj}]),
    ]
    script[-1].done = stopping
    calls: list[dict[str, Any]] = []

    def list_fn(**kwargs: Any) -> Resp:
        calls.append(kwargs)
        return script[len(calls) - 1]

    emitted: list[tuple[str, str, Any]] = []
    w = ResourceWatch("pods", list_fn, timeout=5, emit=emitted.append, stopping=stopping)
    w.stopping.wait = lambda _: False  # type: ignore[method-assign]  # no backoff in a test
    with caplog.at_level(logging.WARNING, logger="agent.kube_watch"):
        w.run()
    assert [k for _, k, _ in emitted] == ["SYNC", "ADDED"]
    assert w.stats["errors"] == 6
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for named in (
        "metadata: expected an object, got NoneType",
        "list reply: expected an object, got list",
        "items: expected a list, got dict",
        "watch event: expected an object, got list",
        "watch event ADDED: object: expected an object",
        "watch event ADDED: object.metadata: expected an object",
    ):
        assert named in logged
