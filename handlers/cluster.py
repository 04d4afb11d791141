"""The cluster boundary: what the agent reads from and does to Kubernetes.

Handlers depend on the :class:`Cluster` protocol only. Adapters translate vendor errors into
:mod:`agent.errors` (``ActionFailed`` for what retrying cannot fix: forbidden, not found,
invalid; ``TransientError`` for 429/5xx/timeouts). Every mutating call takes the action id
and records it on the object it writes in the same write that performs the change
(annotation ``ACTION_IDS_ANNOTATION``, with a ``resourceVersion`` precondition), so a
redelivered action whose id is already there is acknowledged without acting again
(``Effect.applied`` False), except a drain: its id lands with the cordon, before any
eviction, so a redelivery to a node still cordoned resumes the evictions (and the wait for
the evicted pods to be gone), and only a node with none left to evict nor terminating is a
drain already done (:func:`drain_finished`).

Each applied effect carries ``prior_state``: flat scalars (they travel as action params) from
which :meth:`Cluster.undo` restores the target. What the keys mean is the adapter's business;
the executor only hands them back. The write that acts also notes it on the object it writes
(``PRIOR_STATE_ANNOTATION``; a cordon's in ``UNSCHEDULABLE_BEFORE_ANNOTATION``), and a repeat
that finds its id reports it back: an executor that died between acting and recording its
result left nothing else of what was there before, and without it nothing could be undone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any, Literal, Protocol

import orjson

from agent.errors import ActionFailed
from agent.models import ParamValue, Target

ACTION_IDS_ANNOTATION = "sre-agent.io/action-ids"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
# "<action id>=true|false": whether the node was unschedulable before that action cordoned
# it, so a redelivered drain that resumes the evictions still knows what undo restores.
UNSCHEDULABLE_BEFORE_ANNOTATION = "sre-agent.io/unschedulable-before"
# Enough history to recognise any redelivery: actions on one target are serialized.
MAX_REMEMBERED_IDS = 20
ScaleDirection = Literal["up", "down"]
# Why an action in progress must stop now (the kill switch turned on), or None.
StopCheck = Callable[[], str | None]


def against_direction(
    target: Target, current: int, replicas: int, direction: ScaleDirection | None
) -> ActionFailed | None:
    """The refusal of a scale from ``current`` to ``replicas`` that does not move the
    count in ``direction``; None when it does (or when no direction binds it)."""
    if direction is None or (replicas > current if direction == "up" else replicas < current):
        return None
    return ActionFailed(
        f"{target.key} has {current} replicas: scaling {direction} to {replicas} would not "
        f"move it {direction}; refused"
    )


def remembered_ids(annotations: Mapping[str, str]) -> tuple[str, ...]:
    raw = annotations.get(ACTION_IDS_ANNOTATION, "")
    return tuple(i for i in raw.split(",") if i)


def remember_id(annotations: Mapping[str, str], action_id: str) -> str:
    ids = (*remembered_ids(annotations), action_id)[-MAX_REMEMBERED_IDS:]
    return ",".join(ids)


def drain_finished(*, cordoned: bool, evictable: int, unmanaged: int, terminating: int) -> bool:
    """Whether a drain whose id is on its node would do nothing more if asked again: the
    node is still cordoned with no pod left to evict, none the drain refuses (pods without
    a controller) and none still terminating (``terminating``: pods other than DaemonSet
    and mirror pods being deleted, an earlier delivery's evictions, which the drain waits
    for as the first delivery waits for its own, up to its timeout; on a NotReady node the
    adapters count them as gone, as the drain does, since no kubelet confirms their end),
    or it was uncordoned since (an undo, an operator), which a repeat leaves as it is. A
    drain cut short half way (by a dead executor, its timeout, a budget) is not finished:
    its repeat resumes the evictions and the wait, and only its repeat can."""
    return not cordoned or (evictable == 0 and unmanaged == 0 and terminating == 0)


# Pods a drain's partial state names; the count covers the rest.
MAX_NAMED_PODS = 10


def drain_left(
    *, evictable: Sequence[str], unmanaged: Sequence[str], terminating: Sequence[str]
) -> str:
    """How a drain cut half way left its node, for the person reading its result or paged
    about it, each pod by "ns/name": "node cordoned, 3 pods left (2 to evict, 1
    terminating): shop/a, shop/b, shop/c"."""
    groups = (
        (evictable, "to evict"),
        (unmanaged, "without a controller"),
        (terminating, "terminating"),
    )
    parts = ", ".join(f"{len(pods)} {what}" for pods, what in groups if pods)
    names = [p for pods, _ in groups for p in pods]
    more = len(names) - MAX_NAMED_PODS
    named = ", ".join(names[:MAX_NAMED_PODS]) + (f" and {more} more" if more > 0 else "")
    return f"node cordoned, {len(names)} pods left ({parts}): {named}"


def unschedulable_before(action_id: str, was: bool) -> str:
    return f"{action_id}={'true' if was else 'false'}"


def prior_unschedulable(annotations: Mapping[str, str], action_id: str) -> dict[str, Any]:
    """The cordon's prior state as ``action_id`` recorded it; empty when another action
    (or an older agent) wrote the node last."""
    who, _, was = annotations.get(UNSCHEDULABLE_BEFORE_ANNOTATION, "").rpartition("=")
    if who != action_id or was not in ("true", "false"):
        return {}
    return {"unschedulable": was == "true"}


# A JSON object, {"<action id>": {<prior state>}, ...}, oldest first: what each of the latest
# actions that wrote the object found there, written in the same conditional write that
# acts, so the prior state exists on the target exactly when the action took effect.
PRIOR_STATE_ANNOTATION = "sre-agent.io/prior-state"
# Bounded (an object's annotations share 256 KiB): the oldest notes go first, and a prior
# state too large alone (a big config value) is not noted; its redelivery, as before,
# records none. A few notes, not one: an approved action may write the target between a
# crashed delivery and its redelivery.
MAX_PRIOR_STATE_NOTES = 5
MAX_PRIOR_STATE_BYTES = 16384


def _prior_notes(annotations: Mapping[str, str]) -> dict[str, dict[str, ParamValue]]:
    """The notes as written by ``note_prior_state``; anything else in their place (an
    older agent, a person's edit) counts as no note, never as a prior state."""
    try:
        doc = orjson.loads(annotations.get(PRIOR_STATE_ANNOTATION, "") or "{}")
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {
        str(who): dict(prior)
        for who, prior in doc.items()
        if isinstance(prior, dict)
        and prior
        and all(isinstance(v, str | int | float | bool) for v in prior.values())
    }


def noted_prior_state(annotations: Mapping[str, str], action_id: str) -> dict[str, ParamValue]:
    """The prior state ``action_id`` noted on the object it wrote; empty when none."""
    return _prior_notes(annotations).get(action_id, {})


def note_prior_state(
    annotations: Mapping[str, str], action_id: str, prior: Mapping[str, ParamValue]
) -> str:
    """The annotation's value with ``action_id``'s ``prior`` state noted, within bounds."""
    notes = {k: v for k, v in _prior_notes(annotations).items() if k != action_id}
    mine = {action_id: dict(prior)}
    if prior and len(orjson.dumps(mine)) <= MAX_PRIOR_STATE_BYTES:
        notes.update(mine)
    entries = list(notes.items())[-MAX_PRIOR_STATE_NOTES:]
    while len(orjson.dumps(dict(entries))) > MAX_PRIOR_STATE_BYTES:
        entries = entries[1:]
    return orjson.dumps(dict(entries)).decode()


# What each write notes, key -> type. Anyone who can patch an object can write its notes,
# and an undo restores what a redelivery reports: a note of another shape under an action's
# id (an HPA named on a Deployment, a replica count of 10**9 as a string) is no prior state.
PriorShape = Mapping[str, type]
ROLLBACK_PRIOR: PriorShape = {"revision": int, "image": str}
SCALE_PRIOR: PriorShape = {"replicas": int}
HPA_SCALE_PRIOR: PriorShape = {
    "replicas": int,
    "hpa": str,
    "hpa_min_replicas": int,
    "hpa_max_replicas": int,
}
RESTART_PRIOR: PriorShape = {"generation": int}
CONFIG_PRIOR: PriorShape = {"key": str, "value": str, "existed": bool}
CORDON_PRIOR: PriorShape = {"unschedulable": bool}  # in UNSCHEDULABLE_BEFORE_ANNOTATION
NO_PRIOR: PriorShape = {}  # an undo notes none
_PRIOR_OF: Mapping[str, PriorShape] = {
    "scale_up": SCALE_PRIOR,
    "scale_down": SCALE_PRIOR,
    "rollback": ROLLBACK_PRIOR,
    "restart_workload": RESTART_PRIOR,
    "update_config": CONFIG_PRIOR,
    "cordon_node": CORDON_PRIOR,
    "drain_node": CORDON_PRIOR,
}


def prior_shape(action_type: str, *, undo: bool = False) -> PriorShape:
    """The note a write of ``action_type`` leaves on its target (an undo's notes none; a
    scale of an autoscaled workload notes HPA_SCALE_PRIOR on the HPA instead)."""
    return NO_PRIOR if undo else _PRIOR_OF.get(action_type, NO_PRIOR)


def recorded_prior(
    annotations: Mapping[str, str],
    action_id: str,
    shape: PriorShape,
    **must: ParamValue,
) -> dict[str, Any]:
    """What ``action_id`` noted it found on the object, where its write leaves it: a note of
    the ``shape`` that action's write notes, holding the ``must`` values (the HPA, the
    config key the action wrote); else empty."""
    if shape == CORDON_PRIOR:
        return prior_unschedulable(annotations, action_id)
    noted = noted_prior_state(annotations, action_id)
    fits = noted.keys() == shape.keys() and all(type(noted[k]) is t for k, t in shape.items())
    if not fits or any(noted.get(k) != v for k, v in must.items()):
        return {}
    return noted


# On a StatefulSet, or a ReplicaSet's Deployment, "<action id>=<uid>,...": the pod each
# restart_pod action evicted, noted before evicting. The StatefulSet recreates the pod under
# its name, without the id: the uid tells them apart; a redelivery that finds a pod gone
# (its id went with it) reads here that it evicted it. Not in the prior-state notes: pod
# restarts would crowd out the five an undo of the workload's own writes needs.
EVICTED_PODS_ANNOTATION = "sre-agent.io/evicted-pods"


def evicted_uid(annotations: Mapping[str, str], action_id: str) -> str:
    """The uid of the pod ``action_id`` evicted, as its owner's annotation has it."""
    for entry in annotations.get(EVICTED_PODS_ANNOTATION, "").split(","):
        who, _, uid = entry.rpartition("=")
        if who == action_id:
            return uid
    return ""


def remember_eviction(annotations: Mapping[str, str], action_id: str, uid: str) -> str:
    """The annotation with ``action_id`` evicting ``uid`` (in place of any pod it named)."""
    kept = [e for e in _evictions(annotations) if e.rpartition("=")[0] != action_id]
    return ",".join([*kept, f"{action_id}={uid}"][-MAX_REMEMBERED_IDS:])


def forget_eviction(annotations: Mapping[str, str], action_id: str, uid: str) -> str:
    """The annotation without ``action_id`` evicting ``uid``: that eviction never happened
    (refused), and left there it would pass the pod's replacement off as its work."""
    return ",".join(e for e in _evictions(annotations) if e != f"{action_id}={uid}")


def _evictions(annotations: Mapping[str, str]) -> list[str]:
    return [e for e in annotations.get(EVICTED_PODS_ANNOTATION, "").split(",") if e]


@dataclass(frozen=True, slots=True)
class Revision:
    number: int
    image: str
    # When it became current: a re-activated (renumbered) template when it was re-activated,
    # not when it was first created (the rules judge how recent a rollout is by this).
    at: datetime
    # Re-activated: its template is older than the one it replaced (a rollback, ``kubectl
    # rollout undo`` or a patch back to an old template), so rolling it back re-deploys the
    # template it moved away from (see :func:`rolled_back_from`).
    restored: bool = False


def rolled_back_from(revisions: Sequence[Revision]) -> tuple[tuple[str, datetime], ...]:
    """(image, when) of each template a re-activation moved the workload away from: the
    revision just before a restored one by number, which was current when it was re-activated.
    A revision renumbered since is no longer there to say it (the latest move is kept)."""
    ordered = sorted(revisions, key=lambda r: r.number)
    return tuple((before.image, r.at) for before, r in pairwise(ordered) if r.restored)


def rollback_choice(
    revisions: Sequence[Revision], current: int, to_revision: int | None
) -> Revision | None:
    """The revision a rollback would re-activate, as the adapters choose it: ``to_revision``,
    or the latest before ``current`` (kubectl rollout undo); None when there is none."""
    older = [r for r in revisions if r.number != current]
    if to_revision is not None:
        return next((r for r in older if r.number == to_revision), None)
    return max(older, key=lambda r: r.number, default=None)


@dataclass(frozen=True, slots=True)
class WorkloadState:
    target: Target
    replicas: int
    ready_replicas: int
    revision: int
    image: str
    revisions: tuple[Revision, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)  # the workload's own
    generation: int = 1
    # When a rolling restart was last asked for: the pod template's restartedAt annotation
    # (``kubectl rollout restart``), which is not among the workload's own annotations.
    restarted_at: datetime | None = None

    @property
    def applied_action_ids(self) -> tuple[str, ...]:
        return remembered_ids(self.annotations)

    def current(self) -> Revision:
        return next(r for r in self.revisions if r.number == self.revision)


@dataclass(frozen=True, slots=True)
class Effect:
    """What an action did. ``applied`` is False when there was nothing to do; ``found_id``
    tells the reason was the action id already on the target (an earlier delivery acted)."""

    applied: bool
    message: str
    prior_state: Mapping[str, Any] = field(default_factory=dict)
    found_id: bool = False


@dataclass(frozen=True, slots=True)
class Footprint:
    """What the blast-radius rules need to know about a target, read just before deciding."""

    replicas: int = 0  # desired replicas of the workload (of a pod's owner)
    disruption: int = 0  # ready pods a restart/rollout of the target takes down at once
    pdb_headroom: int | None = None  # disruptions the tightest covering PDB allows; None: none
    pdbs: tuple[str, ...] = ()  # "namespace/name" of the budgets covering the target's pods
    cordoned_nodes: tuple[str, ...] = ()  # unschedulable nodes other than the target
    hpa: str = ""  # the HorizontalPodAutoscaler owning the workload's replica count, if any


@dataclass(frozen=True, slots=True)
class Observation:
    """The target's state as verification sees it (the cluster's side of "healed")."""

    exists: bool = True
    desired: int = 0  # workloads: replicas wanted
    ready: int = 0  # workloads: ready replicas; pods: 1 when ready
    settled: bool = True  # the controller has observed and finished the latest change
    # workloads: container restarts, summed over its pods that are not terminating
    restarts: int = 0
    cordoned: bool = False  # nodes
    evictable: int = 0  # nodes: pods a drain would still evict
    uid: str = ""  # pods: a StatefulSet's replacement has the name, not the uid


class PartialFailure(ActionFailed):
    """An action failed after changing something (a drain stopped after the cordon).

    ``prior_state`` lets the change that did happen be undone like a successful one.
    """

    def __init__(self, message: str, *, prior_state: Mapping[str, Any]) -> None:
        self.prior_state = dict(prior_state)
        super().__init__(message)


def drain_stopped(
    target: Target, why: str, evicted: Sequence[str], left: Sequence[str], prior: Mapping[str, Any]
) -> PartialFailure:
    """The end of a drain that ``stop`` halted between evictions."""
    return PartialFailure(
        f"drain of {target.key} stopped by {why} before evicting {', '.join(sorted(left))}. "
        f"Evicted: {', '.join(sorted(evicted)) or 'none'}. The node is left cordoned.",
        prior_state=prior,
    )


UNDOABLE: frozenset[str] = frozenset(
    {"rollback", "scale_up", "scale_down", "cordon_node", "drain_node", "update_config"}
)


class Cluster(Protocol):
    async def workload(self, target: Target) -> WorkloadState: ...

    async def rollback(
        self, target: Target, *, action_id: str, to_revision: int | None = None
    ) -> Effect: ...

    async def scale(
        self,
        target: Target,
        *,
        action_id: str,
        replicas: int,
        direction: ScaleDirection | None = None,
    ) -> Effect:
        """Set the desired replicas (an HPA's bounds when one owns the count). With a
        ``direction``, refuse (ActionFailed, nothing written) unless ``replicas`` moves the
        count read in the same conditional write that way: a scale_up must never cut
        capacity. Without one (an undo), restore ``replicas`` as it is."""
        ...

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Effect: ...

    async def restart_pod(self, target: Target, *, action_id: str) -> Effect:
        """Delete one pod (through the Eviction API where the adapter can) for its owner
        to replace; a pod already gone or terminating counts as done."""
        ...

    async def cordon(self, target: Target, *, action_id: str) -> Effect: ...

    async def drain(
        self,
        target: Target,
        *,
        action_id: str,
        grace_period: float | None,
        drain_timeout: float,
        stop: StopCheck | None = None,
    ) -> Effect:
        """Cordon, then evict every pod but DaemonSet and mirror pods, honouring
        PodDisruptionBudgets; raises PartialFailure naming what blocked it. ``stop`` is
        asked before each eviction: a reason ends the drain there (PartialFailure, the
        node left cordoned)."""
        ...

    async def update_config(
        self, target: Target, *, action_id: str, key: str, value: str
    ) -> Effect: ...

    async def undo(
        self, target: Target, *, action_id: str, action_type: str, prior: Mapping[str, Any]
    ) -> Effect:
        """Restore ``prior`` (an earlier Effect's prior_state) of an ``action_type`` action."""
        ...

    async def applied(
        self,
        target: Target,
        *,
        action_id: str,
        action_type: str,
        undo: bool = False,
        must: Mapping[str, ParamValue] | None = None,
    ) -> Effect | None:
        """A read only: the Effect a repeat of ``action_id`` would report (``found_id``,
        with the prior state its write noted) when an earlier delivery's write is on the
        target and a repeat would do nothing more; else None (no id there, the target
        gone, or a drain with pods left to evict: see :func:`drain_finished`; its repeat
        resumes the evictions). The policy takes it before
        any rule, which would judge the state that very write left. A prior state counts only
        if it is of the shape that action's write notes and holds ``must`` (the config key
        an update_config writes), as the action's own repeat reads it."""
        ...

    async def partly_applied(
        self, target: Target, *, action_id: str, action_type: str
    ) -> str | None:
        """A read only: how an earlier delivery of ``action_id`` left ``target`` when it took
        effect in part, the rest still to do: a drain whose id and cordon are on its node
        with pods left to evict or still terminating (:func:`drain_left`, where
        :meth:`applied` says None); else None (its id not there, the action done, or one
        that is a single write). An approved drain whose executor died half way is resumed
        by it, not rejected as stale for the version its own cordon moved."""
        ...

    async def footprint(self, target: Target) -> Footprint: ...

    async def observe(self, target: Target) -> Observation: ...

    async def version(self, target: Target) -> str:
        """Changes whenever the target's spec does (not its status): approvals pin it."""
        ...

    async def close(self) -> None: ...
