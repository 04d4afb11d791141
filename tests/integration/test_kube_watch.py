"""The Kubernetes watcher against the real local control plane (scripts/k8s.sh): a
crash-looping pod, an OOM event and a node going NotReady each produce the right anomaly;
watches that end, drop or resume from an older version miss nothing and repeat nothing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from agent.kube_watch import KubeWatcher, ResourceWatch
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.settings import parse_settings
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)

    def find(self, name: str, status: str = "firing", **labels: str) -> list[Anomaly]:
        return [
            a
            for a in self.items
            if a.name == name
            and a.status == status
            and all(a.labels.get(k) == v for k, v in labels.items())
        ]


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest) -> str:
    """The local control plane (``k8s_cluster``), or ``SRE_TEST_KUBECONFIG`` if set (a
    control plane of one's own while iterating, e.g. ``SRE_STATE_DIR=.state/mine
    SRE_K8S_APISERVER_PORT=46443 SRE_ETCD_PORT=42379 scripts/k8s.sh up``)."""
    override = os.environ.get("SRE_TEST_KUBECONFIG")
    if override:
        return override
    return str(request.getfixturevalue("k8s_cluster").kubeconfig)


@contextlib.asynccontextmanager
async def watching(
    kubeconfig: str,
    rec: Any,
    *,
    tick_interval: float = 5.0,
    queue_bound: int = 10_000,
    correlation: dict[str, Any] | None = None,
    **kube: Any,
) -> AsyncIterator[tuple[KubeWatcher, Any, str]]:
    """A started watcher publishing to ``rec``, a client and a namespace of its own."""
    settings = parse_settings(
        {
            "agent": {"cluster": "kind"},
            "correlation": correlation or {},
            "detectors": {
                "kubernetes": {
                    "enabled": True,
                    "kubeconfig": kubeconfig,
                    "watch_timeout": "2s",  # every watch ends quickly and must resume
                    "restart_threshold": 3,
                    **kube,
                }
            },
        },
        env={},
    )
    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    ns = f"test-{uuid.uuid4().hex[:10]}"
    await call(core.create_namespace, {"metadata": {"name": ns}})
    watcher = KubeWatcher(
        settings,
        publish=rec,
        topic="t",
        metrics=Metrics(),
        api=api,
        tick_interval=tick_interval,
        queue_bound=queue_bound,
    )
    await watcher.start()
    try:
        await asyncio.wait_for(watcher.synced.wait(), 30)
        yield watcher, core, ns
    finally:
        await watcher.stop()
        await call(core.delete_namespace, ns)
        api.close()


@pytest.fixture
async def watched(kubeconfig: str) -> AsyncIterator[tuple[KubeWatcher, Recorder, Any, str]]:
    rec = Recorder()
    async with watching(kubeconfig, rec) as (watcher, core, ns):
        yield watcher, rec, core, ns


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kwargs)


def container_status(restarts: int, waiting: str | None) -> dict[str, Any]:
    state: dict[str, Any] = (
        {"waiting": {"reason": waiting, "message": "back-off 40s restarting failed container"}}
        if waiting
        else {"running": {"startedAt": datetime.now(UTC).isoformat()}}
    )
    return {
        "name": "app",
        "ready": waiting is None,
        "restartCount": restarts,
        "image": "example/app:1",
        "imageID": "",
        "state": state,
    }


async def bare_pod(core: Any, ns: str, app: str) -> str:
    """A pod of ``app`` that nothing schedules or runs: no scheduler and no kwok node, so
    its status is the test's to write. Returns its name."""
    pod = f"{app}-{uuid.uuid4().hex[:6]}"
    body = {
        "metadata": {"name": pod, "labels": {"app": app}},
        "spec": {
            "schedulerName": "none",
            "containers": [{"name": "app", "image": "example/app:1"}],
        },
    }
    await call(core.create_namespaced_pod, ns, body)
    return pod


async def set_status(core: Any, ns: str, pod: str, restarts: int, waiting: str | None) -> None:
    patch = {
        "status": {"phase": "Running", "containerStatuses": [container_status(restarts, waiting)]}
    }
    await call(core.patch_namespaced_pod_status, pod, ns, patch)


async def test_crash_looping_pod(
    watched: tuple[KubeWatcher, Recorder, Any, str],
) -> None:
    _, rec, core, ns = watched
    pod = await bare_pod(core, ns, "cart")

    async def status(restarts: int, waiting: str | None) -> None:
        await set_status(core, ns, pod, restarts, waiting)

    for n in (1, 2, 3):
        await status(n, "CrashLoopBackOff")
    await eventually(lambda: rec.find("crash-looping", pod=pod), 20, what="crash-looping")
    await eventually(lambda: rec.find("pod-restarting", pod=pod), 20, what="pod-restarting")
    [crash] = rec.find("crash-looping", pod=pod)  # once, though the pod changed 3 times
    assert crash.source == "kubernetes" and crash.severity == "critical"
    assert (crash.labels["namespace"], crash.labels["container"]) == (ns, "app")
    assert crash.labels["service"] == "cart" and crash.labels["cluster"] == "kind"
    assert rec.find("pod-restarting", pod=pod)[0].value == 3
    await status(3, None)
    await eventually(lambda: rec.find("crash-looping", "resolved", pod=pod), 20, what="resolved")
    assert rec.find("crash-looping", "resolved", pod=pod)[0].fingerprint == crash.fingerprint
    await call(core.delete_namespaced_pod, pod, ns, grace_period_seconds=0)
    await eventually(lambda: rec.find("pod-restarting", "resolved", pod=pod), 20, what="gone")


async def test_oom_event_and_node_not_ready(
    watched: tuple[KubeWatcher, Recorder, Any, str],
) -> None:
    _, rec, core, _ = watched
    node = f"h5-node-{uuid.uuid4().hex[:6]}"
    await call(core.create_node, {"metadata": {"name": node}})
    try:
        now = datetime.now(UTC).isoformat()
        event = {
            "metadata": {"name": f"{node}.oom"},
            "involvedObject": {"kind": "Node", "name": node},
            "reason": "OOMKilling",
            "type": "Warning",
            "message": "Out of memory: Killed process 4242 (java)",
            "source": {"component": "kernel-monitor", "host": node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        # Node events live in "default", like the kubelet's and node-problem-detector's.
        await call(core.create_namespaced_event, "default", event)
        await eventually(lambda: rec.find("k8s-oom-killing", node=node), 20, what="oom")
        [oom] = rec.find("k8s-oom-killing", node=node)
        assert oom.severity == "critical" and "Killed process 4242" in oom.annotations["message"]

        def condition(ready: str, **extra: str) -> dict[str, Any]:
            conds = [
                {
                    "type": "Ready",
                    "status": ready,
                    "reason": "KubeletNotReady",
                    "message": "container runtime is down",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ]
            conds += [
                {
                    "type": t,
                    "status": s,
                    "reason": t,
                    "message": "",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s in extra.items()
            ]
            return {"status": {"conditions": conds}}

        await call(core.patch_node_status, node, condition("True", KernelDeadlock="False"))
        await call(core.patch_node_status, node, condition("False", KernelDeadlock="True"))
        await eventually(lambda: rec.find("node-not-ready", node=node), 20, what="not ready")
        await eventually(lambda: rec.find("node-kernel-deadlock", node=node), 20, what="npd")
        await call(core.patch_node_status, node, condition("True", KernelDeadlock="False"))
        await eventually(
            lambda: (
                rec.find("node-not-ready", "resolved", node=node)
                and rec.find("node-kernel-deadlock", "resolved", node=node)
            ),
            20,
            what="node recovered",
        )
        assert len(rec.find("node-not-ready", node=node)) == 1
    finally:
        await call(core.delete_node, node)
        with contextlib.suppress(ApiException):
            await call(core.delete_namespaced_event, f"{node}.oom", "default")


async def test_dropped_and_replayed_watches_resume_without_loss_or_duplicates(
    watched: tuple[KubeWatcher, Recorder, Any, str],
) -> None:
    watcher, rec, core, k8s_namespace = watched
    events = watcher.watches["events"]
    before = dict(events.stats)
    names = [f"pod-{i}-{uuid.uuid4().hex[:4]}" for i in range(24)]
    replay_from = None
    for i, name in enumerate(names):
        now = datetime.now(UTC).isoformat()
        body = {
            "metadata": {"name": f"{name}.backoff"},
            "involvedObject": {"kind": "Pod", "name": name, "namespace": k8s_namespace},
            "reason": "BackOff",
            "type": "Warning",
            "message": "Back-off restarting failed container",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await call(core.create_namespaced_event, k8s_namespace, body)
        if i % 6 == 2:
            events.stop()  # the connection drops mid-watch: resume from the last version
        if i == 0:
            replay_from = events.resource_version
        if i == 15:
            # Resume from an older version: the server replays what was already handled.
            events.resource_version = replay_from
            events.stop()
        await asyncio.sleep(0.15)

    def backoffs() -> list[Anomaly]:
        return [a for a in rec.find("k8s-back-off", namespace=k8s_namespace)]

    await eventually(lambda: len(backoffs()) >= len(names), 30, what="every event")
    await asyncio.sleep(3)  # a resumed or re-listed watch must not replay any of them
    got = sorted(a.labels["pod"] for a in backoffs())
    assert got == sorted(names)
    stats = events.stats
    assert stats["watches"] - before.get("watches", 0) >= 4, stats
    assert stats["errors"] - before.get("errors", 0) >= 2, stats  # the dropped connections


def compact_etcd(port: int) -> None:
    """Compact etcd up to its current revision through its JSON gateway, as the API
    server does every few minutes: older resource versions are then gone for good."""

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    revision = post("/v3/kv/range", {"key": "AA=="})["header"]["revision"]
    post("/v3/kv/compaction", {"revision": revision, "physical": True})


async def test_a_real_410_gone_relists_without_loss_or_duplicates(
    watched: tuple[KubeWatcher, Recorder, Any, str], k8s_cluster: Any
) -> None:
    """After etcd is compacted, resuming from an older resource version ("1") gets a real
    410 Gone from the API server; the watcher re-lists and goes on."""
    from tests.fixtures.k8s import TEST_ETCD_PORT

    watcher, rec, core, ns = watched
    events = watcher.watches["events"]

    async def backoff(pod: str) -> None:
        now = datetime.now(UTC).isoformat()
        await call(
            core.create_namespaced_event,
            ns,
            {
                "metadata": {"name": f"{pod}.backoff"},
                "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
                "reason": "BackOff",
                "type": "Warning",
                "message": "Back-off restarting",
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
        )

    def seen(pod: str) -> int:
        return len(rec.find("k8s-back-off", namespace=ns, pod=pod))

    await backoff("before-gone")
    await eventually(lambda: seen("before-gone") == 1, 30, what="the first event")
    before = dict(events.stats)
    await asyncio.to_thread(compact_etcd, TEST_ETCD_PORT)
    events.stop()  # drop the connection; the thread backs off 0.5 s before resuming
    events.resource_version = "1"  # ... from here (set after the drop: no race with it)
    await eventually(lambda: events.stats["gone"] > before.get("gone", 0), 30, what="410 Gone")
    await eventually(lambda: events.stats["lists"] > before.get("lists", 0), 30, what="re-list")
    await backoff("after-gone")
    await eventually(lambda: seen("after-gone") == 1, 30, what="an event after the re-list")
    await asyncio.sleep(2)
    assert seen("before-gone") == 1, "the re-list must not publish a handled event again"


async def test_a_list_goes_in_pages_from_one_snapshot(
    watched: tuple[KubeWatcher, Recorder, Any, str],
) -> None:
    """limit/continue against the real API server: five pods in pages of two are one
    SYNC of five, and the watch resumes from the snapshot's resourceVersion."""
    _watcher, _rec, core, ns = watched
    for i in range(5):
        pod = {
            "metadata": {"name": f"paged-{i}"},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        }
        await call(core.create_namespaced_pod, ns, pod)
    emitted: list[tuple[str, str, Any]] = []
    w = ResourceWatch(
        "pods",
        functools.partial(core.list_namespaced_pod, ns),
        timeout=5,
        emit=emitted.append,
        stopping=threading.Event(),
        page_size=2,
    )
    await asyncio.to_thread(w._list)
    ((_, kind, items),) = emitted
    assert kind == "SYNC" and sorted(p["metadata"]["name"] for p in items) == [
        f"paged-{i}" for i in range(5)
    ]
    assert w.stats["pages"] == 3 and w.stats["lists"] == 1
    assert w.resource_version is not None and int(w.resource_version) > 0


async def test_a_dead_processing_loop_is_reported(
    watched: tuple[KubeWatcher, Recorder, Any, str],
) -> None:
    """A bug while handling a watch event used to end the processing task silently: the
    watcher went on watching and published nothing again. Now it reports the failure, and
    the agent stops to be restarted."""
    watcher, _, core, ns = watched
    assert watcher.failure is None

    class Broken:
        async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
            raise TypeError("injected: a bug in the publishing path")

    watcher.publisher = Broken()
    now = datetime.now(UTC).isoformat()
    event = {
        "metadata": {"name": f"app-{uuid.uuid4().hex[:6]}.oom"},
        "involvedObject": {"kind": "Pod", "name": "app-0", "namespace": ns},
        "reason": "OOMKilling",
        "type": "Warning",
        "message": "Out of memory: Killed process 4242 (java)",
        "source": {"component": "kernel-monitor"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    await call(core.create_namespaced_event, ns, event)
    await eventually(lambda: watcher.failure is not None, 30, what="the failure reported")
    assert isinstance(watcher.failure, TypeError)


async def test_the_restart_window_empties_while_the_watch_is_busy(kubeconfig: str) -> None:
    """``pod-restarting`` resolves once the restart window no longer holds the threshold,
    checked on a tick. The tick used to run only after ``tick_interval`` without a watch
    event, so in a cluster whose watch never went quiet that long it never resolved."""
    rec = Recorder()
    async with watching(kubeconfig, rec, tick_interval=0.5, restart_window="3s") as (
        _,
        core,
        ns,
    ):
        pod = await bare_pod(core, ns, "cart")
        noisy = await bare_pod(core, ns, "noise")
        for n in (1, 2, 3):
            await set_status(core, ns, pod, n, None)
        await eventually(lambda: rec.find("pod-restarting", pod=pod), 20, what="pod-restarting")
        fired = asyncio.get_running_loop().time()

        async def busy() -> None:
            # A watch event every 0.1 s, for another pod: nothing of the restarting pod
            # changes, and the watch is never quiet for a tick_interval.
            for n in itertools.count():
                await call(
                    core.patch_namespaced_pod,
                    noisy,
                    ns,
                    {"metadata": {"annotations": {"beat": str(n)}}},
                )
                await asyncio.sleep(0.1)

        traffic = asyncio.create_task(busy())
        try:
            await eventually(
                lambda: rec.find("pod-restarting", "resolved", pod=pod),
                20,
                what="pod-restarting resolved while the watch was busy",
            )
            assert not traffic.done()  # the watch was busy all along
        finally:
            traffic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traffic
        # Not before its window emptied (3 s after the last restart).
        assert asyncio.get_running_loop().time() - fired >= 2.0


def oom_event(ns: str, pod: str, n: int) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "metadata": {"name": f"{pod}.oom"},
        "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
        "reason": "OOMKilling",
        "type": "Warning",
        "message": f"Out of memory: Killed process {n}",
        "source": {"component": "kernel-monitor"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


async def test_a_stalled_publisher_holds_the_watch_at_the_queue_bound(kubeconfig: str) -> None:
    """While Kafka does not take what the watcher publishes, its queue of watch events
    stops at the bound and the watch threads wait; it grew with every event before, until
    the process ran out of memory. Once publishing resumes, every anomaly goes out once,
    in order."""

    class Gated(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.gate.set()

        async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
            await self.gate.wait()
            await super().publish_many(items)

    rec = Gated()
    async with watching(kubeconfig, rec, queue_bound=5) as (watcher, core, ns):
        rec.gate.clear()  # Kafka is down from here on
        pods = [f"app-{n:03d}" for n in range(30)]
        backlog = 0
        for n, pod in enumerate(pods):
            await call(core.create_namespaced_event, ns, oom_event(ns, pod, n))
            backlog = max(backlog, watcher.backlog)
        await asyncio.sleep(1)  # what the watch delivers late lands in the queue, or waits
        backlog = max(backlog, watcher.backlog)
        assert backlog == 5, backlog  # reached, and never passed
        assert len(rec.find("k8s-oom-killing", namespace=ns)) == 0
        rec.gate.set()
        await eventually(
            lambda: len(rec.find("k8s-oom-killing", namespace=ns)) == len(pods),
            30,
            what="every event's anomaly",
        )
        assert [a.labels["pod"] for a in rec.find("k8s-oom-killing", namespace=ns)] == pods


async def test_a_burst_of_watch_events_goes_out_in_few_publishes(kubeconfig: str) -> None:
    """What queues up while one batch is being published goes out as the next batch, in
    the order it came: a storm of pod transitions used to cost one publish (one Kafka round
    trip) per event."""

    class Slow(Recorder):
        """A publish takes 0.2 s, as a round trip to a busy broker can."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
            self.calls += 1
            await asyncio.sleep(0.2)
            await super().publish_many(items)

    rec = Slow()
    async with watching(kubeconfig, rec) as (_, core, ns):
        calls_before = rec.calls
        pods = [f"app-{n:03d}" for n in range(60)]
        for n, pod in enumerate(pods):
            await call(core.create_namespaced_event, ns, oom_event(ns, pod, n))
        await eventually(
            lambda: len(rec.find("k8s-oom-killing", namespace=ns)) == len(pods),
            30,
            what="every event's anomaly",
        )
        got = [a.labels["pod"] for a in rec.find("k8s-oom-killing", namespace=ns)]
        assert got == pods  # each once, in the order the events were made
        # One publish per event before; creating 60 events here takes about a second.
        assert rec.calls - calls_before <= 15, rec.calls - calls_before


async def test_a_lasting_crash_loop_is_announced_again(kubeconfig: str) -> None:
    """A pod that keeps crash looping is announced again every third of the correlator's
    resolve_timeout, so its incident is not resolved as quiet while it still fails. It
    used to be announced once."""
    rec = Recorder()
    async with watching(
        kubeconfig, rec, tick_interval=0.2, correlation={"resolve_timeout": "3s"}
    ) as (_, core, ns):
        pod = await bare_pod(core, ns, "cart")
        await set_status(core, ns, pod, 1, "CrashLoopBackOff")
        await eventually(
            lambda: len(rec.find("crash-looping", pod=pod)) >= 3, 20, what="announced 3 times"
        )
        said = rec.find("crash-looping", pod=pod)
        assert len({a.fingerprint for a in said}) == 1
        assert len({a.starts_at for a in said}) == 1  # one fault, observed again
        gaps = [
            (b.observed_at - a.observed_at).total_seconds() for a, b in itertools.pairwise(said)
        ]
        assert all(0.9 <= g <= 2.5 for g in gaps), gaps  # every 1 s (3 s / 3), by the tick
        await set_status(core, ns, pod, 1, None)
        await eventually(
            lambda: rec.find("crash-looping", "resolved", pod=pod), 20, what="resolved"
        )
