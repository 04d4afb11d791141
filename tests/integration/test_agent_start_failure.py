"""An agent that cannot start releases everything it opened (no leaked clients)."""

from __future__ import annotations

import pytest

from agent.errors import DependencyUnavailable
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from tests.helpers import make_settings

pytestmark = pytest.mark.integration


class CountingCluster(FakeCluster):
    closed = 0

    async def close(self) -> None:
        CountingCluster.closed += 1
        await super().close()


async def test_start_failure_closes_what_was_opened() -> None:
    # Nothing listens on port 1: Kafka is unreachable, so start fails at the bus.
    settings = make_settings("127.0.0.1:1", "nowhere.", doc={"server": {"port": 0}})
    with pytest.raises(DependencyUnavailable, match="kafka"):
        async with Agent(settings, roles=["all"], cluster=CountingCluster()):
            pytest.fail("the agent must not start without Kafka")
    assert CountingCluster.closed == 1
