"""Where the lab runs its service and injects its faults: the in-process cluster here,
or a real control plane (:mod:`agent.lab_kube`).

Either way the agent acts through the :class:`~handlers.cluster.Cluster` protocol; this is
only the lab's own side: creating the service's nodes and Deployment, reading which pods
serve from which node, and the faults (a rollout, a kubelet event, a node going down).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from agent.analyzer import KubeEvent
from agent.models import utcnow
from handlers.cluster import Cluster
from handlers.fake_cluster import FakeCluster


@dataclass(frozen=True, slots=True)
class Serving:
    """The service's pods that take traffic now, and which of their nodes are down."""

    pods: tuple[tuple[str, str], ...] = ()  # (pod, node)
    down: frozenset[str] = frozenset()


class LabCluster(Protocol):
    """The lab's side of a cluster (see the module docstring)."""

    @property
    def cluster(self) -> Cluster: ...

    @property
    def where(self) -> str:
        """Where the service runs, as printed."""
        ...

    async def setup(self, namespace: str, name: str, *, image: str, replicas: int) -> None: ...

    async def teardown(self) -> None: ...

    async def serving(self, namespace: str, name: str) -> Serving: ...

    async def ready(self, namespace: str, name: str) -> tuple[tuple[str, str], ...]:
        """(pod, node) of the service's pods that are back: running, ready, not being
        deleted, on a node that is up; sorted. Read from the pods, not the Deployment,
        whose spec says only how many were asked for."""
        ...

    async def rollout(self, namespace: str, name: str, *, image: str, at: datetime) -> None: ...

    async def add_event(self, event: KubeEvent) -> None: ...

    async def crash(self, namespace: str, pod: str) -> None:
        """The pod's container crashed and the kubelet restarted it (its restart count
        goes up); a pod already gone is not an error."""
        ...

    async def fail_node(self, node: str, *, why: str, at: datetime) -> None: ...

    async def close(self) -> None: ...


# The in-process lab's nodes: checkout's three pods start one on each.
LAB_NODES = ("lab-node-1", "lab-node-2", "lab-node-3")


class InProcessLab:
    """The in-process cluster, which the lab's service drives as the ReplicaSet controller
    and the scheduler would (:meth:`FakeCluster.reconcile`)."""

    def __init__(self, cluster: FakeCluster | None = None) -> None:
        self._cluster = cluster or FakeCluster()

    @property
    def cluster(self) -> FakeCluster:
        return self._cluster

    @property
    def where(self) -> str:
        return "in process"

    async def setup(self, namespace: str, name: str, *, image: str, replicas: int) -> None:
        for node in LAB_NODES:
            self._cluster.add_node(node)
        self._cluster.create_deployment(
            namespace, name, image=image, replicas=replicas, at=utcnow() - timedelta(hours=6)
        )

    async def teardown(self) -> None:
        return None  # the cluster goes with the process

    async def close(self) -> None:
        return None  # shared with the agent, which closes it

    async def serving(self, namespace: str, name: str) -> Serving:
        pods = self._cluster.reconcile(namespace, name)
        nodes = {p.node for p in pods}
        return Serving(
            tuple((p.name, p.node) for p in pods),
            frozenset(n for n in nodes if self._cluster.bad_conditions(n)),
        )

    async def ready(self, namespace: str, name: str) -> tuple[tuple[str, str], ...]:
        pods = self._cluster.reconcile(namespace, name)
        return tuple(
            (p.name, p.node) for p in pods if p.ready and not self._cluster.bad_conditions(p.node)
        )

    async def rollout(self, namespace: str, name: str, *, image: str, at: datetime) -> None:
        self._cluster.rollout(namespace, name, image=image, at=at)

    async def add_event(self, event: KubeEvent) -> None:
        self._cluster.add_event(event)

    async def crash(self, namespace: str, pod: str) -> None:
        if self._cluster.pod(namespace, pod) is not None:
            self._cluster.crash(namespace, pod)

    async def fail_node(self, node: str, *, why: str, at: datetime) -> None:
        self._cluster.set_node_conditions(node, ["NotReady"])
        self._cluster.add_event(KubeEvent("", "Node", node, "NodeNotReady", why, at=at))
