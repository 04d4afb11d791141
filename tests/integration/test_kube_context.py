"""The analysis context read from a real API server (events, pods, logs, config changes,
node conditions) through the Kubernetes adapter."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from agent.context import ClusterContext
from agent.errors import AgentError
from agent.models import utcnow
from handlers.kube import KubeCluster

pytestmark = [pytest.mark.integration, pytest.mark.k8s]


def apply(k8s_cluster: Any, doc: dict[str, Any]) -> None:
    path = k8s_cluster.state_dir / f"ctx-{doc['kind']}-{doc['metadata']['name']}.json"
    path.write_text(json.dumps(doc))
    k8s_cluster.kubectl_run("apply", "-f", str(path))


async def test_context_from_the_real_api(k8s_cluster: Any, k8s_namespace: str) -> None:
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

    async with KubeCluster(kubeconfig=str(k8s_cluster.kubeconfig)) as kube:
        assert isinstance(kube, ClusterContext)
        events = await kube.events(ns, ["cart"], limit=10)
        # Ours, plus what the real controllers and scheduler said about cart's objects.
        assert ("Pod", "cart-7d9f-abcde", "BackOff", 4) in [
            (e.kind, e.name, e.reason, e.count) for e in events
        ]
        assert all(e.name.startswith("cart") for e in events), events
        backoff = next(e for e in events if e.reason == "BackOff")
        assert "Back-off restarting" in backoff.message and backoff.at is not None
        assert len(await kube.events(ns, ["cart"], limit=1)) == 1

        changes = await kube.config_changes(ns, ["cart"], since=utcnow() - timedelta(hours=1))
        assert [(c.name, c.used_by) for c in changes] == [("cart-config", ("cart",))]
        assert changes[0].summary == "keys: MODE, RETRIES"
        assert await kube.config_changes(ns, ["cart"], since=utcnow() + timedelta(hours=1)) == []

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        pods: list[str] = []
        while not pods:
            assert loop.time() < deadline, "the Deployment's pod never appeared"
            pods = list(await kube.pods(ns, "cart"))
            await asyncio.sleep(0.3)
        assert all(p.startswith("cart-") for p in pods)
        # kwok pods have no kubelet behind them: the adapter reports it, it does not crash.
        with pytest.raises(AgentError):
            await kube.logs(ns, pods[0], tail=20)

        nodes = await kube.node_conditions(["kwok-node-0", "no-such-node"])
        assert nodes == {}, "healthy kwok nodes report no bad conditions"
