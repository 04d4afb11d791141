"""The action layer against the real control plane (scripts/k8s.sh), acting as the agent's
least-privilege ServiceAccount (deploy/rbac.yaml's executor ClusterRole, a TokenRequest
token).

Every action type executes through the executor and the Kubernetes adapter and is
verified; undo restores the prior state; a drain stops at a PodDisruptionBudget and names
it; an action outside the role fails with the API server's reason; a SIGKILLed executor
does not act twice after restart but records what it did; and an approval sent with kcat (a
non-Python Kafka client) is honoured after an executor restart, while forged decisions are
refused with reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from agent.analysis_stage import action_requests
from agent.analyzer import analyze, recent_rollout
from agent.context import ContextGatherer, rollouts_of
from agent.errors import ActionFailed
from agent.lab_kube import KubeLab, lab_nodes
from agent.metrics import Metrics
from agent.models import (
    ActionRequest,
    ActionResult,
    ApprovalRequest,
    DeadLetter,
    Member,
    Target,
    fingerprint,
    utcnow,
)
from agent.runtime import Agent
from agent.settings import Settings
from handlers.cluster import (
    ACTION_IDS_ANNOTATION,
    EVICTED_PODS_ANNOTATION,
    PartialFailure,
    evicted_uid,
    remember_eviction,
    remembered_ids,
    rolled_back_from,
)
from handlers.executor import Executor, undo_request
from handlers.kube import KubeCluster
from streams.bus import Bus, create_topics
from tests.fakes.incidents import incident as fake_incident
from tests.fakes.publisher import MemoryBus
from tests.fixtures.k8s import K8sCluster, role_kubeconfig
from tests.helpers import eventually, make_settings, readers

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

REPO = Path(__file__).resolve().parents[2]
REMEDIATION = {
    "require_approval": ["update_config"],
    "confidence_threshold": 0.5,
    "cooldown": 0,
    "verify_after": "5s",
    "max_nodes_cordoned": 1,
}


# --- the executor's identity: deploy/rbac.yaml's role, bound to a fresh ServiceAccount -----


@pytest.fixture(scope="module")
def agent_kubeconfig(
    k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with role_kubeconfig(k8s_cluster, "sre-agent-executor", tmp_path_factory.mktemp("rbac")) as p:
        yield p


@pytest.fixture(scope="module")
def analyzer_kubeconfig(
    k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with role_kubeconfig(k8s_cluster, "sre-agent-analyzer", tmp_path_factory.mktemp("rbac")) as p:
        yield p


@pytest.fixture
async def kube(agent_kubeconfig: Path) -> AsyncIterator[KubeCluster]:
    async with KubeCluster(kubeconfig=str(agent_kubeconfig), poll_interval=0.3) as c:
        yield c


@pytest.fixture
async def admin(k8s_cluster: K8sCluster) -> AsyncIterator[KubeCluster]:
    """The cluster admin, for setting the scene (never used to act)."""
    async with KubeCluster(kubeconfig=str(k8s_cluster.kubeconfig)) as c:
        yield c


@pytest.fixture
async def own_nodes(admin: KubeCluster) -> AsyncIterator[tuple[str, str]]:
    """Two nodes of the test's own (kwok runs them), deleted after. A drain must not use
    the session's fixed kwok-node-*: other tests' pods sit there (their namespaces are
    deleted in the background), and it would evict those too, or wait for them."""
    bodies = lab_nodes(uuid.uuid4().hex[:6], 2)
    try:
        for body in bodies:
            await admin.call("POST", "/api/v1/nodes", what="Node", body=body)
        yield bodies[0]["metadata"]["name"], bodies[1]["metadata"]["name"]
    finally:
        for body in bodies:
            with contextlib.suppress(ActionFailed):
                await admin.call("DELETE", f"/api/v1/nodes/{body['metadata']['name']}", what="n")


# --- scene helpers -----------------------------------------------------------------------------


def deployment(name: str, replicas: int, image: str = "registry.invalid/app:v1") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            # kwok is slow to move pods: surge everything at once, never go below.
            "strategy": {"rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "app", "image": image}],
                },
            },
        },
    }


def statefulset_doc(name: str, replicas: int) -> dict[str, Any]:
    sts = deployment(name, replicas)
    sts["kind"] = "StatefulSet"
    del sts["spec"]["strategy"]
    sts["spec"]["serviceName"] = name
    sts["spec"]["podManagementPolicy"] = "Parallel"  # kwok is slow: start pods at once
    return sts


def hpa_of(deployment: str, lo: int, hi: int) -> dict[str, Any]:
    """An HPA owning ``deployment``'s count, named after it, within ``lo``..``hi``."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": deployment},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": lo,
            "maxReplicas": hi,
        },
    }


async def create(admin: KubeCluster, namespace: str, path: str, body: dict[str, Any]) -> None:
    await admin.call("POST", f"{path.format(ns=namespace)}", body=body, what=path)


DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"
PDBS = "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"


async def ready_deployment(
    admin: KubeCluster, namespace: str, name: str, replicas: int, **spec: Any
) -> Target:
    body = deployment(name, replicas)
    body["spec"]["template"]["spec"].update(spec)
    await create(admin, namespace, DEPLOYMENTS, body)
    target = Target(kind="Deployment", namespace=namespace, name=name)
    await settled(admin, target)
    return target


async def settled(admin: KubeCluster, target: Target, timeout: float = 60) -> None:
    async def probe() -> bool:
        o = await admin.observe(target)
        return o.settled and o.ready == o.desired

    await eventually(probe, timeout, 0.3, f"{target.key} rolled out")


async def read(admin: KubeCluster, target: Target) -> dict[str, Any]:
    return await admin.call("GET", _path(target), what=target.key)


def _path(t: Target) -> str:
    from handlers.kube import _path as path

    return path(t)


async def pods_of(admin: KubeCluster, namespace: str, app: str) -> list[dict[str, Any]]:
    doc = await admin.call(
        "GET",
        f"/api/v1/namespaces/{namespace}/pods",
        what="pods",
        query=[("labelSelector", f"app={app}")],
    )
    return [p for p in doc["items"] if not p["metadata"].get("deletionTimestamp")]


async def budget(
    admin: KubeCluster, namespace: str, app: str, min_available: int, pods: int
) -> None:
    await create(
        admin,
        namespace,
        PDBS,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": app},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}},
        },
    )

    async def observed() -> bool:
        pdb = await admin.call("GET", f"{PDBS.format(ns=namespace)}/{app}", what="pdb")
        status = pdb.get("status") or {}
        return bool(
            status.get("observedGeneration") == pdb["metadata"]["generation"]
            and status.get("currentHealthy") == pods
            and status.get("disruptionsAllowed") == pods - min_available
        )

    await eventually(observed, 60, 0.3, f"PDB {app} observed")


def executor(kube: KubeCluster, bus: MemoryBus, **remediation: Any) -> Executor:
    settings = make_settings(
        "127.0.0.1:1", "x.", doc={"remediation": {**REMEDIATION, **remediation}}
    )
    return Executor(settings, bus=bus, cluster=kube, metrics=Metrics())


def request(type_: str, target: Target, **params: Any) -> ActionRequest:
    return ActionRequest(
        id=f"{type_}-{uuid.uuid4().hex[:8]}",
        incident_id="inc-1",
        incident_key=f"test/{target.namespace}/{target.name}",
        analysis_id="an-1",
        type=type_,  # type: ignore[arg-type]
        target=target,
        confidence=0.95,
        reason="test",
        requested_at=utcnow(),
        params=params,
        labels={"namespace": target.namespace, "service": target.name},
    )


async def verified(bus: MemoryBus, action: ActionRequest, timeout: float = 60) -> ActionResult:
    """The verification: the second "succeeded" result of the action."""

    def done(b: MemoryBus) -> bool:
        return len([r for r in b.results(action.id) if r.status == "succeeded"]) >= 2

    await bus.wait_for(done, timeout, f"verification of {action.type}")
    return [r for r in bus.results(action.id) if r.status == "succeeded"][-1]


# --- every action type -------------------------------------------------------------------------


async def test_workload_actions_execute_verify_and_undo(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    roll, scale, restart = await asyncio.gather(
        ready_deployment(admin, ns, "roll", 2),
        ready_deployment(admin, ns, "scale", 2),
        ready_deployment(admin, ns, "restart", 2),
    )
    image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:v2"}]}}}}
    await admin.call(
        "PATCH", _path(roll), body=image, what="v2", content_type="application/merge-patch+json"
    )
    await settled(admin, roll)
    before = {
        t.name: (await read(admin, t))["metadata"]["generation"] for t in (roll, scale, restart)
    }

    bus = MemoryBus()
    ex = executor(kube, bus)
    actions = [
        request("rollback", roll),
        request("scale_up", scale, replicas="+1"),
        request("restart_workload", restart),
    ]
    try:
        results = await asyncio.gather(*(ex.on_action(a) for a in actions))
        assert [r.status for r in results] == ["succeeded"] * 3, [r.message for r in results]
        assert "to the template of revision 1 (registry.invalid/app:v1)" in results[0].message
        assert results[0].prior_state == {"revision": 2, "image": "app:v2"}
        assert results[1].prior_state == {"replicas": 2}
        # Redelivered: acknowledged without acting again.
        again = await asyncio.gather(*(ex.on_action(a) for a in actions))
        assert [r.status for r in again] == ["duplicate"] * 3
        for t, a in zip((roll, scale, restart), actions, strict=True):
            obj = await read(admin, t)
            assert obj["metadata"]["generation"] == before[t.name] + 1, t.key
            assert remembered_ids(obj["metadata"]["annotations"]) == (a.id,)
        outcomes = [await verified(bus, a) for a in actions]
        assert [r.outcome for r in outcomes] == ["healed"] * 3, [r.message for r in outcomes]
        assert "3/3 replicas ready, rollout finished" in outcomes[1].message

        roll_obj = await read(admin, roll)
        assert roll_obj["spec"]["template"]["spec"]["containers"][0]["image"] == (
            "registry.invalid/app:v1"
        )
        assert "pod-template-hash" not in roll_obj["spec"]["template"]["metadata"]["labels"]
        restarted = await read(admin, restart)
        assert (
            "kubectl.kubernetes.io/restartedAt"
            in restarted["spec"]["template"]["metadata"]["annotations"]
        )

        undos = [undo_request(r, requested_by="bob", now=utcnow()) for r in results[:2]]
        done = await asyncio.gather(*(ex.on_action(u) for u in undos))
        assert [r.status for r in done] == ["succeeded"] * 2, [r.message for r in done]
        assert (await read(admin, scale))["spec"]["replicas"] == 2
        image_now = (await read(admin, roll))["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image_now == "app:v2"
        await settled(admin, roll)
        revision = (await kube.workload(roll)).revision
        assert revision == 4  # v1 (rev 1 -> 3), then v2 again (rev 2 -> 4), like kubectl
    finally:
        await ex.stop()


async def test_a_restart_whose_new_pods_crash_again_is_not_healed(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The kubelet restarting a new pod's container (as it does in a crash loop) is read
    through the agent's role from the pods' status: verification says not_healed though
    every replica is ready at that instant."""
    ns = k8s_namespace
    target = await ready_deployment(admin, ns, "crashy", 2)
    ex = executor(kube, MemoryBus(), verify_after="1h")
    try:
        a = request("restart_workload", target)
        assert (await ex.on_action(a)).status == "succeeded"
        await settled(admin, target)
        assert (await ex.verify_now(a))[0] == "healed"
        pod = (await pods_of(admin, ns, "crashy"))[0]
        statuses = pod["status"]["containerStatuses"]
        statuses[0]["restartCount"] = 2
        await admin.call(
            "PATCH",
            f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status",
            body={"status": {"containerStatuses": statuses}},
            what="pod status",
            content_type="application/merge-patch+json",
        )
        assert (await kube.observe(target)).restarts == 2
        outcome, why = await ex.verify_now(a)
        assert outcome == "not_healed", why
        assert why.startswith("containers restarted 2 times since the action"), why
    finally:
        await ex.stop()


async def test_scale_under_an_hpa_moves_its_bounds(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 2)
    await create(
        admin,
        ns,
        "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
        hpa_of("web", 1, 3),
    )
    bus = MemoryBus()
    ex = executor(kube, bus)
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/web"
    try:
        a = request("scale_up", web, replicas="+2")
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "autoscaled by HPA web: moved its bounds 1..3 -> 4..4" in r.message
        hpa = await admin.call("GET", hpa_path, what="hpa")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (4, 4)
        assert a.id in remembered_ids(hpa["metadata"]["annotations"])
        dep = await read(admin, web)
        assert ACTION_IDS_ANNOTATION not in (dep["metadata"].get("annotations") or {})
        # The autoscaler, not the agent, moves the replicas to its new floor.
        await eventually(
            lambda: _replicas(admin, web, 4), 60, 0.5, "the HPA to scale to its new minimum"
        )
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        hpa = await admin.call("GET", hpa_path, what="hpa")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    finally:
        await ex.stop()


async def test_a_scale_whose_executor_died_before_its_result_is_undone(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    # The crash: the write through the adapter, and no result recorded. The redelivery
    # finds the id and the prior state that write noted, and its undo restores it.
    ns = k8s_namespace
    await create(admin, ns, DEPLOYMENTS, deployment("wal", 2))
    wal = Target(kind="Deployment", namespace=ns, name="wal")
    bus = MemoryBus()
    ex = executor(kube, bus)
    hpa_path = f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/wal"
    try:
        a = request("scale_up", wal, replicas="+1")
        crashed = await kube.scale(wal, action_id=a.id, replicas=3, direction="up")
        assert crashed.applied and crashed.prior_state == {"replicas": 2}
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == {"replicas": 2}
        assert (await read(admin, wal))["spec"]["replicas"] == 3  # not scaled again
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        assert (await read(admin, wal))["spec"]["replicas"] == 2

        # Under an HPA the write, and the note, are the HPA's bounds.
        await create(
            admin,
            ns,
            "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
            hpa_of("wal", 1, 3),
        )
        b = request("scale_up", wal, replicas="+1")
        crashed = await kube.scale(wal, action_id=b.id, replicas=4, direction="up")
        assert crashed.applied and crashed.prior_state["hpa_max_replicas"] == 3
        r = await ex.on_action(b)
        assert r.status == "succeeded", r.message
        assert r.prior_state == crashed.prior_state
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        hpa = await admin.call("GET", hpa_path, what="hpa")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    finally:
        await ex.stop()


async def test_an_absolute_scale_whose_executor_died_is_recorded_not_denied(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    # The crash: the write through the adapter, and no result recorded. Judged again, a
    # scale_up to 4 of the 4 replicas it made is "not up": the redelivery reads its id
    # on the target first, and is recorded as the success it was.
    ns = k8s_namespace
    await create(admin, ns, DEPLOYMENTS, deployment("abs", 2))
    t = Target(kind="Deployment", namespace=ns, name="abs")
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        a = request("scale_up", t, replicas="4")
        assert await kube.applied(t, action_id=a.id, action_type=a.type) is None
        assert (await kube.scale(t, action_id=a.id, replicas=4, direction="up")).applied
        r = await ex.on_action(a)
        assert (r.status, r.prior_state) == ("succeeded", {"replicas": 2}), r.message
        assert (await read(admin, t))["spec"]["replicas"] == 4  # not scaled again
        assert [e for e, _ in bus.on("escalations") if e.reason == "denied"] == []

        # Under an HPA the id, and the note, are on the HPA.
        await create(
            admin,
            ns,
            "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
            hpa_of("abs", 1, 4),
        )
        b = request("scale_up", t, replicas="5")
        assert await kube.applied(t, action_id=b.id, action_type=b.type) is None
        crashed = await kube.scale(t, action_id=b.id, replicas=5, direction="up")
        found = await kube.applied(t, action_id=b.id, action_type=b.type)
        assert found is not None and found.found_id
        assert found.prior_state == crashed.prior_state and found.prior_state["hpa"] == "abs"
    finally:
        await ex.stop()


async def _replicas(admin: KubeCluster, target: Target, n: int) -> bool:
    return bool((await read(admin, target))["spec"]["replicas"] == n)


async def test_restart_pod_evicts_and_budgets_hold(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    await ready_deployment(admin, ns, "api", 2)
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        victim = (await pods_of(admin, ns, "api"))[0]["metadata"]["name"]
        pod = Target(kind="Pod", namespace=ns, name=victim)
        a = request("restart_pod", pod)
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert (await ex.on_action(a)).status == "duplicate"
        assert (await verified(bus, a)).outcome == "healed"
        await settled(admin, Target(kind="Deployment", namespace=ns, name="api"))

        await budget(admin, ns, "api", min_available=2, pods=2)
        other = (await pods_of(admin, ns, "api"))[0]["metadata"]["name"]
        pod = Target(kind="Pod", namespace=ns, name=other)
        denied = await ex.on_action(request("restart_pod", pod))
        assert denied.status == "denied"
        assert f"PodDisruptionBudget {ns}/api allows 0" in denied.message
        # Below the policy, the Eviction API itself refuses, and the adapter says why.
        with pytest.raises(ActionFailed, match=f"blocked by PodDisruptionBudget {ns}/api"):
            await kube.restart_pod(pod, action_id="direct")
    finally:
        await ex.stop()
        with contextlib.suppress(ActionFailed):
            await admin.call("DELETE", f"{PDBS.format(ns=ns)}/api", what="pdb")


async def _absent(admin: KubeCluster, namespace: str, name: str) -> None:
    async def gone() -> bool:
        status, _, _ = await admin._raw("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        return status == 404

    await eventually(gone, 60, 0.3, f"{name} gone")


async def test_a_deployment_pod_restart_redelivered_after_the_pod_is_gone_counts_once(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The id rode on the pod, gone with it: the eviction noted on the Deployment is what
    shows a redelivery that the action acted. A note left by a delivery that died before
    evicting names a pod still there: the redelivery evicts that pod, once."""
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 2)
    first, second = [p["metadata"] for p in (await pods_of(admin, ns, "web"))[:2]]
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        # The crash: the eviction through the adapter, and no result recorded.
        a = request("restart_pod", Target(kind="Pod", namespace=ns, name=first["name"]))
        assert (await kube.restart_pod(a.target, action_id=a.id)).applied
        await _absent(admin, ns, first["name"])
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == {"uid": first["uid"]}
        assert (await ex.on_action(a)).status == "duplicate"  # recorded once
        v = await verified(bus, a)
        assert v.outcome == "healed", v.message

        # The crash between the note and the eviction: the id on the pod, the note on the
        # Deployment naming it, the pod still running.
        b = request("restart_pod", Target(kind="Pod", namespace=ns, name=second["name"]))
        merge = "application/merge-patch+json"
        await admin.call(
            "PATCH",
            _path(b.target),
            body={"metadata": {"annotations": {ACTION_IDS_ANNOTATION: b.id}}},
            what="pod",
            content_type=merge,
        )
        notes = (await read(admin, web))["metadata"]["annotations"]
        noted = remember_eviction(notes, b.id, second["uid"])
        await admin.call(
            "PATCH",
            _path(web),
            body={"metadata": {"annotations": {EVICTED_PODS_ANNOTATION: noted}}},
            what="web",
            content_type=merge,
        )
        r = await ex.on_action(b)
        assert r.status == "succeeded", r.message
        assert "stopped before its result" not in r.message
        assert r.prior_state["uid"] == second["uid"]
        await _absent(admin, ns, second["name"])
        await settled(admin, web)
        running = {p["metadata"]["uid"] for p in await pods_of(admin, ns, "web")}
        again = executor(kube, MemoryBus())  # one that never saw the result
        try:
            found = await again.on_action(b)
        finally:
            await again.stop()
        assert found.status == "succeeded", found.message
        assert found.prior_state == {"uid": second["uid"]}
        assert {p["metadata"]["uid"] for p in await pods_of(admin, ns, "web")} == running
    finally:
        await ex.stop()


async def test_a_pod_restart_redelivered_while_its_pod_still_terminates_counts_once(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """A finalizer holds the evicted pod Terminating: the redelivery found it 'already
    terminating' and was a 'duplicate', though the Deployment's note names this action and
    this very pod. It is this action's eviction: recorded once, and verified."""
    ns = k8s_namespace
    await ready_deployment(admin, ns, "held", 1)
    (name,) = await finalize(admin, ns, "held", hold=True)
    try:
        pod = Target(kind="Pod", namespace=ns, name=name)
        uid = (await read(admin, pod))["metadata"]["uid"]
        bus = MemoryBus()
        ex = executor(kube, bus)
        try:
            # The crash: the eviction through the adapter, and no result recorded.
            a = request("restart_pod", pod)
            assert (await kube.restart_pod(pod, action_id=a.id)).applied
            meta = (await read(admin, pod))["metadata"]
            assert meta["uid"] == uid and meta.get("deletionTimestamp")
            found = await kube.applied(pod, action_id=a.id, action_type="restart_pod")
            assert found is not None and found.prior_state == {"uid": uid}
            r = await ex.on_action(a)
            assert r.status == "succeeded", r.message
            assert "by a delivery that stopped before its result" in r.message
            assert r.prior_state == {"uid": uid}
            assert (await ex.on_action(a)).status == "duplicate"  # recorded once
            v = await verified(bus, a)
            assert v.outcome == "healed", v.message
            # Another action finds someone else's deletion: nothing to do.
            other = await kube.restart_pod(pod, action_id="someone-else")
            assert not other.applied and not other.found_id
            assert "already terminating" in other.message
            assert (
                await kube.applied(pod, action_id="someone-else", action_type="restart_pod") is None
            )
        finally:
            await ex.stop()
    finally:
        await finalize(admin, ns, "held", hold=False)
    await _absent(admin, ns, name)


async def test_a_pod_someone_else_deletes_between_the_note_and_the_eviction_is_not_ours(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The eviction noted on the Deployment, then someone else's deletion ends the pod
    before the eviction arrives (404): it was not this action's restart. The note is taken
    back, the result is 'already gone', and neither a redelivery nor rule 0 counts it as
    this action's eviction."""
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 1)
    (meta,) = [p["metadata"] for p in await pods_of(admin, ns, "web")]
    pod = Target(kind="Pod", namespace=ns, name=meta["name"])
    note = kube._note_eviction

    async def noted_then_deleted(*args: Any, **kwargs: Any) -> None:
        await note(*args, **kwargs)
        if kwargs.get("evicting", True):  # another hand, at once (no grace period)
            await admin.call(
                "DELETE",
                _path(pod),
                what=pod.key,
                query=[("gracePeriodSeconds", "0")],
            )

    kube._note_eviction = noted_then_deleted  # type: ignore[method-assign]
    effect = await kube.restart_pod(pod, action_id="r1")
    assert not effect.applied and not effect.found_id, effect
    assert effect.message == f"{pod.key} is already gone"
    notes = (await read(admin, web))["metadata"].get("annotations") or {}
    assert evicted_uid(notes, "r1") == ""
    assert await kube.applied(pod, action_id="r1", action_type="restart_pod") is None


async def test_a_pod_deleted_outright_after_a_dead_deliverys_note_is_not_its_restart(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """A delivery noted the eviction on the Deployment and died before evicting; then
    someone deleted the pod outright (no eviction: no DisruptionTarget condition), and a
    finalizer keeps it terminating. The redelivery finds the note naming that very pod: it
    is not this action's restart. The note is taken back, so once the pod is gone the
    action is not taken for done either."""
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 1)
    (name,) = await finalize(admin, ns, "web", hold=True)
    pod = Target(kind="Pod", namespace=ns, name=name)
    try:
        uid = (await read(admin, pod))["metadata"]["uid"]
        merge = "application/merge-patch+json"
        await admin.call(  # the dead delivery: the id on the pod, the note on its owner
            "PATCH",
            _path(pod),
            body={"metadata": {"annotations": {ACTION_IDS_ANNOTATION: "r1"}}},
            what="pod",
            content_type=merge,
        )
        notes = (await read(admin, web))["metadata"].get("annotations") or {}
        await admin.call(
            "PATCH",
            _path(web),
            body={
                "metadata": {
                    "annotations": {EVICTED_PODS_ANNOTATION: remember_eviction(notes, "r1", uid)}
                }
            },
            what="web",
            content_type=merge,
        )
        await admin.call("DELETE", _path(pod), what=pod.key)  # someone else's
        assert await kube.applied(pod, action_id="r1", action_type="restart_pod") is None
        again = await kube.restart_pod(pod, action_id="r1")
        assert not again.applied and not again.found_id, again
        assert again.message == f"{pod.key} is already terminating"
        notes = (await read(admin, web))["metadata"].get("annotations") or {}
        assert evicted_uid(notes, "r1") == ""
    finally:
        await finalize(admin, ns, "web", hold=False)
    await _absent(admin, ns, name)
    assert await kube.applied(pod, action_id="r1", action_type="restart_pod") is None
    gone = await kube.restart_pod(pod, action_id="r1")
    assert not gone.found_id and gone.message == f"{pod.key} is already gone"


async def test_a_rollback_keeps_the_deployments_own_record_of_pod_evictions(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The controller copies a Deployment's annotations onto its ReplicaSet, and a rollback
    (as ``kubectl rollout undo``) copies the old ReplicaSet's back: its copy of the
    evictions noted is older, and a pod restart noted since would be forgotten."""
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 1)
    v1 = (await pods_of(admin, ns, "web"))[0]["metadata"]["name"]
    assert (
        await kube.restart_pod(Target(kind="Pod", namespace=ns, name=v1), action_id="r1")
    ).applied
    await settled(admin, web)
    image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "v2"}]}}}}
    merge = "application/merge-patch+json"
    await admin.call("PATCH", _path(web), body=image, what="v2", content_type=merge)
    await settled(admin, web)
    v2 = (await pods_of(admin, ns, "web"))[0]["metadata"]
    v2_pod = Target(kind="Pod", namespace=ns, name=v2["name"])
    assert (await kube.restart_pod(v2_pod, action_id="r2")).applied
    await _absent(admin, ns, v2["name"])
    assert (await kube.rollback(web, action_id="rb1")).applied
    notes = (await read(admin, web))["metadata"]["annotations"]
    assert evicted_uid(notes, "r2") == v2["uid"]
    again = await kube.restart_pod(v2_pod, action_id="r2")
    assert (again.found_id, dict(again.prior_state)) == (True, {"uid": v2["uid"]})


async def _ready_uid(admin: KubeCluster, namespace: str, name: str) -> str:
    """The pod's uid once it runs ready, else ""."""
    status, pod, _ = await admin._raw("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    if status != 200 or pod["metadata"].get("deletionTimestamp"):
        return ""
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or ()
    )
    return str(pod["metadata"]["uid"]) if ready else ""


async def statefulset(admin: KubeCluster, namespace: str, name: str) -> None:
    sts = deployment(name, 1)
    sts["kind"] = "StatefulSet"
    del sts["spec"]["strategy"]
    sts["spec"]["serviceName"] = name
    await create(admin, namespace, "/apis/apps/v1/namespaces/{ns}/statefulsets", sts)


async def test_a_statefulset_pod_restart_is_healed_and_its_redelivery_spares_the_new_pod(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The StatefulSet recreates db-0 under its name, with a new uid and no action id."""
    ns = k8s_namespace
    await statefulset(admin, ns, "db")
    uids: list[str] = []

    async def running(not_uid: str = "") -> bool:
        uid = await _ready_uid(admin, ns, "db-0")
        uids.append(uid)
        return bool(uid) and uid != not_uid

    await eventually(running, 60, 0.3, "db-0 ready")
    old = uids[-1]
    bus = MemoryBus()
    ex = executor(kube, bus)
    a = request("restart_pod", Target(kind="Pod", namespace=ns, name="db-0"))
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded" and r.prior_state["uid"] == old, r.message
        await eventually(lambda: running(not_uid=old), 60, 0.3, "db-0 recreated")
        new = uids[-1]
        v = await verified(bus, a)
        assert v.outcome == "healed", v.message
    finally:
        await ex.stop()
    # Redelivered to an executor that never saw the result: the new pod is not evicted.
    again_bus = MemoryBus()
    again = executor(kube, again_bus)
    try:
        r = await again.on_action(a)
        assert r.status == "succeeded", r.message
        assert "StatefulSet db has replaced it" in r.message
        assert await _ready_uid(admin, ns, "db-0") == new
    finally:
        await again.stop()


async def test_statefulset_and_daemonset_actions_act_on_their_own_kind(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """StatefulSet db beside an unrelated Deployment db: scale, restart and rollback act on
    the StatefulSet only, and are verified; a DaemonSet restarts and rolls back, and its
    scale is refused with the reason, nothing written."""
    ns = k8s_namespace
    sts = statefulset_doc("db", 1)
    ds = deployment("agent", 1)
    ds["kind"] = "DaemonSet"
    del ds["spec"]["replicas"], ds["spec"]["strategy"]
    namesake, _, _ = await asyncio.gather(
        ready_deployment(admin, ns, "db", 1),
        create(admin, ns, "/apis/apps/v1/namespaces/{ns}/statefulsets", sts),
        create(admin, ns, "/apis/apps/v1/namespaces/{ns}/daemonsets", ds),
    )
    db = Target(kind="StatefulSet", namespace=ns, name="db")
    agent = Target(kind="DaemonSet", namespace=ns, name="agent")
    await asyncio.gather(settled(admin, db), settled(admin, agent))
    nodes = (await admin.call("GET", "/api/v1/nodes", what="Node"))["items"]
    assert (await admin.observe(agent)).desired == len(nodes)  # those of other tests too
    before = await read(admin, namesake)

    bus = MemoryBus()
    ex = executor(kube, bus)
    actions = [
        request("scale_up", db, replicas="+1"),
        request("restart_workload", db),
        request("restart_workload", agent),
    ]
    try:
        results = [await ex.on_action(a) for a in actions]  # one target: one at a time
        assert [r.status for r in results] == ["succeeded"] * 3, [r.message for r in results]
        assert results[0].prior_state == {"replicas": 1}
        obj = await read(admin, db)
        assert obj["spec"]["replicas"] == 2
        assert (
            "kubectl.kubernetes.io/restartedAt"
            in (obj["spec"]["template"]["metadata"]["annotations"])
        )
        assert remembered_ids(obj["metadata"]["annotations"]) == (actions[0].id, actions[1].id)
        ds_obj = await read(admin, agent)
        assert (
            "kubectl.kubernetes.io/restartedAt"
            in (ds_obj["spec"]["template"]["metadata"]["annotations"])
        )
        outcomes = [await verified(bus, a) for a in actions]
        assert [r.outcome for r in outcomes] == ["healed"] * 3, [r.message for r in outcomes]

        denied = await ex.on_action(request("scale_up", agent, replicas="+1"))
        assert denied.status == "denied" and "no replica count to scale" in denied.message
        with pytest.raises(ActionFailed, match="no replica count to scale"):
            await kube.scale(agent, action_id="sc-1", replicas=5, direction="up")
        ds_after = await read(admin, agent)
        assert ds_after["metadata"]["generation"] == ds_obj["metadata"]["generation"]

        # A bad image on both; each rolls back to its previous ControllerRevision.
        image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "v2"}]}}}}
        merge = "application/merge-patch+json"
        for t in (db, agent):
            await admin.call("PATCH", _path(t), body=image, what="v2", content_type=merge)
        await asyncio.gather(settled(admin, db), settled(admin, agent))
        rollbacks = [request("rollback", db), request("rollback", agent)]
        rolled = [await ex.on_action(a) for a in rollbacks]
        assert [r.status for r in rolled] == ["succeeded"] * 2, [r.message for r in rolled]
        for t in (db, agent):
            obj = await read(admin, t)
            image_now = obj["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image_now == "registry.invalid/app:v1", t.key
        # The StatefulSet's restart is kept: the template of the revision before v2.
        assert (
            "kubectl.kubernetes.io/restartedAt"
            in ((await read(admin, db))["spec"]["template"]["metadata"]["annotations"])
        )
        outcomes = [await verified(bus, a) for a in rollbacks]
        assert [r.outcome for r in outcomes] == ["healed"] * 2, [r.message for r in outcomes]
        undo = await ex.on_action(undo_request(rolled[0], requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        obj = await read(admin, db)
        assert obj["spec"]["template"]["spec"]["containers"][0]["image"] == "v2"
        after = await read(admin, namesake)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"]["replicas"] == 1
        assert ACTION_IDS_ANNOTATION not in (after["metadata"].get("annotations") or {})
    finally:
        await ex.stop()


async def test_a_statefulset_pod_restart_a_budget_refused_is_not_taken_for_done_later(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The eviction a PodDisruptionBudget refused must not stay noted on the StatefulSet:
    once db-0 is replaced by other means, the same action asked again would read the note
    as its own earlier eviction, report it done and restart nothing."""
    ns = k8s_namespace
    await statefulset(admin, ns, "db")
    pod = Target(kind="Pod", namespace=ns, name="db-0")
    first = await _wait_ready_uid(admin, ns, "db-0")
    await budget(admin, ns, "db", min_available=1, pods=1)
    with pytest.raises(ActionFailed, match=f"blocked by PodDisruptionBudget {ns}/db"):
        await kube.restart_pod(pod, action_id="r1")
    await admin.call("DELETE", f"{PDBS.format(ns=ns)}/db", what="pdb")
    # Someone else replaces db-0 (a person, a node drain).
    await admin.call("DELETE", f"/api/v1/namespaces/{ns}/pods/db-0", what="db-0")
    second = await _wait_ready_uid(admin, ns, "db-0", not_uid=first)
    effect = await kube.restart_pod(pod, action_id="r1")
    assert effect.applied, effect.message
    assert effect.prior_state["uid"] == second
    # Asked again while db-0 is not back (held gone here by scaling to 0): the
    # StatefulSet's record shows this action evicted it, so it counts as done.
    await admin.call(
        "PATCH",
        f"/apis/apps/v1/namespaces/{ns}/statefulsets/db",
        body={"spec": {"replicas": 0}},
        what="db",
        content_type="application/merge-patch+json",
    )

    async def absent() -> bool:
        status, _, _ = await admin._raw("GET", f"/api/v1/namespaces/{ns}/pods/db-0")
        return status == 404

    await eventually(absent, 60, 0.3, "db-0 gone")
    again = await kube.restart_pod(pod, action_id="r1")
    assert (again.applied, again.found_id, dict(again.prior_state)) == (
        False,
        True,
        {"uid": second},
    )
    assert not (await kube.restart_pod(pod, action_id="r2")).found_id  # not another's


async def _wait_ready_uid(admin: KubeCluster, namespace: str, name: str, not_uid: str = "") -> str:
    uids: list[str] = []

    async def running() -> bool:
        uids.append(await _ready_uid(admin, namespace, name))
        return bool(uids[-1]) and uids[-1] != not_uid

    await eventually(running, 60, 0.3, f"{name} ready (not {not_uid or 'none'})")
    return uids[-1]


async def test_a_bad_statefulset_rollout_is_rolled_back_by_the_rules(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str, analyzer_kubeconfig: Path
) -> None:
    """A bad image rolled out to StatefulSet db: the analyzer's role reads its
    ControllerRevisions as its rollout history, the rules propose rolling it back, and the
    executor does so and verifies it healed."""
    ns = k8s_namespace
    await create(admin, ns, "/apis/apps/v1/namespaces/{ns}/statefulsets", statefulset_doc("db", 1))
    db = Target(kind="StatefulSet", namespace=ns, name="db")
    await settled(admin, db)
    image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:bad"}]}}}}
    merge = "application/merge-patch+json"
    await admin.call("PATCH", _path(db), body=image, what="bad", content_type=merge)
    await settled(admin, db)

    labels = {"cluster": "test", "namespace": ns, "service": "db"}
    pod = {**labels, "pod": "db-0", "owner": "StatefulSet/db", "workload": "db"}
    signal = Member(
        fingerprint=fingerprint("kubernetes", "DbErrors", pod),
        name="DbErrors",
        source="kubernetes",
        severity="critical",
        status="firing",
        labels=pod,
        first_seen=utcnow(),
        last_seen=utcnow(),
    )
    incident = replace(
        fake_incident(signal, labels=labels), opened_at=utcnow(), updated_at=utcnow()
    )
    runbook = {
        "name": "db",
        "alert": "DbErrors",
        "source": "kubernetes",
        "actions": ["check_recent_deployments", "auto_rollback_if_deployment_recent"],
    }
    settings = make_settings(
        "127.0.0.1:1", "x.", doc={"remediation": REMEDIATION, "runbooks": [runbook]}
    )
    async with KubeCluster(kubeconfig=str(analyzer_kubeconfig)) as reader:
        history = await reader.workload(db)
        assert [(r.number, r.image) for r in history.revisions] == [
            (1, "registry.invalid/app:v1"),
            (2, "app:bad"),
        ]
        assert (history.revision, history.image) == (2, "app:bad")
        ctx = await ContextGatherer(settings, cluster=reader, source=reader).gather(incident)
    assert [(r.revision, r.image, r.previous_image) for r in ctx.rollouts] == [
        (1, "registry.invalid/app:v1", None),
        (2, "app:bad", "registry.invalid/app:v1"),
    ]
    analysis = analyze(incident, ctx, settings, utcnow())
    assert analysis.root_cause_class == "bad_rollout", analysis
    (action,) = action_requests(analysis, incident)
    assert (action.type, action.target) == ("rollback", db)

    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        result = await ex.on_action(action)
        assert result.status == "succeeded", result.message
        assert result.prior_state == {"revision": 2, "image": "app:bad"}
        outcome = await verified(bus, action)
        assert outcome.outcome == "healed", outcome.message
    finally:
        await ex.stop()
    obj = await read(admin, db)
    assert obj["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.invalid/app:v1"
    # As kubectl rollout undo: the restored revision takes the next number.
    after = await kube.workload(db)
    assert [(r.number, r.image) for r in after.revisions] == [
        (2, "app:bad"),
        (3, "registry.invalid/app:v1"),
    ]
    assert after.revision == 3


async def test_a_template_rolled_back_to_is_a_recent_rollout(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str, analyzer_kubeconfig: Path
) -> None:
    """v1, then v2, then back to v1: by the agent's rollback (a Deployment and a
    StatefulSet) and by a plain patch of the template back to v1. The controllers renumber
    v1's ReplicaSet / ControllerRevision 3 and keep its creation time; the analyzer's role
    reads it as rolled out at the rollback (its managedFields), so the rules see a recent
    rollout of v1 after v2."""
    ns = k8s_namespace
    await create(admin, ns, "/apis/apps/v1/namespaces/{ns}/statefulsets", statefulset_doc("db", 1))
    db = Target(kind="StatefulSet", namespace=ns, name="db")
    undone, patched = await asyncio.gather(
        ready_deployment(admin, ns, "undone", 1), ready_deployment(admin, ns, "patched", 1)
    )
    await settled(admin, db)
    targets = (undone, patched, db)

    def image(name: str) -> dict[str, Any]:
        return {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": name}]}}}}

    merge = "application/merge-patch+json"
    # v2 created a second after v1: a ControllerRevision shows its re-activation only by
    # its creation before the one it replaced.
    await asyncio.sleep(1.1)
    for t in targets:
        await admin.call("PATCH", _path(t), body=image("app:v2"), what="v2", content_type=merge)
    await asyncio.gather(*(settled(admin, t) for t in targets))
    # The API server dates to the second: v1's creation is then strictly before the rollback.
    await asyncio.sleep(1.5)
    rolled_at = utcnow().replace(microsecond=0)
    for t in (undone, db):
        effect = await kube.rollback(t, action_id=f"rollback-{t.name}")
        assert effect.applied, effect.message
    v1 = "registry.invalid/app:v1"
    await admin.call("PATCH", _path(patched), body=image(v1), what="v1", content_type=merge)
    await asyncio.gather(*(settled(admin, t) for t in targets))

    async with KubeCluster(kubeconfig=str(analyzer_kubeconfig)) as reader:
        for t in targets:
            w = await reader.workload(t)
            assert [(r.number, r.image) for r in w.revisions] == [(2, "app:v2"), (3, v1)], t.key
            assert w.revision == 3, t.key
            v2_at, v1_at = (r.at for r in w.revisions)
            assert v2_at < rolled_at <= v1_at, (t.key, w.revisions)
            rollouts, notes = await rollouts_of(reader, [t])
            assert notes == []
            found = recent_rollout(tuple(rollouts), t, utcnow(), window=300)
            assert found is not None, (t.key, rollouts)
            assert (found.revision, found.image, found.previous_image) == (3, v1, "app:v2")
            # Re-activated: rolling it back re-deploys v2, which it left (policy rule 7c).
            assert found.restored and [r.restored for r in w.revisions] == [False, True]
            assert rolled_back_from(w.revisions) == (("app:v2", v1_at),), t.key
        # A later scale moves the controller's managedFields time on the ReplicaSet too: it
        # is not a rollout, and v1 stays dated by its rollback.
        v1_at = (await reader.workload(patched)).current().at
        await asyncio.sleep(1.5)
        scaled_at = utcnow()
        body = {"spec": {"replicas": 2}}
        await admin.call("PATCH", _path(patched), body=body, what="scale", content_type=merge)
        await settled(admin, patched)
        assert (await reader.workload(patched)).current().at == v1_at < scaled_at
    # Created before v2, re-activated after it (the ReplicaSet's creation is what the history
    # gave before).
    sets = await admin.call(
        "GET",
        f"/apis/apps/v1/namespaces/{ns}/replicasets",
        what="replicasets",
        query=[("labelSelector", "app=patched")],
    )
    (old,) = [
        rs
        for rs in sets["items"]
        if rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    ]
    assert old["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] == "1"
    assert old["metadata"]["creationTimestamp"] < rolled_at.isoformat().replace("+00:00", "Z")
    # A rollback of v1 now would re-deploy v2, which the rollback (or patch) left: an
    # executor that never acted on them (no history of its own) reads that in the cluster's
    # rollout history and asks a person (policy rule 7c), with the executor's own role.
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        for t in targets:
            result = await ex.on_action(request("rollback", t))
            assert result.status == "pending_approval", (t.key, result.message)
            assert "re-deploy app:v2" in result.message, result.message
            assert "a rollback in its rollout history" in result.message
    finally:
        await ex.stop()
    for t in targets:
        assert (await admin.workload(t)).image == v1, t.key


async def test_drain_skips_daemonset_pods_and_undo_uncordons(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str, own_nodes: tuple[str, str]
) -> None:
    ns = k8s_namespace
    node, spare = own_nodes
    await ready_deployment(admin, ns, "pinned", 2, nodeSelector={"kubernetes.io/hostname": node})
    ds = deployment("agent", 1)
    ds["kind"] = "DaemonSet"
    del ds["spec"]["replicas"], ds["spec"]["strategy"]
    await create(admin, ns, "/apis/apps/v1/namespaces/{ns}/daemonsets", ds)
    await eventually(lambda: _on(pods_of(admin, ns, "agent"), node), 60, 0.5, "its DS pod")
    # pinned pods can go nowhere else: let them be evictable but not rescheduled
    bus = MemoryBus()
    ex = executor(kube, bus)
    target = Target(kind="Node", name=node)
    try:
        a = request("drain_node", target, timeout=60)
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "cordoned, evicted" in r.message and "DaemonSet/mirror pods" in r.message
        for p in await pods_of(admin, ns, "pinned"):
            assert p["spec"].get("nodeName") != node or p["status"].get("phase") != "Running"
        assert any(p["spec"]["nodeName"] == node for p in await pods_of(admin, ns, "agent"))
        assert (await verified(bus, a)).outcome == "healed"

        second = await ex.on_action(request("cordon_node", Target(kind="Node", name=spare)))
        assert second.status == "denied" and "max_nodes_cordoned" in second.message

        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded" and f"uncordoned Node//{node}" in undo.message
        assert not (await admin.call("GET", f"/api/v1/nodes/{node}", what="n"))["spec"].get(
            "unschedulable"
        )

        c = request("cordon_node", target)
        cordoned = await ex.on_action(c)
        assert cordoned.status == "succeeded" and cordoned.prior_state == {"unschedulable": False}
        assert (await verified(bus, c)).outcome == "healed"
        assert (await admin.call("GET", f"/api/v1/nodes/{node}", what="n"))["spec"]["unschedulable"]
        await ex.on_action(undo_request(cordoned, requested_by="bob", now=utcnow()))
        assert await kube.version(target) == "unschedulable=False"
    finally:
        await ex.stop()


async def _on(pods: Any, node: str) -> bool:
    return any(p["spec"].get("nodeName") == node for p in await pods)


async def test_drain_stops_at_a_budget_and_names_the_pods_and_budget(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str, own_nodes: tuple[str, str]
) -> None:
    ns = k8s_namespace
    node = own_nodes[0]
    await ready_deployment(admin, ns, "guarded", 2, nodeSelector={"kubernetes.io/hostname": node})
    await budget(admin, ns, "guarded", min_available=2, pods=2)
    names = sorted(p["metadata"]["name"] for p in await pods_of(admin, ns, "guarded"))
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        a = request("drain_node", Target(kind="Node", name=node), timeout=3)
        r = await ex.on_action(a)
        assert r.status == "failed"
        for name in names:
            assert (
                f"pod {ns}/{name} blocked by PodDisruptionBudget {ns}/guarded "
                "(The disruption budget guarded needs 2 healthy pods and has 2 currently)"
            ) in r.message, r.message
        assert "The node is left cordoned" in r.message
        assert r.prior_state == {"unschedulable": False}
        assert sorted(p["metadata"]["name"] for p in await pods_of(admin, ns, "guarded")) == names
        # Asked again once the budget is gone: the id on the node does not end it there.
        await admin.call("DELETE", f"{PDBS.format(ns=ns)}/guarded", what="pdb")
        again = await ex.on_action(replace(a, params={"timeout": 30}))
        assert again.status == "succeeded", again.message
        assert "already cordoned by this action, resumed, evicted 2 pods" in again.message
        assert again.prior_state == {"unschedulable": False}
        assert not [
            p for p in await pods_of(admin, ns, "guarded") if p["spec"].get("nodeName") == node
        ]
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
    finally:
        await ex.stop()
        with contextlib.suppress(ActionFailed):
            await admin.call("DELETE", f"{PDBS.format(ns=ns)}/guarded", what="pdb")


async def test_a_drain_is_already_applied_only_once_its_node_is_drained(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str, own_nodes: tuple[str, str]
) -> None:
    # Rule 0 for a drain: its id lands with the cordon, before any eviction. A delivery
    # that died half way is resumed, one that died after the last eviction is recorded.
    ns = k8s_namespace
    node, other = own_nodes
    await ready_deployment(admin, ns, "halfway", 2, nodeSelector={"kubernetes.io/hostname": node})
    target = Target(kind="Node", name=node)
    a = request("drain_node", target, timeout=30)
    stops = iter([None, "a dead executor"])
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await kube.drain(
            target, action_id=a.id, grace_period=None, drain_timeout=30, stop=lambda: next(stops)
        )
    assert await kube.applied(target, action_id=a.id, action_type=a.type) is None
    resumed = await kube.drain(target, action_id=a.id, grace_period=None, drain_timeout=30)
    assert resumed.applied and "resumed, evicted 1 pods" in resumed.message, resumed.message
    found = await kube.applied(target, action_id=a.id, action_type=a.type)
    assert found is not None and found.prior_state == {"unschedulable": False}
    # That delivery died too; meanwhile another node was cordoned (max_nodes_cordoned: 1).
    await admin.call(
        "PATCH",
        f"/api/v1/nodes/{other}",
        what="Node",
        body={"spec": {"unschedulable": True}},
        content_type="application/merge-patch+json",
    )
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        r = await ex.on_action(a)
        assert (r.status, r.prior_state) == ("succeeded", {"unschedulable": False}), r.message
        assert "by a delivery that stopped before its result [already_applied]" in r.message
        assert [e for e, _ in bus.on("escalations") if e.reason == "denied"] == []
        assert (await verified(bus, a)).outcome == "healed"
        assert [x.status for x in bus.results(a.id)] == ["succeeded", "succeeded"]
        await admin.call(
            "PATCH",
            f"/api/v1/nodes/{other}",
            what="Node",
            body={"spec": {"unschedulable": None}},
            content_type="application/merge-patch+json",
        )
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded" and f"uncordoned Node//{node}" in undo.message
        assert await kube.version(target) == "unschedulable=False"
    finally:
        await ex.stop()


async def test_an_approved_drain_cut_half_way_is_resumed_when_its_decision_comes_again(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    # Approved, begun, and its executor died after one eviction: the node's version moved
    # with its own cordon. The decision's redelivery finishes the drain, not "stale".
    from agent.models import ApprovalDecision

    ns = k8s_namespace
    (body,) = lab_nodes(uuid.uuid4().hex[:6], 1)
    node = body["metadata"]["name"]
    await admin.call("POST", "/api/v1/nodes", what="Node", body=body)  # its pods only
    target = Target(kind="Node", name=node)
    bus = MemoryBus()
    ex = executor(kube, bus, require_approval=["drain_node"])
    try:
        await ready_deployment(
            admin, ns, "approved", 2, nodeSelector={"kubernetes.io/hostname": node}
        )
        a = request("drain_node", target, timeout=30)
        assert (await ex.on_action(a)).status == "pending_approval"
        req = bus.approvals()[-1]
        assert req.target_version == "unschedulable=False"
        stops = iter([None, "a dead executor"])
        with pytest.raises(PartialFailure, match="stopped by a dead executor"):
            await kube.drain(
                target,
                action_id=a.id,
                grace_period=None,
                drain_timeout=30,
                stop=lambda: next(stops),
            )
        assert await kube.version(target) == "unschedulable=True"
        left = await kube.partly_applied(target, action_id=a.id, action_type=a.type)
        assert left and left.startswith(f"node cordoned, 1 pods left (1 to evict): {ns}/approved-")
        await ex.on_decision(
            ApprovalDecision(
                id="d1",
                request_id=req.id,
                action_hash=req.action_hash,
                decision="approve",
                decided_by="alice",
                decided_at=utcnow(),
            )
        )
        r = bus.results(a.id)[-1]
        assert r.status == "succeeded", r.message
        assert "resumed, evicted 1 pods" in r.message and "partly applied" in r.message
        assert [e for e, _ in bus.on("escalations") if e.reason == "approval_stale"] == []
        assert await kube.partly_applied(target, action_id=a.id, action_type=a.type) is None
        assert await kube.applied(target, action_id=a.id, action_type=a.type) is not None
    finally:
        await ex.stop()
        with contextlib.suppress(ActionFailed):
            await admin.call("DELETE", f"/api/v1/nodes/{node}", what="Node")


async def finalize(admin: KubeCluster, namespace: str, app: str, hold: bool) -> list[str]:
    """Put a finalizer on the app's pods (or take it off): a deleted pod then stays
    Terminating, as one does whose kubelet never confirms its end. Returns their names."""
    doc = await admin.call(
        "GET",
        f"/api/v1/namespaces/{namespace}/pods",
        what="pods",
        query=[("labelSelector", f"app={app}")],
    )
    names = [p["metadata"]["name"] for p in doc["items"]]
    for name in names:
        await admin.call(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            what=f"Pod/{name}",
            body={"metadata": {"finalizers": [HOLD] if hold else None}},
            content_type="application/merge-patch+json",
        )
    return names


HOLD = "sre-agent.io/test-hold"


async def test_a_drain_does_not_wait_on_pods_only_a_dead_kubelet_could_end(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """On a NotReady node, an evicted pod stays Terminating until the node object goes: no
    kubelet confirms its end. The drain counts it as gone (its ReplicaSet replaced it), and
    names it; on a Ready node it still waits for it."""
    ns = k8s_namespace
    nodes = lab_nodes(uuid.uuid4().hex[:6], 2)
    up, dead = (n["metadata"]["name"] for n in nodes)
    for n in nodes:  # nodes of its own: one is taken down
        await admin.call("POST", "/api/v1/nodes", what="Node", body=n)
    pods: dict[str, str] = {}
    try:
        for app, node in (("on-up", up), ("on-dead", dead)):
            await ready_deployment(admin, ns, app, 1, nodeSelector={"kubernetes.io/hostname": node})
            (pods[app],) = await finalize(admin, ns, app, hold=True)
        await KubeLab(admin, nodes=0).fail_node(dead, why="test: the kubelet died", at=utcnow())
        ex = executor(kube, MemoryBus(), max_nodes_cordoned=5)
        try:
            r = await ex.on_action(request("drain_node", Target(kind="Node", name=up), timeout=3))
            assert r.status == "failed", r.message
            assert "evicted pods still terminating" in r.message
            r = await ex.on_action(
                request("drain_node", Target(kind="Node", name=dead), timeout=30)
            )
            assert r.status == "succeeded", r.message
            assert (
                "1 still terminating on the NotReady node, whose kubelet cannot confirm it "
                f"({ns}/{pods['on-dead']})"
            ) in r.message
        finally:
            await ex.stop()
    finally:
        for app in pods:
            with contextlib.suppress(ActionFailed):
                await finalize(admin, ns, app, hold=False)
        for node in (up, dead):
            with contextlib.suppress(ActionFailed):
                await admin.call("DELETE", f"/api/v1/nodes/{node}", what="Node")


async def test_a_drain_resumed_while_its_evicted_pods_still_terminate_waits_for_them(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    """The first delivery evicted both pods and stopped while they still terminated (its
    timeout here; a dead executor alike). Rule 0's read and its resumed delivery count them
    as not yet gone, as the first delivery did: the resumed drain waits for them, up to
    its timeout, and is applied only once they are gone."""
    ns = k8s_namespace
    (body,) = lab_nodes(uuid.uuid4().hex[:6], 1)
    node = body["metadata"]["name"]
    await admin.call("POST", "/api/v1/nodes", what="Node", body=body)  # its pods only
    target = Target(kind="Node", name=node)
    a = request("drain_node", target, timeout=30)
    try:
        await ready_deployment(
            admin, ns, "lingering", 2, nodeSelector={"kubernetes.io/hostname": node}
        )
        await finalize(admin, ns, "lingering", hold=True)
        with pytest.raises(PartialFailure, match="evicted pods still terminating after 2s"):
            await kube.drain(target, action_id=a.id, grace_period=None, drain_timeout=2)
        assert await kube.applied(target, action_id=a.id, action_type=a.type) is None
        with pytest.raises(PartialFailure, match="terminating since before it: "):
            await kube.drain(target, action_id=a.id, grace_period=None, drain_timeout=2)
        resumed = asyncio.create_task(
            kube.drain(target, action_id=a.id, grace_period=None, drain_timeout=30)
        )
        await asyncio.sleep(1)
        assert not resumed.done()
        await finalize(admin, ns, "lingering", hold=False)  # their kubelet confirms the end
        effect = await asyncio.wait_for(resumed, 30)
        assert effect.applied and "resumed, evicted 0 pods" in effect.message, effect.message
        assert "waited for 2 terminating" in effect.message
        found = await kube.applied(target, action_id=a.id, action_type=a.type)
        assert found is not None and found.prior_state == {"unschedulable": False}
        ex = executor(kube, MemoryBus())
        try:
            r = await ex.on_action(a)
            assert r.status == "succeeded" and "[already_applied]" in r.message, r.message
        finally:
            await ex.stop()
    finally:
        with contextlib.suppress(ActionFailed):
            await finalize(admin, ns, "lingering", hold=False)
        with contextlib.suppress(ActionFailed):
            await admin.call("DELETE", f"/api/v1/nodes/{node}", what="Node")


async def test_config_update_behind_approval_then_undo(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    await create(
        admin,
        ns,
        "/api/v1/namespaces/{ns}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "flags"},
            "data": {"mode": "fast"},
        },
    )
    cm = Target(kind="ConfigMap", namespace=ns, name="flags")
    bus = MemoryBus()
    ex = executor(kube, bus)
    try:
        a = request("update_config", cm, key="mode", value="safe")
        assert (await ex.on_action(a)).status == "pending_approval"
        req = bus.approvals()[-1]
        assert req.target_version.startswith("resourceVersion=")
        from agent.models import ApprovalDecision

        await ex.on_decision(
            ApprovalDecision(
                id="d1",
                request_id=req.id,
                action_hash=req.action_hash,
                decision="approve",
                decided_by="alice",
                decided_at=utcnow(),
            )
        )
        r = bus.results(a.id)[-1]
        assert r.status == "succeeded", r.message
        assert r.prior_state == {"key": "mode", "value": "fast", "existed": True}
        assert (await read(admin, cm))["data"] == {"mode": "safe"}
        check = await verified(bus, a)
        assert (check.outcome, check.message) == (
            "unknown",
            "no condition to re-check; configuration applied",
        )
        await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert (await read(admin, cm))["data"] == {"mode": "fast"}
    finally:
        await ex.stop()


# --- RBAC ----------------------------------------------------------------------------------------


async def test_an_action_outside_the_role_fails_with_the_reason(
    admin: KubeCluster, kube: KubeCluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 1)
    with pytest.raises(ActionFailed) as deleting:
        await kube.call("DELETE", _path(web), what=web.key)
    message = str(deleting.value)
    assert message.startswith("forbidden:")
    assert 'cannot delete resource "deployments" in API group "apps"' in message
    assert "system:serviceaccount:sre-agent-" in message
    with pytest.raises(ActionFailed, match='cannot patch resource "secrets"'):
        await kube.call(
            "PATCH",
            f"/api/v1/namespaces/{ns}/secrets/x",
            body={"data": {}},
            what="Secret",
            content_type="application/merge-patch+json",
        )
    # ... while what the role does allow works with the same credentials
    assert (await kube.workload(web)).replicas == 1


# --- crash between acting and recording ----------------------------------------------------------


def _config_file(path: Path, settings: Settings, kubeconfig: Path) -> Path:
    doc = {
        "agent": {"cluster": "test"},
        "kafka": {
            "bootstrap_servers": settings.kafka.bootstrap_servers,
            "topic_prefix": settings.kafka.topic_prefix,
            "partitions": 2,
            "session_timeout_ms": 6000,
        },
        "monitoring": {"prometheus": {"url": "http://127.0.0.1:1"}},
        "server": {"port": 0},
        "remediation": REMEDIATION,
        "kubernetes": {"backend": "kubernetes", "kubeconfig": str(kubeconfig)},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _executor_process(config: Path, *, crash: bool, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRE_AGENT_")}
    if crash:
        env["SRE_AGENT_TEST_CRASH_AFTER_APPLY"] = "1"
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--role",
                "executor",
                "--config",
                str(config),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


async def test_an_executor_killed_after_acting_does_not_act_again(
    admin: KubeCluster,
    agent_kubeconfig: Path,
    k8s_namespace: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    web = await ready_deployment(admin, k8s_namespace, "web", 2)
    generation = (await read(admin, web))["metadata"]["generation"]
    settings = make_settings(kafka_bootstrap, topic_prefix)
    await create_topics(settings.kafka)
    config = _config_file(tmp_path / "agent.yaml", settings, agent_kubeconfig)
    log = tmp_path / "executor.log"
    a = request("restart_workload", web)
    async with Bus(settings.kafka, metrics=Metrics(), name="test") as bus:
        await bus.publish(bus.topic("actions"), a)

    first = _executor_process(config, crash=True, log=log)
    try:
        code = await _wait_exit(first, 90)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    obj = await read(admin, web)
    assert obj["metadata"]["generation"] == generation + 1
    assert remembered_ids(obj["metadata"]["annotations"]) == (a.id,)

    t = settings.kafka.topic_prefix
    async with readers(kafka_bootstrap, {"results": (f"{t}action-results", ActionResult)}) as r:
        await asyncio.sleep(1)
        assert not [x for x in r["results"].items if x.action_id == a.id], (
            "killed before the result"
        )
        second = _executor_process(config, crash=False, log=log)
        try:
            found = await r["results"].wait_for(
                lambda xs: any(x.action_id == a.id for x in xs),
                90,
                "the redelivered action's result",
            )
            second.send_signal(signal.SIGTERM)
            assert await _wait_exit(second, 30) == 0
        finally:
            if second.poll() is None:
                second.kill()
    mine = [x for x in found if x.action_id == a.id]
    # Recorded as the action it was (it counts for the policy, and is verified), not again.
    assert [x.status for x in mine][:1] == ["succeeded"], [x.message for x in mine]
    assert "by a delivery that stopped before its result" in mine[0].message
    assert (await read(admin, web))["metadata"]["generation"] == generation + 1


# --- approvals from kcat, across an executor restart --------------------------------------------


def kcat(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    subprocess.run(
        ["kcat", "-P", "-b", bootstrap, "-t", topic, "-k", key],
        input=value + b"\n",
        check=True,
        timeout=30,
    )


async def test_a_kcat_approval_is_honoured_after_restart_and_forgeries_are_refused(
    admin: KubeCluster,
    agent_kubeconfig: Path,
    k8s_namespace: str,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    ns = k8s_namespace
    await create(
        admin,
        ns,
        "/api/v1/namespaces/{ns}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "flags"},
            "data": {"mode": "fast"},
        },
    )
    cm = Target(kind="ConfigMap", namespace=ns, name="flags")
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"remediation": REMEDIATION, "kafka": {"session_timeout_ms": 6000}},
    )
    t = settings.kafka.topic_prefix
    decisions = f"{t}decisions"
    await create_topics(settings.kafka)

    def agent() -> Agent:
        cluster = KubeCluster(kubeconfig=str(agent_kubeconfig))
        return Agent(settings, roles=["executor"], cluster=cluster, serve_http=False)

    a = request("update_config", cm, key="mode", value="safe")
    async with readers(
        kafka_bootstrap,
        {
            "approvals": (f"{t}approvals", ApprovalRequest),
            "results": (f"{t}action-results", ActionResult),
            "dlq": (f"{t}dead-letter", DeadLetter),
        },
    ) as r:
        first = agent()
        async with first:
            await first.bus.publish(first.bus.topic("actions"), a)
            await r["approvals"].wait_for(lambda xs: len(xs) >= 1, 60, "approval request")
        req = r["approvals"].items[0]
        assert req.action.id == a.id and req.action_hash == a.digest()

        # A request that expired while nobody decided (published as a Kafka client would).
        stale_action = request("update_config", cm, key="mode", value="slow")
        stale = ApprovalRequest(
            id=f"stale-{uuid.uuid4().hex[:6]}",
            action=stale_action,
            action_hash=stale_action.digest(),
            root_cause="test",
            evidence=(),
            created_at=utcnow() - timedelta(hours=2),
            expires_at=utcnow() - timedelta(hours=1),
        )

        second = agent()  # a restarted executor: the pending request comes back from Kafka
        async with second:
            assert second.executor is not None and req.id in second.executor.pending
            await second.bus.publish(second.bus.topic("approvals"), stale)

            def decision(request_id: str, action_hash: str, **extra: Any) -> bytes:
                doc = {
                    "id": uuid.uuid4().hex,
                    "request_id": request_id,
                    "action_hash": action_hash,
                    "decision": "approve",
                    "decided_by": "kcat-user",
                    "decided_at": utcnow().isoformat(),
                    "reason": "looks right",
                    **extra,
                }
                return orjson.dumps(doc)

            kcat(kafka_bootstrap, decisions, "nope", decision("nope", req.action_hash))
            kcat(kafka_bootstrap, decisions, req.id, decision(req.id, "0" * 32))
            kcat(kafka_bootstrap, decisions, req.id, b'{"request_id": "' + req.id.encode() + b'"}')
            kcat(kafka_bootstrap, decisions, stale.id, decision(stale.id, stale.action_hash))

            def refused(xs: list[DeadLetter]) -> bool:
                return (
                    any("unknown approval request nope" in d.error for d in xs)
                    and any("does not match request" in d.error for d in xs)
                    and any("decided_by: Field required" in d.error for d in xs)
                )

            letters = await r["dlq"].wait_for(refused, 60, "forged decisions refused")

            def stale_refused() -> bool:
                in_results = any(
                    x.action_id == stale_action.id
                    and x.status == "rejected"
                    and "expired" in x.message
                    for x in r["results"].items
                )
                late = any(stale.id in d.error and "expired" in d.error for d in r["dlq"].items)
                return in_results and (
                    late
                    or any(
                        x.action_id == stale_action.id and "came after" in x.message
                        for x in r["results"].items
                    )
                )

            await eventually(stale_refused, 60, 0.3, "the expired approval refused")
            assert (await read(admin, cm))["data"] == {"mode": "fast"}, "nothing forged ran"

            kcat(kafka_bootstrap, decisions, req.id, decision(req.id, req.action_hash))
            done = await r["results"].wait_for(
                lambda xs: any(x.action_id == a.id and x.status == "succeeded" for x in xs),
                60,
                "the approved action",
            )
    ok = next(x for x in done if x.action_id == a.id and x.status == "succeeded")
    assert "[approved]" in ok.message
    assert (await read(admin, cm))["data"] == {"mode": "safe"}
    print("\n".join(d.error for d in letters))
