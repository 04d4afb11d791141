"""Shared test configuration: real-infrastructure fixtures live in tests/fixtures."""

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fixtures.infra", "tests.fixtures.k8s"]

# Property tests assert behaviour, never time: hypothesis' per-example deadline and its
# too-slow health check are timed assertions, and on 2 cores shared with Kafka, Prometheus
# and a control plane they failed examples that were correct.
settings.register_profile("sre-agent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sre-agent")
