"""The cluster boundary: what the agent reads from and does to Kubernetes.

Handlers depend on the :class:`Cluster` protocol only. Adapters translate vendor errors into
:mod:`agent.errors`. Every mutating call takes the action id and records it on the target
in the same write that performs the change (annotation ``ACTION_IDS_ANNOTATION``), so a
redelivered action whose id is already there is acknowledged without acting again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agent.models import Target

ACTION_IDS_ANNOTATION = "sre-agent.io/action-ids"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
# Enough history to recognise any redelivery: actions on one target are serialized.
MAX_REMEMBERED_IDS = 20


def remembered_ids(annotations: Mapping[str, str]) -> tuple[str, ...]:
    raw = annotations.get(ACTION_IDS_ANNOTATION, "")
    return tuple(i for i in raw.split(",") if i)


def remember_id(annotations: Mapping[str, str], action_id: str) -> str:
    ids = (*remembered_ids(annotations), action_id)[-MAX_REMEMBERED_IDS:]
    return ",".join(ids)


@dataclass(frozen=True, slots=True)
class Revision:
    number: int
    image: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WorkloadState:
    target: Target
    replicas: int
    ready_replicas: int
    revision: int
    image: str
    revisions: tuple[Revision, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    generation: int = 1

    @property
    def applied_action_ids(self) -> tuple[str, ...]:
        return remembered_ids(self.annotations)

    def current(self) -> Revision:
        return next(r for r in self.revisions if r.number == self.revision)


@dataclass(frozen=True, slots=True)
class Effect:
    """What an action did. ``applied`` is False when the id was already on the target."""

    applied: bool
    message: str
    prior_state: Mapping[str, Any] = field(default_factory=dict)


class Cluster(Protocol):
    async def workload(self, target: Target) -> WorkloadState: ...

    async def rollback(
        self, target: Target, *, action_id: str, to_revision: int | None = None
    ) -> Effect: ...

    async def scale(self, target: Target, *, action_id: str, replicas: int) -> Effect: ...

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Effect: ...

    async def close(self) -> None: ...
