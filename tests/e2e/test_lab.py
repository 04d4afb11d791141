"""`make run`'s main job, the lab, heals its injected fault end to end (with the lab's
simulated on-call approving through the decisions topic), and so does each chaos
experiment of `make chaos`: the remedy it names heals it, verified, and nothing else acts."""

from __future__ import annotations

from typing import Any

import pytest

from agent.lab import experiment, run_lab
from tests.helpers import lab_settings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

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
        "checkout runs 3 x registry.local/checkout:v1 (revision 1, generation 2)",
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
    # (confidence 0.88, autonomous); the pod comes back on another node, and the drain is
    # judged by the service's patterns, not by the node, which stays down.
    "node-failure": [
        "lab: experiment node-failure: ",
        "anomaly pod-failing firing",
        "node_failure: node lab-node-1 is unhealthy (confidence 0.88",
        "result drain_node succeeded outcome=unknown: drained Node//lab-node-1: cordoned, "
        "evicted 1 pods ({ns}/checkout-0) [autonomous]",
        "result drain_node succeeded outcome=healed: high-error-rate, pod-failing cleared",
        "lab: healed by drain_node in ",
        "checkout runs 3 x registry.local/checkout:v1",
    ],
}


@pytest.mark.parametrize("name", list(STEPS))
async def test_each_experiment_is_healed_by_its_remedy_and_verified(
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
    chaos = experiment(name)
    # A namespace of its own: the one before it would leave its series in the windows.
    ns = f"shop-{name}"
    code = await run_lab(settings, timeout=150, baseline=5, chaos=chaos, namespace=ns)
    out = capsys.readouterr().out
    assert code == 0, out
    positions = [out.find(s.format(ns=ns)) for s in STEPS[name]]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions), out
    others = {"rollback", "restart_workload", "scale_up", "drain_node"} - {chaos.remedy}
    assert not any(f"result {other}" in out for other in others), out  # nothing else acted
    assert not list(prometheus.targets_dir.glob("sre-agent-lab.json")), "target left behind"
