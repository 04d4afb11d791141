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
        "approval requested for restart_workload Deployment/shop/checkout",
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
        "result scale_up succeeded outcome=unknown: scaled Deployment/shop/checkout from 3 to 4 "
        "[autonomous]",
        "result scale_up succeeded outcome=healed",
        "lab: healed by scale_up in ",
        "checkout runs 4 x registry.local/checkout:v1",
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
    code = await run_lab(settings, timeout=150, baseline=5, chaos=chaos)
    out = capsys.readouterr().out
    assert code == 0, out
    positions = [out.find(s) for s in STEPS[name]]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions), out
    others = {"rollback", "restart_workload", "scale_up"} - {chaos.remedy}
    assert not any(f"result {other}" in out for other in others), out  # nothing else acted
    assert not list(prometheus.targets_dir.glob("sre-agent-lab.json")), "target left behind"
