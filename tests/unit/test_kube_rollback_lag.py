"""A rollback asked between a template change and the Deployment controller's sync: the
Deployment's revision annotation still names the ReplicaSet the new template replaces, so
"the revision before the current one" was two steps back. As for a StatefulSet's revision
its controller has not recorded, the rollback is transient until the ReplicaSet exists.
Against a local HTTP server answering as the API server does, at that instant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from kubernetes import client as kube_client

from agent.errors import TransientError
from agent.models import Target
from handlers.kube import KubeCluster


def template(image: str, hash_: str = "") -> dict[str, Any]:
    labels = {"app": "web", **({"pod-template-hash": hash_} if hash_ else {})}
    return {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": image}]},
    }


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "d1",
        "resourceVersion": "30",
        "generation": 3,
        # The controller has not synced generation 3 yet: still revision 2's number.
        "annotations": {"deployment.kubernetes.io/revision": "2"},
    },
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": template("app:v3"),
    },
    "status": {"observedGeneration": 2},
}


def replica_set(revision: int, image: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"web-h{revision}",
            "namespace": "shop",
            "annotations": {"deployment.kubernetes.io/revision": str(revision)},
            "ownerReferences": [
                {"kind": "Deployment", "name": "web", "uid": "d1", "controller": True}
            ],
            "creationTimestamp": f"2026-01-0{revision}T00:00:00Z",
        },
        "spec": {"template": template(image, f"h{revision}")},
    }


@pytest.fixture
async def lagging() -> AsyncIterator[tuple[str, list[Any]]]:
    patches: list[Any] = []

    def json(doc: Any) -> web.Response:
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def deployment(request: web.Request) -> web.Response:
        if request.method == "PATCH":
            patches.append(orjson.loads(await request.read()))
        return json(DEPLOYMENT)

    async def replica_sets(request: web.Request) -> web.Response:
        return json({"items": [replica_set(1, "app:v1"), replica_set(2, "app:v2")]})

    app = web.Application()
    app.router.add_route("*", "/apis/apps/v1/namespaces/shop/deployments/web", deployment)
    app.router.add_route("GET", "/apis/apps/v1/namespaces/shop/replicasets", replica_sets)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", patches
    finally:
        await runner.cleanup()


async def test_a_rollback_before_the_controller_created_the_running_replica_set_waits(
    lagging: tuple[str, list[Any]],
) -> None:
    url, patches = lagging
    api = kube_client.ApiClient(kube_client.Configuration(host=url))
    target = Target(kind="Deployment", namespace="shop", name="web")
    async with KubeCluster(api=api, request_timeout=5) as kube:
        with pytest.raises(TransientError, match="has not created the ReplicaSet"):
            await kube.rollback(target, action_id="rb1")
    assert patches == []  # app:v1 (two steps back) was never written
