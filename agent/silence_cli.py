"""`sre-agent silence add|list|expire`: silences as records on the silences topic."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from datetime import datetime, timedelta

from agent import models
from agent.codec import decode, encode
from agent.errors import ConfigError, InvalidEvent
from agent.metrics import Metrics
from agent.models import Matcher, Silence, new_id, utcnow
from agent.settings import Settings, load_settings, positive_duration
from streams.bus import Bus, create_topics
from streams.silences import SilenceStore


def parse_matcher(text: str) -> Matcher:
    """'service=checkout', 'namespace=~shop-.*', 'env!=dev' -> Matcher (validated)."""
    try:
        return models.parse_matcher(text)
    except ValueError as err:
        raise ConfigError([str(err)]) from err


def describe(s: Silence, now: datetime) -> str:
    state = "active" if s.active(now) else ("pending" if s.starts_at > now else "expired")
    matchers = ",".join(f"{m.name}{m.op}{m.value}" for m in s.matchers)
    return (
        f"{s.id}  {state:8} {matchers}  {s.starts_at:%Y-%m-%dT%H:%M:%SZ} -> "
        f"{s.ends_at:%Y-%m-%dT%H:%M:%SZ}  by {s.created_by}: {s.comment}"
    )


async def _store(settings: Settings) -> SilenceStore:
    await create_topics(settings.kafka, ["silences"])
    store = SilenceStore(settings.kafka, f"{settings.kafka.topic_prefix}silences")
    await store.start()
    return store


async def _publish(settings: Settings, silence: Silence) -> None:
    async with Bus(settings.kafka, metrics=Metrics(), name="cli") as bus:
        await bus.publish(bus.topic("silences"), silence)


# The flag each field of a Silence comes from, to name it in an error.
_FLAGS = {
    "matchers": "--matcher",
    "starts_at": "--start",
    "ends_at": "--duration",
    "created_by": "--author",
    "comment": "--comment",
}


def new_silence(
    sid: str,
    matchers: tuple[Matcher, ...],
    start: datetime,
    seconds: float,
    author: str,
    comment: str,
    now: datetime,
) -> Silence:
    """The silence to publish, validated as every reader validates it: one they would drop
    as invalid is refused here, naming the flag, instead of printing an id that does
    nothing."""
    if all(m.matches({}) for m in matchers):
        # Alertmanager's rule: such a silence also matches every anomaly without the label.
        shown = ", ".join(f"{m.name}{m.op}{m.value}" for m in matchers)
        raise ConfigError(
            [
                f"--matcher: {shown} also matches an anomaly without the label, so it would "
                "silence nearly everything; at least one matcher must not match the empty "
                "string (e.g. service=checkout)"
            ]
        )
    raw = Silence(
        id=sid,
        matchers=matchers,
        starts_at=start,
        ends_at=start + timedelta(seconds=seconds),
        created_by=author,
        comment=comment,
        created_at=now,
    )
    try:
        return decode(Silence, encode(raw))
    except InvalidEvent as err:
        raise ConfigError([_flagged(p) for p in err.problems]) from err


def _flagged(problem: str) -> str:
    field = problem.split(".", 1)[0].split("[", 1)[0].split(":", 1)[0]
    flag = _FLAGS.get(field)
    return f"{flag} ({problem})" if flag else problem


async def add(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    matchers = tuple(parse_matcher(m) for m in args.matcher)
    seconds = positive_duration(args.duration, "--duration")
    now = utcnow()
    start = datetime.fromisoformat(args.start) if args.start else now
    if start.tzinfo is None:
        raise ConfigError(["--start: must carry a timezone, e.g. 2026-01-01T10:00:00Z"])
    silence = new_silence(new_id(), matchers, start, seconds, args.author, args.comment, now)
    await create_topics(settings.kafka, ["silences"])
    await _publish(settings, silence)
    print(silence.id)
    return 0


async def list_(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store = await _store(settings)
    try:
        now = utcnow()
        for s in sorted(store.all(), key=lambda s: s.starts_at):
            if args.all or s.ends_at > now:
                print(describe(s, now))
    finally:
        await store.stop()
    return 0


async def expire(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store = await _store(settings)
    try:
        current = store.silences.get(args.id)
    finally:
        await store.stop()
    if current is None:
        raise ConfigError([f"silence {args.id}: no such silence"])
    now = utcnow()
    if current.ends_at <= now:
        print(f"{args.id} already expired")
        return 0
    await _publish(settings, ended(current, now))
    print(f"{args.id} expired")
    return 0


def ended(silence: Silence, now: datetime) -> Silence:
    """``silence`` expired at ``now``: active no more from now on, listed as expired. One
    still pending ends before it ever took effect: it used to end a millisecond after its
    start, so it still silenced then and stayed listed as pending until it did (a window
    must not be empty, so it spans the microsecond before now)."""
    if silence.starts_at < now:
        return replace(silence, ends_at=now)
    return replace(silence, starts_at=now - timedelta(microseconds=1), ends_at=now)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sil = sub.add_parser("silence", help="silences: matched anomalies are recorded, not acted on")
    sil_sub = sil.add_subparsers(dest="silence_command", required=True)
    a = sil_sub.add_parser("add", help="add a silence; prints its id")
    a.add_argument(
        "-m",
        "--matcher",
        action="append",
        required=True,
        help="NAME=VALUE, NAME!=VALUE, NAME=~REGEX or NAME!~REGEX (repeatable); NAME is a "
        "label, or alertname, severity or source",
    )
    a.add_argument("--duration", default="2h", help="e.g. 30m, 2h (default 2h)")
    a.add_argument("--start", default=None, help="ISO time with zone (default now)")
    a.add_argument("--author", required=True)
    a.add_argument("--comment", required=True)
    a.add_argument("--config", default=None)
    a.set_defaults(func=lambda ns: asyncio.run(add(ns)))
    ls = sil_sub.add_parser("list", help="active and pending silences")
    ls.add_argument("--all", action="store_true", help="include expired ones")
    ls.add_argument("--config", default=None)
    ls.set_defaults(func=lambda ns: asyncio.run(list_(ns)))
    ex = sil_sub.add_parser("expire", help="end a silence now")
    ex.add_argument("id")
    ex.add_argument("--config", default=None)
    ex.set_defaults(func=lambda ns: asyncio.run(expire(ns)))
