"""The Kubernetes adapter on an in-memory API server (tests/fakes/kube_api.py): a directed
scale never moves the count the other way, on a plain Deployment nor through the bounds of
the HPA that owns its count; an undo (no direction) restores as recorded; a drain stops
evicting once the kill switch is on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from agent.errors import ActionFailed
from agent.metrics import Metrics
from agent.models import Target
from handlers.executor import Executor, kill_switch_file
from handlers.kube import KubeCluster
from tests.fakes.kube_api import FakeKubeAPI
from tests.fakes.publisher import MemoryBus
from tests.unit.factories import action, settings

WEB = Target(kind="Deployment", namespace="shop", name="web")
DEPLOYMENT = "/apis/apps/v1/namespaces/shop/deployments/web"
HPA = "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers/web"


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKubeAPI, KubeCluster]]:
    fake = FakeKubeAPI()
    kube = KubeCluster(api=fake, poll_interval=0.01)
    try:
        yield fake, kube
    finally:
        await kube.close()


async def test_a_directed_scale_of_a_deployment_never_moves_the_other_way(
    api: tuple[FakeKubeAPI, KubeCluster],
) -> None:
    fake, kube = api
    fake.deployment("shop", "web", replicas=80)
    with pytest.raises(ActionFailed, match="has 80 replicas: scaling up to 50"):
        await kube.scale(WEB, action_id="up", replicas=50, direction="up")
    with pytest.raises(ActionFailed, match="has 80 replicas: scaling down to 81"):
        await kube.scale(WEB, action_id="down", replicas=81, direction="down")
    assert fake.writes == []
    effect = await kube.scale(WEB, action_id="up2", replicas=81, direction="up")
    assert effect.applied and effect.prior_state == {"replicas": 80}
    assert fake.get(DEPLOYMENT)["spec"]["replicas"] == 81


async def test_a_directed_scale_under_an_hpa_never_moves_its_bounds_the_other_way(
    api: tuple[FakeKubeAPI, KubeCluster],
) -> None:
    fake, kube = api
    fake.deployment("shop", "web", replicas=80)
    fake.hpa("shop", "web", "web", lo=10, hi=80)
    with pytest.raises(ActionFailed, match="has 80 replicas: scaling up to 50"):
        await kube.scale(WEB, action_id="up", replicas=50, direction="up")
    with pytest.raises(ActionFailed, match="has 80 replicas: scaling down to 80"):
        await kube.scale(WEB, action_id="down", replicas=80, direction="down")
    assert fake.writes == []
    assert (fake.get(HPA)["spec"]["minReplicas"], fake.get(HPA)["spec"]["maxReplicas"]) == (10, 80)
    effect = await kube.scale(WEB, action_id="down2", replicas=78, direction="down")
    assert effect.applied
    assert (fake.get(HPA)["spec"]["minReplicas"], fake.get(HPA)["spec"]["maxReplicas"]) == (10, 78)


async def test_an_undo_restores_the_recorded_count_whichever_way(
    api: tuple[FakeKubeAPI, KubeCluster],
) -> None:
    fake, kube = api
    fake.deployment("shop", "web", replicas=6)
    undo = await kube.undo(WEB, action_id="u1", action_type="scale_up", prior={"replicas": 4})
    assert undo.applied
    assert fake.get(DEPLOYMENT)["spec"]["replicas"] == 4


async def test_a_drain_in_progress_stops_when_the_kill_switch_turns_on(
    api: tuple[FakeKubeAPI, KubeCluster], tmp_path: Any
) -> None:
    """Through the executor: the switch is asked before each eviction, so a drain already
    running stops evicting; the node stays cordoned and the result says why."""
    fake, kube = api
    kill = tmp_path / "kill"
    fake.node("n1")
    for i in (1, 2, 3):
        fake.pod("shop", f"web-{i}", node="n1")
    fake.on_evict = lambda pod: kill.touch()  # the operator acts after the first eviction
    ex = Executor(
        settings({"remediation": {"verify_after": 3600}}),
        bus=MemoryBus(),
        cluster=kube,
        metrics=Metrics(),
        switches=kill_switch_file(str(kill)),
    )
    try:
        r = await ex.on_action(replace(action("drain_node"), target=Target(kind="Node", name="n1")))
    finally:
        await ex.stop()
    assert r.status == "failed"
    assert f"stopped by the kill switch (file {kill} exists)" in r.message
    assert r.prior_state == {"unschedulable": False}
    assert fake.get("/api/v1/nodes/n1")["spec"]["unschedulable"] is True
    pods = [p for p in fake.objects if "/pods/" in p]
    assert len(pods) == 2  # one evicted, two left
