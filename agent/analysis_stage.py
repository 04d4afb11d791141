"""The analysis stage: incidents in, analyses and action requests out.

For each incident revision that needs a decision (open, updated, reopened) it gathers a
bounded context (rollout history of the affected workloads from the cluster), runs the
analyzer and publishes the :class:`Analysis` and one :class:`ActionRequest` per recommended
action. Action ids are deterministic (incident, action type, target), so re-analysing the
same incident after a crash or an update yields the same ids and the executor's
idempotency check absorbs the repeat.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from agent.analyzer import Context, Rollout, analyze, workload_target
from agent.errors import ActionFailed, AgentError
from agent.metrics import Metrics
from agent.models import ActionRequest, Analysis, Incident, stable_id, utcnow
from agent.settings import Settings
from handlers.cluster import Cluster
from streams.bus import Bus, Envelope

log = logging.getLogger(__name__)

NEEDS_DECISION = frozenset({"open", "updated", "reopened"})


def action_requests(analysis: Analysis, incident: Incident) -> list[ActionRequest]:
    return [
        ActionRequest(
            id=stable_id("action", incident.id, a.type, a.target.key),
            incident_id=incident.id,
            incident_key=incident.key,
            analysis_id=analysis.id,
            type=a.type,
            target=a.target,
            params=a.params,
            confidence=analysis.confidence,
            reason=analysis.root_cause,
            requested_at=analysis.created_at,
            labels=incident.labels,
            trigger=tuple(sorted({m.name for m in incident.firing})),
        )
        for a in analysis.actions
    ]


def evidence_key(incident: Incident) -> str:
    """What the analysis depends on; the same evidence is not analysed twice."""
    firing = sorted(f"{m.fingerprint}:{m.status}" for m in incident.members)
    return stable_id(incident.id, *firing)


class AnalysisStage:
    def __init__(self, settings: Settings, *, bus: Bus, cluster: Cluster, metrics: Metrics) -> None:
        self.settings = settings
        self.bus = bus
        self.cluster = cluster
        self.metrics = metrics
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def gather(self, incident: Incident) -> Context:
        rollouts: list[Rollout] = []
        notes: list[str] = []
        targets = {workload_target(m.labels or incident.labels) for m in incident.firing}
        for target in sorted(targets, key=lambda t: t.key):
            if not target.name:
                continue
            try:
                w = await self.cluster.workload(target)
            except ActionFailed as err:
                notes.append(f"no rollout history for {target.key}: {err}")
                continue
            except AgentError as err:
                notes.append(f"cluster unavailable for {target.key}: {err}")
                continue
            ordered = sorted(w.revisions, key=lambda r: r.number)
            for prev, rev in zip([None, *ordered[:-1]], ordered, strict=True):
                rollouts.append(
                    Rollout(
                        namespace=target.namespace,
                        workload=target.name,
                        revision=rev.number,
                        image=rev.image,
                        at=rev.created_at,
                        previous_image=prev.image if prev else None,
                    )
                )
        return Context(rollouts=tuple(rollouts), notes=tuple(notes))

    async def handle(self, batch: Sequence[Envelope]) -> None:
        out: list[tuple[str, object, str | None]] = []
        analysed: list[str] = []
        for env in batch:
            incident = env.value
            if not isinstance(incident, Incident) or incident.status not in NEEDS_DECISION:
                continue
            ek = evidence_key(incident)
            if ek in self._seen:
                continue
            ctx = await self.gather(incident)
            analysis = analyze(incident, ctx, self.settings, utcnow())
            self.metrics.analyses.labels(
                analyzer=analysis.analyzer, root_cause_class=analysis.root_cause_class
            ).inc()
            log.info(
                "analysis %s: %s (%s, confidence %.2f, %d actions)",
                incident.key,
                analysis.root_cause,
                analysis.analyzer,
                analysis.confidence,
                len(analysis.actions),
            )
            out.append((self.bus.topic("analyses"), analysis, None))
            out.extend(
                (self.bus.topic("actions"), req, None)
                for req in action_requests(analysis, incident)
            )
            analysed.append(ek)
        await self.bus.publish_many(out)
        for ek in analysed:  # only once durable: a failed publish is analysed again
            self._remember(ek)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)
