"""The in-process FakeCluster answers as the real adapter on the real control plane: the same
sequence of actions and reads runs against both, and what the adapter makes visible (the
effect or the failure, applied/partly_applied, observe, footprint) is compared after naming
pods alike (a real pod is <deployment>-<hash>-<suffix>, a fake one <deployment>-<index>).

What the fake got wrong before: a drain deleted pods a finalizer holds (the API server keeps
them listed, terminating, and the adapter waits for them), and an eviction did not spend a
disruption of its budget (the API server decrements disruptionsAllowed with it, so a second
pod of the workload gets 429 until a replacement is ready)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent.errors import ActionFailed
from agent.models import Target, utcnow
from handlers.cluster import Cluster, PartialFailure
from handlers.fake_cluster import FakeCluster
from handlers.kube import KubeCluster
from tests.helpers import eventually
from tests.integration.test_kube_actions import (
    HOLD,
    PDBS,
    admin,  # noqa: F401 (a fixture)
    budget,
    finalize,
    own_nodes,  # noqa: F401 (a fixture)
    ready_deployment,
)

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

Answers = list[str]


def normal(text: str, pods: list[str]) -> str:
    """Pod names by their rank (the adapter sorts the names it reports), uids and node
    names as placeholders, and a budget's refusal without its reason (the API server's
    words, not the adapter's)."""
    for i, name in enumerate(sorted(pods)):
        text = text.replace(name, f"<pod{i}>")
    text = re.sub(r"'(uid|node)': '[^']*'", r"'\1': <\1>", text)  # the API server's own
    return re.sub(r"(PodDisruptionBudget \S+) \([^)]*\)", r"\1", text)


async def outcome(call: Awaitable[Any], pods: list[str]) -> str:
    try:
        effect = await call
    except PartialFailure as e:
        return normal(f"PartialFailure: {e} prior={e.prior_state}", pods)
    except ActionFailed as e:
        return normal(f"{type(e).__name__}: {e}", pods)
    return normal(f"applied={effect.applied}: {effect.message} prior={effect.prior_state}", pods)


async def reads(c: Cluster, node: str, action_id: str, pods: list[str]) -> Answers:
    """What the executor and the verifier read after a drain."""
    target = Target(kind="Node", name=node)
    found = await c.applied(target, action_id=action_id, action_type="drain_node")
    left = await c.partly_applied(target, action_id=action_id, action_type="drain_node")
    o = await c.observe(target)
    return [
        f"applied={found is not None and found.prior_state}",
        normal(f"partly={left}", pods),
        f"cordoned={o.cordoned} evictable={o.evictable}",
    ]


async def pod_reads(c: Cluster, namespace: str, pods: list[str]) -> Answers:
    out = []
    for name in sorted(pods):
        target = Target(kind="Pod", namespace=namespace, name=name)
        o = await c.observe(target)
        fp = await c.footprint(target)
        out.append(
            normal(
                f"{name}: exists={o.exists} settled={o.settled} ready={o.ready}/{o.desired} "
                f"headroom={fp.pdb_headroom} pdbs={fp.pdbs}",
                pods,
            )
        )
    return out


Scene = Callable[[], Awaitable[Any]]


async def finalizer_drain(
    c: Cluster, ns: str, node: str, pods: list[str], release: Scene, wait_gone: Scene
) -> Answers:
    answers = [
        await outcome(
            c.drain(
                Target(kind="Node", name=node), action_id="d1", grace_period=None, drain_timeout=2
            ),
            pods,
        )
    ]
    answers += await reads(c, node, "d1", pods)
    answers += await pod_reads(c, ns, pods)
    await release()
    await wait_gone()
    answers += await reads(c, node, "d1", pods)
    answers += await pod_reads(c, ns, pods)
    return answers


async def test_a_drain_waits_for_pods_a_finalizer_holds_on_the_fake_as_on_the_cluster(
    admin: KubeCluster,  # noqa: F811
    k8s_namespace: str,
    own_nodes: tuple[str, str],  # noqa: F811
) -> None:
    ns, node = k8s_namespace, own_nodes[0]
    # The real control plane.
    await ready_deployment(admin, ns, "held", 2, nodeSelector={"kubernetes.io/hostname": node})
    real_pods = await finalize(admin, ns, "held", hold=True)

    async def release_real() -> None:
        await finalize(admin, ns, "held", hold=False)

    async def gone_real() -> None:
        async def gone() -> bool:
            for p in real_pods:
                if (await admin.observe(Target(kind="Pod", namespace=ns, name=p))).exists:
                    return False
            return True

        await eventually(gone, 30, 0.3, "evicted pods gone")

    try:
        real = await finalizer_drain(admin, ns, node, real_pods, release_real, gone_real)
    finally:
        with contextlib.suppress(ActionFailed):
            await finalize(admin, ns, "held", hold=False)
    # The fake, set up alike.
    fake = FakeCluster()
    fake.create_deployment(ns, "held", image="registry.invalid/app:v1", replicas=2, at=utcnow())
    fake.add_node(node)
    fake.add_node(own_nodes[1])
    fake_pods = [fake.add_pod(ns, f"held-{i}", node=node, workload="held").name for i in (0, 1)]
    for p in fake_pods:
        fake.add_finalizer(ns, p, HOLD)

    async def release_fake() -> None:
        for p in fake_pods:
            fake.remove_finalizer(ns, p, HOLD)

    async def nothing() -> None:
        await asyncio.sleep(0)

    answers = await finalizer_drain(fake, ns, node, fake_pods, release_fake, nothing)
    assert answers == real
    assert "evicted pods still terminating after 2s" in real[0]
    assert "1 terminating" not in real[0] and "2 terminating" in real[2], real


async def budget_spent(c: Cluster, ns: str, node: str, pods: list[str]) -> Answers:
    answers = [
        await outcome(
            c.drain(
                Target(kind="Node", name=node), action_id="d1", grace_period=None, drain_timeout=3
            ),
            pods,
        )
    ]
    answers += await pod_reads(c, ns, pods)
    last = sorted(pods)[-1]
    answers.append(
        await outcome(
            c.restart_pod(Target(kind="Pod", namespace=ns, name=last), action_id="r1"), pods
        ),
    )
    return answers


async def test_each_eviction_spends_its_budget_on_the_fake_as_on_the_cluster(
    admin: KubeCluster,  # noqa: F811
    k8s_namespace: str,
    own_nodes: tuple[str, str],  # noqa: F811
) -> None:
    # Three pods pinned to the node, a budget allowing one disruption: the drain's cordon
    # leaves replacements Pending, so no recount gives the disruption back meanwhile.
    ns, node = k8s_namespace, own_nodes[0]
    await ready_deployment(admin, ns, "guarded", 3, nodeSelector={"kubernetes.io/hostname": node})
    await budget(admin, ns, "guarded", min_available=2, pods=3)
    real_pods = sorted(
        p["metadata"]["name"]
        for p in (
            await admin.call(
                "GET",
                f"/api/v1/namespaces/{ns}/pods",
                what="pods",
                query=[("labelSelector", "app=guarded")],
            )
        )["items"]
    )
    try:
        real = await budget_spent(admin, ns, node, real_pods)
    finally:
        with contextlib.suppress(ActionFailed):
            await admin.call("DELETE", f"{PDBS.format(ns=ns)}/guarded", what="pdb")
    fake = FakeCluster()
    fake.create_deployment(ns, "guarded", image="registry.invalid/app:v1", replicas=3, at=utcnow())
    fake.add_node(node)
    fake.add_node(own_nodes[1])
    fake_pods = [
        fake.add_pod(ns, f"guarded-{i}", node=node, workload="guarded").name for i in range(3)
    ]
    fake.add_budget(ns, "guarded", workload="guarded", disruptions_allowed=1)
    answers = await budget_spent(fake, ns, node, fake_pods)
    assert answers == real
    assert f"Evicted: {ns}/<pod0>. The node is left cordoned." in real[0], real
    assert "blocked by PodDisruptionBudget" in real[-1], real


async def unready_pod_restart(c: Cluster, ns: str, app: str, pods: list[str]) -> Answers:
    first = sorted(pods)[0]  # the unready one
    target = Target(kind="Pod", namespace=ns, name=first)
    fp = await c.footprint(target)
    answers = [normal(f"{app}: headroom={fp.pdb_headroom} pdbs={fp.pdbs}", pods)]
    answers.append(await outcome(c.restart_pod(target, action_id=f"r-{app}"), pods))
    return answers


async def test_an_unready_pod_is_evicted_only_while_its_budget_is_healthy_on_both(
    admin: KubeCluster,  # noqa: F811
    k8s_namespace: str,
) -> None:
    # The default unhealthyPodEvictionPolicy (IfHealthyBudget): an unready pod may go
    # although no disruption is allowed, but only while the budget is healthy. The fake
    # let any unready pod go: a crash-looping pod's restart under a budget already short of
    # healthy pods succeeded there and is refused by the API server.
    ns = k8s_namespace
    real: Answers = []
    fake = FakeCluster()
    fake.add_node("n1")
    for app, min_available in (("frail", 2), ("sturdy", 1)):
        await ready_deployment(admin, ns, app, 2)
        names = sorted(
            p["metadata"]["name"]
            for p in (
                await admin.call(
                    "GET",
                    f"/api/v1/namespaces/{ns}/pods",
                    what="pods",
                    query=[("labelSelector", f"app={app}")],
                )
            )["items"]
        )
        await admin.call(  # its readiness probe fails (kwok leaves the condition be)
            "PATCH",
            f"/api/v1/namespaces/{ns}/pods/{names[0]}/status",
            what=f"Pod/{names[0]}",
            body={"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            content_type="application/strategic-merge-patch+json",
        )
        await admin.call(
            "POST",
            PDBS.format(ns=ns),
            what="pdb",
            body={
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": app},
                "spec": {
                    "minAvailable": min_available,
                    "selector": {"matchLabels": {"app": app}},
                },
            },
        )

        async def counted(app: str = app) -> bool:
            pdb = await admin.call("GET", f"{PDBS.format(ns=ns)}/{app}", what="pdb")
            status = pdb.get("status") or {}
            return status.get("observedGeneration") == 1 and status.get("currentHealthy") == 1

        await eventually(counted, 60, 0.3, f"PDB {app} observed")
        real += await unready_pod_restart(admin, ns, app, names)
        fake.create_deployment(ns, app, image="registry.invalid/app:v1", replicas=2, at=utcnow())
        fake_names = [fake.add_pod(ns, f"{app}-{i}", node="n1", workload=app).name for i in (0, 1)]
        fake.set_ready(ns, fake_names[0], False)
        fake.add_budget(ns, app, workload=app, min_available=min_available)
    answers: Answers = []
    for app in ("frail", "sturdy"):
        answers += await unready_pod_restart(fake, ns, app, [p.name for p in fake.pods_of(ns, app)])
    assert answers == real
    assert real[1].startswith("ActionFailed: restart of") and "blocked by" in real[1], real
    assert real[3].startswith("applied=True"), real
