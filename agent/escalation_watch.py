"""Escalating incidents nobody has healed: an incident still open (not resolved, not
silenced) ``escalation.unresolved_after`` after it opened is escalated once, reason
``unresolved``, whatever the agent did or did not do about it (the runbook's "level 1
after 5 minutes"); one still open at each of ``escalation.unresolved_again_after`` is
escalated again, at level 2, 3, ..., which webhooks can route elsewhere (a manager's pager).

The watch follows every incident of the incidents topic from the time it starts (each
replica reads every partition, in no consumer group), and seeds itself from the incidents
written in the last ``unresolved_after`` (or last level) plus an hour, so a restart keeps
watching what was open; and further back, to the start of each silence in force in that
time, so it knows which incidents a silence closed, however long ago (see below).
Replicas escalate the same incident under the same stable id; the escalations of one
incident share a partition, so one notifier usually sees them all and posts the first
only (across a rebalance another may post it again: receivers dedupe on the id).
An incident escalated before a restart may be escalated again, under that same id.

An incident that reopens (it keeps its id) begins a new episode, as the analysis stage
counts them (:func:`agent.analysis_stage.episode_starts`): its unresolved time counts from
the reopening, and its escalations carry the revision it reopened at in their ids, so a
flapping incident pages again from level 1 instead of being dropped as already sent.
A silence pauses the watch without starting an episode: once it ends (an open revision
after a silenced one, no resolution between), the incident, still counted from its
episode's start, is escalated again at each level it has reached, once, under ids that
carry the revision the silence ended at; under its old ids the pages were dropped as
already sent, so an incident still firing after its silence never paged again. That
takes the silenced revision: a watch restarted during a silence longer than its seed
window used to miss it, and paged under the old ids when the silence ended.
An incident whose signal a runbook file with ``spec.escalation`` answers for follows that
runbook's levels instead (:func:`runbook_plan`): its ``after`` times, and its ``notify``
channels as the webhooks its escalations go to (the global routing when none names one).

The decisions are pure (:func:`track`, :func:`due`, :func:`runbook_plan`); the watch keeps
their state and publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from agent.analysis_stage import episode_starts
from agent.errors import AgentError, cancel_and_wait, task_failure
from agent.memory import remember
from agent.metrics import Metrics
from agent.models import CLOSED_STATUSES, Escalation, Incident, Silence, stable_id, utcnow
from agent.settings import EscalationSection, Settings
from streams.bus import Envelope

log = logging.getLogger(__name__)

SEED_MARGIN = 3600.0

Publish = Callable[[str, object], Awaitable[None]]
RecentIncidents = Callable[[float], Awaitable[Iterable[Envelope]]]
Silences = Callable[[], Awaitable[Iterable[Silence]]]


@dataclass(frozen=True, slots=True)
class Episode:
    """The episode an incident is in since it last reopened: the revision it reopened at
    and when (that revision's update). Its first episode has none: it counts from
    ``opened_at``, and its escalations keep the ids they had before episodes counted."""

    revision: int
    began: datetime


@dataclass(frozen=True, slots=True)
class SilenceEnd:
    """The revision at which an incident's last silence in its current episode ended (the
    first open one after it was silenced), and when (that revision's update)."""

    revision: int
    at: datetime


Closed = OrderedDict[str, tuple[int, bool]]  # id -> (closing revision, resolved since open)
Episodes = OrderedDict[str, Episode]
SilenceEnds = OrderedDict[str, SilenceEnd]


def track(
    open_: dict[str, Incident],
    incident: Incident,
    closed: Closed | None = None,
    episodes: Episodes | None = None,
    silence_ends: SilenceEnds | None = None,
) -> None:
    """Keep the latest state of each open incident; drop it once it closes. A transition
    older than the one held (a redelivery) changes nothing. With ``closed`` and
    ``episodes`` (bounded memories), also note what closed, and the episode each incident
    is in: a reopening begins a new one; with ``silence_ends`` too, where its last silence
    in that episode ended."""
    held = open_.get(incident.id)
    if held is not None and incident.revision < held.revision:
        return
    last = closed.get(incident.id) if closed is not None else None
    if last is not None and incident.revision < last[0]:
        return  # older than its closing: not open again
    if episodes is not None:
        current = episodes.get(incident.id)
        starts = () if current is None else (current.revision,)
        if episode_starts(starts, last, incident) != starts:
            remember(episodes, incident.id, Episode(incident.revision, incident.updated_at))
            if silence_ends is not None:
                silence_ends.pop(incident.id, None)
            last = None  # a reopening, not the end of a silence
    if (
        silence_ends is not None
        and last is not None
        and not last[1]
        and incident.status not in CLOSED_STATUSES
    ):
        # Open again after it closed with no resolution since: its silence ended.
        remember(silence_ends, incident.id, SilenceEnd(incident.revision, incident.updated_at))
    if incident.status in CLOSED_STATUSES:
        open_.pop(incident.id, None)
        if closed is not None:
            resolved = incident.status == "resolved" or bool(last and last[1])
            remember(closed, incident.id, (incident.revision, resolved))
    else:
        open_[incident.id] = incident
        if closed is not None:
            closed.pop(incident.id, None)


def since(incident: Incident, episode: Episode | None) -> datetime:
    """When the incident's current episode began: its reopening, else its opening."""
    return episode.began if episode is not None else incident.opened_at


@dataclass(frozen=True, slots=True)
class Level:
    """A runbook file's escalation level, as the watch follows it."""

    after: float
    channels: tuple[str, ...]  # the webhooks it goes to; empty: the global routing
    notify: tuple[str, ...]  # what the runbook asks for, as people read it


def runbook_plan(incident: Incident, settings: Settings) -> tuple[str, tuple[Level, ...]] | None:
    """(runbook, its levels) of the runbook file with ``spec.escalation`` that one of the
    incident's signals matches (the first by signal name, so it does not change with what
    fires now); None: the global levels apply."""
    hooks = {w.name for w in settings.escalation.webhooks}
    for m in sorted(incident.members, key=lambda m: (m.name, m.source)):
        book = settings.file_runbook_for(m.name, m.source)
        if book is None or not book.escalation:
            continue
        levels = sorted(book.escalation, key=lambda lv: lv.level)
        return book.name, tuple(
            Level(
                after=lv.after,
                channels=tuple(c for c, _ in lv.channels if c in hooks),
                notify=tuple(f"{c} {t}".strip() for c, t in lv.channels),
            )
            for lv in levels
        )
    return None


def due(
    open_: dict[str, Incident],
    escalated: Mapping[str, int],
    now: datetime,
    levels: Sequence[float],
    episodes: Mapping[str, Episode] | None = None,
    levels_for: Callable[[Incident], Sequence[float] | None] | None = None,
) -> list[tuple[Incident, int]]:
    """(incident, level) for each level an open incident has reached in its current
    episode and was not escalated at, oldest first. ``levels``: the ages (s) of levels
    1, 2, ..., increasing; ``escalated``: the highest level each incident was escalated at
    in its current episode; ``episodes``: those that reopened (see :func:`track`);
    ``levels_for``: an incident's own levels (a runbook's), None for ``levels``."""
    episodes = episodes or {}
    found: list[tuple[Incident, int]] = []
    for inc in open_.values():
        age = (now - since(inc, episodes.get(inc.id))).total_seconds()
        sent = escalated.get(inc.id, 0)
        own = levels_for(inc) if levels_for is not None else None
        bounds = levels if own is None else own
        found.extend((inc, n) for n, bound in enumerate(bounds, 1) if n > sent and age >= bound)
    return sorted(found, key=lambda pair: (since(pair[0], episodes.get(pair[0].id)), pair[1]))


def unresolved(
    incident: Incident,
    now: datetime,
    level: int = 1,
    episode: Episode | None = None,
    silence_end: SilenceEnd | None = None,
) -> Escalation:
    minutes = (now - since(incident, episode)).total_seconds() / 60
    firing = incident.firing_names
    again = f" (level {level})" if level > 1 else ""
    reopened = " since it reopened" if episode is not None else ""
    escalation = Escalation.of_incident(
        incident,
        "unresolved",
        f"{incident.key}: open for {minutes:.0f} min{reopened}, {incident.status}{again}",
        now,
        (
            f"severity {incident.severity}, revision {incident.revision}",
            f"firing: {', '.join(firing) or 'none'}",
            f"opened {incident.opened_at.isoformat()}",
            *(
                (f"reopened {episode.began.isoformat()} (revision {episode.revision})",)
                if episode is not None
                else ()
            ),
            *(
                (f"silence ended {silence_end.at.isoformat()} (revision {silence_end.revision})",)
                if silence_end is not None
                else ()
            ),
        ),
        level,
    )
    id_ = escalation.id
    if episode is not None:
        # Each episode pages on its own: the same id as the last one's would be dropped as sent.
        id_ = stable_id(id_, f"episode:{episode.revision}")
    if silence_end is not None:
        # So does each end of a silence, for the same reason.
        id_ = stable_id(id_, f"unsilenced:{silence_end.revision}")
    return replace(escalation, id=id_)


def levels_of(escalation: EscalationSection) -> tuple[float, ...]:
    """The ages (s) of the unresolved levels 1, 2, ... (see :func:`due`); none when
    ``unresolved_after`` is 0 (never)."""
    if escalation.unresolved_after <= 0:
        return ()
    return (escalation.unresolved_after, *escalation.unresolved_again_after)


def all_levels(settings: Settings) -> tuple[float, ...]:
    """Every level's age, the global ones and the runbook files'."""
    own = tuple(lv.after for r in settings.file_runbooks for lv in r.escalation)
    return levels_of(settings.escalation) + own


def seed_window(
    levels: Sequence[float], silences: Iterable[Silence] = (), now: datetime | None = None
) -> float:
    """Seconds of incidents the watch seeds itself from: its last level, and an hour; with
    ``silences`` (those known ``now``), back to the start of each one in force within
    that time, and an hour. A silence closes the incidents it covers while it is in
    force, never before it starts: to page under new ids once it ends, the watch must
    have read that closing, however long ago. One that ended earlier than that has let
    its incidents reopen or resolve as quiet since (``resolve_timeout``, under an hour)."""
    window = max(levels, default=0.0) + SEED_MARGIN
    if now is None:
        return window
    since = now - timedelta(seconds=window)
    started = [s.starts_at for s in silences if s.ends_at > since and s.starts_at < since]
    if started:
        window = (now - min(started)).total_seconds() + SEED_MARGIN
    return window


class UnresolvedWatch:
    def __init__(
        self,
        *,
        after: float,
        topic: str,
        publish: Publish,
        metrics: Metrics,
        recent: RecentIncidents | None = None,
        every: float = 5.0,
        again: Sequence[float] = (),
        settings: Settings | None = None,  # its runbook files' escalations (runbook_plan)
        silences: Silences | None = None,  # the silences known at start (seed_window)
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.after = after
        self.levels: tuple[float, ...] = (after, *again) if after > 0 else ()  # see due
        self.settings = settings
        self.topic = topic
        self.publish = publish
        self.metrics = metrics
        self._recent = recent
        self._silences = silences
        self.clock = clock
        self.every = every
        self.open: dict[str, Incident] = {}
        # incident id -> highest level escalated in its current episode
        self.escalated: dict[str, int] = {}
        self.closed: Closed = OrderedDict()
        self.episodes: Episodes = OrderedDict()
        self.silence_ends: SilenceEnds = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.name = "escalation-watch"

    async def start(self) -> None:
        if self._recent is not None:
            horizon = all_levels(self.settings) if self.settings else self.levels
            silences = await self._silences() if self._silences is not None else ()
            window = seed_window((*self.levels, *horizon), silences, self.clock())
            for env in await self._recent(window):
                if isinstance(env.value, Incident):
                    track(self.open, env.value, self.closed, self.episodes, self.silence_ends)
            log.info("escalation watch: %d open incidents loaded", len(self.open))
        self._task = asyncio.create_task(self._loop(), name="escalation-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    @property
    def failure(self) -> BaseException | None:
        return task_failure(self._task)

    async def handle(self, batch: Sequence[Envelope]) -> None:
        for env in batch:
            if isinstance(env.value, Incident):
                inc = env.value
                was = self.episodes.get(inc.id), self.silence_ends.get(inc.id)
                track(self.open, inc, self.closed, self.episodes, self.silence_ends)
                if (self.episodes.get(inc.id), self.silence_ends.get(inc.id)) != was:
                    # Closed and open again within one batch: a new episode starts at level
                    # 1, the end of a silence pages the levels reached again.
                    self.escalated.pop(inc.id, None)
        # Forget closed ones (memory stays bounded by what is open); one that opens again
        # later (a new episode, or its silence ended) is escalated under ids of its own.
        self.escalated = {k: n for k, n in self.escalated.items() if k in self.open}

    def plan(self, incident: Incident) -> tuple[str, tuple[Level, ...]] | None:
        return runbook_plan(incident, self.settings) if self.settings is not None else None

    def _levels_for(self, incident: Incident) -> Sequence[float] | None:
        found = self.plan(incident)
        return None if found is None else [lv.after for lv in found[1]]

    async def sweep(self, now: datetime) -> list[Escalation]:
        out = []
        for inc, level in due(
            self.open, self.escalated, now, self.levels, self.episodes, self._levels_for
        ):
            escalation = unresolved(
                inc, now, level, self.episodes.get(inc.id), self.silence_ends.get(inc.id)
            )
            found = self.plan(inc)
            if found is not None:
                book, levels = found
                lv = levels[level - 1]
                asks = f"runbook {book} escalation level {level}: {', '.join(lv.notify) or '-'}"
                escalation = replace(
                    escalation, channels=lv.channels, details=(*escalation.details, asks)
                )
            await self.publish(self.topic, escalation)
            self.escalated[inc.id] = level
            self.metrics.escalations.labels(reason="unresolved").inc()
            log.error("ESCALATE: incident %s unresolved: %s", inc.key, escalation.summary)
            out.append(escalation)
        return out

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep(utcnow())
            except AgentError as err:  # Kafka away: the next sweep tries again
                log.warning("escalation watch: publishing failed, retrying: %s", err)
            await asyncio.sleep(self.every)
