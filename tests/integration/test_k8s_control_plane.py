"""The local control plane behaves like a real cluster for what the agent does.

Runs against scripts/k8s.sh (real etcd, kube-apiserver, kube-controller-manager,
kube-scheduler; kwok simulating three nodes and their pods) through the
official ``kubernetes`` client, with TLS verified against the local CA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.fixtures.k8s import K8sCluster

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

T = TypeVar("T")

APP_LABEL = "sre-agent-test"
NODE_COUNT = 3


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def api(k8s_cluster: K8sCluster) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    with api_client:
        yield api_client


def deployment(name: str, image: str, replicas: int = 3) -> client.V1Deployment:
    labels = {"app": name, "app.kubernetes.io/part-of": APP_LABEL}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="app", image=image)],
                    # kwok deletes a simulated pod at once; keep it explicit
                    termination_grace_period_seconds=0,
                    # one pod per node, so the scheduler has to use all three
                    topology_spread_constraints=[
                        client.V1TopologySpreadConstraint(
                            max_skew=1,
                            topology_key="kubernetes.io/hostname",
                            when_unsatisfiable="DoNotSchedule",
                            label_selector=client.V1LabelSelector(match_labels={"app": name}),
                        )
                    ],
                ),
            ),
        ),
    )


def ready_pods(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return [
        pod
        for pod in pods
        if pod.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
    ]


def create_ready_deployment(api: client.ApiClient, namespace: str, name: str) -> list[client.V1Pod]:
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment(name, "registry.invalid/app:v1"))

    def three_ready() -> list[client.V1Pod] | None:
        pods = ready_pods(core, namespace, name)
        return pods if len(pods) == 3 else None

    pods = wait_for(f"3 Ready pods of {name}", three_ready)
    wait_for(
        f"deployment {name} to report 3 available",
        lambda: (
            apps.read_namespaced_deployment_status(name, namespace).status.available_replicas == 3
        ),
    )
    return pods


def test_server_version_matches_build(api: client.ApiClient, k8s_cluster: K8sCluster) -> None:
    info = client.VersionApi(api).get_code()
    print(
        f"server: {info.git_version} ({info.platform}, {info.go_version}, built {info.build_date})"
    )
    assert info.git_version == k8s_cluster.version
    assert info.major == "1"
    assert info.minor == k8s_cluster.version.split(".")[1]
    kubectl_version = k8s_cluster.kubectl_run("version", "--client", "-o", "yaml")
    print(f"kubectl: {kubectl_version.strip()}")
    assert f"gitVersion: {k8s_cluster.version}" in kubectl_version


def test_three_kwok_nodes_are_ready(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    nodes = core.list_node(label_selector="type=kwok").items
    assert sorted(n.metadata.name for n in nodes) == [f"kwok-node-{i}" for i in range(NODE_COUNT)]
    for node in nodes:
        assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", node.metadata.name
        assert not node.spec.taints, f"{node.metadata.name} is tainted: {node.spec.taints}"


def test_deployment_gets_ready_pods_and_rolls_out_a_new_replicaset(
    api: client.ApiClient, k8s_namespace: str
) -> None:
    apps = client.AppsV1Api(api)
    name = "web"
    pods = create_ready_deployment(api, k8s_namespace, name)
    assert sorted(p.spec.node_name for p in pods) == [f"kwok-node-{i}" for i in range(NODE_COUNT)]
    assert all(p.status.pod_ip for p in pods)

    def replicasets() -> list[client.V1ReplicaSet]:
        return apps.list_namespaced_replica_set(k8s_namespace, label_selector=f"app={name}").items

    assert len(replicasets()) == 1

    apps.patch_namespaced_deployment(
        name,
        k8s_namespace,
        {
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:v2"}]}
                }
            }
        },
    )

    def rolled_out() -> bool:
        dep = apps.read_namespaced_deployment_status(name, k8s_namespace)
        status = dep.status
        return bool(
            status.observed_generation == dep.metadata.generation
            and status.updated_replicas == 3
            and status.ready_replicas == 3
            and (status.replicas or 0) == 3
        )

    wait_for("the rollout to v2 to finish", rolled_out)
    rs = replicasets()
    assert len(rs) == 2, [r.metadata.name for r in rs]
    by_image = {r.spec.template.spec.containers[0].image: r for r in rs}
    assert by_image["registry.invalid/app:v2"].status.ready_replicas == 3
    assert not by_image["registry.invalid/app:v1"].spec.replicas
    core = client.CoreV1Api(api)
    images = {p.spec.containers[0].image for p in ready_pods(core, k8s_namespace, name)}
    assert images == {"registry.invalid/app:v2"}


def test_pod_disruption_budget_gates_evictions(api: client.ApiClient, k8s_namespace: str) -> None:
    core = client.CoreV1Api(api)
    policy = client.PolicyV1Api(api)
    name = "guarded"
    pods = create_ready_deployment(api, k8s_namespace, name)

    policy.create_namespaced_pod_disruption_budget(
        k8s_namespace,
        client.V1PodDisruptionBudget(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PodDisruptionBudgetSpec(
                min_available=3, selector=client.V1LabelSelector(match_labels={"app": name})
            ),
        ),
    )

    def budget_settled(allowed: int) -> Callable[[], bool]:
        # The eviction API refuses while the disruption controller has not
        # observed the budget's current generation, so wait for that first.
        def probe() -> bool:
            pdb = policy.read_namespaced_pod_disruption_budget_status(name, k8s_namespace)
            status = pdb.status
            return bool(
                status
                and status.observed_generation == pdb.metadata.generation
                and status.current_healthy == 3
                and status.disruptions_allowed == allowed
            )

        return probe

    wait_for("PDB minAvailable=3 to allow 0 disruptions", budget_settled(0))

    def evict(pod_name: str) -> None:
        core.create_namespaced_pod_eviction(
            pod_name,
            k8s_namespace,
            client.V1Eviction(metadata=client.V1ObjectMeta(name=pod_name, namespace=k8s_namespace)),
            _preload_content=False,
        )

    victim = pods[0].metadata.name
    with pytest.raises(ApiException) as refused:
        evict(victim)
    assert refused.value.status == 429
    # refused by the budget itself ("needs 3 healthy pods and has 3"), not
    # because the budget was "still being processed"
    body = json.loads(refused.value.body)
    causes = [c["message"] for c in body["details"]["causes"]]
    print(f"eviction refused: {body['message']} {causes}")
    assert f"The disruption budget {name} needs 3 healthy pods and has 3 currently" in causes
    assert core.read_namespaced_pod(victim, k8s_namespace).metadata.deletion_timestamp is None

    policy.patch_namespaced_pod_disruption_budget(
        name, k8s_namespace, {"spec": {"minAvailable": 2}}
    )
    wait_for("PDB minAvailable=2 to allow 1 disruption", budget_settled(1))

    evict(victim)

    def victim_gone() -> bool:
        try:
            pod = core.read_namespaced_pod(victim, k8s_namespace)
        except ApiException as e:
            return e.status == 404
        return pod.metadata.deletion_timestamp is not None

    wait_for(f"evicted pod {victim} to be deleted", victim_gone)
    # the ReplicaSet replaces it and the budget is satisfied again
    wait_for(
        "3 Ready pods after the eviction",
        lambda: (
            len(ready_pods(core, k8s_namespace, name)) == 3
            and victim not in {p.metadata.name for p in ready_pods(core, k8s_namespace, name)}
        ),
    )
