"""An in-process cluster with real state, for the local lab and pure unit tests.

It follows the Kubernetes semantics the agent relies on, not a mock that accepts anything:
a Deployment's revisions are its ReplicaSets; a rollback re-activates an old template and
gives it the next revision number (the old number disappears, as with ReplicaSets); scale
and restart bump ``generation``; an action id recorded on the object makes a repeat a no-op;
unknown objects are errors.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import datetime

from agent.errors import ActionFailed
from agent.models import Target
from handlers.cluster import (
    ACTION_IDS_ANNOTATION,
    RESTARTED_AT_ANNOTATION,
    Effect,
    Revision,
    WorkloadState,
    remember_id,
)


class FakeCluster:
    def __init__(self) -> None:
        self._workloads: dict[str, WorkloadState] = {}
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set on every write; the lab's service watches it

    # --- set-up used by the lab and tests -------------------------------------------------
    def create_deployment(
        self, namespace: str, name: str, *, image: str, replicas: int, at: datetime
    ) -> WorkloadState:
        target = Target(kind="Deployment", namespace=namespace, name=name)
        if target.key in self._workloads:
            raise ActionFailed(f"{target.key} already exists")
        state = WorkloadState(
            target=target,
            replicas=replicas,
            ready_replicas=replicas,
            revision=1,
            image=image,
            revisions=(Revision(number=1, image=image, created_at=at),),
        )
        self._workloads[target.key] = state
        return state

    def rollout(self, namespace: str, name: str, *, image: str, at: datetime) -> WorkloadState:
        """A new image: a new ReplicaSet with the next revision number (kubectl set image)."""
        state = self._get(Target(kind="Deployment", namespace=namespace, name=name))
        number = max(r.number for r in state.revisions) + 1
        new = replace(
            state,
            image=image,
            revision=number,
            revisions=(*state.revisions, Revision(number=number, image=image, created_at=at)),
            generation=state.generation + 1,
        )
        return self._put(new)

    # --- the Cluster protocol ----------------------------------------------------------------
    async def workload(self, target: Target) -> WorkloadState:
        return self._get(target)

    async def rollback(
        self, target: Target, *, action_id: str, to_revision: int | None = None
    ) -> Effect:
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return Effect(applied=False, message=f"action {action_id} already applied")
            older = [r for r in state.revisions if r.number != state.revision]
            if to_revision is not None:
                chosen = next((r for r in older if r.number == to_revision), None)
                if chosen is None:
                    raise ActionFailed(f"{target.key}: revision {to_revision} not found")
            elif older:
                chosen = max(older, key=lambda r: r.number)
            else:
                raise ActionFailed(f"{target.key}: no previous revision to roll back to")
            number = max(r.number for r in state.revisions) + 1
            revisions = tuple(r for r in state.revisions if r.number != chosen.number)
            new = replace(
                state,
                image=chosen.image,
                revision=number,
                revisions=(*revisions, replace(chosen, number=number)),
                generation=state.generation + 1,
                annotations=self._with_id(state, action_id),
            )
            self._put(new)
            return Effect(
                applied=True,
                message=f"rolled back {target.key} from revision {state.revision} "
                f"({state.image}) to {chosen.number} ({chosen.image}), now revision {number}",
                prior_state={"revision": state.revision, "image": state.image},
            )

    async def scale(self, target: Target, *, action_id: str, replicas: int) -> Effect:
        if replicas < 0:
            raise ActionFailed(f"{target.key}: replicas must be >= 0, got {replicas}")
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return Effect(applied=False, message=f"action {action_id} already applied")
            new = replace(
                state,
                replicas=replicas,
                ready_replicas=replicas,
                generation=state.generation + 1,
                annotations=self._with_id(state, action_id),
            )
            self._put(new)
            return Effect(
                applied=True,
                message=f"scaled {target.key} from {state.replicas} to {replicas}",
                prior_state={"replicas": state.replicas},
            )

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Effect:
        async with self._lock:
            state = self._get(target)
            if action_id in state.applied_action_ids:
                return Effect(applied=False, message=f"action {action_id} already applied")
            annotations = dict(self._with_id(state, action_id))
            annotations[RESTARTED_AT_ANNOTATION] = at.isoformat()
            new = replace(state, generation=state.generation + 1, annotations=annotations)
            self._put(new)
            return Effect(
                applied=True,
                message=f"restarted {target.key} (rolling)",
                prior_state={"generation": state.generation},
            )

    async def close(self) -> None:
        return None

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

    @staticmethod
    def _with_id(state: WorkloadState, action_id: str) -> dict[str, str]:
        annotations = dict(state.annotations)
        annotations[ACTION_IDS_ANNOTATION] = remember_id(state.annotations, action_id)
        return annotations
