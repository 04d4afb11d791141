"""A 429 from the API server is a budget's refusal only when it says so (its cause is
DisruptionBudget); otherwise the server sheds load (priority and fairness, a proxy) and
the same eviction succeeds later. A pod restart told the second was failed for good,
"blocked by a PodDisruptionBudget" that does not exist. Against a local HTTP server
answering as the API server does for the requests a restart_pod makes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from kubernetes import client as kube_client

from agent.errors import ActionFailed, TransientError
from agent.models import Target
from handlers.kube import KubeCluster

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "job-1",
        "namespace": "shop",
        "uid": "u1",
        "resourceVersion": "7",
        "labels": {"app": "job"},
    },
    "spec": {"nodeName": "n1"},
}
SHED = {  # what kube-apiserver's priority and fairness answers when it sheds a request
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": "Too many requests, please try again later.",
    "reason": "TooManyRequests",
    "details": {"retryAfterSeconds": 3},
    "code": 429,
}
BUDGET = {  # what the eviction subresource answers when a budget refuses
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": "Cannot evict pod as it would violate the pod's disruption budget.",
    "reason": "TooManyRequests",
    "details": {
        "causes": [
            {
                "reason": "DisruptionBudget",
                "message": "The disruption budget job needs 1 healthy pods and has 1 currently",
            }
        ]
    },
    "code": 429,
}
PDB = {
    "metadata": {"name": "job", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "job"}}},
}


def json(status: int, doc: Any, **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers
    )


async def server(refusal: Any) -> AsyncIterator[str]:
    async def pod(request: web.Request) -> web.Response:
        return json(200, POD)

    async def eviction(request: web.Request) -> web.Response:
        return json(429, refusal, **({"Retry-After": "3"} if refusal is SHED else {}))

    async def budgets(request: web.Request) -> web.Response:
        return json(200, {"items": [PDB]})

    app = web.Application()
    app.router.add_route("GET", "/api/v1/namespaces/shop/pods/job-1", pod)
    app.router.add_route("PATCH", "/api/v1/namespaces/shop/pods/job-1", pod)
    app.router.add_route("POST", "/api/v1/namespaces/shop/pods/job-1/eviction", eviction)
    app.router.add_route("GET", "/apis/policy/v1/namespaces/shop/poddisruptionbudgets", budgets)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def shedding() -> AsyncIterator[str]:
    async for url in server(SHED):
        yield url


@pytest.fixture
async def refusing() -> AsyncIterator[str]:
    async for url in server(BUDGET):
        yield url


TARGET = Target(kind="Pod", namespace="shop", name="job-1")


async def test_a_shed_eviction_is_transient_not_a_budgets_refusal(shedding: str) -> None:
    api = kube_client.ApiClient(kube_client.Configuration(host=shedding))
    async with KubeCluster(api=api, request_timeout=5) as kube:
        with pytest.raises(TransientError) as err:
            await kube.restart_pod(TARGET, action_id="r1")
    assert not isinstance(err.value, ActionFailed)
    assert err.value.retry_after == 3.0
    assert "Too many requests" in str(err.value) and "Budget" not in str(err.value)


async def test_a_budgets_refusal_stays_a_refusal(refusing: str) -> None:
    api = kube_client.ApiClient(kube_client.Configuration(host=refusing))
    async with KubeCluster(api=api, request_timeout=5) as kube:
        with pytest.raises(ActionFailed, match="blocked by PodDisruptionBudget shop/job"):
            await kube.restart_pod(TARGET, action_id="r1")
