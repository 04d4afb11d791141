"""`make run`'s main job, the lab, heals its injected fault end to end (with the lab's
simulated on-call approving the rollback through the decisions topic)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.lab import run_lab
from tests.helpers import lab_settings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


async def test_lab_heals_the_faulty_rollout(
    kafka_bootstrap: str,
    prometheus: Any,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The lab registers its service with the Prometheus the fixture started.
    monkeypatch.setenv("SRE_STATE_DIR", str(prometheus.state_dir.parent))
    settings = lab_settings(kafka_bootstrap, topic_prefix, prometheus.url)
    code = await run_lab(settings, timeout=150, baseline=5)
    out = capsys.readouterr().out
    assert code == 0, out
    steps = [
        "anomaly high-error-rate firing",
        "incident",
        "bad_rollout",
        "approval requested for rollback",
        "[on-call]    approves rollback",
        "result rollback succeeded outcome=unknown",
        "result rollback succeeded outcome=healed",
        "lab: healed. checkout runs registry.local/checkout:v1",
    ]
    positions = [out.find(s) for s in steps]
    assert all(p >= 0 for p in positions), out
    assert positions == sorted(positions), out
    assert not list(prometheus.targets_dir.glob("sre-agent-lab.json")), "target left behind"
