"""``sre-agent incidents list|show``: what the agent saw, decided, did and told people, read
back from the topics (they are the audit trail; nothing else keeps it).

``show`` puts one incident's revisions, analyses, action requests, approval requests,
results and escalations in time order; ``list`` the latest state of recent incidents.
Both read the last ``--since`` of each topic (by record timestamp) outside any consumer
group, like the other CLI commands. The decisions are pure (:func:`timeline`,
:func:`latest`, :func:`matching`); only :func:`read_history` touches Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.errors import PermanentError
from agent.models import (
    CLOSED_STATUSES,
    ActionRequest,
    ActionResult,
    Analysis,
    ApprovalRequest,
    Escalation,
    Incident,
)
from agent.remediation_cli import when
from agent.settings import Settings, load_settings, positive_duration
from agent.topics import topic
from streams.replay import recent

# topic -> the event it holds; tombstones and records that do not decode are skipped
SOURCES: tuple[tuple[str, type], ...] = (
    ("incidents", Incident),
    ("analyses", Analysis),
    ("actions", ActionRequest),
    ("approvals", ApprovalRequest),
    ("action-results", ActionResult),
    ("escalations", Escalation),
)
# Within one instant, the order things happen in.
KINDS = ("incident", "analysis", "action", "approval", "result", "escalation")
ORDER = {name: i for i, name in enumerate(KINDS)}


@dataclass(frozen=True, slots=True)
class Entry:
    at: datetime
    kind: str
    text: str


def _incident_of(value: object) -> str | None:
    match value:
        case Incident():
            return value.id
        case Analysis() | ActionRequest() | ActionResult() | Escalation():
            return value.incident_id
        case ApprovalRequest():
            return value.action.incident_id
    return None


def _entry(value: object) -> Entry | None:
    match value:
        case Incident():
            names = ", ".join(value.firing_names) or "nothing"
            return Entry(
                value.updated_at,
                "incident",
                f"rev {value.revision} {value.status}, {value.severity}; firing: {names}",
            )
        case Analysis():
            acts = ", ".join(f"{a.type} {a.target.key}" for a in value.actions) or "no action"
            return Entry(
                value.created_at,
                "analysis",
                f"{value.analyzer} ({value.root_cause_class}, confidence "
                f"{value.confidence:.2f}): {value.root_cause}; recommends {acts}",
            )
        case ActionRequest():
            return Entry(
                value.requested_at,
                "action",
                f"{value.type} {value.target.key} requested (id {value.id})",
            )
        case ApprovalRequest():
            return Entry(
                value.created_at,
                "approval",
                f"{value.id} asked for {value.action.type} {value.action.target.key}, "
                f"expires {value.expires_at.isoformat()}",
            )
        case ActionResult():
            return Entry(
                value.finished_at,
                "result",
                f"{value.type} {value.target.key} {value.status}/{value.outcome}: {value.message}",
            )
        case Escalation():
            return Entry(value.at, "escalation", f"[{value.label}] {value.summary}")
    return None


def matching(query: str, values: Iterable[object]) -> list[str]:
    """The incident ids that ``query`` is, or is the start of (logs print 12 characters)."""
    ids = {i for v in values if (i := _incident_of(v)) is not None}
    if query in ids:
        return [query]
    return sorted(i for i in ids if i.startswith(query))


def timeline(incident_id: str, values: Iterable[object]) -> list[Entry]:
    """Everything about one incident, oldest first; a record read twice shows once."""
    found = {e for v in values if _incident_of(v) == incident_id and (e := _entry(v)) is not None}
    return sorted(found, key=lambda e: (e.at, ORDER[e.kind], e.text))


def latest(values: Iterable[object]) -> list[Incident]:
    """The latest revision of each incident, most recently updated first."""
    last: dict[str, Incident] = {}
    for v in values:
        if isinstance(v, Incident):
            held = last.get(v.id)
            if held is None or v.revision >= held.revision:
                last[v.id] = v
    return sorted(last.values(), key=lambda i: i.updated_at, reverse=True)


async def read_history(
    settings: Settings, seconds: float, names: Sequence[str] | None = None
) -> list[object]:
    """The values written to the named topics (default: all of :data:`SOURCES`) in the
    last ``seconds``."""
    prefix = settings.kafka.topic_prefix
    wanted = [(n, cls) for n, cls in SOURCES if names is None or n in names]
    reads = await asyncio.gather(
        *(recent(settings.kafka, topic(prefix, n), cls, seconds) for n, cls in wanted)
    )
    return [env.value for envs in reads for env in envs if env.value is not None]


async def show(settings: Settings, query: str, seconds: float) -> int:
    values = await read_history(settings, seconds)
    ids = matching(query, values)
    if not ids:
        raise PermanentError(f"no incident {query} in the last {seconds:.0f}s (--since)")
    if len(ids) > 1:
        raise PermanentError(f"{query} matches {len(ids)} incidents: {', '.join(ids)}")
    entries = timeline(ids[0], values)
    last = latest(values)
    head = next((i for i in last if i.id == ids[0]), None)
    print(f"incident {ids[0]} {head.key if head else '(its records are older)'}")
    for e in entries:
        print(f"{when(e.at)}  {e.kind:10}  {e.text}")
    return 0


async def list_incidents(settings: Settings, seconds: float, everything: bool) -> int:
    shown = [
        i
        for i in latest(await read_history(settings, seconds, ["incidents"]))
        if everything or i.status not in CLOSED_STATUSES
    ]
    if not shown:
        print("no open incidents" if not everything else "no incidents")
        return 0
    for i in shown:
        print(
            f"{i.id[:12]}  {i.status:10} {i.severity:8} {i.key}  opened {when(i.opened_at)}, "
            f"rev {i.revision}, {len(i.firing)} firing"
        )
    return 0


def cmd_incidents(args: argparse.Namespace) -> int:
    seconds = positive_duration(args.since, "--since")
    settings = load_settings(args.config)
    if args.incidents_command == "show":
        return asyncio.run(show(settings, args.id, seconds))
    return asyncio.run(list_incidents(settings, seconds, args.all))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``incidents`` on the top-level parser."""
    inc = sub.add_parser("incidents", help="incidents: list, show one's timeline")
    inc_sub = inc.add_subparsers(dest="incidents_command", required=True)
    ls = inc_sub.add_parser("list", help="the latest state of recent incidents (open ones)")
    ls.add_argument("--all", action="store_true", help="resolved and silenced ones too")
    sh = inc_sub.add_parser(
        "show", help="one incident's revisions, analyses, actions, results and escalations"
    )
    sh.add_argument("id", help="the incident id, or its first characters")
    for p in (ls, sh):
        p.add_argument("--since", default="24h", help="how far back to read (default 24h)")
        p.add_argument("--config", default=None)
    inc.set_defaults(func=cmd_incidents)
