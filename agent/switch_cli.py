"""``sre-agent switches status|kill|dry-run``: run-time switches for every executor replica.

A change is a SwitchChange on the compacted, single-partition switches topic, keyed by the
switch's name. Every executor replica reads that topic outside its consumer group and waits
until it has read everything published before it decides an action, so an action decided
after ``sre-agent switches kill on`` returns is denied, on every replica, with no restart
and no file to place in each pod. ``--namespace`` scopes a switch to one namespace's
targets (a change freeze). The settings (``agent.kill_switch``, ``agent.dry_run``)
and the kill-switch file still work; a switch is on when any of them turns it on, so this
command cannot turn off what the settings or the file turned on.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import get_args

from agent.codec import from_obj
from agent.metrics import Metrics
from agent.models import SwitchChange, SwitchName, new_id, utcnow
from agent.remediation_cli import login_name
from agent.settings import Settings, load_settings
from agent.topics import topic
from streams.bus import Bus
from streams.replay import snapshot

NAMES: dict[str, SwitchName] = {"kill": "kill_switch", "dry-run": "dry_run"}


async def latest(settings: Settings) -> dict[str, SwitchChange]:
    """The last change of each switch and scope on the topic, by key."""
    name = topic(settings.kafka.topic_prefix, "switches")
    out: dict[str, SwitchChange] = {}
    for env in await snapshot(settings.kafka, name, SwitchChange):
        if isinstance(env.value, SwitchChange):
            out[env.value.key] = env.value
    return out


def status_lines(changes: dict[str, SwitchChange]) -> list[str]:
    """Each cluster-wide switch, then each namespace's that was ever set."""
    lines = []
    for switch in get_args(SwitchName):
        change = changes.get(switch)
        if change is None:
            lines.append(f"{switch}: off (never set on the switches topic)")
        else:
            lines.append(f"{switch}: {'ON' if change.on else 'off'}, {change.describe()}")
    scoped = sorted((c for c in changes.values() if c.namespace), key=lambda c: c.key)
    for c in scoped:
        lines.append(f"{c.name} in {c.namespace}: {'ON' if c.on else 'off'}, {c.describe()}")
    return lines


async def show(settings: Settings) -> int:
    for line in status_lines(await latest(settings)):
        print(line)
    print("(agent.kill_switch, agent.dry_run and the kill-switch file are per replica)")
    return 0


async def set_switch(
    settings: Settings, name: SwitchName, on: bool, *, by: str, reason: str, namespace: str = ""
) -> int:
    # Validated here: a bad namespace is named before anything is published.
    change = from_obj(
        SwitchChange,
        {
            "id": new_id(),
            "name": name,
            "on": on,
            "by": by,
            "reason": reason,
            "at": utcnow(),
            "namespace": namespace,
        },
    )
    async with Bus(settings.kafka, metrics=Metrics(), name="cli") as bus:
        await bus.publish(bus.topic("switches"), change)
    print(f"{name} {change.describe()}")
    return 0


def cmd_switches(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.switches_command == "status":
        return asyncio.run(show(settings))
    name = NAMES[args.switches_command]
    on = args.state == "on"
    return asyncio.run(
        set_switch(settings, name, on, by=args.by, reason=args.reason, namespace=args.namespace)
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sw = sub.add_parser(
        "switches", help="run-time switches for every executor replica: status, kill, dry-run"
    )
    sw_sub = sw.add_subparsers(dest="switches_command", required=True)
    st = sw_sub.add_parser("status", help="each switch's last change on the switches topic")
    st.add_argument("--config", default=None)
    for command, what in (
        ("kill", "the kill switch: no action executes while it is on"),
        ("dry-run", "shadow mode: actions are decided and recorded, never applied"),
    ):
        p = sw_sub.add_parser(command, help=what)
        p.add_argument("state", choices=["on", "off"])
        p.add_argument("--by", default=login_name(), help="who (default: the login name)")
        p.add_argument("--reason", default="", help="why, shown with every denied action")
        p.add_argument(
            "--namespace",
            default="",
            help="only the targets in this namespace (a change freeze); default: all",
        )
        p.add_argument("--config", default=None)
    sw.set_defaults(func=cmd_switches)
