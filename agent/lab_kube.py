"""The lab on a real control plane: kwok's nodes and pods behind kube-apiserver, the
controller-manager and the scheduler (``scripts/k8s.sh``).

The lab creates nodes of its own, which kwok runs, and the service's Deployment spread
over them; it removes both afterwards. A node goes down the way a dead kubelet does: kwok
stops playing it (no more heartbeats), and its Ready condition turns False.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from agent.analyzer import KubeEvent
from agent.errors import ActionFailed
from agent.lab_clusters import Serving
from agent.models import Target, utcnow
from handlers.kube import KubeCluster, NotFound

log = logging.getLogger(__name__)

# kwok simulates the kubelet of every node carrying this annotation (scripts/k8s.sh).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
LAB_LABEL = "sre-agent.io/lab"


def lab_nodes(run: str, count: int) -> list[dict[str, Any]]:
    """Nodes of their own for one lab run, which kwok runs: the node-failure experiment
    takes one down without touching any other workload's."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"lab-{run}-{i}",
                "annotations": {KWOK_ANNOTATION: "fake"},
                "labels": {
                    LAB_LABEL: run,
                    "type": "kwok",
                    "kubernetes.io/hostname": f"lab-{run}-{i}",
                    "kubernetes.io/os": "linux",
                },
            },
            "spec": {},
        }
        for i in range(1, count + 1)
    ]


def lab_deployment(
    namespace: str, name: str, *, image: str, replicas: int, run: str | None
) -> dict[str, Any]:
    """The service's Deployment: one pod per lab node (``run``), as a zone-spread service
    would be, so a node failure takes one replica of several.

    The spread honours taints: by default a cordoned or NotReady node still counts as a
    domain with no pod, and with maxSkew 1 the replacement of its pod could go nowhere
    else (it stayed Pending while the lab reported the service healed)."""
    pod_spec: dict[str, Any] = {"containers": [{"name": "app", "image": image}]}
    if run is not None:
        pod_spec["nodeSelector"] = {LAB_LABEL: run}
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "DoNotSchedule",
                "nodeAffinityPolicy": "Honor",  # only the run's nodes (the default, said)
                "nodeTaintsPolicy": "Honor",
                "labelSelector": {"matchLabels": {"app": name}},
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def takes_pods(node: dict[str, Any]) -> bool:
    """Whether the scheduler places pods on ``node``: Ready, and no taint a pod without
    tolerations must stay off (a new node carries node.kubernetes.io/not-ready until the
    node controller sees it Ready)."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    tainted = any(t.get("effect") in ("NoSchedule", "NoExecute") for t in spec.get("taints") or [])
    return ready and not tainted and not spec.get("unschedulable")


def serving_pods(pods: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod, node) of the pods an Endpoints controller would send traffic to: running on a
    node, not being deleted. Sorted by name, so "the first pod" is stable."""
    out = []
    for p in pods:
        meta, spec, status = p.get("metadata") or {}, p.get("spec") or {}, p.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        if spec.get("nodeName"):
            out.append((str(meta.get("name", "")), str(spec["nodeName"])))
    return sorted(out)


def ready_pods(pods: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod, node) of the serving pods (:func:`serving_pods`) whose Ready condition is
    True: a pod the scheduler could not place, or one on a node the node controller
    marked down, does not count as the service being back."""
    ready = set()
    for p in pods:
        conditions = (p.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            ready.add(str((p.get("metadata") or {}).get("name", "")))
    return [(pod, node) for pod, node in serving_pods(pods) if pod in ready]


class KubeLab:
    """A real control plane: the lab creates the service's own kwok nodes (``nodes``; 0:
    use the cluster's) and its Deployment, and removes what it created afterwards."""

    def __init__(self, cluster: KubeCluster, *, nodes: int = 3, refresh: float = 1.0) -> None:
        self._cluster = cluster
        self._node_count = nodes
        self._refresh = refresh
        self.run = uuid.uuid4().hex[:6]
        self.nodes: list[str] = []
        self._created: list[tuple[str, str]] = []  # (path, what) to delete, newest last
        self._view: tuple[float, Serving] | None = None

    @property
    def cluster(self) -> KubeCluster:
        return self._cluster

    @property
    def where(self) -> str:
        return f"on kwok nodes {', '.join(self.nodes)}" if self.nodes else "on the cluster"

    async def _create(self, path: str, doc: dict[str, Any], what: str) -> None:
        await self._cluster.call("POST", path, what=what, body=doc)
        name = doc["metadata"]["name"]
        self._created.append((f"{path}/{name}", what))

    async def setup(self, namespace: str, name: str, *, image: str, replicas: int) -> None:
        """The namespace (kept afterwards: deleting it waits on every pod in it, and a pod
        on a node that went down ends only once its node is gone), the lab's nodes, and
        the Deployment, replacing an earlier run's."""
        await self._namespace(namespace)
        run = None
        if self._node_count:
            run = self.run
            for node in lab_nodes(self.run, self._node_count):
                await self._create("/api/v1/nodes", node, f"Node/{node['metadata']['name']}")
                self.nodes.append(node["metadata"]["name"])
            # The spread honours taints: a Deployment created while some of the nodes still
            # carry not-ready would put every pod on the others.
            await self._until_nodes_take_pods()
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
        await self._gone(f"{path}/{name}", f"Deployment/{namespace}/{name}")
        doc = lab_deployment(namespace, name, image=image, replicas=replicas, run=run)
        await self._create(path, doc, f"Deployment/{namespace}/{name}")
        await self._until_serving(namespace, name, replicas)

    async def _until_nodes_take_pods(self, limit: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            waiting = [
                n
                for n in self.nodes
                if not takes_pods(await self._cluster.call("GET", f"/api/v1/nodes/{n}", what=n))
            ]
            if not waiting:
                return
            if loop.time() >= deadline:
                raise ActionFailed(
                    f"lab nodes {', '.join(waiting)} not schedulable after {limit:.0f}s"
                )
            await asyncio.sleep(0.5)

    async def _namespace(self, namespace: str, limit: float = 180.0) -> None:
        """Create the namespace unless it exists; one being deleted is waited out first
        (nothing can be created in it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        path, what = f"/api/v1/namespaces/{namespace}", f"Namespace/{namespace}"
        while True:
            try:
                ns = await self._cluster.call("GET", path, what=what)
            except NotFound:
                doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
                await self._cluster.call("POST", "/api/v1/namespaces", what=what, body=doc)
                return
            if (ns.get("status") or {}).get("phase") != "Terminating":
                return
            if loop.time() >= deadline:
                raise ActionFailed(f"{what} still terminating after {limit:.0f}s")
            await asyncio.sleep(1.0)

    async def _gone(self, path: str, what: str, limit: float = 60.0) -> None:
        """Delete ``path`` (an earlier run's) and wait until it is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            await self._cluster.call("DELETE", path, what=what)
        except NotFound:
            return
        while loop.time() < deadline:
            try:
                await self._cluster.call("GET", path, what=what)
            except NotFound:
                return
            await asyncio.sleep(0.5)
        raise ActionFailed(f"{what} still there {limit:.0f}s after its deletion")

    async def _until_serving(
        self, namespace: str, name: str, replicas: int, limit: float = 90.0
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            view = await self._read(namespace, name)
            if len(view.pods) >= replicas and not view.down:
                return
            if loop.time() >= deadline:
                raise ActionFailed(
                    f"{namespace}/{name}: {len(view.pods)} of {replicas} pods running after "
                    f"{limit:.0f}s"
                )
            await asyncio.sleep(0.5)

    async def teardown(self) -> None:
        """Remove what setup created, newest first; what fails is logged, not raised."""
        while self._created:
            path, what = self._created.pop()
            try:
                await self._cluster.call("DELETE", path, what=what)
            except NotFound:
                pass
            except Exception:  # clean up the rest whatever one did
                log.exception("lab: could not delete %s", what)

    async def serving(self, namespace: str, name: str) -> Serving:
        """Read at most every ``refresh`` s: the traffic loop asks ten times a second."""
        now = asyncio.get_running_loop().time()
        if self._view is None or now - self._view[0] >= self._refresh:
            self._view = (now, await self._read(namespace, name))
        return self._view[1]

    async def ready(self, namespace: str, name: str) -> tuple[tuple[str, str], ...]:
        pods = ready_pods(await self._pods(namespace, name))
        down = await self._cluster.node_conditions(sorted({node for _, node in pods}))
        return tuple((pod, node) for pod, node in pods if node not in down)

    async def _pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        doc = await self._cluster.call(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            what="pods",
            query=[("labelSelector", f"app={name}")],
        )
        return list(doc.get("items") or [])

    async def _read(self, namespace: str, name: str) -> Serving:
        pods = serving_pods(await self._pods(namespace, name))
        down = await self._cluster.node_conditions(sorted({node for _, node in pods}))
        return Serving(tuple(pods), frozenset(down))

    async def rollout(self, namespace: str, name: str, *, image: str, at: datetime) -> None:
        del at  # the API server stamps the rollout
        target = Target(kind="Deployment", namespace=namespace, name=name)
        patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}}
        await self._cluster.call(
            "PATCH",
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
            what=target.key,
            body=patch,
            content_type="application/strategic-merge-patch+json",
        )

    async def add_event(self, event: KubeEvent) -> None:
        """What the kubelet (or the node controller) would report."""
        at = (event.at or utcnow()).isoformat().replace("+00:00", "Z")
        namespace = event.namespace or "default"
        doc = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "lab-", "namespace": namespace},
            "involvedObject": {
                "kind": event.kind,
                "name": event.name,
                "namespace": event.namespace,
            },
            "reason": event.reason,
            "message": event.message,
            "type": "Warning",
            "source": {"component": "sre-agent-lab"},
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
        }
        await self._cluster.call(
            "POST", f"/api/v1/namespaces/{namespace}/events", what="Event", body=doc
        )

    async def crash(self, namespace: str, pod: str) -> None:
        """What the kubelet writes when it restarts a crashed container; kwok leaves a
        running pod's container statuses alone, so the count stays."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}"
        try:
            obj = await self._cluster.call("GET", path, what=f"Pod/{namespace}/{pod}")
        except NotFound:
            return  # replaced meanwhile
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        if not statuses:
            return  # not started yet: nothing to restart
        statuses[0]["restartCount"] = int(statuses[0].get("restartCount") or 0) + 1
        try:
            await self._cluster.call(
                "PATCH",
                f"{path}/status",
                what=f"Pod/{namespace}/{pod}",
                body={"status": {"containerStatuses": statuses}},
                content_type="application/merge-patch+json",
            )
        except NotFound:
            return

    async def close(self) -> None:
        await self._cluster.close()

    async def fail_node(self, node: str, *, why: str, at: datetime) -> None:
        """The node's kubelet dies: kwok stops playing it (no more heartbeats), and the
        node reports NotReady, as the node controller would mark it once the heartbeats
        stop (here without waiting out its grace period)."""
        await self._cluster.call(
            "PATCH",
            f"/api/v1/nodes/{node}",
            what=f"Node//{node}",
            body={"metadata": {"annotations": {KWOK_ANNOTATION: None}}},
            content_type="application/merge-patch+json",
        )
        stamp = at.isoformat().replace("+00:00", "Z")
        ready = {
            "type": "Ready",
            "status": "False",
            "reason": "KubeletNotReady",
            "message": why,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        await self._cluster.call(
            "PATCH",
            f"/api/v1/nodes/{node}/status",
            what=f"Node//{node}",
            body={"status": {"conditions": [ready]}},
            content_type="application/strategic-merge-patch+json",
        )
        await self.add_event(KubeEvent("", "Node", node, "NodeNotReady", why, at=at))
        self._view = None  # the next read sees it
