"""The analysis context read from a real API server (events, pods, logs, config changes,
node conditions, rollout history) through the Kubernetes adapter, as the analyzer's
read-only ServiceAccount (deploy/rbac.yaml); neither read role can write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config

from agent.context import ClusterContext, ContextGatherer
from agent.errors import ActionFailed, AgentError
from agent.kube_watch import KubeWatcher
from agent.metrics import Metrics
from agent.models import Member, Target, fingerprint, utcnow
from agent.settings import parse_settings
from handlers.kube import KubeCluster
from tests.fakes.incidents import incident
from tests.fakes.publisher import MemoryBus
from tests.fixtures.k8s import K8sCluster, role_kubeconfig
from tests.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


@pytest.fixture(scope="module")
def analyzer_kubeconfig(
    k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with role_kubeconfig(k8s_cluster, "sre-agent-analyzer", tmp_path_factory.mktemp("rbac")) as p:
        yield p


@pytest.fixture(scope="module")
def detector_kubeconfig(
    k8s_cluster: K8sCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    with role_kubeconfig(k8s_cluster, "sre-agent-detector", tmp_path_factory.mktemp("rbac")) as p:
        yield p


def apply(k8s_cluster: Any, doc: dict[str, Any]) -> None:
    path = k8s_cluster.state_dir / f"ctx-{doc['kind']}-{doc['metadata']['name']}.json"
    path.write_text(json.dumps(doc))
    k8s_cluster.kubectl_run("apply", "-f", str(path))


async def test_context_from_the_real_api(
    k8s_cluster: Any, k8s_namespace: str, analyzer_kubeconfig: Path
) -> None:
    ns = k8s_namespace
    apply(
        k8s_cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cart-config", "namespace": ns},
            "data": {"MODE": "fast", "RETRIES": "3"},
        },
    )
    apply(
        k8s_cluster,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "unrelated", "namespace": ns},
            "data": {"x": "1"},
        },
    )
    apply(
        k8s_cluster,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "cart", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "cart"}},
                "template": {
                    "metadata": {"labels": {"app": "cart"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "app",
                                "image": "cart:v1",
                                "envFrom": [{"configMapRef": {"name": "cart-config"}}],
                            }
                        ],
                        "tolerations": [{"operator": "Exists"}],
                    },
                },
            },
        },
    )
    now = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
    apply(
        k8s_cluster,
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "cart-backoff", "namespace": ns},
            "involvedObject": {"kind": "Pod", "namespace": ns, "name": "cart-7d9f-abcde"},
            "reason": "BackOff",
            "message": "Back-off restarting failed container app",
            "type": "Warning",
            "count": 4,
            "firstTimestamp": now,
            "lastTimestamp": now,
        },
    )
    apply(
        k8s_cluster,
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "other-event", "namespace": ns},
            "involvedObject": {"kind": "Pod", "namespace": ns, "name": "payments-1"},
            "reason": "BackOff",
            "message": "not ours",
            "type": "Warning",
            "firstTimestamp": now,
            "lastTimestamp": now,
        },
    )

    async with KubeCluster(kubeconfig=str(analyzer_kubeconfig)) as kube:
        assert isinstance(kube, ClusterContext)
        rollout = await kube.workload(Target(kind="Deployment", namespace=ns, name="cart"))
        assert rollout.image == "cart:v1" and rollout.revisions
        events = await kube.events(ns, ["cart"], limit=10)
        # Ours, plus what the real controllers and scheduler said about cart's objects.
        assert ("Pod", "cart-7d9f-abcde", "BackOff", 4) in [
            (e.kind, e.name, e.reason, e.count) for e in events
        ]
        assert all(e.name.startswith("cart") for e in events), events
        backoff = next(e for e in events if e.reason == "BackOff")
        assert "Back-off restarting" in backoff.message and backoff.at is not None
        assert len(await kube.events(ns, ["cart"], limit=1)) == 1

        cart = [Target(kind="Deployment", namespace=ns, name="cart")]
        changes = await kube.config_changes(cart, since=utcnow() - timedelta(hours=1))
        assert [(c.name, c.used_by) for c in changes] == [("cart-config", ("cart",))]
        assert changes[0].summary == "keys: MODE, RETRIES"
        assert await kube.config_changes(cart, since=utcnow() + timedelta(hours=1)) == []

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        pods: list[str] = []
        while not pods:
            assert loop.time() < deadline, "the Deployment's pod never appeared"
            pods = list(await kube.pods(ns, "cart"))
            await asyncio.sleep(0.3)
        assert all(p.startswith("cart-") for p in pods)
        # kwok pods have no kubelet behind them: the adapter reports it, it does not crash.
        with pytest.raises(AgentError) as err:
            await kube.logs(ns, pods[0], tail=20)
        assert "forbidden" not in str(err.value)

        nodes = await kube.node_conditions(["kwok-node-0", "no-such-node"])
        assert nodes == {}, "healthy kwok nodes report no bad conditions"


def workload(kind: str, name: str, config_map: str) -> dict[str, Any]:
    """A ``kind`` named ``name`` whose pods mount ``config_map``."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": f"{name}-{kind.lower()}"}},
        "template": {
            "metadata": {"labels": {"app": f"{name}-{kind.lower()}"}},
            "spec": {
                "containers": [{"name": "app", "image": f"{name}:v1"}],
                "volumes": [{"name": "config", "configMap": {"name": config_map}}],
            },
        },
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


async def test_a_statefulsets_config_changes_are_its_own_not_its_namesake_deployments(
    k8s_cluster: Any, k8s_namespace: str, analyzer_kubeconfig: Path
) -> None:
    ns = k8s_namespace
    for doc in (
        workload("StatefulSet", "db", "db-sts-config"),
        workload("Deployment", "db", "db-deploy-config"),
    ):
        doc["metadata"]["namespace"] = ns
        apply(k8s_cluster, doc)
    for cm in ("db-sts-config", "db-deploy-config"):
        apply(
            k8s_cluster,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": cm, "namespace": ns},
                "data": {"MODE": "fast"},
            },
        )
    settings = parse_settings({}, env={})
    labels = {"cluster": "test", "namespace": ns, "service": "db"}
    seen = {}
    async with KubeCluster(kubeconfig=str(analyzer_kubeconfig)) as kube:
        gatherer = ContextGatherer(settings, cluster=kube, source=kube, logs=False)
        for kind in ("StatefulSet", "Deployment"):
            pod = {**labels, "owner": f"{kind}/db", "workload": "db"}
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
            inc = replace(incident(signal, labels=labels), opened_at=utcnow())
            ctx = await gatherer.gather(inc)
            seen[kind] = [(c.name, c.used_by) for c in ctx.config_changes]
    assert seen == {
        "StatefulSet": [("db-sts-config", ("db",))],
        "Deployment": [("db-deploy-config", ("db",))],
    }


async def test_the_read_roles_cannot_patch_a_deployment(
    k8s_cluster: Any,
    k8s_namespace: str,
    analyzer_kubeconfig: Path,
    detector_kubeconfig: Path,
) -> None:
    apply(
        k8s_cluster,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": k8s_namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "app", "image": "web:v1"}]},
                },
            },
        },
    )
    path = f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments/web"
    target = Target(kind="Deployment", namespace=k8s_namespace, name="web")
    for kubeconfig in (analyzer_kubeconfig, detector_kubeconfig):
        async with KubeCluster(kubeconfig=str(kubeconfig)) as kube:
            with pytest.raises(ActionFailed, match=r"forbidden: .*cannot patch") as err:
                await kube.call(
                    "PATCH",
                    path,
                    what=target.key,
                    body={"spec": {"replicas": 3}},
                    content_type="application/merge-patch+json",
                )
            assert "system:serviceaccount:sre-agent-" in str(err.value)
    # The analyzer reads the Deployment it may not write: the 403 was the patch's.
    async with KubeCluster(kubeconfig=str(analyzer_kubeconfig)) as kube:
        with pytest.raises(ActionFailed, match="forbidden"):
            await kube.restart(target, action_id="a-1", at=utcnow())
        assert (await kube.workload(target)).replicas == 1


async def test_the_detector_role_lists_and_watches_what_the_kube_watch_reads(
    detector_kubeconfig: Path,
) -> None:
    settings = parse_settings(
        {"detectors": {"kubernetes": {"enabled": True, "watch_timeout": "2s"}}}, env={}
    )
    api = config.new_client_from_config(config_file=str(detector_kubeconfig))
    bus = MemoryBus()
    watcher = KubeWatcher(
        settings, publish=bus, topic=bus.topic("anomalies"), metrics=Metrics(), api=api
    )
    await watcher.start()
    try:
        await asyncio.wait_for(watcher.synced.wait(), 30)
        # Each watch ends after watch_timeout and resumes: a second one means the first
        # was granted and streamed; a 403 on list or watch counts as an error instead.
        await eventually(
            lambda: all(w.stats["watches"] >= 2 for w in watcher.watches.values()),
            what="every resource watched twice",
        )
        assert set(watcher.watches) == {"pods", "nodes", "events"}
        assert all(w.stats["errors"] == 0 for w in watcher.watches.values())
        assert watcher.failure is None
    finally:
        await watcher.stop()
