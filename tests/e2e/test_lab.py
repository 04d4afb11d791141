"""`make run`'s main job, the lab, heals its injected fault end to end (with the lab's
simulated on-call approving through the decisions topic), and so does each chaos
experiment of `make chaos` on the real control plane (kwok's nodes and pods): the remedy
it names heals it, verified, and nothing else acts."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from agent.lab import experiment, run_lab
from agent.lab_kube import LAB_LABEL
from agent.settings import Settings
from tests.helpers import lab_settings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# In process: `make run`'s job (the same experiment runs on the real control plane in
# tests/e2e/test_healing_loop.py).
STEPS = {
    "bad-rollout": [
        "lab: experiment bad-rollout: ",
        "anomaly high-error-rate firing",
        "incident",
        "bad_rollout",
        "approval requested for rollback",
        "[on-call]    approves rollback",
        "result rollback succeeded outcome=unknown",
        "result rollback succeeded outcome=healed",
        "lab: healed by rollback in ",
        "checkout runs 3 x registry.local/checkout:v1 (revision 3",
    ],
}


# On the real control plane: kwok runs the pods on the lab's own nodes, the
# controller-manager replaces them, the scheduler places them.
KUBE_STEPS = {
    # The rule analyzer finds the crash loop in the kubelet's BackOff event (the context
    # it reads since it no longer sees rollouts only) and restarts the Deployment.
    "crash-loop": [
        "lab: experiment crash-loop: ",
        "anomaly container-restarts firing",
        "crash_loop: checkout pods are crash looping (confidence 0.70",
        "approval requested for restart_workload Deployment/{ns}/checkout",
        "[on-call]    approves restart_workload",
        "result restart_workload succeeded outcome=unknown",
        "result restart_workload succeeded outcome=healed",
        "lab: healed by restart_workload in ",
        # The restart stamps the pod template: a new ReplicaSet, revision 2.
        "checkout runs 3 x registry.local/checkout:v1 (revision 2, generation 2)",
    ],
    # The CPU saturation the context query reads (cAdvisor usage over the limits) makes
    # the rules scale up; confident enough (0.86) to act without approval.
    "traffic-surge": [
        "lab: experiment traffic-surge: ",
        "anomaly cpu-saturated firing",
        "saturation: checkout is CPU-saturated",
        "result scale_up succeeded outcome=unknown: scaled Deployment/{ns}/checkout from 3 to 4 "
        "[autonomous]",
        "result scale_up succeeded outcome=healed",
        "lab: healed by scale_up in ",
        "checkout runs 4 x registry.local/checkout:v1",
    ],
    # The failing pod's node reads NotReady in the context, so the rules drain it
    # (confidence 0.88, autonomous); the ReplicaSet controller replaces the evicted pod and
    # the scheduler places it on another node; the drain is judged by the service's
    # patterns, not by the node, which stays down.
    "node-failure": [
        "lab: experiment node-failure: ",
        "anomaly pod-failing firing",
        "node_failure: node lab-",  # the node of the first pod, whichever it is
        "result drain_node succeeded outcome=unknown: drained Node//lab-",
        "cordoned, evicted 1 pods ({ns}/checkout-",
        "result drain_node succeeded outcome=healed: high-error-rate, pod-failing cleared",
        "lab: healed by drain_node in ",
        # Read from the pods: the replacement runs, ready, on a healthy node.
        "checkout runs 3 x registry.local/checkout:v1",
        "), ready on lab-",
    ],
}


async def healed(
    settings: Settings, name: str, ns: str, steps: list[str], prometheus: Any, capsys: Any
) -> str:
    """Run one experiment; assert its steps printed in order and nothing else acted."""
    chaos = experiment(name)
    code = await run_lab(settings, timeout=150, baseline=5, chaos=chaos, namespace=ns)
    out: str = capsys.readouterr().out
    assert code == 0, out
    positions = [out.find(s.format(ns=ns)) for s in steps]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions), out
    others = {"rollback", "restart_workload", "scale_up", "drain_node"} - {chaos.remedy}
    assert not any(f"result {other}" in out for other in others), out  # nothing else acted
    assert not list(prometheus.targets_dir.glob("sre-agent-lab.json")), "target left behind"
    return out


@pytest.mark.parametrize("name", list(STEPS))
async def test_the_lab_heals_in_process(
    name: str,
    kafka_bootstrap: str,
    prometheus: Any,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The lab registers its service with the Prometheus the fixture started.
    monkeypatch.setenv("SRE_STATE_DIR", str(prometheus.state_dir.parent))
    settings = lab_settings(kafka_bootstrap, topic_prefix, prometheus.url)
    await healed(settings, name, f"shop-{name}", STEPS[name], prometheus, capsys)


@pytest.mark.k8s
@pytest.mark.parametrize("name", list(KUBE_STEPS))
async def test_each_experiment_heals_on_the_real_control_plane(
    name: str,
    kafka_bootstrap: str,
    prometheus: Any,
    topic_prefix: str,
    k8s_cluster: Any,
    k8s_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SRE_STATE_DIR", str(prometheus.state_dir.parent))
    settings = lab_settings(kafka_bootstrap, topic_prefix, prometheus.url)
    kube = replace(
        settings.kubernetes, backend="kubernetes", kubeconfig=str(k8s_cluster.kubeconfig)
    )
    settings = replace(settings, kubernetes=kube)
    # A namespace of its own (no earlier run's series in the windows).
    out = await healed(settings, name, k8s_namespace, KUBE_STEPS[name], prometheus, capsys)
    assert "(on kwok nodes lab-" in out
    # The lab's nodes and Deployment are gone afterwards; its namespace stays.
    nodes = json.loads(k8s_cluster.kubectl_run("get", "nodes", "-l", LAB_LABEL, "-o", "json"))
    assert nodes["items"] == [], [n["metadata"]["name"] for n in nodes["items"]]
    deployments = json.loads(
        k8s_cluster.kubectl_run("get", "deployments", "-n", k8s_namespace, "-o", "json")
    )
    assert deployments["items"] == []
