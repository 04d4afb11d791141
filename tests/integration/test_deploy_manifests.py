"""The project's own manifests are accepted by a real API server (server-side dry run:
schema, defaulting and admission, without persisting)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.k8s]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_manifests_pass_server_side_dry_run(k8s_cluster: Any) -> None:
    # Namespaced objects need their namespace to exist even in a dry run; the real one,
    # so its Pod Security labels judge the Deployments' pods.
    k8s_cluster.kubectl_run("apply", "-f", str(DEPLOY / "namespace.yaml"))
    applied = subprocess.run(
        k8s_cluster.kubectl_cmd("apply", "--dry-run=server", "-f", str(DEPLOY)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if applied.returncode != 0:
        pytest.fail(f"kubectl apply --dry-run=server rejected deploy/: {applied.stderr}")
    # The restricted standard warns of a Deployment whose pods would be refused.
    assert "PodSecurity" not in applied.stderr, applied.stderr
    out = applied.stdout
    for kind in (
        *(
            f"{what}/sre-agent-{role}"
            for role in ("detector", "analyzer", "executor")
            for what in (
                "clusterrole.rbac.authorization.k8s.io",
                "clusterrolebinding.rbac.authorization.k8s.io",
                "serviceaccount",
                "deployment.apps",
            )
        ),
        "serviceaccount/sre-agent-correlator",
        "deployment.apps/sre-agent-correlator",
        *(
            f"poddisruptionbudget.policy/sre-agent-{role}"
            for role in ("detector", "analyzer", "executor", "correlator")
        ),
        "service/sre-agent-webhooks",  # Alertmanager's way to the detectors' webhook
    ):
        assert kind in out, out
    assert "(server dry run)" in out
    # Nothing was created by the dry run.
    missing = subprocess.run(
        k8s_cluster.kubectl_cmd("get", "deployment", "sre-agent-detector", "-n", "sre-agent"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "NotFound" in missing.stderr
