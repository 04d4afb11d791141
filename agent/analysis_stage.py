"""The analysis stage: incidents in, analyses and action requests out.

For each incident revision that needs a decision (open, updated, reopened) it gathers a
bounded context (:mod:`agent.context`), runs the analyzer and publishes the
:class:`Analysis` and one :class:`ActionRequest` per recommended action. Action ids are
deterministic (incident, action type, target), so re-analysing the same incident after a
crash or an update yields the same ids and the executor's idempotency check absorbs the
repeat. An incident that reopens keeps its id but is a new episode: analysed once more,
with action ids of its own (the revision it reopened at is part of them), so the remedy
that healed it last time can be taken again.

A runbook escalates: every replica reads every incident and action result (outside the
group), and when one of an incident's actions is verified not_healed or worse, the replica
whose group holds the incident's partition analyses it again with that remedy marked as
tried (``Context.ineffective``): the rules take the runbook's next step, the LLM is refused
the failed one. Both are replayed at start, so a restart forgets neither the incidents nor
what failed; and a replica that gains partitions (at start, or from one that died) takes the
next step of any incident there whose failure it has not analysed, as the verdict may have
landed while no replica owned it.

With ``ai.enabled`` the stage asks the :class:`~agent.llm_analyzer.LLMAnalyzer`, which
falls back to the rules and says why; incidents of one batch are analysed concurrently (the
analyzer bounds the calls). Without it, the rules decide on the same context, less the pod
logs, which the gatherer then does not fetch.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace

from agent.analyzer import analyze, escalates_to, failed_pages
from agent.context import ContextGatherer
from agent.labels import service_of
from agent.llm_analyzer import LLMAnalyzer
from agent.memory import remember
from agent.metrics import Metrics
from agent.models import (
    CLOSED_STATUSES,
    ActionRequest,
    ActionResult,
    Analysis,
    Escalation,
    EscalationReason,
    Firing,
    Incident,
    Member,
    RecommendedAction,
    stable_id,
    utcnow,
)
from agent.policy import INEFFECTIVE
from agent.settings import Settings
from handlers.cluster import Cluster
from streams.bus import Bus, Envelope, progressed
from streams.replay import RecentSource
from streams.topology import scope

log = logging.getLogger(__name__)

# How long a replica that gained partitions waits for its watch to catch up (the analyses
# the previous owner made) before it takes their incidents' next steps.
CATCH_UP_WAIT = 5.0

NEEDS_DECISION = frozenset({"open", "updated", "reopened"})
EPISODES_KEPT = 8  # reopenings remembered per incident: a late copy is of a recent one


NODE_ACTIONS = frozenset({"cordon_node", "drain_node"})


def where_fired(m: Member) -> dict[str, str]:
    """Where a member fired, as verification looks for it (see :class:`Firing`)."""
    where = scope(m.labels)
    if where is not None and where.startswith("node/"):
        return {"node": m.labels["node"]}
    return service_of(m.labels)


def firing_for(action: RecommendedAction, incident: Incident) -> tuple[Firing, ...]:
    """What verifies an action: the incident's firing members, less, for a node action,
    the node's own conditions. Cordoning or draining moves the workloads off a broken node;
    it does not mend the node, so its NotReady would judge every drain a failure."""
    own = f"node/{action.target.name}" if action.type in NODE_ACTIONS else None
    found = {
        (m.name, m.source, tuple(sorted(where_fired(m).items())))
        for m in incident.firing
        if own is None or scope(m.labels) != own
    }
    return tuple(Firing(name, dict(labels), source) for name, source, labels in sorted(found))


def action_requests(
    analysis: Analysis, incident: Incident, episode: int | None = None
) -> list[ActionRequest]:
    """The analysis's actions as requests. ``episode``: the revision the incident last
    reopened at, None in its first episode (see :func:`evidence_key`)."""
    out = []
    reopened = () if episode is None else (f"episode:{episode}",)
    for a in analysis.actions:
        firing = firing_for(a, incident)
        out.append(
            ActionRequest(
                # The executor acts once per id: a reopening must not look like a repeat.
                id=stable_id("action", incident.id, a.type, a.target.key, *reopened),
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
                severity=incident.severity,
                trigger=tuple(sorted({f.name for f in firing})),
                firing=firing,
            )
        )
    return out


def notify_escalation(
    incident: Incident, analysis: Analysis, settings: Settings
) -> Escalation | None:
    """The escalation a ``notify_oncall`` step asks for: the incident, with what the
    analysis found and will do, for the on-call engineer. One per incident (stable id)."""
    asking = sorted(
        {
            m.name
            for m in incident.firing
            if (steps := settings.steps_for(m.name, m.source)) and "notify_oncall" in steps[1]
        }
    )
    if not asking:
        return None
    doing = [f"action: {a.type} {a.target.key}" for a in analysis.actions] or ["no action"]
    return _escalation(
        incident,
        analysis,
        "notify",
        f"{incident.key}: {analysis.root_cause}",
        f"notify_oncall is a step of {', '.join(asking)}",
        doing,
    )


def failure_escalation(
    incident: Incident,
    analysis: Analysis,
    settings: Settings,
    tried: Iterable[tuple[str, str]],
) -> Escalation | None:
    """The page a runbook file's ``onFailure: notify_*/escalate*`` asks for once its step's
    action was verified ineffective; one per incident and set of such steps (an id of its
    own: a notify or no_remedy page sent earlier does not stand in for it)."""
    pages = failed_pages(incident, tried, settings)
    lines = [line for line, _ in pages]
    if not lines:
        return None
    hooks = {w.name for w in settings.escalation.webhooks}
    # escalate_<who> goes to the webhook named <who>; one naming none, the global route.
    # A page any step cannot route that way goes the global route: none is left unsent.
    whos = [escalates_to(f) for _, f in pages]
    routed = tuple(dict.fromkeys(w for w in whos if w in hooks))
    if len(routed) < len(set(whos)):
        routed = ()
    page = _escalation(
        incident,
        analysis,
        "notify",
        f"{incident.key}: {lines[0]}",
        "a runbook step's onFailure asks for a person",
        lines[1:],
    )
    return replace(page, id=stable_id(page.id, "onFailure", *lines), channels=routed)


def no_remedy_escalation(
    incident: Incident, analysis: Analysis, severities: Sequence[str]
) -> Escalation | None:
    """A severe incident with something firing (not suppressed) that the analysis
    recommends no action for: the agent will try nothing, so a human hears of it now rather
    than at ``unresolved_after``. One per incident (stable id), with what the analysis found
    and the actions it refused (an LLM's proposals outside the allow-list, say)."""
    if analysis.actions or incident.severity not in severities or not incident.firing:
        return None
    firing = ", ".join(incident.firing_names)
    return _escalation(
        incident,
        analysis,
        "no_remedy",
        f"{incident.key}: {analysis.root_cause}; no action to take",
        f"{incident.severity}, firing: {firing}",
        [f"refused: {r}" for r in analysis.rejected_actions[:8]],
    )


def _escalation(
    incident: Incident,
    analysis: Analysis,
    reason: EscalationReason,
    summary: str,
    headline: str,
    more: Sequence[str],
) -> Escalation:
    """An incident's escalation from its analysis, one per (incident, reason). Details:
    ``headline``, the analyzer and its confidence, ``more``, then the evidence."""
    return Escalation.of_incident(
        incident,
        reason,
        summary,
        analysis.created_at,
        (
            headline,
            f"{analysis.analyzer} analysis, confidence {analysis.confidence:.2f}",
            *more,
            *analysis.evidence[:8],
        ),
    )


def evidence_key(
    incident: Incident, tried: Iterable[tuple[str, str]] = (), episode: int | None = None
) -> str:
    """What the analysis depends on; the same evidence is not analysed twice. A remedy
    verified ineffective is new evidence, and so is a reopening: ``episode`` is the
    revision the incident last reopened at (None in its first episode, whose keys stay
    those of analyses made before episodes counted)."""
    firing = sorted(f"{m.fingerprint}:{m.status}" for m in incident.members)
    reopened = () if episode is None else (f"episode:{episode}",)
    return stable_id(incident.id, *firing, *sorted(f"tried:{t}:{k}" for t, k in tried), *reopened)


def episode_starts(
    starts: tuple[int, ...], closed: tuple[int, bool] | None, incident: Incident
) -> tuple[int, ...]:
    """The revisions an incident reopened at, with ``incident`` (the newest revision read,
    ``closed`` the revision that last closed it and whether it had resolved since it was
    last open). A reopening is a "reopened" revision, or an open one after a resolution:
    one that reopened silenced is "silenced", and shows only when the silence lifts."""
    if incident.status in CLOSED_STATUSES:
        return starts
    after_resolution = closed is not None and closed[1]
    if incident.status != "reopened" and not after_resolution:
        return starts
    if starts and starts[-1] >= incident.revision:
        return starts
    return (*starts, incident.revision)[-EPISODES_KEPT:]


def episode_of(starts: tuple[int, ...], revision: int) -> int | None:
    """The revision that began the episode ``revision`` belongs to; None for the first."""
    return next((s for s in reversed(starts) if s <= revision), None)


class AnalysisStage:
    def __init__(
        self,
        settings: Settings,
        *,
        bus: Bus,
        cluster: Cluster,
        metrics: Metrics,
        gatherer: ContextGatherer,
        llm: LLMAnalyzer | None = None,
        results: RecentSource | None = None,  # action results of the last seconds
        results_window: float = 6 * 3600.0,
        incidents: RecentSource | None = None,  # incidents of the last seconds
        incidents_window: float = 3600.0,
        analyses: RecentSource | None = None,  # analyses of the last seconds
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.cluster = cluster
        self.metrics = metrics
        self.llm = llm
        self.gatherer = gatherer
        self._seen: OrderedDict[str, None] = OrderedDict()
        # evidence key -> whether its analysis became durable, for the analyses under way
        # (handle and the watch run concurrently); settled when it ends.
        self._analysing: dict[str, asyncio.Future[bool]] = {}
        # incidents escalated (an episode's stable id, once an incident reopened)
        self._notified: OrderedDict[str, None] = OrderedDict()
        # The latest revision of each open incident known: every replica's, when the
        # runtime feeds on_watch; only those of this replica's partitions otherwise.
        self.incidents: OrderedDict[str, Incident] = OrderedDict()
        # incident id -> the revision that closed it, and whether it had resolved since it
        # was last open: an older open revision read later (the replay, a redelivery) must
        # not bring it back; only its id is kept.
        self._closed: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        # incident id -> the revisions it reopened at, oldest first: the replay of the
        # incidents rebuilds them, so a restarted stage keys evidence as before.
        self._reopened: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        # incident id -> (action type, target key) verified not_healed or worse.
        self.ineffective: OrderedDict[str, frozenset[tuple[str, str]]] = OrderedDict()
        self._results = results
        self._results_window = results_window
        self._incidents = incidents
        self._incidents_window = incidents_window
        self._analyses = analyses
        # Whether this replica owns an incident key now (its group holds the partition).
        # The runtime binds it to the analyzer's group consumer; alone, a stage owns all.
        self.owns: Callable[[str], bool] = lambda key: True
        # Waits until the watch (on_watch) has had what was published before the call; the
        # runtime binds it to the watch's consumer.
        self.caught_up: Callable[[float], Awaitable[bool]] | None = None

    async def start(self) -> None:
        """Hold the recent incidents and remember what failed in the last hours. Nothing is
        analysed here: the partitions this replica owns are not known yet (see
        :meth:`on_gained`)."""
        if self._incidents is not None:
            replayed = await self._incidents(self._incidents_window)
            self._hold(e.value for e in replayed if isinstance(e.value, Incident))
        if self._results is not None:
            replayed = await self._results(self._results_window)
            self._learn(e.value for e in replayed if isinstance(e.value, ActionResult))
        if self._analyses is not None:
            replayed = await self._analyses(self._incidents_window)
            self._made(e.value for e in replayed if isinstance(e.value, Analysis))

    def _made(self, analyses: Iterable[Analysis]) -> None:
        """Analyses made already, here or by another replica: their evidence is not
        analysed again (an LLM asked twice may not answer the same)."""
        for a in analyses:
            if a.basis is not None:
                remember(self._seen, a.basis, None)

    async def stop(self) -> None:
        return None

    def _hold(self, incidents: Iterable[Incident]) -> None:
        """Keep the latest revision of each open incident, and only the closing revision
        of a closed one."""
        for incident in incidents:
            held = self.incidents.get(incident.id)
            closed = self._closed.get(incident.id)
            newest = max(held.revision if held else -1, closed[0] if closed else -1)
            if incident.revision < newest:
                continue
            starts = self._reopened.get(incident.id, ())
            began = episode_starts(starts, closed, incident)
            if began != starts:
                remember(self._reopened, incident.id, began)
            if incident.status in CLOSED_STATUSES:
                self.incidents.pop(incident.id, None)
                resolved = incident.status == "resolved" or bool(closed and closed[1])
                remember(self._closed, incident.id, (incident.revision, resolved))
            else:
                self._closed.pop(incident.id, None)  # reopened
                remember(self.incidents, incident.id, incident)

    def _due(self, incident_id: str) -> Incident | None:
        """The incident, when this replica is the one to take its next step: held, still
        open, with a remedy verified ineffective, and on a partition this replica owns."""
        incident = self.incidents.get(incident_id)
        if incident is None or not self.ineffective.get(incident_id) or not self.owns(incident.key):
            return None
        return incident

    def _learn(self, results: Iterable[ActionResult]) -> list[str]:
        """Record the remedies verified ineffective; the incidents that learned one."""
        changed: list[str] = []
        for r in results:
            if r.status != "succeeded" or r.outcome not in INEFFECTIVE:
                continue
            known = self.ineffective.get(r.incident_id, frozenset())
            tried = (r.type, r.target.key)
            if tried not in known:
                remember(self.ineffective, r.incident_id, known | {tried})
                changed.append(r.incident_id)
        return changed

    async def on_watch(self, batch: Sequence[Envelope]) -> None:
        """Every replica's incidents and action results: an incident this replica owns,
        still open, whose remedy was just verified ineffective is analysed again (its next
        step)."""
        self._hold(e.value for e in batch if isinstance(e.value, Incident))
        self._made(e.value for e in batch if isinstance(e.value, Analysis))
        changed = self._learn(e.value for e in batch if isinstance(e.value, ActionResult))
        due = (self._due(i) for i in dict.fromkeys(changed))
        await self._again(i for i in due if i is not None)

    async def on_gained(self) -> None:
        """This replica's group gained partitions: take the next step of every incident
        there with a failure not analysed here yet. Its verdict may have landed while no
        replica owned the partition (a restart, a rebalance); one analysed before by the
        replica that had it is not made again, once the watch has read it."""
        if self.caught_up is not None and not await self.caught_up(CATCH_UP_WAIT):
            log.warning("analyzer watch behind: taking over with what it has read")
        due = (self._due(i) for i in list(self.ineffective))
        await self._again(i for i in due if i is not None)

    async def _again(self, incidents: Iterable[Incident]) -> None:
        again = [i for i in incidents if self._evidence(i) not in self._seen]
        for incident in again:
            log.info(
                "analysing %s again: %s verified ineffective",
                incident.key,
                ", ".join(f"{t} {k}" for t, k in sorted(self.ineffective[incident.id])),
            )
        if again:
            await self._analyse(again)

    def _episode(self, incident: Incident) -> int | None:
        return episode_of(self._reopened.get(incident.id, ()), incident.revision)

    def _evidence(self, incident: Incident) -> str:
        tried = self.ineffective.get(incident.id, ())
        return evidence_key(incident, tried, self._episode(incident))

    async def decide(self, incident: Incident) -> Analysis:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tried = tuple(sorted(self.ineffective.get(incident.id, ())))
        ctx = replace(await self.gatherer.gather(incident), ineffective=tried)
        if self.llm is None:
            analysis = analyze(incident, ctx, self.settings, utcnow())
        else:
            try:
                analysis = await self.llm.analyze(incident, ctx, utcnow())
            except Exception:  # a bug in the LLM path must not stop decisions: rules decide
                log.exception("LLM analysis of %s failed; the rules decide", incident.key)
                self.metrics.analysis_fallbacks.labels(reason="internal_error").inc()
                analysis = replace(
                    analyze(incident, ctx, self.settings, utcnow()),
                    fallback_reason="internal_error: see the analyzer's log",
                )
        self.metrics.analysis_duration.labels(analyzer=analysis.analyzer).observe(
            loop.time() - started
        )
        progressed()  # a batch of many incidents is many analyses: each one is progress
        if tried:  # another analysis of the same revision: its own id
            analysis = replace(analysis, id=stable_id(analysis.id, *(f"{t}:{k}" for t, k in tried)))
        return analysis

    async def handle(self, batch: Sequence[Envelope]) -> None:
        needed: list[Incident] = []
        for env in batch:
            incident = env.value
            if not isinstance(incident, Incident):
                continue
            self._hold((incident,))
            if incident.status in NEEDS_DECISION:
                needed.append(incident)
        await self._analyse(needed)

    async def _analyse(self, incidents: Sequence[Incident]) -> None:
        """Analyse the evidence not analysed yet. ``handle`` and the watch run concurrently:
        evidence another of them is analysing is not analysed twice (an LLM asked twice may
        answer differently, and both answers would be acted on); this waits for it to be
        durable instead, and analyses it itself if that failed."""
        todo: dict[str, Incident] = {}  # evidence key -> incident
        elsewhere: dict[str, tuple[asyncio.Future[bool], Incident]] = {}
        for incident in incidents:
            ek = self._evidence(incident)
            running = self._analysing.get(ek)
            if running is not None and ek not in todo:
                elsewhere.setdefault(ek, (running, incident))
            elif ek not in self._seen:
                todo.setdefault(ek, incident)
        # Claimed before the first await, released whatever happens.
        loop = asyncio.get_running_loop()
        mine = {ek: loop.create_future() for ek in todo}
        self._analysing.update(mine)
        done = False
        try:
            if todo:
                await self._decide_and_publish(todo)
            done = True
        finally:
            for ek, claim in mine.items():
                del self._analysing[ek]
                claim.set_result(done)
        failed = [incident for claim, incident in elsewhere.values() if not await claim]
        if failed:
            await self._analyse(failed)

    async def _decide_and_publish(self, todo: dict[str, Incident]) -> None:
        out: list[tuple[str, object, str | None]] = []
        notified: list[str] = []  # incidents escalated by this batch
        analyses = await asyncio.gather(*(self.decide(i) for i in todo.values()))
        made: list[tuple[str, object, str | None]] = []
        for (ek, incident), analysis in zip(todo.items(), analyses, strict=True):
            analysis = replace(analysis, basis=ek)
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
            made.append((self.bus.topic("analyses"), analysis, None))
            episode = self._episode(incident)
            out.extend(
                (self.bus.topic("actions"), req, None)
                for req in action_requests(analysis, incident, episode)
            )
            # A notify step's page says "no action" itself: one page, not two.
            page = notify_escalation(incident, analysis, self.settings) or no_remedy_escalation(
                incident, analysis, self.settings.escalation.no_remedy
            )
            # Once per episode of an incident, however many of its revisions this batch or
            # earlier held; a reopening pages again, under an id of its own.
            paged = incident.id if episode is None else stable_id(incident.id, str(episode))
            failed = failure_escalation(
                incident, analysis, self.settings, self.ineffective.get(incident.id, ())
            )
            pages = [(page, paged)]
            if failed is not None:  # its own key: one per set of failed steps
                pages.append((failed, stable_id(paged, failed.id)))
            for one, key in pages:
                if one is None or key in self._notified or key in notified:
                    continue
                if episode is not None:
                    one = replace(one, id=stable_id(one.id, f"episode:{episode}"))
                out.append((self.bus.topic("escalations"), one, None))
                notified.append(key)
                self.metrics.escalations.labels(reason=one.reason).inc()
        # The analyses once their actions are durable: a replica that reads an analysis
        # will not make it again, so it must not stand without its actions.
        await self.bus.publish_many(out)
        await self.bus.publish_many(made)
        for ek in todo:  # only once durable: a failed publish is analysed again
            remember(self._seen, ek, None)
        for incident_id in notified:
            remember(self._notified, incident_id, None)
