"""Choosing the cluster the executor acts on (one place, used by the composition root).

``kubernetes.backend: kubernetes`` builds the real adapter (:mod:`handlers.kube`, which
loads the ``kubernetes`` client); ``in-process`` (the default, and the lab's) the simulated
:class:`~handlers.fake_cluster.FakeCluster`.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from agent.models import ActionRequest
from handlers.cluster import Cluster, Effect

# Test-only: with this set to 1, `sre-agent run` kills itself with SIGKILL right after an
# action's cluster write and before its result is produced (tests/integration/test_kube_actions).
TEST_CRASH_ENV = "SRE_AGENT_TEST_CRASH_AFTER_APPLY"


def cluster_from(settings: Any) -> Cluster:
    if settings.kubernetes.backend == "kubernetes":
        from handlers.kube import KubeCluster  # the kubernetes client loads only if used

        return KubeCluster.from_settings(settings.kubernetes)
    from handlers.fake_cluster import FakeCluster

    return FakeCluster()


def crash_after_apply(action: ActionRequest, effect: Effect) -> None:
    """Test-only hook: die as abruptly as a SIGKILLed pod, between acting and recording."""
    if effect.applied:
        os.kill(os.getpid(), signal.SIGKILL)
