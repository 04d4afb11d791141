"""An in-process cluster with real state, for the local lab and pure unit tests.

It follows the Kubernetes semantics the agent relies on, not a mock that accepts anything:
a Deployment's revisions are its ReplicaSets, a StatefulSet's or DaemonSet's its
ControllerRevisions, the rollout history the analysis reads of each; a rollback re-activates
an old template (as a rollout back to an old image does) and gives it the next revision
number, dated when it became current (the old number disappears, as the controllers
renumber a ReplicaSet or ControllerRevision, which the adapter dates by when its number was
set, not by its creation); a StatefulSet's or DaemonSet's
change can be left unrecorded until ``record_revision`` (the controller lags the write), and
a rollback then is a transient error, as the adapter's; scale
and restart bump ``generation``; an action id recorded on the object makes a repeat a no-op,
which reports the prior state the write noted there, as the adapter's does;
unknown objects are errors, and a workload is found only under its own kind. As the real
adapter, it refuses an action on a kind it does not apply to (agent.policy.kind_problem: a
DaemonSet has no replica count) before reading anything.
Nodes, pods, ConfigMaps and PodDisruptionBudgets are modelled as
far as the actions need: a pod restart and a drain evict (a budget with no disruptions left
refuses, as the API server's 429; each eviction of a ready pod spends one of its budget's
disruptions, given back by a ready replacement; a budget set up by ``min_available`` is
counted from the pods instead, and lets an unready pod go only while it is healthy, as the
default unhealthyPodEvictionPolicy), a drain skips DaemonSet and mirror pods and
refuses pods without a controller; an evicted pod with a finalizer stays listed, terminating,
and a drain waits for it as the adapter does (up to its timeout; on a NotReady node it counts
as gone). tests/integration/test_fake_fidelity.py runs the same sequences against this and
the real control plane and compares what the adapter answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from agent.analyzer import ConfigChange, KubeEvent
from agent.context import is_workload_pod
from agent.errors import ActionFailed, TransientError
from agent.models import WORKLOAD_KINDS, ParamValue, Target, TargetKind, utcnow
from agent.policy import kind_problem
from handlers.cluster import (
    ACTION_IDS_ANNOTATION,
    CONFIG_PRIOR,
    CORDON_PRIOR,
    EVICTED_PODS_ANNOTATION,
    NO_PRIOR,
    PRIOR_STATE_ANNOTATION,
    RESTART_PRIOR,
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
    rollback_choice,
    unschedulable_before,
)


@dataclass(frozen=True, slots=True)
class FakeNode:
    name: str
    unschedulable: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FakePod:
    namespace: str
    name: str
    node: str
    workload: str = ""  # the Deployment/StatefulSet it belongs to ("" with owner "")
    owner: str = "ReplicaSet"  # controller kind: ReplicaSet, StatefulSet, DaemonSet, "" (none)
    ready: bool = True
    mirror: bool = False
    uid: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    restarts: int = 0  # container restarts (a crash loop, an OOM kill)
    finalizers: tuple[str, ...] = ()
    # Deleted, its end not yet confirmed by its kubelet (a graceful termination under way,
    # a finalizer, a NotReady node): the API server still lists it, with a deletionTimestamp.
    terminating: bool = False
    # Terminating by an eviction (its DisruptionTarget condition), not a plain delete.
    evicted: bool = False


@dataclass(frozen=True, slots=True)
class FakeConfigMap:
    namespace: str
    name: str
    data: Mapping[str, str]
    version: int = 1
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FakeBudget:
    namespace: str
    name: str
    workload: str
    disruptions_allowed: int
    # The headroom with every pod healthy (as set up): an eviction of a ready pod takes one
    # (the API server decrements status.disruptionsAllowed with it), a ready replacement
    # gives it back (the disruption controller recounts), never above this.
    full: int = 0
    # spec.minAvailable, when given: the budget's status is counted from the workload's
    # pods as the disruption controller counts it (currentHealthy: ready and not
    # terminating; disruptionsAllowed: those above it), and an unready pod may be evicted
    # only while the budget is healthy (the default unhealthyPodEvictionPolicy,
    # IfHealthyBudget). Without it, disruptions_allowed as set up, spent as above, and the
    # budget taken as healthy.
    min_available: int | None = None


class FakeCluster:
    def __init__(self, *, clock: Callable[[], datetime] = utcnow) -> None:
        # The API server's clock: it dates what the cluster does by itself (a revision a
        # rollback re-activates); set-up methods take their time as ``at``.
        self._clock = clock
        self._workloads: dict[str, WorkloadState] = {}
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set on every write; the lab's service watches it
        # Read-only context (agent.context.ClusterContext): events, logs, config changes.
        self._events: list[KubeEvent] = []
        self._logs: dict[tuple[str, str], str] = {}
        self._log_times: dict[tuple[str, str], tuple[datetime, ...]] = {}
        self._config_changes: list[ConfigChange] = []
        self._node_conditions: dict[str, tuple[str, ...]] = {}
        self._nodes: dict[str, FakeNode] = {}
        self._pods: dict[tuple[str, str], FakePod] = {}
        self._config_maps: dict[tuple[str, str], FakeConfigMap] = {}
        self._budgets: dict[tuple[str, str], FakeBudget] = {}
        # StatefulSets and DaemonSets, by key, whose running template has no
        # ControllerRevision yet; each one's creation time dates it meanwhile, as the adapter.
        self._unrecorded: set[str] = set()
        self._created: dict[str, datetime] = {}
        self._uids = 0

    # --- set-up used by the lab and tests -------------------------------------------------
    def create_deployment(
        self, namespace: str, name: str, *, image: str, replicas: int, at: datetime
    ) -> WorkloadState:
        return self.create_workload(
            "Deployment", namespace, name, image=image, replicas=replicas, at=at
        )

    def create_workload(
        self,
        kind: TargetKind,
        namespace: str,
        name: str,
        *,
        image: str,
        replicas: int,
        at: datetime,
    ) -> WorkloadState:
        """A Deployment, StatefulSet or DaemonSet (``replicas``: its pods, one a node)."""
        if kind not in WORKLOAD_KINDS:
            raise ActionFailed(f"{kind} is not a workload")
        target = Target(kind=kind, namespace=namespace, name=name)
        if target.key in self._workloads:
            raise ActionFailed(f"{target.key} already exists")
        state = WorkloadState(
            target=target,
            replicas=replicas,
            ready_replicas=replicas,
            revision=1,
            image=image,
            revisions=(Revision(number=1, image=image, at=at),),
        )
        self._workloads[target.key] = state
        self._created[target.key] = at
        return state

    def rollout(
        self,
        namespace: str,
        name: str,
        *,
        image: str,
        at: datetime,
        kind: TargetKind = "Deployment",
        recorded: bool = True,
    ) -> WorkloadState:
        """A new image: a new ReplicaSet (a StatefulSet's or DaemonSet's ControllerRevision)
        with the next revision number (kubectl set image). ``recorded=False``: a StatefulSet's
        or DaemonSet's controller has not recorded it yet (see ``record_revision``)."""
        target = Target(kind=kind, namespace=namespace, name=name)
        state = self._get(target)
        if not recorded and kind == "Deployment":
            raise ActionFailed("the fake leaves only a ControllerRevision unrecorded")
        # A change over an unrecorded one replaces it: the controller never recorded it.
        known = tuple(
            r
            for r in state.revisions
            if not (target.key in self._unrecorded and r.number == state.revision)
        )
        number = max(r.number for r in known) + 1
        restored = False
        if recorded:
            # Back to an old template: the controller renumbers that revision, now current.
            restored = any(r.image == image and r.number != state.revision for r in known)
            known = tuple(r for r in known if r.image != image)
            self._unrecorded.discard(target.key)
        else:
            self._unrecorded.add(target.key)
            at = self._created[target.key]  # dated as the adapter dates an unrecorded one
        new = replace(
            state,
            image=image,
            revision=number,
            revisions=(*known, Revision(number=number, image=image, at=at, restored=restored)),
            generation=state.generation + 1,
        )
        return self._put(new)

    def record_revision(self, target: Target, *, at: datetime) -> WorkloadState:
        """The StatefulSet or DaemonSet controller records the running template as a
        ControllerRevision, at ``at``."""
        state = self._get(target)
        if target.key not in self._unrecorded:
            return state
        self._unrecorded.discard(target.key)
        revisions = tuple(
            replace(r, at=at) if r.number == state.revision else r for r in state.revisions
        )
        return self._put(replace(state, revisions=revisions))

    def add_node(self, name: str) -> FakeNode:
        node = self._nodes[name] = FakeNode(name=name)
        return node

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str,
        workload: str = "",
        owner: str = "ReplicaSet",
        ready: bool = True,
        mirror: bool = False,
    ) -> FakePod:
        if node not in self._nodes:
            raise ActionFailed(f"Node//{node} not found")
        sts = Target(kind="StatefulSet", namespace=namespace, name=workload)
        if owner == "StatefulSet" and workload and sts.key not in self._workloads:
            # A StatefulSet's pod has its StatefulSet (it notes the pod's evictions).
            self.create_workload(
                "StatefulSet", namespace, workload, image="", replicas=1, at=self._clock()
            )
        self._uids += 1
        pod = FakePod(
            namespace, name, node, workload, owner, ready, mirror, uid=f"uid-{self._uids}"
        )
        self._pods[(namespace, name)] = pod
        return pod

    def add_finalizer(self, namespace: str, pod: str, finalizer: str) -> FakePod:
        """A finalizer on the pod: evicted (restart_pod, a drain), it stays terminating,
        listed with its deletionTimestamp, until the last one is removed."""
        p = self._pods[(namespace, pod)]
        held = replace(p, finalizers=(*p.finalizers, finalizer))
        self._pods[(namespace, pod)] = held
        return held

    def remove_finalizer(self, namespace: str, pod: str, finalizer: str) -> None:
        """The finalizer done: a terminating pod without any left is gone."""
        p = self._pods[(namespace, pod)]
        p = replace(p, finalizers=tuple(f for f in p.finalizers if f != finalizer))
        if p.terminating and not p.finalizers:
            del self._pods[(namespace, pod)]
            self.changed.set()
        else:
            self._pods[(namespace, pod)] = p

    def terminate(self, namespace: str, pod: str, *, evicted: bool = False) -> None:
        """The pod is deleted (by anyone; ``evicted``: through the Eviction API, which marks
        it DisruptionTarget) and its end not yet confirmed: it stays listed, terminating,
        until :meth:`remove_pod`."""
        p = self._pods[(namespace, pod)]
        self._pods[(namespace, pod)] = replace(p, terminating=True, evicted=evicted)

    def remove_pod(self, namespace: str, pod: str) -> None:
        """The pod's end is confirmed (its kubelet, or the node object's deletion): gone."""
        del self._pods[(namespace, pod)]

    def crash(self, namespace: str, pod: str, times: int = 1) -> None:
        """The pod's container crashes and the kubelet restarts it ``times`` times."""
        p = self._pods[(namespace, pod)]
        self._pods[(namespace, pod)] = replace(p, restarts=p.restarts + times)

    def _replace_pods(self, namespace: str, workload: str) -> None:
        """A rollout's new pods: new uids, no restarts (names kept for the lab's metrics)."""
        for p in self.pods_of(namespace, workload):
            self._uids += 1
            self._pods[(namespace, p.name)] = replace(p, uid=f"uid-{self._uids}", restarts=0)

    def pods_of(self, namespace: str, workload: str) -> list[FakePod]:
        """The workload's pods, by name."""
        return sorted(
            (p for p in self._pods.values() if (p.namespace, p.workload) == (namespace, workload)),
            key=lambda p: p.name,
        )

    def reconcile(self, namespace: str, name: str) -> list[FakePod]:
        """What the ReplicaSet controller and the scheduler do for a Deployment: create the
        pods it lacks (evicted by a drain, added by a scale up) on the schedulable node
        without bad conditions that runs the fewest pods, and remove the newest-named extras
        (a scale down). With no such node a pod stays missing (Pending). A pod on a broken
        node stays: Kubernetes evicts those only after the not-ready toleration (5 min),
        which is what a drain cuts short. Pods are named by the lowest free index, as the
        replica numbers the lab's metrics use. Returns the workload's pods."""
        want = self._get(Target(kind="Deployment", namespace=namespace, name=name)).replicas
        # A terminating pod (evicted, its finalizer pending) is no replica any more: the
        # ReplicaSet controller replaces it at once; its name stays taken while it is listed.
        used = {p.name for p in self.pods_of(namespace, name)}
        pods = [p for p in self.pods_of(namespace, name) if not p.terminating]
        # Newest first: by index, not by text ("-10" sorts before "-2").
        for extra in sorted(pods, key=lambda p: (len(p.name), p.name))[want:]:
            del self._pods[(namespace, extra.name)]
        load = {  # pods per node that can take one
            n: sum(p.node == n for p in self._pods.values())
            for n, node in sorted(self._nodes.items())
            if not node.unschedulable and not self.bad_conditions(n)
        }
        for _ in range(want - len(pods) if load else 0):
            node = min(load, key=load.__getitem__)
            load[node] += 1
            index = next(i for i in range(want + len(used)) if f"{name}-{i}" not in used)
            used.add(f"{name}-{index}")
            new = self.add_pod(namespace, f"{name}-{index}", node=node, workload=name)
            # A ready replacement: the disruption controller gives its budgets one back.
            for b in self._covering(new):
                if b.min_available is not None:
                    continue  # counted from the pods
                back = min(b.full, b.disruptions_allowed + 1)
                self._budgets[(b.namespace, b.name)] = replace(b, disruptions_allowed=back)
        return self.pods_of(namespace, name)

    def add_budget(
        self,
        namespace: str,
        name: str,
        *,
        workload: str,
        disruptions_allowed: int = 0,
        min_available: int | None = None,
    ) -> FakeBudget:
        """A PodDisruptionBudget over the workload's pods: its headroom as set up
        (``disruptions_allowed``), or counted from the pods (``min_available``)."""
        budget = FakeBudget(
            namespace, name, workload, disruptions_allowed, disruptions_allowed, min_available
        )
        self._budgets[(namespace, name)] = budget
        return budget

    def set_ready(self, namespace: str, pod: str, ready: bool) -> None:
        """The pod's Ready condition (its readiness probe failing, or passing again)."""
        p = self._pods[(namespace, pod)]
        self._pods[(namespace, pod)] = replace(p, ready=ready)

    def create_config_map(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        self._config_maps[(namespace, name)] = FakeConfigMap(namespace, name, dict(data))

    def annotate(self, target: Target, key: str, value: str) -> None:
        """kubectl annotate --overwrite: what anyone with patch rights on it may write."""
        if target.kind == "ConfigMap":
            cm = self._config_map(target)
            annotations = {**cm.annotations, key: value}
            self._config_maps[(cm.namespace, cm.name)] = replace(cm, annotations=annotations)
        else:
            state = self._get(target)
            self._put(replace(state, annotations={**state.annotations, key: value}))

    def node(self, name: str) -> FakeNode:
        return self._node(Target(kind="Node", name=name))

    def pod(self, namespace: str, name: str) -> FakePod | None:
        return self._pods.get((namespace, name))

    def config_map(self, namespace: str, name: str) -> FakeConfigMap:
        return self._config_map(Target(kind="ConfigMap", namespace=namespace, name=name))

    # --- the Cluster protocol ----------------------------------------------------------------
    async def workload(self, target: Target) -> WorkloadState:
        return self._get(target)

    async def rollback(
        self, target: Target, *, action_id: str, to_revision: int | None = None
    ) -> Effect:
        _need_kind(target, "rollback")
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return _already(action_id, state.annotations, ROLLBACK_PRIOR)
            if target.key in self._unrecorded:
                raise TransientError(
                    f"{target.key}: the controller has not recorded the running template "
                    f"({state.image}) as a ControllerRevision yet"
                )
            # The same choice the executor predicts for rule 7c.
            chosen = rollback_choice(state.revisions, state.revision, to_revision)
            if chosen is None:
                raise ActionFailed(
                    f"{target.key}: revision {to_revision} not found"
                    if to_revision is not None
                    else f"{target.key}: no previous revision to roll back to"
                )
            number = max(r.number for r in state.revisions) + 1
            revisions = tuple(r for r in state.revisions if r.number != chosen.number)
            prior: dict[str, ParamValue] = {"revision": state.revision, "image": state.image}
            new = replace(
                state,
                image=chosen.image,
                revision=number,
                # Current from now on, though its template is older (revision_times).
                revisions=(
                    *revisions,
                    replace(chosen, number=number, at=self._clock(), restored=True),
                ),
                generation=state.generation + 1,
                annotations=self._with_id(state, action_id, prior),
            )
            self._put(new)
            self._replace_pods(target.namespace, target.name)
            return Effect(
                applied=True,
                message=f"rolled back {target.key} from revision {state.revision} "
                f"({state.image}) to {chosen.number} ({chosen.image}), now revision {number}",
                prior_state=prior,
            )

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
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return _already(action_id, state.annotations, SCALE_PRIOR)
            refused = against_direction(target, state.replicas, replicas, direction)
            if refused is not None:
                raise refused
            prior: dict[str, ParamValue] = {"replicas": state.replicas}
            new = replace(
                state,
                replicas=replicas,
                ready_replicas=replicas,
                generation=state.generation + 1,
                annotations=self._with_id(state, action_id, prior),
            )
            self._put(new)
            return Effect(
                applied=True,
                message=f"scaled {target.key} from {state.replicas} to {replicas}",
                prior_state=prior,
            )

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Effect:
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return _already(action_id, state.annotations, RESTART_PRIOR)
            prior: dict[str, ParamValue] = {"generation": state.generation}
            new = replace(
                state,
                generation=state.generation + 1,
                annotations=self._with_id(state, action_id, prior),
                restarted_at=at,
            )
            self._put(new)
            self._replace_pods(target.namespace, target.name)
            return Effect(
                applied=True,
                message=f"restarted {target.key} (rolling)",
                prior_state=prior,
            )

    async def restart_pod(self, target: Target, *, action_id: str) -> Effect:
        async with self._lock:
            found = self._pod_restarted(target, action_id)
            if found is not None:
                return found
            pod = self._pods.get((target.namespace, target.name))
            if pod is None:
                return Effect(applied=False, message=f"{target.key} is already gone")
            if pod.terminating:  # someone else's deletion (this action's: found above)
                w = self._recorder(pod.owner, pod.namespace, pod.workload)
                if w is not None and evicted_uid(w.annotations, action_id) == pod.uid:
                    # Noted by a delivery that died before evicting: taken back, as the
                    # adapter, or the pod gone would pass for this action's eviction.
                    kept = forget_eviction(w.annotations, action_id, pod.uid)
                    self._put(
                        replace(w, annotations={**w.annotations, EVICTED_PODS_ANNOTATION: kept})
                    )
                return Effect(applied=False, message=f"{target.key} is already terminating")
            why = self._eviction_block(pod)
            if why:
                raise ActionFailed(f"restart of {target.key} refused: {why}")
            self._note_eviction(pod, action_id)
            self._evict(pod)
            self.changed.set()
            return Effect(
                applied=True,
                message=f"evicted {target.key} for its controller to replace",
                prior_state={"uid": pod.uid, "node": pod.node},
            )

    async def cordon(self, target: Target, *, action_id: str) -> Effect:
        async with self._lock:
            return self._cordon(target, action_id, unschedulable=True)

    async def drain(
        self,
        target: Target,
        *,
        action_id: str,
        grace_period: float | None,
        drain_timeout: float,
        stop: StopCheck | None = None,
    ) -> Effect:
        async with self._lock:
            cordoned = self._cordon(target, action_id, unschedulable=True)
            # As the adapter: the id on a node still cordoned resumes the evictions.
            resumed = not cordoned.applied
            node = self._node(target)
            if resumed:
                prior: Mapping[str, Any] = prior_unschedulable(node.annotations, action_id)
            else:
                prior = cordoned.prior_state
            unmanaged, skipped, evict, terminating = self._drain_plan(target)
            down = "NotReady" in self.bad_conditions(target.name)
            if resumed and drain_finished(
                cordoned=node.unschedulable,
                evictable=len(evict),
                unmanaged=len(unmanaged),
                terminating=0 if down else len(terminating),
            ):
                return cordoned
            if unmanaged:
                raise PartialFailure(
                    f"drain of {target.key} refused: pods without a controller would not be "
                    f"recreated: {', '.join(unmanaged)}; the node is left cordoned",
                    prior_state=prior,
                )
            # One by one, as the adapter: each eviction of a ready pod takes a disruption
            # from its budgets, so a later pod of the same workload may find none left.
            # Nothing in the fake gives one back while the drain holds the lock (no
            # replacement becomes ready): the adapter's retries up to its timeout end so.
            blocked: dict[str, str] = {}
            evicted: list[str] = []
            held: list[str] = []  # evicted, kept terminating by a finalizer
            for p in evict:
                why = stop() if stop is not None else None
                if why:
                    self.changed.set()
                    keys = (f"{q.namespace}/{q.name}" for q in evict)
                    left = [k for k in keys if k not in evicted]
                    raise drain_stopped(target, why, evicted, left, prior)
                key = f"{p.namespace}/{p.name}"
                refused = self._eviction_block(p)
                if refused:
                    blocked[key] = refused
                    continue
                if self._evict(p):
                    held.append(key)
                evicted.append(key)
            self.changed.set()
            done = ", ".join(sorted(evicted)) or "none"
            if blocked:
                raise PartialFailure(
                    f"drain of {target.key} stopped after {drain_timeout:.0f}s: "
                    + "; ".join(f"pod {k} {v}" for k, v in sorted(blocked.items()))
                    + f". Evicted: {done}. The node is left cordoned.",
                    prior_state=prior,
                )
            # A pod evicted with a finalizer, or terminating already (an earlier delivery's
            # eviction), ends only by the test's hand, which cannot come while the drain
            # holds the lock: the adapter's wait up to the timeout, ending this way.
            names = ", ".join(sorted(terminating))
            if (terminating or held) and not down:
                before = f"; terminating since before it: {names}" if terminating else ""
                raise PartialFailure(
                    f"drain of {target.key}: evicted pods still terminating after "
                    f"{drain_timeout:.0f}s ({done}{before}); the node is left cordoned",
                    prior_state=prior,
                )
            skip = f"; skipped {len(skipped)} DaemonSet/mirror pods" if skipped else ""
            still = sorted([*terminating, *held])
            stranded = (
                f"; {len(still)} still terminating on the NotReady node, whose kubelet "
                f"cannot confirm it ({', '.join(still)})"
                if still
                else ""
            )
            waited = f"; waited for {len(terminating)} terminating ({names})" if terminating else ""
            how = "already cordoned by this action, resumed" if resumed else "cordoned"
            return Effect(
                applied=True,
                message=f"drained {target.key}: {how}, evicted {len(evicted)} pods "
                f"({done}){waited}{skip}{stranded}",
                prior_state=prior,
            )

    async def update_config(
        self, target: Target, *, action_id: str, key: str, value: str
    ) -> Effect:
        async with self._lock:
            cm = self._config_map(target)
            if action_id in remembered_ids(cm.annotations):
                return _already(action_id, cm.annotations, CONFIG_PRIOR, key=key)
            if not key:
                raise ActionFailed(f"update_config of {target.key} needs a key")
            existed = key in cm.data
            prior: dict[str, ParamValue] = {
                "key": key,
                "value": cm.data.get(key, ""),
                "existed": existed,
            }
            self._set_config(cm, action_id, key, value, prior)
            return Effect(
                applied=True,
                message=f"set {key} in {target.key}" + ("" if existed else " (new key)"),
                prior_state=prior,
            )

    async def undo(
        self, target: Target, *, action_id: str, action_type: str, prior: Mapping[str, Any]
    ) -> Effect:
        if action_type == "rollback":
            revision = int(prior["revision"])
            effect = await self.rollback(target, action_id=action_id, to_revision=revision)
            if effect.applied:
                effect = Effect(
                    True, f"undid rollback of {target.key}: back to revision {revision}"
                )
            return effect
        if action_type in ("scale_up", "scale_down"):
            effect = await self.scale(target, action_id=action_id, replicas=int(prior["replicas"]))
            if effect.applied:
                effect = Effect(True, f"scaled {target.key} back to {prior['replicas']}")
            return effect
        async with self._lock:
            if action_type in ("cordon_node", "drain_node"):
                return self._cordon(
                    target, action_id, unschedulable=bool(prior.get("unschedulable", False))
                )
            if action_type == "update_config":
                cm = self._config_map(target)
                if action_id in remembered_ids(cm.annotations):
                    return _already(action_id, cm.annotations, NO_PRIOR)
                key = str(prior["key"])
                existed = bool(prior.get("existed"))
                self._set_config(
                    cm, action_id, key, str(prior.get("value", "")) if existed else None
                )
                verb = "restored" if existed else "removed"
                return Effect(applied=True, message=f"{verb} {key} in {target.key}")
        raise ActionFailed(f"{action_type} cannot be undone")

    async def applied(
        self,
        target: Target,
        *,
        action_id: str,
        action_type: str,
        undo: bool = False,
        must: Mapping[str, ParamValue] | None = None,
    ) -> Effect | None:
        async with self._lock:
            if target.kind == "Pod":
                return self._pod_restarted(target, action_id)
            if target.kind == "Node":
                node = self._nodes.get(target.name)
                annotations = node.annotations if node is not None else {}
            elif target.kind == "ConfigMap":
                cm = self._config_maps.get((target.namespace, target.name))
                annotations = cm.annotations if cm is not None else {}
            else:
                w = self._workloads.get(target.key)
                annotations = w.annotations if w is not None else {}
            if action_id not in remembered_ids(annotations):
                return None
            if action_type == "drain_node" and not undo:
                # Its id lands with the cordon: done only once no pod is left to evict.
                unmanaged, _skipped, evict, terminating = self._drain_plan(target)
                cordoned = self._node(target).unschedulable
                down = "NotReady" in self.bad_conditions(target.name)
                if not drain_finished(
                    cordoned=cordoned,
                    evictable=len(evict),
                    unmanaged=len(unmanaged),
                    terminating=0 if down else len(terminating),
                ):
                    return None
            return _already(
                action_id, annotations, prior_shape(action_type, undo=undo), **(must or {})
            )

    async def partly_applied(
        self, target: Target, *, action_id: str, action_type: str
    ) -> str | None:
        async with self._lock:
            node = self._nodes.get(target.name) if target.kind == "Node" else None
            if action_type != "drain_node" or node is None or not node.unschedulable:
                return None
            if action_id not in remembered_ids(node.annotations):
                return None
            unmanaged, _skipped, evict, going = self._drain_plan(target)
            terminating = [] if "NotReady" in self.bad_conditions(target.name) else going
            evictable = sorted(f"{p.namespace}/{p.name}" for p in evict)
            left = {"evictable": evictable, "unmanaged": unmanaged, "terminating": terminating}
            if drain_finished(cordoned=True, **{k: len(v) for k, v in left.items()}):
                return None
            return drain_left(**left)

    def _drain_plan(
        self, target: Target
    ) -> tuple[list[str], list[FakePod], list[FakePod], list[str]]:
        """The pods on the node as a drain sees them: (without a controller, by key;
        skipped DaemonSet and mirror pods; the rest, to evict; terminating ones other than
        DaemonSet and mirror pods, by key: the drain waits for them)."""
        on_node = [p for p in self._pods.values() if p.node == target.name]
        left = [p for p in on_node if p.mirror or p.owner == "DaemonSet"]
        going = sorted(
            f"{p.namespace}/{p.name}" for p in on_node if p.terminating and p not in left
        )
        on_node = [p for p in on_node if not p.terminating]
        unmanaged = sorted(f"{p.namespace}/{p.name}" for p in on_node if not p.owner)
        skipped = [p for p in on_node if p in left]
        return unmanaged, skipped, [p for p in on_node if p not in skipped], going

    def _pod_restarted(self, target: Target, action_id: str) -> Effect | None:
        """As the adapter: a restart_pod repeat finds the pod gone, still terminating, or
        replaced, after this action evicted it (its StatefulSet or Deployment remembers which
        pod it evicted). A live pod whose uid the note names was not evicted (its delivery
        died first): None."""
        pod = self._pods.get((target.namespace, target.name))
        if pod is None:
            # As the adapter reads the owner off the name (the fake names a pod
            # <workload>-<suffix>, a Deployment's as a StatefulSet's).
            named = target.name.rpartition("-")[0]
            owners = (self._eviction_notes(k, target.namespace, named) for k in _RECORDERS)
            gone = next((uid for uid in (evicted_uid(n, action_id) for n in owners) if uid), "")
            if not gone:
                return None
            return Effect(
                applied=False,
                message=f"action {action_id} already evicted {target.key} (uid {gone})",
                prior_state={"uid": gone},
                found_id=True,
            )
        # A StatefulSet's replacement, under the evicted pod's name and without the id, is
        # told apart by the uid the StatefulSet remembers.
        notes = self._eviction_notes(pod.owner, pod.namespace, pod.workload)
        gone = evicted_uid(notes, action_id)
        # Only this action's eviction, not a plain delete after its note (see the adapter).
        if gone and gone == pod.uid and pod.terminating and pod.evicted:
            return Effect(
                applied=False,
                message=f"action {action_id} already evicted {target.key} (uid {gone}); "
                "it is terminating",
                prior_state={"uid": gone},
                found_id=True,
            )
        if not gone or gone == pod.uid:
            return None
        kind = _OWNER_KINDS.get(pod.owner, pod.owner)
        return Effect(
            applied=False,
            message=f"action {action_id} already evicted {target.key} (uid {gone}); "
            f"{kind} {pod.workload} has replaced it",
            prior_state={"uid": gone},
            found_id=True,
        )

    async def footprint(self, target: Target) -> Footprint:
        if target.kind in WORKLOAD_KINDS:
            w = self._get(target)
            # The default RollingUpdate strategy: maxUnavailable 25%, rounded down.
            return Footprint(
                replicas=w.replicas,
                disruption=min(w.replicas // 4, w.ready_replicas),
                **self._budget_of(target.namespace, target.name),
            )
        if target.kind == "Pod":
            pod = self._pods.get((target.namespace, target.name))
            if pod is None:
                return Footprint()  # already gone: restarting it disrupts nothing
            kind = _OWNER_KINDS.get(pod.owner, "Deployment")
            owner = Target(kind=kind, namespace=pod.namespace, name=pod.workload)
            replicas = self._workloads[owner.key].replicas if owner.key in self._workloads else 1
            return Footprint(
                replicas=replicas,
                disruption=int(pod.ready and not pod.terminating),
                **self._budget_of(pod.namespace, pod.workload),
            )
        if target.kind == "Node":
            self._node(target)
            others = sorted(n.name for n in self._nodes.values() if n.unschedulable)
            return Footprint(cordoned_nodes=tuple(n for n in others if n != target.name))
        self._config_map(target)
        return Footprint()

    async def observe(self, target: Target) -> Observation:
        if target.kind in WORKLOAD_KINDS:
            if target.key not in self._workloads:
                return Observation(exists=False)
            w = self._workloads[target.key]
            restarts = sum(p.restarts for p in self.pods_of(target.namespace, target.name))
            return Observation(desired=w.replicas, ready=w.ready_replicas, restarts=restarts)
        if target.kind == "Pod":
            pod = self._pods.get((target.namespace, target.name))
            if pod is None:
                return Observation(exists=False)
            return Observation(
                desired=1, ready=int(pod.ready), settled=not pod.terminating, uid=pod.uid
            )
        if target.kind == "Node":
            node = self._nodes.get(target.name)
            if node is None:
                return Observation(exists=False)
            pods = [p for p in self._pods.values() if p.node == target.name]
            left = [p for p in pods if not (p.mirror or p.owner == "DaemonSet" or p.terminating)]
            return Observation(cordoned=node.unschedulable, evictable=len(left))
        return Observation(exists=(target.namespace, target.name) in self._config_maps)

    async def version(self, target: Target) -> str:
        if target.kind in WORKLOAD_KINDS:
            return f"generation={self._get(target).generation}"
        if target.kind == "Pod":
            pod = self._pods.get((target.namespace, target.name))
            if pod is None:
                raise ActionFailed(f"{target.key} not found")
            return f"uid={pod.uid}"
        if target.kind == "Node":
            return f"unschedulable={self._node(target).unschedulable}"
        return f"resourceVersion={self._config_map(target).version}"

    async def close(self) -> None:
        return None

    # --- context: the agent.context.ClusterContext protocol ------------------------------------
    def add_event(self, event: KubeEvent) -> None:
        self._events.append(event)

    def set_logs(self, namespace: str, pod: str, text: str, *, at: Sequence[datetime] = ()) -> None:
        """The pod's log; ``at``: when each of its lines was written, oldest first. A line
        without a time (none given) counts as written now: every window keeps it."""
        self._logs[(namespace, pod)] = text
        self._log_times[(namespace, pod)] = tuple(at)

    def add_config_change(self, change: ConfigChange) -> None:
        self._config_changes.append(change)

    def set_node_conditions(self, node: str, conditions: Sequence[str]) -> None:
        self._node_conditions[node] = tuple(conditions)

    def bad_conditions(self, node: str) -> tuple[str, ...]:
        """The node's bad conditions (e.g. NotReady), as :meth:`node_conditions` reads them."""
        return self._node_conditions.get(node, ())

    async def events(
        self, namespace: str, names: Sequence[str], *, limit: int
    ) -> Sequence[KubeEvent]:
        def about(e: KubeEvent) -> bool:
            return any(e.name == n or e.name.startswith(f"{n}-") for n in names)

        if namespace:
            found = [e for e in self._events if e.namespace == namespace and about(e)]
        else:  # cluster-scoped objects
            found = [e for e in self._events if e.kind == "Node" and about(e)]
        return found[-limit:] if limit else []

    async def pods(self, namespace: str, workload: str) -> Sequence[str]:
        """The pods ``workload`` controls, as handlers.kube finds them by owner reference:
        a placed pod by the workload it was placed for, whatever its name (Kubernetes
        truncates long generated names). A pod only given logs has no owner here; it
        stands for one whose name has the shape of ``workload``'s pods (never a mere
        prefix: shop-api's pods are not shop's)."""
        own = {
            p.name
            for p in self._pods.values()
            if p.namespace == namespace and p.owner and p.workload == workload
        }
        logs_only = {p for ns, p in self._logs if ns == namespace and (ns, p) not in self._pods}
        return sorted(own | {p for p in logs_only if is_workload_pod(workload, p)})

    async def logs(
        self, namespace: str, pod: str, *, tail: int, since: datetime | None = None
    ) -> str:
        text = self._logs.get((namespace, pod))
        if text is None:
            raise ActionFailed(f"Pod/{namespace}/{pod} not found")
        lines = text.splitlines()
        if since is not None:  # as the kubelet: the window first, then the tail of it
            times = self._log_times.get((namespace, pod), ())
            lines = [x for i, x in enumerate(lines) if i >= len(times) or times[i] >= since]
        return "\n".join(lines[-tail:]) if tail else ""

    async def config_changes(
        self, workloads: Sequence[Target], *, since: datetime
    ) -> Sequence[ConfigChange]:
        """The changes added, of the workloads' namespaces, that name one of them as a user
        (or no user); as the adapter, a workload that does not exist references nothing."""
        present = [w for w in workloads if w.key in self._workloads]
        return [
            c
            for c in self._config_changes
            if c.at >= since
            and any(w.namespace == c.namespace for w in workloads)
            and (
                not c.used_by
                or any(w.namespace == c.namespace and w.name in c.used_by for w in present)
            )
        ]

    async def node_conditions(self, nodes: Sequence[str]) -> Mapping[str, tuple[str, ...]]:
        return {n: self._node_conditions[n] for n in nodes if self._node_conditions.get(n)}

    # --- internals ----------------------------------------------------------------------------
    def _get(self, target: Target) -> WorkloadState:
        state = self._workloads.get(target.key)
        if state is None:
            raise ActionFailed(f"{target.key} not found")
        return state

    def _put(self, state: WorkloadState) -> WorkloadState:
        self._workloads[state.target.key] = state
        self.changed.set()
        return state

    def _node(self, target: Target) -> FakeNode:
        node = self._nodes.get(target.name) if target.kind == "Node" else None
        if node is None:
            raise ActionFailed(f"{target.key} not found")
        return node

    def _config_map(self, target: Target) -> FakeConfigMap:
        cm = self._config_maps.get((target.namespace, target.name))
        if cm is None or target.kind != "ConfigMap":
            raise ActionFailed(f"{target.key} not found")
        return cm

    def _cordon(self, target: Target, action_id: str, *, unschedulable: bool) -> Effect:
        node = self._node(target)
        if action_id in remembered_ids(node.annotations):
            return _already(action_id, node.annotations, CORDON_PRIOR)
        annotations = {
            **node.annotations,
            ACTION_IDS_ANNOTATION: remember_id(node.annotations, action_id),
        }
        if unschedulable:  # as the adapter's cordon (an undo does not write it)
            before = unschedulable_before(action_id, node.unschedulable)
            annotations[UNSCHEDULABLE_BEFORE_ANNOTATION] = before
        self._nodes[node.name] = replace(node, unschedulable=unschedulable, annotations=annotations)
        self.changed.set()
        verb = "cordoned" if unschedulable else "uncordoned"
        return Effect(
            applied=True,
            message=f"{verb} {target.key}",
            prior_state={"unschedulable": node.unschedulable},
        )

    def _set_config(
        self,
        cm: FakeConfigMap,
        action_id: str,
        key: str,
        value: str | None,
        prior: Mapping[str, ParamValue] | None = None,
    ) -> None:
        data = {k: v for k, v in cm.data.items() if k != key}
        if value is not None:
            data[key] = value
        annotations = {
            **cm.annotations,
            ACTION_IDS_ANNOTATION: remember_id(cm.annotations, action_id),
        }
        if prior is not None:
            annotations[PRIOR_STATE_ANNOTATION] = note_prior_state(cm.annotations, action_id, prior)
        self._config_maps[(cm.namespace, cm.name)] = replace(
            cm, data=data, version=cm.version + 1, annotations=annotations
        )
        self.changed.set()

    def _budget_of(self, namespace: str, workload: str) -> dict[str, Any]:
        budgets = [
            b for b in self._budgets.values() if b.namespace == namespace and b.workload == workload
        ]
        if not budgets:
            return {}
        return {
            "pdb_headroom": min(self._allowed(b) for b in budgets),
            "pdbs": tuple(f"{b.namespace}/{b.name}" for b in budgets),
        }

    def _healthy(self, b: FakeBudget) -> int:
        """status.currentHealthy: the covered pods ready and not terminating."""
        return sum(p.ready and not p.terminating for p in self.pods_of(b.namespace, b.workload))

    def _allowed(self, b: FakeBudget) -> int:
        """status.disruptionsAllowed."""
        if b.min_available is None:
            return b.disruptions_allowed
        return max(0, self._healthy(b) - b.min_available)

    def _refuses(self, b: FakeBudget, pod: FakePod) -> bool:
        """The eviction API's check: an unready pod goes while the budget is healthy
        (IfHealthyBudget: currentHealthy >= desiredHealthy > 0), any other pod only with a
        disruption allowed."""
        if not pod.ready:
            if b.min_available is None:
                return False  # taken as healthy (see FakeBudget)
            if b.min_available > 0 and self._healthy(b) >= b.min_available:
                return False
        return self._allowed(b) < 1

    def _eviction_block(self, pod: FakePod) -> str:
        full = [b for b in self._covering(pod) if self._refuses(b, pod)]
        if not full:
            return ""
        names = ", ".join(f"PodDisruptionBudget {b.namespace}/{b.name}" for b in full)
        return f"blocked by {names} (no disruptions allowed)"

    def _covering(self, pod: FakePod) -> list[FakeBudget]:
        return [
            b
            for b in self._budgets.values()
            if b.namespace == pod.namespace and b.workload == pod.workload and pod.workload
        ]

    def _evict(self, pod: FakePod) -> bool:
        """The API server's eviction, allowed: a ready pod takes one disruption from each
        budget covering it; the pod is deleted, and stays terminating while a finalizer
        holds it. Whether it stays."""
        if pod.ready:
            for b in self._covering(pod):
                if b.min_available is not None:
                    continue  # counted from the pods: this one is no longer healthy
                spent = replace(b, disruptions_allowed=b.disruptions_allowed - 1)
                self._budgets[(b.namespace, b.name)] = spent
        if pod.finalizers:
            self._pods[(pod.namespace, pod.name)] = replace(pod, terminating=True, evicted=True)
            return True
        del self._pods[(pod.namespace, pod.name)]
        return False

    def _recorder(self, owner: str, namespace: str, name: str) -> WorkloadState | None:
        """Where a pod's evictions are noted, as the adapter: on its StatefulSet, or for a
        ReplicaSet's pod its Deployment; None for other pods."""
        if owner not in _RECORDERS:
            return None
        kind = _OWNER_KINDS[owner]
        return self._workloads.get(Target(kind=kind, namespace=namespace, name=name).key)

    def _eviction_notes(self, owner: str, namespace: str, name: str) -> Mapping[str, str]:
        """The annotations a pod's ``owner`` kind notes its evictions in (its recorder's)."""
        w = self._recorder(owner, namespace, name)
        return w.annotations if w is not None else {}

    def _note_eviction(self, pod: FakePod, action_id: str) -> None:
        """As the adapter: the eviction noted on the pod's StatefulSet's or Deployment's
        own annotations."""
        w = self._recorder(pod.owner, pod.namespace, pod.workload)
        if w is None:
            return
        noted = remember_eviction(w.annotations, action_id, pod.uid)
        self._put(replace(w, annotations={**w.annotations, EVICTED_PODS_ANNOTATION: noted}))

    @staticmethod
    def _with_id(
        state: WorkloadState, action_id: str, prior: Mapping[str, ParamValue]
    ) -> dict[str, str]:
        annotations = dict(state.annotations)
        annotations[ACTION_IDS_ANNOTATION] = remember_id(state.annotations, action_id)
        annotations[PRIOR_STATE_ANNOTATION] = note_prior_state(state.annotations, action_id, prior)
        return annotations


# The pod owners that note a restart_pod's eviction (a ReplicaSet's: on its Deployment).
_RECORDERS = ("StatefulSet", "ReplicaSet")
# A pod's controller kind -> the workload it acts through (a ReplicaSet: its Deployment).
_OWNER_KINDS: Mapping[str, TargetKind] = {
    "ReplicaSet": "Deployment",
    "StatefulSet": "StatefulSet",
    "DaemonSet": "DaemonSet",
}


def _need_kind(target: Target, action_type: str) -> None:
    problem = kind_problem(action_type, target.kind)
    if problem is not None:
        raise ActionFailed(f"{target.key}: {problem}")


def _already(
    action_id: str, annotations: Mapping[str, str], shape: PriorShape, **must: ParamValue
) -> Effect:
    """A repeat, with the prior state its earlier delivery noted on the object."""
    return Effect(
        applied=False,
        message=f"action {action_id} already applied",
        prior_state=recorded_prior(annotations, action_id, shape, **must),
        found_id=True,
    )
