"""Shared test configuration: real-infrastructure fixtures live in tests/fixtures."""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fixtures.infra", "tests.fixtures.k8s"]

# Property tests assert behaviour, never time: hypothesis' per-example deadline and its
# too-slow health check are timed assertions, and on 2 cores shared with Kafka, Prometheus
# and a control plane they failed examples that were correct.
# In CI (CI set, as .ci/run's callers do) the examples are derived from each test, not
# drawn afresh: a landing run is reproducible, and the leak a random draw finds is found by
# a developer's run (random, as here) and pinned as an explicit example, not by the gate.
settings.register_profile(
    "sre-agent",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("sre-agent")
