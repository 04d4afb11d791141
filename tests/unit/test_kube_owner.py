"""A pod's workload from its controller reference, never from its (truncated) name."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from handlers.kube import workload_of_pod

DNS = st.from_regex(r"[a-z]([a-z0-9-]{0,70}[a-z0-9])?", fullmatch=True)
HASH = st.from_regex(r"[bcdfghjklmnpqrstvwxz2-9]{6,10}", fullmatch=True)


def pod(name: str, kind: str, owner: str, template_hash: str = "") -> dict[str, Any]:
    labels = {"pod-template-hash": template_hash} if template_hash else {}
    ref = {"kind": kind, "name": owner, "controller": True}
    return {"metadata": {"name": name, "labels": labels, "ownerReferences": [ref]}}


@given(DNS, HASH)
def test_a_deployments_pod_is_its_deployments_whatever_its_name(name: str, h: str) -> None:
    truncated = f"{name}-{h}-"[:58] + "q2x7z"  # what the API server generates
    assert workload_of_pod(pod(truncated, "ReplicaSet", f"{name}-{h}", h)) == name


def test_a_longer_named_workloads_pod_is_not_the_shorter_ones() -> None:
    assert workload_of_pod(pod("shop-api-0", "StatefulSet", "shop-api")) == "shop-api"
    assert workload_of_pod(pod("shop-api-x2k4q", "DaemonSet", "shop-api")) == "shop-api"


def test_a_pod_no_controller_owns_has_no_workload() -> None:
    assert workload_of_pod({"metadata": {"name": "shop-7c9f-abcde"}}) is None
