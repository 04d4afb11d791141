"""The Prometheus boundary over real HTTP: replies, and the warnings of partial ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from agent.prom import PromClient, Sample, Vector


@pytest.fixture
async def prom() -> AsyncIterator[tuple[PromClient, dict[str, Any]]]:
    """A PromClient talking to a local server that answers /api/v1/query with ``reply``."""
    reply: dict[str, Any] = {}

    async def query(request: web.Request) -> web.Response:
        assert request.query["query"] == "errors > 1"
        return web.json_response(reply)

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = PromClient(f"http://127.0.0.1:{port}")
    try:
        yield client, reply
    finally:
        await client.close()
        await runner.cleanup()


def _vector(*services: str, **extra: Any) -> dict[str, Any]:
    result = [{"metric": {"service": s}, "value": [1717239600, "2"]} for s in services]
    return {"status": "success", "data": {"resultType": "vector", "result": result}, **extra}


async def test_the_warnings_of_a_partial_reply_are_kept(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    # prometheus-api-client returns only data.result: Thanos' "partial response" warning
    # was dropped, and the series of the missing store looked resolved.
    client, reply = prom
    reply.update(_vector("cart", warnings=["partial response: store eu-1 unavailable"]))
    got = await client.query_vector("errors > 1")
    assert got == Vector(
        [Sample({"service": "cart"}, 2.0)], ("partial response: store eu-1 unavailable",)
    )
    # The next reply of the same client is whole again: no warning carried over.
    reply.clear()
    reply.update(_vector("cart", "checkout"))
    got = await client.query_vector("errors > 1")
    assert got.warnings == () and len(got.samples) == 2
    assert await client.query("errors > 1") == got.samples
