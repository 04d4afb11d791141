"""The Kubernetes adapter: the :class:`~handlers.cluster.Cluster` protocol on a real API server.

The only module of the action path that imports ``kubernetes``. It uses the official
client for what it is good at (kubeconfig / in-cluster loading, TLS, bearer tokens and
their refresh) and sends plain JSON through ``ApiClient.call_api``: objects cross into
the agent as dicts, never as the client's model classes.

Design choices:

- **Never block the event loop.** The client is synchronous; every request runs in a
  bounded thread pool with a per-request timeout (``kubernetes.request_timeout``).
- **Effect-once.** Every write carries the object's ``metadata.resourceVersion`` (a
  compare-and-set: a concurrent change answers 409, and the write is retried on a fresh
  read) and the action id in the ``sre-agent.io/action-ids`` annotation. A read that finds
  the id already there answers "not applied" without writing, with the prior state the
  write noted on the object (``sre-agent.io/prior-state``), for undo.
- **Scale** patches ``spec.replicas`` of the workload together with the annotation, not
  the scale subresource: the subresource cannot carry an annotation, so a redelivered scale
  could not be recognised. When an HPA owns the replica count, the HPA's bounds are moved
  instead (raising ``minReplicas`` to scale up, lowering ``maxReplicas`` to scale down), so
  the agent does not fight the autoscaler; the id is then recorded on the HPA. A scale_up
  or scale_down that would move the count the other way is refused, never written.
- **Rollback** does what ``kubectl rollout undo`` does for apps/v1: find the ReplicaSets the
  Deployment controls, pick the previous (or the named) revision by the
  ``deployment.kubernetes.io/revision`` annotation and copy its pod template, minus the
  ``pod-template-hash`` label, into the Deployment (one JSON patch with the annotations).
  ``spec.rollbackTo`` only existed in long-removed API versions.
- **Pod restart and drain** evict through the Eviction API, so PodDisruptionBudgets hold;
  a drain skips DaemonSet and mirror pods, refuses pods without a controller (they would
  not come back, as ``kubectl drain`` without ``--force``), and when budgets block it past
  its timeout it fails naming each blocked pod and its budget.

Errors, translated once here: 403/401/404/400/422 -> ``ActionFailed`` with the API server's
own message (a 403 names the verb and resource the role lacks); 409 -> :class:`Conflict`
(retried with a fresh read, retriable if it escapes); 429, 5xx, timeouts and connection
failures -> ``TransientError`` / ``DependencyUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, NamedTuple

import orjson
import urllib3
from kubernetes import client as _client
from kubernetes import config as _config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from agent.analyzer import ConfigChange, KubeEvent
from agent.errors import (
    ActionFailed,
    AgentError,
    ConfigError,
    DependencyUnavailable,
    TransientError,
    plain,
)
from agent.models import ParamValue, Target
from agent.policy import kind_problem
from handlers.cluster import (
    ACTION_IDS_ANNOTATION,
    CONFIG_PRIOR,
    CORDON_PRIOR,
    EVICTED_PODS_ANNOTATION,
    HPA_SCALE_PRIOR,
    NO_PRIOR,
    PRIOR_STATE_ANNOTATION,
    RESTART_PRIOR,
    RESTARTED_AT_ANNOTATION,
    ROLLBACK_PRIOR,
    SCALE_PRIOR,
    UNSCHEDULABLE_BEFORE_ANNOTATION,
    Effect,
    Footprint,
    Observation,
    PartialFailure,
    PriorShape,
    Revision,
    ScaleDirection,
    StopCheck,
    WorkloadState,
    against_direction,
    drain_finished,
    drain_left,
    drain_stopped,
    evicted_uid,
    forget_eviction,
    note_prior_state,
    prior_shape,
    prior_unschedulable,
    recorded_prior,
    remember_eviction,
    remember_id,
    remembered_ids,
    unschedulable_before,
)

log = logging.getLogger(__name__)

client: Any = _client  # the client's modules are untyped
config: Any = _config

Obj = dict[str, Any]

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
# Set by the Deployment controller on a ReplicaSet it renumbers (the numbers it had before).
REVISION_HISTORY_ANNOTATION = "deployment.kubernetes.io/revision-history"
# Where managedFields record who sets a ReplicaSet's / ControllerRevision's number.
RS_REVISION_FIELD = ("f:metadata", "f:annotations", f"f:{REVISION_ANNOTATION}")
CR_REVISION_FIELD = ("f:revision",)
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
POD_TEMPLATE_HASH = "pod-template-hash"
# Deployment annotations `kubectl rollout undo` keeps instead of copying from the ReplicaSet.
ROLLBACK_SKIPPED_ANNOTATIONS = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION_ANNOTATION,
        REVISION_HISTORY_ANNOTATION,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    }
)
WORKLOAD_RESOURCES: Mapping[str, str] = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "DaemonSet": "daemonsets",
}
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
CONFLICT_RETRIES = 5


class Conflict(TransientError):
    """409: the object changed since it was read (resourceVersion precondition failed)."""


class Throttled(TransientError):
    """429 that is no budget's refusal: the API server's priority and fairness (or a proxy)
    sheds load; the same request succeeds later."""


class NotFound(ActionFailed):
    """404: no such object (or its namespace is gone)."""


# --- pure helpers (unit-tested) -----------------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against labels; a null selector selects nothing, an empty one all."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or ()
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def scaled_value(value: int | str | None, total: int, *, round_up: bool, default: str) -> int:
    """An IntOrString ("25%" or 2) resolved against ``total`` the way controllers do."""
    v: int | str = default if value is None else value
    if isinstance(v, int):
        return v
    if v.endswith("%"):
        x = int(v[:-1]) * total / 100
        return math.ceil(x) if round_up else math.floor(x)
    return int(v)


def desired_pods(obj: Mapping[str, Any]) -> int:
    """The pods a workload wants: its replicas, or a DaemonSet's one per eligible node."""
    if obj.get("kind") == "DaemonSet":
        return int((obj.get("status") or {}).get("desiredNumberScheduled") or 0)
    return int((obj.get("spec") or {}).get("replicas", 1))


def ready_pods(obj: Mapping[str, Any]) -> int:
    status = obj.get("status") or {}
    key = "numberReady" if obj.get("kind") == "DaemonSet" else "readyReplicas"
    return int(status.get(key) or 0)


def rollout_disruption(obj: Mapping[str, Any]) -> int:
    """Ready pods a rollout of this Deployment/StatefulSet/DaemonSet takes down at once."""
    spec = obj.get("spec") or {}
    replicas = desired_pods(obj)
    ready = ready_pods(obj)
    if obj.get("kind") == "DaemonSet":
        strategy = spec.get("updateStrategy") or {}
        if strategy.get("type") == "OnDelete":
            return 0
        rolling = strategy.get("rollingUpdate") or {}
        # The DaemonSet controller rounds up; with a surge it may take none down at once.
        at_once = scaled_value(rolling.get("maxUnavailable"), replicas, round_up=True, default="1")
    elif obj.get("kind") == "StatefulSet":
        strategy = spec.get("updateStrategy") or {}
        if strategy.get("type") == "OnDelete":
            return 0
        rolling = strategy.get("rollingUpdate") or {}
        at_once = max(
            1, scaled_value(rolling.get("maxUnavailable"), replicas, round_up=False, default="1")
        )
    else:
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            at_once = replicas
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = scaled_value(rolling.get("maxSurge"), replicas, round_up=True, default="25%")
            at_once = scaled_value(
                rolling.get("maxUnavailable"), replicas, round_up=False, default="25%"
            )
            if surge == 0 and at_once == 0:
                at_once = 1  # what the Deployment controller does
    return max(0, min(at_once, replicas, ready))


def revision_of(obj: Mapping[str, Any]) -> int:
    raw = annotations_of(obj).get(REVISION_ANNOTATION, "")
    return int(raw) if raw.isdigit() else 0


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return next((r for r in refs if r.get("controller")), None)


def workload_of_pod(pod: Mapping[str, Any]) -> str | None:
    """The name of the workload controlling ``pod``, from its controller reference: a
    ReplicaSet ``<deployment>-<pod-template-hash>`` stands for its Deployment (the hash
    label says where the Deployment's name ends; the ReplicaSet's name, unlike the pod's,
    is never truncated). None for a pod no controller owns."""
    ref = controller_of(pod)
    if ref is None:
        return None
    name = str(ref.get("name", ""))
    labels = (pod.get("metadata") or {}).get("labels") or {}
    template_hash = str(labels.get(POD_TEMPLATE_HASH, ""))
    if ref.get("kind") == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
        return name[: -len(template_hash) - 1]
    return name


def template_without_hash(template: Mapping[str, Any]) -> Obj:
    """A ReplicaSet's pod template as the Deployment should carry it (kubectl rollout undo)."""
    out: Obj = orjson.loads(orjson.dumps(template))
    labels = (out.get("metadata") or {}).get("labels")
    if labels:
        labels.pop(POD_TEMPLATE_HASH, None)
    return out


def restarted_at(template: Mapping[str, Any]) -> datetime | None:
    """When ``kubectl rollout restart`` (or our restart) last stamped the pod template;
    None when never, or when the stamp is not a time."""
    raw = annotations_of(template).get(RESTARTED_AT_ANNOTATION)
    if not raw:
        return None
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def first_image(template: Mapping[str, Any]) -> str:
    containers = (template.get("spec") or {}).get("containers") or ()
    return str(containers[0].get("image", "")) if containers else ""


def revision_template(revision: Mapping[str, Any]) -> Obj | None:
    """The pod template a StatefulSet's or DaemonSet's ControllerRevision holds (its data is
    the patch that restores it, the template marked to replace the current one whole)."""
    template = ((revision.get("data") or {}).get("spec") or {}).get("template")
    if not isinstance(template, Mapping):
        return None
    return {k: v for k, v in template.items() if k != "$patch"}


def last_set(obj: Mapping[str, Any], field: Sequence[str]) -> datetime | None:
    """When the manager owning ``field`` (a ``fieldsV1`` path such as ``("f:revision",)``)
    last changed anything it owns: ``metadata.managedFields`` keeps one time per manager
    and operation, moved by any change of the fields that entry owns; None when no entry
    owns it (managed fields not kept)."""
    times = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or ():
        owned: Any = entry.get("fieldsV1") or {}
        for name in field:
            owned = owned.get(name) if isinstance(owned, Mapping) else None
        if owned is not None and entry.get("time"):
            times.append(_parse_time(entry["time"]))
    return max(times, default=None)


@dataclass(frozen=True, slots=True)
class RevisionDates:
    """What the API server tells of when one revision became current."""

    created: datetime
    # When its number was last set, if that can differ from its creation (a renumbered one).
    numbered: datetime | None = None
    # When the controller last changed it at all: a ReplicaSet's last scale, after which a
    # superseded one stays untouched.
    changed: datetime | None = None


def revision_times(history: Mapping[int, RevisionDates]) -> dict[int, datetime]:
    """When each revision became current, by number.

    A controller renumbers the template it re-activates (a rollback, or a patch back to an
    old template), keeping the object and its creation time: the time its number was last
    set is when it became current again. That time is only known as the time the
    controller last changed anything it owns on the object, which later scales move too;
    so a renumbered revision is taken no later than the last change of the one it replaced
    (n-1, scaled down by the rollout to n and left alone after). Numbers are given in the
    order revisions became current, so none is dated after a later one (a creation is
    exact, a last change only an upper bound)."""
    times: dict[int, datetime] = {}
    for n in sorted(history):
        d = history[n]
        t = d.created
        if d.numbered is not None:
            t = max(t, d.numbered)
            replaced = history.get(n - 1)
            if replaced is not None and replaced.changed is not None:
                t = min(t, replaced.changed)
        times[n] = t
    later: datetime | None = None
    for n in sorted(times, reverse=True):
        if later is not None and times[n] > later:
            times[n] = later
        later = times[n]
    return times


def restored_revisions(history: Mapping[int, RevisionDates]) -> frozenset[int]:
    """The revisions that re-activated an older template: created before the revision they
    replaced (the one numbered just below), as a renumbered ReplicaSet/ControllerRevision is
    and a new one never is. Creation times alone, exact: no managedFields needed."""
    numbers = sorted(history)
    return frozenset(
        n for before, n in pairwise(numbers) if history[n].created < history[before].created
    )


def replica_set_history(sets: Sequence[Mapping[str, Any]]) -> tuple[Revision, ...]:
    """A Deployment's rollout history from the ReplicaSets it controls: each revision's
    image and the time it became current (:func:`revision_times`), by number. Only a
    renumbered ReplicaSet (one with a revision history) became current after its
    creation, and only it is restored (see :func:`restored_revisions`)."""
    by_number = {revision_of(rs): rs for rs in sets}
    by_number.pop(0, None)
    history: dict[int, RevisionDates] = {}
    for n, rs in by_number.items():
        changed = last_set(rs, RS_REVISION_FIELD)
        history[n] = RevisionDates(
            created=_parse_time((rs.get("metadata") or {}).get("creationTimestamp")),
            numbered=changed if REVISION_HISTORY_ANNOTATION in annotations_of(rs) else None,
            changed=changed,
        )
    times = revision_times(history)
    restored = restored_revisions(history)
    return tuple(
        Revision(
            number=n,
            image=first_image((by_number[n].get("spec") or {}).get("template") or {}),
            at=times[n],
            # Renumbered by its controller: exact, where creation times to the second are not.
            restored=n in restored or REVISION_HISTORY_ANNOTATION in annotations_of(by_number[n]),
        )
        for n in sorted(by_number)
    )


def controller_history(
    workload: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> tuple[int, tuple[Revision, ...]]:
    """A StatefulSet's or DaemonSet's rollout history from the ControllerRevisions it owns,
    as a Deployment's from its ReplicaSets: each revision's image and the time it became
    current (a renumbered one's when its number was last set), by number, and the number
    of the template it runs."""
    images: dict[int, str] = {}
    dates: dict[int, RevisionDates] = {}
    running: list[int] = []
    now = (workload.get("spec") or {}).get("template") or {}
    for r in history:
        number = int(r.get("revision") or 0)
        template = revision_template(r)
        if number < 1 or template is None:
            continue
        created = _parse_time((r.get("metadata") or {}).get("creationTimestamp"))
        images[number] = first_image(template)
        # A ControllerRevision's data never changes: its number is all its controller sets.
        dates[number] = RevisionDates(created=created, numbered=last_set(r, CR_REVISION_FIELD))
        if template == now:
            running.append(number)
    times = revision_times(dates)
    restored = restored_revisions(dates)
    revisions = {
        n: Revision(number=n, image=images[n], at=times[n], restored=n in restored) for n in images
    }
    if running:
        current = max(running)
    else:
        # The controller has not recorded the running template yet: it is the next revision,
        # dated as a Deployment's unrecorded one (its creation), never as a recent rollout.
        current = max(revisions, default=0) + 1
        meta = workload.get("metadata") or {}
        revisions[current] = Revision(
            number=current,
            image=first_image(now),
            at=_parse_time(meta.get("creationTimestamp")),
        )
    return current, tuple(revisions[n] for n in sorted(revisions))


def pick_revision(
    target: Target, numbers: Sequence[int], current: int, to_revision: int | None
) -> int:
    """The revision a rollback restores: ``to_revision``, or the latest before ``current``
    (kubectl rollout undo); ActionFailed when there is none."""
    older = sorted(n for n in numbers if n != current)
    if to_revision is None:
        if not older:
            raise ActionFailed(f"{target.key}: no previous revision to roll back to")
        return max(older)
    if to_revision not in older:
        raise ActionFailed(
            f"{target.key}: revision {to_revision} not found among previous revisions "
            f"{older} (current {current})"
        )
    return to_revision


def revision_rollback(
    target: Target,
    obj: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    action_id: str,
    to_revision: int | None,
) -> _Write:
    """kubectl rollout undo of a StatefulSet or DaemonSet: the template of a previous
    ControllerRevision replaces the current one, in one conditional write with the id."""
    by_number = {int(r.get("revision") or 0): r for r in history}
    by_number.pop(0, None)
    if not by_number:
        raise ActionFailed(f"{target.key}: no rollout history found")
    spec = obj.get("spec") or {}
    now = spec.get("template") or {}
    running = [n for n, r in by_number.items() if revision_template(r) == now]
    if not running:
        # A change the controller has not recorded yet: any number given to the running
        # template is a guess (taking the newest called it the one it replaced, rolled back
        # past that one and noted an undo target that is not what runs). Retried, the
        # rollback is decided once the controller has recorded it.
        raise TransientError(
            f"{target.key}: the controller has not recorded the running template "
            f"({first_image(now)}) as a ControllerRevision yet"
        )
    current = max(running)
    chosen = pick_revision(target, list(by_number), current, to_revision)
    template = revision_template(by_number[chosen])
    if template is None:
        raise ActionFailed(f"{target.key}: revision {chosen} holds no pod template")
    if template == now:
        raise ActionFailed(
            f"{target.key}: current template already matches revision {chosen}; nothing to do"
        )
    annotations = annotations_of(obj)
    annotations[ACTION_IDS_ANNOTATION] = remember_id(annotations, action_id)
    return _rollback_write(
        target, obj, annotations, annotations, action_id, template, current, chosen
    )


def _rollback_write(
    target: Target,
    obj: Mapping[str, Any],
    annotations: dict[str, str],
    noted_on: Mapping[str, str],
    action_id: str,
    template: Obj,
    current: int,
    chosen: int,
) -> _Write:
    """The conditional JSON patch that puts revision ``chosen``'s ``template`` in place of
    revision ``current``'s on ``obj``, with ``annotations`` and, added to the notes of
    ``noted_on``, the prior state an undo restores."""
    old_image = first_image((obj.get("spec") or {}).get("template") or {})
    new_image = first_image(template)
    prior: dict[str, ParamValue] = {"revision": current, "image": old_image}
    annotations[PRIOR_STATE_ANNOTATION] = note_prior_state(noted_on, action_id, prior)
    body = [
        {
            "op": "replace",
            "path": "/metadata/resourceVersion",
            "value": obj["metadata"]["resourceVersion"],
        },
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "add", "path": "/metadata/annotations", "value": annotations},
    ]
    return _Write(
        body,
        Effect(
            applied=True,
            message=f"rolled back {target.key} from revision {current} ({old_image}) to the "
            f"template of revision {chosen} ({new_image})",
            prior_state=prior,
        ),
        content_type=JSON_PATCH,
    )


def eviction_block(status_doc: Mapping[str, Any]) -> str:
    """The reason an eviction was refused (429), from the API server's Status."""
    causes = ((status_doc.get("details") or {}).get("causes")) or ()
    texts = [str(c.get("message")) for c in causes if c.get("message")]
    return "; ".join(texts) or str(status_doc.get("message") or "eviction refused")


def evicted_by_api(pod: Mapping[str, Any]) -> bool:
    """Whether the pod is going by an eviction: the API server sets this condition before
    deleting it (PodDisruptionConditions, on since Kubernetes 1.31); a plain delete does not."""
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(
        c.get("type") == "DisruptionTarget"
        and c.get("status") == "True"
        and c.get("reason") == "EvictionByEvictionAPI"
        for c in conditions
    )


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _deep_merge(base: Obj, extra: Mapping[str, Any]) -> Obj:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _parse_time(raw: str | None) -> datetime:
    if not raw:
        return datetime.fromtimestamp(0, UTC)
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


# --- the adapter ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Write:
    """One conditional write and the effect it has when it lands."""

    body: Any
    effect: Effect
    content_type: str = MERGE_PATCH


@dataclass(slots=True)
class _DrainState:
    pending: dict[str, Obj] = field(default_factory=dict)
    evicted: dict[str, str] = field(default_factory=dict)  # "ns/name" -> uid
    blocked: dict[str, str] = field(default_factory=dict)  # "ns/name" -> why


def api_client(kubeconfig: str, *, setting: str = "kubernetes.kubeconfig") -> Any:
    """A client from ``kubeconfig``, else in-cluster config, else the default kubeconfig;
    ``setting`` names the configuration key in errors."""
    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=kubeconfig)
        try:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except ConfigException:
            return config.new_client_from_config()
    except (ConfigException, OSError) as err:
        raise ConfigError([f"{setting}: {err}"]) from err


def log_query(tail: int, since: datetime | None, now: datetime) -> list[tuple[str, str]]:
    """The pod log API's query: the last ``tail`` lines, of those since ``since``. The
    window goes as ``sinceSeconds`` (kept whole, and at least 1, which the API requires),
    counted from ``now``: the kubelet cuts the window first, then takes its tail."""
    query = [("tailLines", str(tail))]
    if since is not None:
        seconds = max(1, math.ceil((now - since).total_seconds()))
        query.append(("sinceSeconds", str(seconds)))
    return query


class KubeCluster:
    """The Cluster protocol against a Kubernetes API server."""

    def __init__(
        self,
        *,
        kubeconfig: str = "",
        request_timeout: float = 10.0,
        max_workers: int = 4,
        poll_interval: float = 0.5,
        api: Any = None,
    ) -> None:
        self._api = api if api is not None else api_client(kubeconfig)
        self._timeout = request_timeout
        self._poll = poll_interval
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube-action")
        self._closed = False

    @classmethod
    def from_settings(cls, section: Any) -> KubeCluster:
        """From ``settings.kubernetes`` (agent.settings.KubernetesSection)."""
        return cls(
            kubeconfig=section.kubeconfig,
            request_timeout=section.request_timeout,
            max_workers=section.max_workers,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool = self._pool
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._api.close)

    async def __aenter__(self) -> KubeCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"{self!r} was never closed", ResourceWarning, stacklevel=1)

    # --- transport -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        body: Any,
        content_type: str | None,
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One HTTP request, in a worker thread. Returns (status, body, headers)."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            req = self._api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(
                *req, _request_timeout=(min(5.0, self._timeout), self._timeout)
            )
            data = resp.read() or b""
            return int(resp.status), bytes(data), dict(resp.getheaders() or {})
        except ApiException as err:  # status 0: the transport failed
            raise DependencyUnavailable(
                f"kubernetes API {method} {path}: {plain(str(err.reason))}"
            ) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise DependencyUnavailable(f"kubernetes API {method} {path}: {err}") from err

    async def _raw(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
    ) -> tuple[int, Obj, Mapping[str, str]]:
        if self._closed:
            raise ActionFailed("the Kubernetes adapter is closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._request, method, path, query, body, content_type)
        try:
            status, data, headers = await asyncio.wait_for(
                loop.run_in_executor(self._pool, call), timeout=self._timeout + 5.0
            )
        except TimeoutError as err:
            raise DependencyUnavailable(
                f"kubernetes API {method} {path}: no answer in {self._timeout:.0f}s"
            ) from err
        try:
            doc = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            doc = {"message": data[:500].decode("utf-8", "replace")}
        if not isinstance(doc, dict):
            doc = {"items": doc}
        return status, doc, headers

    async def call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
    ) -> Obj:
        """One API request; a non-2xx answer raises the agent error it means."""
        status, doc, headers = await self._raw(
            method, path, query=query, body=body, content_type=content_type
        )
        if 200 <= status < 300:
            return doc
        raise translate(status, doc, headers, method=method, what=what)

    async def _get(self, target: Target) -> Obj:
        return await self.call("GET", _path(target), what=target.key)

    async def _list(
        self, path: str, *, what: str, query: Sequence[tuple[str, str]] = ()
    ) -> list[Obj]:
        doc = await self.call("GET", path, what=what, query=query)
        return list(doc.get("items") or ())

    async def _mutate(
        self,
        target: Target,
        path: str,
        action_id: str,
        plan: Callable[[Obj], _Write],
        shape: PriorShape,
        **must: ParamValue,
    ) -> Effect:
        """Read, skip if the id is there (with the prior state it noted, of ``shape`` and
        holding ``must``), write conditionally; on 409 start over."""
        for attempt in range(1, CONFLICT_RETRIES + 1):
            obj = await self.call("GET", path, what=target.key)
            if action_id in remembered_ids(annotations_of(obj)):
                noted = recorded_prior(annotations_of(obj), action_id, shape, **must)
                return _already(action_id, target, noted)
            write = plan(obj)
            try:
                await self.call(
                    "PATCH", path, what=target.key, body=write.body, content_type=write.content_type
                )
            except Conflict:
                log.info("%s changed while acting (attempt %d); re-reading", target.key, attempt)
                continue
            return write.effect
        raise ActionFailed(
            f"{target.key} changed concurrently {CONFLICT_RETRIES} times in a row; gave up"
        )

    # --- reads -----------------------------------------------------------------------------

    async def workload(self, target: Target) -> WorkloadState:
        _need(target, WORKLOAD_RESOURCES, "workload")
        obj = await self._get(target)
        spec = obj.get("spec") or {}
        template = spec.get("template") or {}
        image = first_image(template)
        meta = obj.get("metadata") or {}
        created = _parse_time(meta.get("creationTimestamp"))
        if target.kind == "Deployment":
            revisions = replica_set_history(await self._replica_sets(target, obj))
            revision = revision_of(obj) or max((r.number for r in revisions), default=1)
            if not any(r.number == revision for r in revisions):
                revisions = (*revisions, Revision(number=revision, image=image, at=created))
        else:
            history = await self._controller_revisions(target, obj)
            revision, revisions = controller_history(obj, history)
        typed = {**obj, "kind": target.kind}
        return WorkloadState(
            target=target,
            replicas=desired_pods(typed),
            ready_replicas=ready_pods(typed),
            revision=revision,
            image=image,
            revisions=revisions,
            annotations=annotations_of(obj),
            generation=int(meta.get("generation") or 1),
            restarted_at=restarted_at(template),
        )

    async def _replica_sets(self, target: Target, deployment: Obj) -> list[Obj]:
        """The ReplicaSets this Deployment controls (by owner uid, as kubectl does)."""
        uid = (deployment.get("metadata") or {}).get("uid")
        sets = await self._list(
            f"/apis/apps/v1/namespaces/{target.namespace}/replicasets",
            what=f"ReplicaSets of {target.key}",
            query=_selector_query(deployment),
        )
        return [rs for rs in sets if (controller_of(rs) or {}).get("uid") == uid]

    async def _controller_revisions(self, target: Target, workload: Obj) -> list[Obj]:
        """The ControllerRevisions (template history) this StatefulSet or DaemonSet
        controls, by owner uid, as kubectl rollout undo reads them."""
        uid = (workload.get("metadata") or {}).get("uid")
        revisions = await self._list(
            f"/apis/apps/v1/namespaces/{target.namespace}/controllerrevisions",
            what=f"ControllerRevisions of {target.key}",
            query=_selector_query(workload),
        )
        return [r for r in revisions if (controller_of(r) or {}).get("uid") == uid]

    async def _budgets(self, namespace: str) -> list[Obj]:
        return await self._list(
            f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
            what=f"PodDisruptionBudgets in {namespace}",
        )

    def _covering(
        self, budgets: Sequence[Obj], namespace: str, labels: Mapping[str, str]
    ) -> list[Obj]:
        return [
            b
            for b in budgets
            if selector_matches((b.get("spec") or {}).get("selector"), labels)
            and (b.get("metadata") or {}).get("namespace", namespace) == namespace
        ]

    async def _hpa_for(self, target: Target) -> Obj | None:
        hpas = await self._list(
            f"/apis/autoscaling/v2/namespaces/{target.namespace}/horizontalpodautoscalers",
            what=f"HorizontalPodAutoscalers in {target.namespace}",
        )
        for hpa in hpas:
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind") == target.kind and ref.get("name") == target.name:
                return hpa
        return None

    async def _restarts(self, target: Target, workload: Obj) -> int:
        """Container restarts of the workload's pods (by its selector) that are not
        terminating: a crash loop shows here even while a pod is, for a moment, ready."""
        query = _selector_query(workload)
        if not query:
            return 0  # no matchLabels: nothing to list by, and never a whole namespace
        pods = await self._list(
            f"/api/v1/namespaces/{target.namespace}/pods", what=f"pods of {target.key}", query=query
        )
        return sum(
            int(c.get("restartCount") or 0)
            for p in pods
            if not (p.get("metadata") or {}).get("deletionTimestamp")
            for c in (p.get("status") or {}).get("containerStatuses") or ()
        )

    async def _pods_on(self, node: str) -> list[Obj]:
        return await self._list(
            "/api/v1/pods",
            what=f"pods on Node/{node}",
            query=[("fieldSelector", f"spec.nodeName={node}")],
        )

    async def applied(
        self,
        target: Target,
        *,
        action_id: str,
        action_type: str,
        undo: bool = False,
        must: Mapping[str, ParamValue] | None = None,
    ) -> Effect | None:
        if target.kind == "Pod":
            return await self._pod_restarted(target, action_id)
        status, obj, headers = await self._raw("GET", _path(target))
        if status == 404:
            return None
        if not 200 <= status < 300:
            raise translate(status, obj, headers, method="GET", what=target.key)
        if action_id in remembered_ids(annotations_of(obj)):
            if action_type == "drain_node" and not undo and not await self._drained(target, obj):
                return None  # its id lands with the cordon: a repeat resumes the evictions
            shape = prior_shape(action_type, undo=undo)
            noted = recorded_prior(annotations_of(obj), action_id, shape, **(must or {}))
            return _already(action_id, target, noted)
        if action_type not in ("scale_up", "scale_down") or target.kind == "DaemonSet":
            return None
        # A scale of an autoscaled workload wrote its id on the HPA (see scale).
        hpa = await self._hpa_for(target)
        if hpa is None or action_id not in remembered_ids(annotations_of(hpa)):
            return None
        # As _scale_hpa: only this HPA's own bounds count.
        shape = NO_PRIOR if undo else HPA_SCALE_PRIOR
        name = str(hpa["metadata"]["name"])
        prior = recorded_prior(
            annotations_of(hpa), action_id, shape, **({} if undo else {"hpa": name})
        )
        return _already(action_id, target, prior)

    async def partly_applied(
        self, target: Target, *, action_id: str, action_type: str
    ) -> str | None:
        if action_type != "drain_node" or target.kind != "Node":
            return None
        status, node, headers = await self._raw("GET", _path(target))
        if status == 404:
            return None
        if not 200 <= status < 300:
            raise translate(status, node, headers, method="GET", what=target.key)
        cordoned = bool((node.get("spec") or {}).get("unschedulable"))
        if not cordoned or action_id not in remembered_ids(annotations_of(node)):
            return None
        pods = _classify(await self._pods_on(target.name))
        if _finished(True, pods, node):
            return None
        evictable, unmanaged, terminating = _left(pods, node)
        return drain_left(evictable=evictable, unmanaged=unmanaged, terminating=terminating)

    async def _drained(self, target: Target, node: Obj) -> bool:
        """Whether a drain whose id is on ``node`` would do nothing more if asked again."""
        cordoned = bool((node.get("spec") or {}).get("unschedulable"))
        pods = _classify(await self._pods_on(target.name)) if cordoned else _NO_PODS
        return _finished(cordoned, pods, node)

    async def _pod_restarted(self, target: Target, action_id: str) -> Effect | None:
        """As restart_pod tells a repeat: the pod gone, still terminating, or replaced by
        its StatefulSet, after this action evicted it. A live pod with the id is not done,
        nor one whose uid the note names (a delivery that noted and died before evicting):
        a repeat evicts."""
        status, pod, headers = await self._raw("GET", _path(target))
        if status == 404:
            effect = await self._pod_gone(target, action_id)
            return effect if effect.found_id else None
        if not 200 <= status < 300:
            raise translate(status, pod, headers, method="GET", what=target.key)
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            effect = await self._pod_terminating(target, pod, action_id)
            return effect if effect.found_id else None
        recorder = await self._recorder(target.namespace, pod)
        if recorder is None:
            return None
        gone = await self._evicted_by(recorder, action_id)
        uid = (pod.get("metadata") or {}).get("uid")
        return _replaced(action_id, target, gone, recorder) if gone and gone != uid else None

    async def footprint(self, target: Target) -> Footprint:
        if target.kind in WORKLOAD_RESOURCES:
            obj = await self._get(target)
            spec = obj.get("spec") or {}
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            covering = self._covering(
                await self._budgets(target.namespace), target.namespace, labels
            )
            hpa = await self._hpa_for(target) if target.kind != "DaemonSet" else None
            return Footprint(
                replicas=desired_pods({**obj, "kind": target.kind}),
                disruption=rollout_disruption({**obj, "kind": target.kind}),
                pdb_headroom=_headroom(covering),
                pdbs=tuple(_name(b, target.namespace) for b in covering),
                hpa=(hpa or {}).get("metadata", {}).get("name", "") if hpa else "",
            )
        if target.kind == "Pod":
            status, pod, headers = await self._raw("GET", _path(target))
            if status == 404:
                return Footprint()  # already gone: restarting it disrupts nothing
            if not 200 <= status < 300:
                raise translate(status, pod, headers, method="GET", what=target.key)
            labels = (pod.get("metadata") or {}).get("labels") or {}
            covering = self._covering(
                await self._budgets(target.namespace), target.namespace, labels
            )
            replicas = 1
            owner = controller_of(pod)
            if owner and owner.get("kind") in ("ReplicaSet", "StatefulSet", "DaemonSet"):
                kind = owner["kind"]
                group = "replicasets" if kind == "ReplicaSet" else WORKLOAD_RESOURCES[kind]
                with contextlib.suppress(ActionFailed):
                    parent = await self.call(
                        "GET",
                        f"/apis/apps/v1/namespaces/{target.namespace}/{group}/{owner['name']}",
                        what=f"{kind}/{target.namespace}/{owner['name']}",
                    )
                    replicas = desired_pods({**parent, "kind": kind})
            terminating = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
            return Footprint(
                replicas=replicas,
                disruption=1 if pod_ready(pod) and not terminating else 0,
                pdb_headroom=_headroom(covering),
                pdbs=tuple(_name(b, target.namespace) for b in covering),
            )
        if target.kind == "Node":
            nodes = await self._list("/api/v1/nodes", what="nodes")
            cordoned = tuple(
                sorted(
                    str(n["metadata"]["name"])
                    for n in nodes
                    if (n.get("spec") or {}).get("unschedulable")
                    and n["metadata"]["name"] != target.name
                )
            )
            return Footprint(cordoned_nodes=cordoned)
        return Footprint()

    async def observe(self, target: Target) -> Observation:
        try:
            obj = await self._get(target)
        except ActionFailed as err:
            if "not found" in str(err):
                return Observation(exists=False)
            raise
        meta, spec, status = (
            obj.get("metadata") or {},
            obj.get("spec") or {},
            obj.get("status") or {},
        )
        if target.kind in WORKLOAD_RESOURCES:
            typed = {**obj, "kind": target.kind}
            desired, ready = desired_pods(typed), ready_pods(typed)
            updated, current = (
                ("updatedNumberScheduled", "currentNumberScheduled")
                if target.kind == "DaemonSet"
                else ("updatedReplicas", "replicas")
            )
            settled = (
                int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
                and int(status.get(updated) or 0) == desired
                and int(status.get(current) or 0) == desired
                and ready == desired
            )
            if target.kind == "StatefulSet":
                settled = settled and status.get("currentRevision") == status.get("updateRevision")
            restarts = await self._restarts(target, obj)
            return Observation(desired=desired, ready=ready, settled=settled, restarts=restarts)
        if target.kind == "Pod":
            terminating = bool(meta.get("deletionTimestamp"))
            return Observation(
                desired=1,
                ready=int(pod_ready(obj)),
                settled=not terminating,
                uid=str(meta.get("uid", "")),
            )
        if target.kind == "Node":
            pods = await self._pods_on(target.name)
            evict, _skipped, unmanaged, _terminating = _classify(pods)
            return Observation(
                cordoned=bool(spec.get("unschedulable")), evictable=len(evict) + len(unmanaged)
            )
        return Observation()

    async def version(self, target: Target) -> str:
        obj = await self._get(target)
        meta = obj.get("metadata") or {}
        if target.kind in WORKLOAD_RESOURCES:
            return f"generation={meta.get('generation')}"
        if target.kind == "Pod":
            return f"uid={meta.get('uid')}"
        if target.kind == "Node":
            return f"unschedulable={bool((obj.get('spec') or {}).get('unschedulable'))}"
        return f"resourceVersion={meta.get('resourceVersion')}"

    # --- actions ---------------------------------------------------------------------------

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Effect:
        _need(target, WORKLOAD_RESOURCES, "restart_workload")

        def plan(obj: Obj) -> _Write:
            gen = int((obj.get("metadata") or {}).get("generation") or 1)
            prior: dict[str, ParamValue] = {"generation": gen}
            change = {
                "spec": {
                    "template": {
                        "metadata": {"annotations": {RESTARTED_AT_ANNOTATION: at.isoformat()}}
                    }
                }
            }
            return _Write(
                _merge_body(obj, action_id, change, prior),
                Effect(
                    applied=True,
                    message=f"restarted {target.key} (rolling restart, as kubectl rollout restart)",
                    prior_state=prior,
                ),
            )

        return await self._mutate(target, _path(target), action_id, plan, RESTART_PRIOR)

    async def scale(
        self,
        target: Target,
        *,
        action_id: str,
        replicas: int,
        direction: ScaleDirection | None = None,
    ) -> Effect:
        _need_kind(target, "scale_up")
        if replicas < 0:
            raise ActionFailed(f"{target.key}: replicas must be >= 0, got {replicas}")
        obj = await self._get(target)
        if action_id in remembered_ids(annotations_of(obj)):
            noted = recorded_prior(annotations_of(obj), action_id, SCALE_PRIOR)
            return _already(action_id, target, noted)
        current = int((obj.get("spec") or {}).get("replicas", 1))
        hpa = await self._hpa_for(target)
        if hpa is not None:
            refused = against_direction(target, current, replicas, direction)
            if refused is not None:
                raise refused
            return await self._scale_hpa(target, hpa, action_id, replicas, current)

        def plan(o: Obj) -> _Write:
            before = int((o.get("spec") or {}).get("replicas", 1))
            # Checked on the object the conditional write is based on.
            refused = against_direction(target, before, replicas, direction)
            if refused is not None:
                raise refused
            prior: dict[str, ParamValue] = {"replicas": before}
            return _Write(
                _merge_body(o, action_id, {"spec": {"replicas": replicas}}, prior),
                Effect(
                    applied=True,
                    message=f"scaled {target.key} from {before} to {replicas}",
                    prior_state=prior,
                ),
            )

        return await self._mutate(target, _path(target), action_id, plan, SCALE_PRIOR)

    async def _scale_hpa(
        self, target: Target, hpa: Obj, action_id: str, replicas: int, current: int
    ) -> Effect:
        name = hpa["metadata"]["name"]
        path = _hpa_path(target.namespace, name)
        if replicas < 1:
            raise ActionFailed(f"{target.key} is autoscaled by HPA {name}: cannot scale to 0")

        def plan(o: Obj) -> _Write:
            spec = o.get("spec") or {}
            lo, hi = int(spec.get("minReplicas") or 1), int(spec["maxReplicas"])
            if replicas >= current:
                new_lo, new_hi = max(lo, replicas), max(hi, replicas)
            else:
                new_lo, new_hi = min(lo, replicas), min(hi, replicas)
            prior: dict[str, ParamValue] = {
                "replicas": current,
                "hpa": name,
                "hpa_min_replicas": lo,
                "hpa_max_replicas": hi,
            }
            bounds = {"spec": {"minReplicas": new_lo, "maxReplicas": new_hi}}
            return _Write(
                _merge_body(o, action_id, bounds, prior),
                Effect(
                    applied=True,
                    message=f"{target.key} is autoscaled by HPA {name}: moved its bounds "
                    f"{lo}..{hi} -> {new_lo}..{new_hi} for {replicas} replicas (was {current})",
                    prior_state=prior,
                ),
            )

        # An undo writes the HPA the note names: only this one's own bounds count.
        return await self._mutate(target, path, action_id, plan, HPA_SCALE_PRIOR, hpa=name)

    async def rollback(
        self, target: Target, *, action_id: str, to_revision: int | None = None
    ) -> Effect:
        _need_kind(target, "rollback")
        path = _path(target)
        for attempt in range(1, CONFLICT_RETRIES + 1):
            dep = await self._get(target)
            if action_id in remembered_ids(annotations_of(dep)):
                noted = recorded_prior(annotations_of(dep), action_id, ROLLBACK_PRIOR)
                return _already(action_id, target, noted)
            if target.kind == "Deployment":
                write = await self._rollback_write(target, dep, action_id, to_revision)
            else:
                history = await self._controller_revisions(target, dep)
                write = revision_rollback(target, dep, history, action_id, to_revision)
            try:
                await self.call(
                    "PATCH", path, what=target.key, body=write.body, content_type=JSON_PATCH
                )
            except Conflict:
                log.info("%s changed while rolling back (attempt %d)", target.key, attempt)
                continue
            return write.effect
        raise ActionFailed(f"{target.key} changed concurrently {CONFLICT_RETRIES} times; gave up")

    async def _rollback_write(
        self, target: Target, dep: Obj, action_id: str, to_revision: int | None
    ) -> _Write:
        spec = dep.get("spec") or {}
        if spec.get("paused"):
            raise ActionFailed(f"{target.key} is paused: resume it before rolling back")
        by_revision = {revision_of(rs): rs for rs in await self._replica_sets(target, dep)}
        by_revision.pop(0, None)
        if not by_revision:
            raise ActionFailed(f"{target.key}: no rollout history found")
        now = spec.get("template") or {}
        running = [
            n
            for n, rs in by_revision.items()
            if template_without_hash((rs.get("spec") or {}).get("template") or {}) == now
        ]
        if not running:
            # A template change the controller has not given a ReplicaSet yet: the
            # Deployment's revision still names the one it replaces, and "the one before"
            # would be two steps back (as for a StatefulSet's unrecorded revision).
            raise TransientError(
                f"{target.key}: the controller has not created the ReplicaSet of the running "
                f"template ({first_image(now)}) yet"
            )
        current = max(running)
        chosen = pick_revision(target, list(by_revision), current, to_revision)
        rs = by_revision[chosen]
        template = template_without_hash((rs.get("spec") or {}).get("template") or {})
        if template == (spec.get("template") or {}):
            raise ActionFailed(
                f"{target.key}: current template already matches revision {chosen}; nothing to do"
            )
        current_ann = annotations_of(dep)
        # The Deployment's own record of pod evictions too: the controller copies the
        # Deployment's annotations onto its ReplicaSet, and an old one's copy is older.
        kept = ROLLBACK_SKIPPED_ANNOTATIONS | {EVICTED_PODS_ANNOTATION}
        annotations = {k: v for k, v in current_ann.items() if k in kept}
        annotations.update((k, v) for k, v in annotations_of(rs).items() if k not in kept)
        annotations[ACTION_IDS_ANNOTATION] = remember_id(current_ann, action_id)
        # Noted on the Deployment's own notes: the ReplicaSet's copy of them is older.
        return _rollback_write(
            target, dep, annotations, current_ann, action_id, template, current, chosen
        )

    async def restart_pod(self, target: Target, *, action_id: str) -> Effect:
        _need(target, ("Pod",), "restart_pod")
        path = _path(target)
        for _ in range(CONFLICT_RETRIES):
            status, pod, headers = await self._raw("GET", path)
            if status == 404:
                return await self._pod_gone(target, action_id)
            if not 200 <= status < 300:
                raise translate(status, pod, headers, method="GET", what=target.key)
            meta = pod.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                return await self._pod_terminating(target, pod, action_id, acting=True)
            recorder = await self._recorder(target.namespace, pod)
            if action_id not in remembered_ids(annotations_of(pod)):
                gone = await self._evicted_by(recorder, action_id) if recorder else ""
                if recorder and gone and gone != meta.get("uid"):
                    return _replaced(action_id, target, gone, recorder)
                # The id rides on the pod first; a delivery interrupted between this write and
                # the eviction finds the id on a live pod and completes the eviction.
                try:
                    pod = await self.call(
                        "PATCH",
                        path,
                        what=target.key,
                        body=_merge_body(pod, action_id, {}),
                        content_type=MERGE_PATCH,
                    )
                except Conflict:
                    continue
                meta = pod.get("metadata") or {}
            if recorder is not None:
                # A note naming a pod still here (a delivery that died before evicting) is
                # kept and this eviction completes it: the uid tells the pod from the next.
                await self._note_eviction(recorder, action_id, str(meta.get("uid")))
            try:
                why = await self._evict(
                    target.namespace,
                    target.name,
                    uid=meta.get("uid"),
                    resource_version=meta.get("resourceVersion"),
                )
            except Throttled:
                if recorder is not None:  # not evicted: the note must not outlive it
                    uid = str(meta.get("uid"))
                    await self._note_eviction(recorder, action_id, uid, evicting=False)
                raise
            if why is not None and recorder is not None:
                # Not evicted (refused, the pod changed, or someone else deleted it since
                # it was read): the note must not outlive it.
                uid = str(meta.get("uid"))
                await self._note_eviction(recorder, action_id, uid, evicting=False)
            if why in ("conflict", "gone"):
                # Read again: gone or terminating now, by another hand than this action's.
                continue
            if why is not None:
                raise ActionFailed(f"restart of {target.key} refused: {why}")
            return Effect(
                applied=True,
                message=f"evicted {target.key} for its controller to replace",
                prior_state={
                    "uid": str(meta.get("uid", "")),
                    "node": str((pod.get("spec") or {}).get("nodeName", "")),
                },
            )
        raise ActionFailed(f"{target.key} changed concurrently {CONFLICT_RETRIES} times; gave up")

    async def _pod_gone(self, target: Target, action_id: str) -> Effect:
        """A pod not found: evicted by this action's earlier delivery if the owner its name
        points to (``<sts>-<ordinal>``, ``<deployment>-<template hash>-<suffix>``) records
        that eviction; of other pods nothing tells. No pod has the noted uid any more (it
        had this name), so the note cannot be of an eviction that never happened."""
        for recorder in _recorders_named(target.namespace, target.name):
            status, obj, headers = await self._raw("GET", recorder.path)
            if status == 404:
                continue
            if not 200 <= status < 300:
                raise translate(status, obj, headers, method="GET", what=recorder.what)
            gone = evicted_uid(annotations_of(obj), action_id)
            if gone:
                return Effect(
                    applied=False,
                    message=f"action {action_id} already evicted {target.key} (uid {gone})",
                    prior_state={"uid": gone},
                    found_id=True,
                )
        return Effect(applied=False, message=f"{target.key} is already gone")

    async def _pod_terminating(
        self, target: Target, pod: Mapping[str, Any], action_id: str, *, acting: bool = False
    ) -> Effect:
        """A pod already terminating: this action's own eviction, as for a pod gone, when
        its owner's note names this action and this very pod (its uid) and the pod is going
        by an eviction: an earlier delivery evicted it and died before its outcome was
        recorded (a finalizer, or a long grace period, keeps the pod). Otherwise someone
        else is deleting it: nothing to do; ``acting`` (restart_pod, not a read), a note
        naming the pod, left by a delivery that died before evicting, is taken back, or
        the redelivery finding the pod gone would take that deletion for its own."""
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        recorder = await self._recorder(target.namespace, pod)
        if uid and recorder is not None:
            status, obj, headers = await self._raw("GET", recorder.path)
            if status != 404 and not 200 <= status < 300:  # 404: its owner went first
                raise translate(status, obj, headers, method="GET", what=recorder.what)
            noted = 200 <= status < 300 and evicted_uid(annotations_of(obj), action_id) == uid
            # Only an eviction marks the pod DisruptionTarget (EvictionByEvictionAPI) before
            # deleting it: a pod deleted outright is someone else's doing.
            if noted and evicted_by_api(pod):
                return Effect(
                    applied=False,
                    message=f"action {action_id} already evicted {target.key} (uid {uid}); "
                    "it is terminating",
                    prior_state={"uid": uid},
                    found_id=True,
                )
            if noted and acting:
                await self._note_eviction(recorder, action_id, uid, evicting=False)
        return Effect(applied=False, message=f"{target.key} is already terminating")

    async def _recorder(self, namespace: str, pod: Mapping[str, Any]) -> _Recorder | None:
        """Where a restart_pod of ``pod`` notes its eviction: the pod's StatefulSet, or the
        Deployment of its ReplicaSet (what outlives the pod and the redelivery can find by
        its name); None for other pods (a bare ReplicaSet's, a Job's, a DaemonSet's)."""
        owner = controller_of(pod) or {}
        name = str(owner.get("name", ""))
        if owner.get("kind") == "StatefulSet":
            return _Recorder("StatefulSet", namespace, name)
        if owner.get("kind") != "ReplicaSet":
            return None
        rs = _Recorder("ReplicaSet", namespace, name)
        status, obj, headers = await self._raw("GET", rs.path)
        if status == 404:
            return None  # deleted with its pods: they go with it
        if not 200 <= status < 300:
            raise translate(status, obj, headers, method="GET", what=rs.what)
        deployment = controller_of(obj) or {}
        if deployment.get("kind") != "Deployment":
            return None
        return _Recorder("Deployment", namespace, str(deployment.get("name", "")))

    async def _evicted_by(self, recorder: _Recorder, action_id: str) -> str:
        obj = await self.call("GET", recorder.path, what=recorder.what)
        return evicted_uid(annotations_of(obj), action_id)

    async def _note_eviction(
        self, recorder: _Recorder, action_id: str, uid: str, *, evicting: bool = True
    ) -> None:
        """Record on the pod's owner, before evicting, which pod ``action_id`` evicts: a
        StatefulSet's replacement, under the same name, carries no id, and a redelivery
        must not evict it too; a redelivery that finds the pod gone reads here that the
        action evicted it (the id rode on the pod). ``evicting`` False takes the record
        back when the eviction did not happen: left there, it would pass the pod's next
        replacement off as the action's work."""
        path, what = recorder.path, recorder.what
        for _ in range(CONFLICT_RETRIES):
            obj = await self.call("GET", path, what=what)
            ann = annotations_of(obj)
            if (evicted_uid(ann, action_id) == uid) == evicting:
                return
            noted = (remember_eviction if evicting else forget_eviction)(ann, action_id, uid)
            body = {
                "metadata": {
                    "resourceVersion": (obj.get("metadata") or {}).get("resourceVersion"),
                    "annotations": {EVICTED_PODS_ANNOTATION: noted},
                }
            }
            try:
                await self.call("PATCH", path, what=what, body=body, content_type=MERGE_PATCH)
            except Conflict:
                continue
            return
        raise ActionFailed(f"{what} changed concurrently {CONFLICT_RETRIES} times; gave up")

    async def _evict(
        self,
        namespace: str,
        name: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
        grace_period: float | None = None,
        budgets: Sequence[Obj] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> str | None:
        """None when evicted; "gone" when no such pod (someone else's deletion ended
        first); "conflict"; else why a budget refused it."""
        options: Obj = {}
        pre = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
        if pre:
            options["preconditions"] = pre
        if grace_period is not None:
            options["gracePeriodSeconds"] = int(grace_period)
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
            **({"deleteOptions": options} if options else {}),
        }
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/eviction"
        status, doc, headers = await self._raw(
            "POST", path, body=body, content_type="application/json"
        )
        if 200 <= status < 300:
            return None
        if status == 404:
            return "gone"
        if status == 403 and _cause(doc, "NamespaceTerminating"):
            return None  # as kubectl drain: the namespace's deletion takes the pod anyway
        if status == 409:
            return "conflict"
        if status == 429 and not _cause(doc, "DisruptionBudget"):
            # Every budget refusal names its cause; without it the server sheds load.
            what = f"eviction of Pod/{namespace}/{name}"
            err = translate(status, doc, headers, method="POST", what=what)
            wait = err.retry_after if isinstance(err, TransientError) else None
            raise Throttled(str(err), retry_after=wait)
        if status == 429:
            if budgets is None:
                budgets = await self._budgets(namespace)
            if labels is None:
                pod = await self.call(
                    "GET",
                    f"/api/v1/namespaces/{namespace}/pods/{name}",
                    what=f"Pod/{namespace}/{name}",
                )
                labels = (pod.get("metadata") or {}).get("labels") or {}
            names = [_name(b, namespace) for b in self._covering(budgets, namespace, labels)]
            which = ", ".join(f"PodDisruptionBudget {n}" for n in names) or "a PodDisruptionBudget"
            return f"blocked by {which} ({eviction_block(doc)})"
        raise translate(
            status, doc, headers, method="POST", what=f"eviction of Pod/{namespace}/{name}"
        )

    async def cordon(self, target: Target, *, action_id: str) -> Effect:
        _need(target, ("Node",), "cordon_node")
        return await self._cordon(target, action_id)

    async def _cordon(self, target: Target, action_id: str) -> Effect:
        def plan(node: Obj) -> _Write:
            was = bool((node.get("spec") or {}).get("unschedulable"))
            change = {
                "metadata": {
                    "annotations": {
                        UNSCHEDULABLE_BEFORE_ANNOTATION: unschedulable_before(action_id, was)
                    }
                },
                "spec": {"unschedulable": True},
            }
            return _Write(
                _merge_body(node, action_id, change),
                Effect(
                    applied=True,
                    message=f"cordoned {target.key}" + (" (it already was)" if was else ""),
                    prior_state={"unschedulable": was},
                ),
            )

        return await self._mutate(target, _path(target), action_id, plan, CORDON_PRIOR)

    async def drain(
        self,
        target: Target,
        *,
        action_id: str,
        grace_period: float | None,
        drain_timeout: float,
        stop: StopCheck | None = None,
    ) -> Effect:
        _need(target, ("Node",), "drain_node")
        cordoned = await self._cordon(target, action_id)
        # The id is on the node from the cordon on, before any eviction: finding it, this
        # delivery resumes one that died (the drain may evict the executor's own pod) or
        # timed out, unless the node was uncordoned since (an undo, an operator).
        resumed = not cordoned.applied
        unschedulable = True
        node: Obj = {}
        if resumed:
            node = await self._get(target)
            unschedulable = bool((node.get("spec") or {}).get("unschedulable"))
            prior: Mapping[str, Any] = prior_unschedulable(annotations_of(node), action_id)
        else:
            prior = cordoned.prior_state
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        pods = _classify(await self._pods_on(target.name)) if unschedulable else _NO_PODS
        evict, skipped, unmanaged, terminating = pods
        if resumed and _finished(unschedulable, pods, node):
            # An earlier delivery evicted them all and they are gone (or stranded on a
            # NotReady node), or the node was uncordoned since.
            return cordoned
        if unmanaged:
            raise PartialFailure(
                f"drain of {target.key} refused: pods without a controller would not be "
                f"recreated: {', '.join(sorted(unmanaged))}; the node is left cordoned",
                prior_state=prior,
            )
        state = _DrainState(pending=dict(evict))
        budgets: dict[str, list[Obj]] = {}
        gone = False
        stranded: list[str] = []
        while True:
            for key, pod in list(state.pending.items()):
                why = stop() if stop is not None else None
                if why:
                    raise drain_stopped(
                        target, why, list(state.evicted), list(state.pending), prior
                    )
                meta = pod["metadata"]
                ns = meta["namespace"]
                if ns not in budgets:
                    budgets[ns] = await self._budgets(ns)
                try:
                    why = await self._evict(
                        ns,
                        meta["name"],
                        uid=meta.get("uid"),
                        grace_period=grace_period,
                        budgets=budgets[ns],
                        labels=meta.get("labels") or {},
                    )
                except Throttled as err:
                    why = f"not evicted yet: {err}"  # tried again until the timeout
                # "conflict": the uid precondition failed, so the pod we listed is gone
                # (a StatefulSet pod recreated under its name): as good as evicted; "gone"
                # alike (a drain wants the pod off the node, whoever took it).
                if why in (None, "conflict", "gone"):
                    state.evicted[key] = str(meta.get("uid", ""))
                    del state.pending[key]
                    state.blocked.pop(key, None)
                else:
                    state.blocked[key] = why
            if not state.pending:
                # What it evicted, and what was terminating already (an earlier delivery's
                # evictions, or anyone's): the node is drained once they are gone, as
                # kubectl drain waits for every pod it deletes.
                gone, stranded = await self._gone({**terminating, **state.evicted}, target.name)
                if gone:
                    break
            if loop.time() >= deadline:
                break
            budgets.clear()  # budgets' headroom moves as replacements become ready
            await asyncio.sleep(self._poll)
        evicted = ", ".join(sorted(state.evicted)) or "none"
        if state.pending:
            blocked = "; ".join(
                f"pod {k} {state.blocked.get(k, 'not evicted yet')}" for k in sorted(state.pending)
            )
            raise PartialFailure(
                f"drain of {target.key} stopped after {drain_timeout:.0f}s: {blocked}. "
                f"Evicted: {evicted}. The node is left cordoned.",
                prior_state=prior,
            )
        if not gone:
            waited = ", ".join(sorted(terminating))
            before = f"; terminating since before it: {waited}" if terminating else ""
            raise PartialFailure(
                f"drain of {target.key}: evicted pods still terminating after {drain_timeout:.0f}s "
                f"({evicted}{before}); the node is left cordoned",
                prior_state=prior,
            )
        skip = f"; skipped {len(skipped)} DaemonSet/mirror pods" if skipped else ""
        left = (
            f"; {len(stranded)} still terminating on the NotReady node, whose kubelet cannot "
            f"confirm it ({', '.join(sorted(stranded))})"
            if stranded
            else ""
        )
        how = "already cordoned by this action, resumed" if resumed else "cordoned"
        waited = (
            f"; waited for {len(terminating)} terminating ({', '.join(sorted(terminating))})"
            if terminating
            else ""
        )
        return Effect(
            applied=True,
            message=f"drained {target.key}: {how}, evicted {len(state.evicted)} pods "
            f"({evicted}){waited}{skip}{left}",
            prior_state=prior,
        )

    async def _gone(self, evicted: Mapping[str, str], node: str) -> tuple[bool, list[str]]:
        """Whether the evicted pods are gone, and those that count as gone though still
        terminating: on a NotReady node no kubelet confirms a pod's end, so it would stay
        Terminating until the node object goes (kubectl drain waits out its timeout
        there). Its controller has replaced it already; waiting only fails the drain."""
        down: bool | None = None  # read once, when a pod still terminates
        stranded: list[str] = []
        for key, uid in evicted.items():
            ns, name = key.split("/", 1)
            status, pod, headers = await self._raw("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
            if status == 404:
                continue
            if not 200 <= status < 300:
                raise translate(status, pod, headers, method="GET", what=f"Pod/{key}")
            meta = pod.get("metadata") or {}
            if meta.get("uid") != uid:
                continue  # a new pod under the old name (a StatefulSet's)
            if meta.get("deletionTimestamp"):
                if down is None:
                    down = "NotReady" in (await self.node_conditions([node])).get(node, ())
                if down:
                    stranded.append(key)
                    continue
            return False, []
        return True, stranded

    async def update_config(
        self, target: Target, *, action_id: str, key: str, value: str
    ) -> Effect:
        _need(target, ("ConfigMap",), "update_config")
        if not key:
            raise ActionFailed(f"update_config of {target.key} needs a key")

        def plan(cm: Obj) -> _Write:
            data = cm.get("data") or {}
            existed = key in data
            # The old value is noted on the ConfigMap that held it: whoever can read the
            # note could read the value there before.
            prior: dict[str, ParamValue] = {
                "key": key,
                "value": str(data.get(key, "")),
                "existed": existed,
            }
            return _Write(
                _merge_body(cm, action_id, {"data": {key: value}}, prior),
                Effect(
                    applied=True,
                    message=f"set {key} in {target.key}" + ("" if existed else " (new key)"),
                    prior_state=prior,
                ),
            )

        # (An undo restores the key the note names: only the key this action set counts.)
        return await self._mutate(target, _path(target), action_id, plan, CONFIG_PRIOR, key=key)

    async def undo(
        self, target: Target, *, action_id: str, action_type: str, prior: Mapping[str, Any]
    ) -> Effect:
        if action_type == "rollback":
            revision = int(prior["revision"])
            effect = await self.rollback(target, action_id=action_id, to_revision=revision)
            return _undo_effect(
                effect, f"undid rollback of {target.key}: back to revision {revision}"
            )
        if action_type in ("scale_up", "scale_down"):
            _need_kind(target, "scale_up")
            if prior.get("hpa"):
                name = str(prior["hpa"])
                path = _hpa_path(target.namespace, name)
                lo, hi = int(prior["hpa_min_replicas"]), int(prior["hpa_max_replicas"])
                change: Obj = {"spec": {"minReplicas": lo, "maxReplicas": hi}}
                message = f"restored HPA {name} bounds of {target.key} to {lo}..{hi}"
            else:
                path, n = _path(target), int(prior["replicas"])
                change, message = {"spec": {"replicas": n}}, f"scaled {target.key} back to {n}"
            return await self._mutate(
                target,
                path,
                action_id,
                lambda o: _Write(_merge_body(o, action_id, change), Effect(True, message)),
                NO_PRIOR,
            )
        if action_type in ("cordon_node", "drain_node"):
            _need(target, ("Node",), "undo of cordon/drain")
            was = bool(prior.get("unschedulable", False))
            message = (
                f"uncordoned {target.key}" if not was else f"{target.key} stays cordoned (it was)"
            )
            return await self._mutate(
                target,
                _path(target),
                action_id,
                lambda o: _Write(
                    _merge_body(o, action_id, {"spec": {"unschedulable": was}}),
                    Effect(True, message),
                ),
                NO_PRIOR,
            )
        if action_type == "update_config":
            _need(target, ("ConfigMap",), "undo of update_config")
            key = str(prior["key"])
            existed = bool(prior.get("existed"))
            value = str(prior.get("value", "")) if existed else None
            message = (
                f"restored {key} in {target.key}" if existed else f"removed {key} from {target.key}"
            )
            return await self._mutate(
                target,
                _path(target),
                action_id,
                lambda o: _Write(
                    _merge_body(o, action_id, {"data": {key: value}}), Effect(True, message)
                ),
                NO_PRIOR,
            )
        raise ActionFailed(f"{action_type} cannot be undone")

    # --- read-only context for analysis (agent.context.ClusterContext) ------------------
    async def events(
        self, namespace: str, names: Sequence[str], *, limit: int
    ) -> Sequence[KubeEvent]:
        """Events about ``names`` or their pods (``<name>-...``); "" means nodes."""
        if limit <= 0:
            return []
        if namespace:
            items = await self._list(f"/api/v1/namespaces/{namespace}/events", what="events")
        else:
            items = await self._list(
                "/api/v1/events",
                what="events",
                query=[("fieldSelector", "involvedObject.kind=Node")],
            )
        found = [event_of(e) for e in items if about(e, names)]
        found.sort(key=lambda e: e.at or datetime.fromtimestamp(0, UTC))
        return found[-limit:]

    async def pods(self, namespace: str, workload: str) -> Sequence[str]:
        """The pods ``workload`` controls, by their owner references: a pod's name is a
        truncated prefix (Kubernetes cuts generated names at 58 characters) and a prefix
        match also finds a longer-named workload's pods (shop-api's for shop)."""
        items = await self._list(f"/api/v1/namespaces/{namespace}/pods", what="pods")
        return sorted(
            str(p.get("metadata", {}).get("name", ""))
            for p in items
            if workload_of_pod(p) == workload
        )

    async def logs(
        self, namespace: str, pod: str, *, tail: int, since: datetime | None = None
    ) -> str:
        """The last ``tail`` lines (text, untrusted), of those written at ``since`` or later;
        needs a kubelet behind the pod."""
        if tail <= 0:
            return ""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        loop = asyncio.get_running_loop()
        query = log_query(tail, since, datetime.now(UTC))
        call = functools.partial(self._request, "GET", path, query, None, None)
        try:
            status, data, headers = await asyncio.wait_for(
                loop.run_in_executor(self._pool, call), timeout=self._timeout + 5.0
            )
        except TimeoutError as err:
            raise DependencyUnavailable(f"logs of Pod/{namespace}/{pod}: no answer") from err
        if 200 <= status < 300:
            return data.decode("utf-8", "replace")
        try:
            doc = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            doc = {"message": data[:500].decode("utf-8", "replace")}
        raise translate(
            status,
            doc if isinstance(doc, dict) else {},
            headers,
            method="GET",
            what=f"logs of Pod/{namespace}/{pod}",
        )

    async def config_changes(
        self, workloads: Sequence[Target], *, since: datetime
    ) -> Sequence[ConfigChange]:
        """ConfigMaps the workloads reference that changed since ``since`` (keys only).
        Each workload is read as its own kind: StatefulSet db never lends the references
        of an unrelated Deployment db."""
        out: list[ConfigChange] = []
        for namespace in sorted({w.namespace for w in workloads}):
            users: dict[str, list[str]] = {}
            for w in workloads:
                if w.namespace != namespace:
                    continue
                _need(w, WORKLOAD_RESOURCES, "config_changes")
                try:
                    obj = await self._get(w)
                except NotFound:
                    continue  # gone: nothing references through it
                template = (obj.get("spec") or {}).get("template") or {}
                for cm in config_maps_of(template):
                    users.setdefault(cm, []).append(w.name)
            if users:
                out += await self._changed_config_maps(namespace, users, since)
        return out

    async def _changed_config_maps(
        self, namespace: str, users: Mapping[str, Sequence[str]], since: datetime
    ) -> list[ConfigChange]:
        items = await self._list(f"/api/v1/namespaces/{namespace}/configmaps", what="configmaps")
        out = []
        for obj in items:
            meta = obj.get("metadata", {})
            name = str(meta.get("name", ""))
            changed = last_change(meta)
            if name in users and changed >= since:
                keys = sorted((obj.get("data") or {}).keys())
                out.append(
                    ConfigChange(
                        namespace=namespace,
                        name=name,
                        at=changed,
                        used_by=tuple(users[name]),
                        summary="keys: " + ", ".join(keys[:20]),
                    )
                )
        return out

    async def node_conditions(self, nodes: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for n in nodes:
            try:
                node = await self.call("GET", f"/api/v1/nodes/{n}", what=f"Node//{n}")
            except ActionFailed:
                continue
            bad = bad_conditions(node.get("status", {}).get("conditions") or [])
            if bad:
                out[n] = bad
        return out


# --- module helpers ------------------------------------------------------------------------


def translate(
    status: int, doc: Mapping[str, Any], headers: Mapping[str, str], *, method: str, what: str
) -> AgentError:
    """An API answer that is not 2xx, as the agent error it means."""
    # The API server's (or a proxy's) words: untrusted, into errors and logs.
    message = plain(str(doc.get("message") or doc.get("reason") or f"HTTP {status}"))
    if status == 403:
        return ActionFailed(f"forbidden: {message}")
    if status == 401:
        return ActionFailed(f"unauthorized ({what}): the credentials were refused: {message}")
    if status == 404:
        return NotFound(f"{what} not found")
    if status == 409:
        return Conflict(f"{what}: {message}", retry_after=0.1)
    if status in (400, 405, 415, 422):
        return ActionFailed(f"{what}: the API server rejected {method}: {message}")
    if status == 429 or status >= 500:
        retry = headers.get("Retry-After") or headers.get("retry-after") or "1"
        return TransientError(
            f"{what}: API server answered {status}: {message}",
            retry_after=float(retry) if retry.isdigit() else 1.0,
        )
    return ActionFailed(f"{what}: API server answered {status}: {message}")


def _selector_query(workload: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The labelSelector query of a workload's spec.selector.matchLabels (none: empty)."""
    selector = (workload.get("spec") or {}).get("selector") or {}
    labels = selector.get("matchLabels") or {}
    return [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if labels else []


def _path(target: Target) -> str:
    ns, name = target.namespace, target.name
    if target.kind in WORKLOAD_RESOURCES:
        return f"/apis/apps/v1/namespaces/{ns}/{WORKLOAD_RESOURCES[target.kind]}/{name}"
    if target.kind == "Pod":
        return f"/api/v1/namespaces/{ns}/pods/{name}"
    if target.kind == "ConfigMap":
        return f"/api/v1/namespaces/{ns}/configmaps/{name}"
    return f"/api/v1/nodes/{name}"


def _hpa_path(namespace: str, name: str) -> str:
    return f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}"


def _need(target: Target, kinds: Sequence[str] | Mapping[str, str], what: str) -> None:
    if target.kind not in kinds:
        raise ActionFailed(f"{what} needs a {' or '.join(kinds)}, not a {target.kind}")
    if target.kind != "Node" and not target.namespace:
        raise ActionFailed(f"{target.key}: a {target.kind} needs a namespace")


def _need_kind(target: Target, action_type: str) -> None:
    """Refuse, before reading anything, an action on a kind it does not apply to: never
    a same-named object of another kind."""
    problem = kind_problem(action_type, target.kind)
    if problem is not None:
        raise ActionFailed(f"{target.key}: {problem}")
    _need(target, WORKLOAD_RESOURCES, action_type)


def _merge_body(
    obj: Mapping[str, Any],
    action_id: str,
    change: Mapping[str, Any],
    prior: Mapping[str, ParamValue] | None = None,
) -> Obj:
    """A merge patch: ``change`` plus the action id (and the ``prior`` state it found, for
    a redelivery to report), conditional on the read's version."""
    meta = obj.get("metadata") or {}
    annotations = annotations_of(obj)
    notes = {ACTION_IDS_ANNOTATION: remember_id(annotations, action_id)}
    if prior is not None:
        notes[PRIOR_STATE_ANNOTATION] = note_prior_state(annotations, action_id, prior)
    body: Obj = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": notes}}
    return _deep_merge(body, change)


@dataclass(frozen=True, slots=True)
class _Recorder:
    """An apps/v1 object by kind and name: the one a restart_pod notes its eviction on."""

    kind: str
    namespace: str
    name: str

    @property
    def path(self) -> str:
        resource = f"{self.kind.lower()}s"
        return f"/apis/apps/v1/namespaces/{self.namespace}/{resource}/{self.name}"

    @property
    def what(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


def _recorders_named(namespace: str, pod: str) -> list[_Recorder]:
    """The owners that may have noted the eviction of a pod no longer there, as its name
    tells: a StatefulSet's pod is ``<sts>-<ordinal>``, a Deployment's
    ``<deployment>-<template hash>-<suffix>`` (a suffix may be all digits: both are read)."""
    first, _, last = pod.rpartition("-")
    deployment = first.rpartition("-")[0]
    return [
        *([_Recorder("StatefulSet", namespace, first)] if first and last.isdigit() else []),
        *([_Recorder("Deployment", namespace, deployment)] if deployment else []),
    ]


def _already(action_id: str, target: Target, prior: Mapping[str, Any] | None = None) -> Effect:
    """A repeat; ``prior``: what its earlier delivery noted it found there, for undo."""
    return Effect(
        applied=False,
        message=f"action {action_id} already applied to {target.key}",
        prior_state=dict(prior or {}),
        found_id=True,
    )


def _replaced(action_id: str, target: Target, uid: str, owner: _Recorder) -> Effect:
    """A repeat of a pod restart whose pod its StatefulSet has since replaced."""
    return Effect(
        applied=False,
        message=f"action {action_id} already evicted {target.key} (uid {uid}); "
        f"{owner.kind} {owner.name} has replaced it",
        prior_state={"uid": uid},
        found_id=True,
    )


def _undo_effect(effect: Effect, message: str) -> Effect:
    return replace(effect, message=message) if effect.applied else effect


def _cause(status_doc: Mapping[str, Any], kind: str) -> bool:
    causes = (status_doc.get("details") or {}).get("causes") or ()
    return any(c.get("type") == kind or c.get("reason") == kind for c in causes)


def _headroom(budgets: Sequence[Obj]) -> int | None:
    if not budgets:
        return None
    return min(int((b.get("status") or {}).get("disruptionsAllowed") or 0) for b in budgets)


def _name(obj: Mapping[str, Any], namespace: str) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', namespace)}/{meta.get('name')}"


class _NodePods(NamedTuple):
    """A node's pods as a drain sees them, each by "ns/name"."""

    evict: dict[str, Obj]
    skipped: list[str]  # DaemonSet and mirror pods: a drain leaves them
    unmanaged: list[str]  # without a controller: a drain refuses them
    terminating: dict[str, str]  # already going, not yet gone -> uid: a drain waits for them


_NO_PODS = _NodePods({}, [], [], {})


def _classify(pods: Sequence[Obj]) -> _NodePods:
    """Pods of a node as a drain sees them."""
    out = _NodePods({}, [], [], {})
    for pod in pods:
        meta = pod.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        owner = controller_of(pod)
        left = MIRROR_ANNOTATION in (meta.get("annotations") or {}) or (
            owner is not None and owner.get("kind") == "DaemonSet"
        )
        if meta.get("deletionTimestamp"):
            # Already going (an earlier delivery's eviction): not gone until its kubelet
            # confirms it, so the drain waits for it as for those it evicts itself.
            if not left:
                out.terminating[key] = str(meta.get("uid", ""))
        elif (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue  # finished: nothing runs there any more
        elif left:
            out.skipped.append(key)
        elif owner is None:
            out.unmanaged.append(key)
        else:
            out.evict[key] = pod
    return out


def _left(pods: _NodePods, node: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """What a drain has left to do on ``node``, each pod by "ns/name": (to evict, without a
    controller, terminating). A pod terminating on a NotReady node counts as gone, as the
    drain counts it (see KubeCluster._gone)."""
    conditions = (node.get("status") or {}).get("conditions") or []
    stranded = "NotReady" in bad_conditions(conditions)
    going = [] if stranded else sorted(pods.terminating)
    return sorted(pods.evict), sorted(pods.unmanaged), going


def _finished(cordoned: bool, pods: _NodePods, node: Mapping[str, Any]) -> bool:
    """:func:`drain_finished` as a drain reads its node."""
    evictable, unmanaged, terminating = _left(pods, node)
    return drain_finished(
        cordoned=cordoned,
        evictable=len(evictable),
        unmanaged=len(unmanaged),
        terminating=len(terminating),
    )


# --- pure helpers for the analysis context ---------------------------------------------------


def about(event: Mapping[str, Any], names: Sequence[str]) -> bool:
    obj = event.get("involvedObject") or {}
    name = str(obj.get("name", ""))
    return any(name == n or name.startswith(f"{n}-") for n in names)


def event_of(e: Mapping[str, Any]) -> KubeEvent:
    obj = e.get("involvedObject") or {}
    when = e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")
    return KubeEvent(
        namespace=str(obj.get("namespace") or ""),
        kind=str(obj.get("kind") or ""),
        name=str(obj.get("name") or ""),
        reason=str(e.get("reason") or ""),
        message=str(e.get("message") or ""),
        count=int(e.get("count") or 1),
        type=str(e.get("type") or "Normal"),
        at=_parse_time(when) if when else None,
    )


def config_maps_of(template: Mapping[str, Any]) -> set[str]:
    """ConfigMaps a pod template mounts or reads into its environment."""
    spec = template.get("spec") or {}
    names = {
        str(v["configMap"]["name"])
        for v in spec.get("volumes") or ()
        if (v.get("configMap") or {}).get("name")
    }
    for c in [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]:
        for src in c.get("envFrom") or ():
            ref = (src.get("configMapRef") or {}).get("name")
            if ref:
                names.add(str(ref))
        for env in c.get("env") or ():
            ref = ((env.get("valueFrom") or {}).get("configMapKeyRef") or {}).get("name")
            if ref:
                names.add(str(ref))
    return names


def last_change(meta: Mapping[str, Any]) -> datetime:
    """Latest write recorded in managedFields (else the creation time)."""
    times = [_parse_time(f.get("time")) for f in meta.get("managedFields") or () if f.get("time")]
    return max(times, default=_parse_time(meta.get("creationTimestamp")))


# Conditions whose "True" is bad news (node-problem-detector adds its own, e.g.
# KernelDeadlock, ReadonlyFilesystem); Ready is the one whose "True" is good.
def bad_conditions(conditions: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    bad = []
    for c in conditions:
        kind, status = str(c.get("type", "")), str(c.get("status", ""))
        if kind == "Ready":
            if status != "True":
                bad.append("NotReady")
        elif status == "True":
            bad.append(kind)
    return tuple(sorted(bad))
