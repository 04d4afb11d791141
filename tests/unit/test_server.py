"""The health server's liveness: a component that reports itself stuck fails it."""

from __future__ import annotations

import aiohttp

from agent.metrics import Metrics
from agent.server import HealthServer


async def test_liveness_fails_while_a_component_reports_itself_stuck() -> None:
    server = HealthServer(host="127.0.0.1", port=0, metrics=Metrics())
    reason: list[str | None] = [None]

    def broken() -> str | None:
        raise RuntimeError("lost its state")

    server.live_checks["correlator"] = lambda: reason[0]
    await server.start()
    url = f"http://127.0.0.1:{server.bound_port}/health/live"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert (r.status, await r.json()) == (200, {"status": "ok"})
            reason[0] = "folding of anomalies[0]: 3 records waiting"
            async with http.get(url) as r:
                assert r.status == 503
                assert await r.json() == {
                    "status": "stuck",
                    "failures": {"correlator": "folding of anomalies[0]: 3 records waiting"},
                }
            reason[0] = None  # moving again: alive again
            server.live_checks["other"] = broken
            async with http.get(url) as r:
                assert r.status == 503
                assert (await r.json())["failures"] == {"other": "RuntimeError: lost its state"}
    finally:
        await server.stop()
