"""A small in-memory Kubernetes API server, as handlers.kube.KubeCluster talks to it
(``param_serialize`` / ``call_api`` of the official client's ApiClient), for unit tests of
the adapter without a control plane.

It stores objects by their API path and answers what a real server would for the requests
it knows: GET of an object (404 when absent), GET of a collection (the objects under its
path; ``fieldSelector=spec.nodeName=N`` filters pods), a merge PATCH conditional on
``metadata.resourceVersion`` (409 on a stale one), and POST of a pod's eviction (the pod
goes). Anything else is refused with 405, never accepted silently. ``on_evict`` lets a test
act between evictions (an operator turning the kill switch on mid-drain).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

Obj = dict[str, Any]


class _Response:
    def __init__(self, status: int, doc: Mapping[str, Any]) -> None:
        self.status = status
        self._data = orjson.dumps(doc)

    def read(self) -> bytes:
        return self._data

    def getheaders(self) -> dict[str, str]:
        return {}


COLLECTIONS = ("pods", "poddisruptionbudgets", "horizontalpodautoscalers", "replicasets")


def _in_collection(obj_path: str, collection: str) -> bool:
    """Whether the object at ``obj_path`` is listed by a GET of ``collection``: its own
    namespace's (``.../namespaces/NS/pods``) or every namespace's (``/api/v1/pods``)."""
    parent, _, _ = obj_path.rpartition("/")
    if parent == collection:
        return True
    head, _, resource = collection.rpartition("/")
    return parent.startswith(head + "/namespaces/") and parent.endswith("/" + resource)


def _merge(base: Obj, patch: Mapping[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


class FakeKubeAPI:
    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.writes: list[tuple[str, str]] = []  # (method, path) of each accepted write
        self.on_evict: Callable[[str], None] | None = None
        self._version = 0

    # --- setup ---------------------------------------------------------------------------
    def put(self, path: str, obj: Obj) -> Obj:
        self._version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        obj["metadata"].setdefault("annotations", {})
        self.objects[path] = obj
        return obj

    def deployment(self, namespace: str, name: str, replicas: int) -> Obj:
        return self.put(
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
            {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}},
            },
        )

    def hpa(self, namespace: str, name: str, deployment: str, lo: int, hi: int) -> Obj:
        return self.put(
            f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}",
            {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "scaleTargetRef": {"kind": "Deployment", "name": deployment},
                    "minReplicas": lo,
                    "maxReplicas": hi,
                },
            },
        )

    def node(self, name: str) -> Obj:
        return self.put(f"/api/v1/nodes/{name}", {"metadata": {"name": name}, "spec": {}})

    def pod(self, namespace: str, name: str, node: str, owner: str = "ReplicaSet") -> Obj:
        return self.put(
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": f"uid-{namespace}-{name}",
                    "ownerReferences": [
                        {"kind": owner, "name": f"{name}-owner", "controller": True}
                    ],
                },
                "spec": {"nodeName": node},
                "status": {"phase": "Running"},
            },
        )

    def get(self, path: str) -> Obj:
        return self.objects[path]

    # --- the ApiClient surface KubeCluster uses --------------------------------------------
    def param_serialize(
        self,
        *,
        method: str,
        resource_path: str,
        query_params: Sequence[tuple[str, str]],
        header_params: Mapping[str, str],
        body: Any,
        auth_settings: Sequence[str],
    ) -> tuple[str, str, list[tuple[str, str]], Any]:
        return method, resource_path, list(query_params), body

    def call_api(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: Any,
        _request_timeout: Any = None,
    ) -> _Response:
        if method == "GET":
            if path in self.objects:
                return _Response(200, self.objects[path])
            items = [o for p, o in self.objects.items() if _in_collection(p, path)]
            if not items and not path.endswith(COLLECTIONS):
                return _Response(404, {"message": f"{path} not found"})
            for key, value in query:
                if key == "fieldSelector" and value.startswith("spec.nodeName="):
                    node = value.split("=", 1)[1]
                    items = [o for o in items if o.get("spec", {}).get("nodeName") == node]
            return _Response(200, {"items": items})
        if method == "PATCH":
            obj = self.objects.get(path)
            if obj is None:
                return _Response(404, {"message": f"{path} not found"})
            want = ((body or {}).get("metadata") or {}).get("resourceVersion")
            if want is not None and want != obj["metadata"]["resourceVersion"]:
                return _Response(409, {"message": "the object has been modified"})
            _merge(obj, body or {})
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            self.writes.append((method, path))
            return _Response(200, obj)
        if method == "POST" and path.endswith("/eviction"):
            pod = path.removesuffix("/eviction")
            if pod not in self.objects:
                return _Response(404, {"message": f"{pod} not found"})
            del self.objects[pod]
            self.writes.append((method, path))
            if self.on_evict is not None:
                self.on_evict(pod)
            return _Response(201, {})
        return _Response(405, {"message": f"{method} {path} is not served by the fake"})

    def close(self) -> None:
        pass
