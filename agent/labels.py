"""Label normalisation shared by every detector source.

Whatever the source (a PromQL series, an Alertmanager alert, an external feed), an anomaly
leaves the detection layer with the labels the correlator and the analyzer read:
``cluster`` and ``namespace`` (defaulted), ``service`` (taken from the first label that
names one) and, when the source names a workload controller, ``workload`` and ``owner``.
Labels the source already sets are never overwritten, so a source can always be explicit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# Labels that name the service, in order of preference. The later ones are what
# kube-state-metrics and cAdvisor series carry once aggregated by namespace and pod.
SERVICE_LABELS = (
    "service",
    "app",
    "app_kubernetes_io_name",
    "job",
    "label_app_kubernetes_io_name",
    "label_app",
    "deployment",
    "statefulset",
    "daemonset",
    "horizontalpodautoscaler",
    "container",
)
# kube-state-metrics label -> Kubernetes kind of the owning controller.
WORKLOAD_LABELS = (
    ("deployment", "Deployment"),
    ("statefulset", "StatefulSet"),
    ("daemonset", "DaemonSet"),
)


def service_of(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels that place a series or an anomaly at its service: the namespace and the
    service, those that are set."""
    return {k: labels[k] for k in ("namespace", "service") if labels.get(k)}


def normalise(labels: Mapping[str, str], cluster: str) -> dict[str, str]:
    out = {k: v for k, v in labels.items() if k != "__name__"}
    out.setdefault("cluster", cluster)
    if "service" not in out:
        out["service"] = next((out[k] for k in SERVICE_LABELS if out.get(k)), "")
    out.setdefault("namespace", "default")
    if "workload" not in out:
        for label, kind in WORKLOAD_LABELS:
            if out.get(label):
                out["workload"] = out[label]
                out.setdefault("owner", f"{kind}/{out[label]}")
                break
    return out


# What an anomaly's label names and values may hold (agent.models.Labels).
MAX_NAME = 256
MAX_VALUE = 4096


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    marker = f"...[cut from {len(text)} chars, {digest}]"
    return text[: limit - len(marker)] + marker


def fit(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels within the anomaly schema's bounds. Prometheus bounds neither names nor values
    (a label can hold a whole SQL query): a longer one is cut, marked with its length and a
    digest of the whole, so two series that differ only past the cut stay two anomalies."""
    if all(len(k) <= MAX_NAME and len(v) <= MAX_VALUE for k, v in labels.items()):
        return dict(labels)
    return {_cut(k, MAX_NAME): _cut(v, MAX_VALUE) for k, v in labels.items()}
