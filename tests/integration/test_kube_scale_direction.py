"""The Kubernetes adapter on the real control plane: a directed scale never moves the count
the other way, neither on a plain Deployment nor through the bounds of the HPA that owns its
count; an undo (no direction) restores what was recorded; a drain stops evicting once the
kill switch is on, leaving the node cordoned and saying why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import ActionFailed
from agent.metrics import Metrics
from agent.models import Target
from handlers.executor import Executor, kill_switch_file
from handlers.kube import KubeCluster
from tests.fakes.publisher import MemoryBus
from tests.fixtures.k8s import K8sCluster
from tests.helpers import eventually, make_settings
from tests.integration.test_kube_actions import (
    admin,  # noqa: F401 (a fixture)
    create,
    hpa_of,
    own_nodes,  # noqa: F401 (a fixture)
    pods_of,
    read,
    ready_deployment,
    request,
)

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

HPAS = "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers"


async def test_a_directed_scale_of_a_deployment_never_moves_the_other_way(
    admin: KubeCluster,  # noqa: F811
    k8s_namespace: str,
) -> None:
    web = await ready_deployment(admin, k8s_namespace, "web", 4)
    # What a clamp to remediation.max_replicas / min_replicas would have written.
    with pytest.raises(ActionFailed, match="has 4 replicas: scaling up to 3"):
        await admin.scale(web, action_id="up", replicas=3, direction="up")
    with pytest.raises(ActionFailed, match="has 4 replicas: scaling down to 5"):
        await admin.scale(web, action_id="down", replicas=5, direction="down")
    assert (await read(admin, web))["spec"]["replicas"] == 4
    effect = await admin.scale(web, action_id="up2", replicas=5, direction="up")
    assert effect.applied and effect.prior_state == {"replicas": 4}
    assert (await read(admin, web))["spec"]["replicas"] == 5
    undo = await admin.undo(web, action_id="u1", action_type="scale_up", prior={"replicas": 4})
    assert undo.applied
    assert (await read(admin, web))["spec"]["replicas"] == 4


async def test_a_directed_scale_under_an_hpa_never_moves_its_bounds_the_other_way(
    admin: KubeCluster,  # noqa: F811
    k8s_namespace: str,
) -> None:
    ns = k8s_namespace
    web = await ready_deployment(admin, ns, "web", 4)
    await create(admin, ns, HPAS, hpa_of("web", 1, 4))
    path = f"{HPAS.format(ns=ns)}/web"

    async def bounds() -> tuple[int, int]:
        spec = (await admin.call("GET", path, what="hpa"))["spec"]
        return spec["minReplicas"], spec["maxReplicas"]

    with pytest.raises(ActionFailed, match="has 4 replicas: scaling up to 3"):
        await admin.scale(web, action_id="up", replicas=3, direction="up")
    with pytest.raises(ActionFailed, match="has 4 replicas: scaling down to 4"):
        await admin.scale(web, action_id="down", replicas=4, direction="down")
    assert await bounds() == (1, 4)
    effect = await admin.scale(web, action_id="down2", replicas=3, direction="down")
    assert effect.applied
    assert await bounds() == (1, 3)


class _SwitchAfterFirstEviction(KubeCluster):
    """The real adapter; the operator turns the kill switch on once the first eviction is
    answered, between two evictions of one drain."""

    def __init__(self, kill: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.kill = kill

    async def _raw(self, method: str, path: str, **kw: Any) -> Any:
        answer = await super()._raw(method, path, **kw)
        if method == "POST" and path.endswith("/eviction"):
            self.kill.touch()
        return answer


async def test_a_drain_in_progress_stops_when_the_kill_switch_turns_on(
    k8s_cluster: K8sCluster,
    k8s_namespace: str,
    admin: KubeCluster,  # noqa: F811
    own_nodes: tuple[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    ns, node = k8s_namespace, own_nodes[0]
    kill = tmp_path / "kill"
    await ready_deployment(admin, ns, "pinned", 3, nodeSelector={"kubernetes.io/hostname": node})
    settings = make_settings("127.0.0.1:1", "x.", doc={"remediation": {"verify_after": 3600}})
    async with _SwitchAfterFirstEviction(
        kill, kubeconfig=str(k8s_cluster.kubeconfig), poll_interval=0.3
    ) as kube:
        ex = Executor(
            settings,
            bus=MemoryBus(),
            cluster=kube,
            metrics=Metrics(),
            switches=kill_switch_file(str(kill)),
        )
        try:
            r = await ex.on_action(request("drain_node", Target(kind="Node", name=node)))
        finally:
            await ex.stop()
    assert r.status == "failed", r.message
    assert f"stopped by the kill switch (file {kill} exists)" in r.message
    assert r.prior_state == {"unschedulable": False}
    assert (await admin.call("GET", f"/api/v1/nodes/{node}", what="n"))["spec"]["unschedulable"]

    # The node is the test's own: exactly one pinned pod went, the other two are still on it.
    evicted = r.message.split("Evicted: ")[1].split(". ")[0].split(", ")
    assert len(evicted) == 1 and evicted[0].startswith(f"{ns}/pinned-"), r.message
    left = 2

    async def pinned_left() -> bool:
        pods = await pods_of(admin, ns, "pinned")
        return len([p for p in pods if p["spec"].get("nodeName") == node]) == left

    await eventually(pinned_left, 30, 0.3, f"{left} pinned pods left on the node")
