"""Shared test configuration: real-infrastructure fixtures live in tests/fixtures."""

pytest_plugins = ["tests.fixtures.infra", "tests.fixtures.k8s"]
