"""``sre-agent approvals list|approve|reject`` and ``sre-agent actions list|undo|budget``.

Everything goes through Kafka, like any other client: the pending approvals are read from
the compacted approvals topic, a decision is an ApprovalDecision on the decisions topic
(keyed by the request id, carrying the request's action hash), an undo is an ActionRequest
on the actions topic (keyed by target, so it is serialized with the target's other
actions) executed by the executor with the executor's permissions. Nothing here talks to
Kubernetes.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import datetime

from agent.errors import PermanentError
from agent.metrics import Metrics
from agent.models import (
    ActionResult,
    ApprovalDecision,
    ApprovalRequest,
    BudgetClaim,
    Decision,
    new_id,
    utcnow,
)
from agent.policy import budget_usage
from agent.settings import Settings, load_settings
from agent.topics import topic
from handlers.executor import can_undo, still_pending, undo_request, undoable_result
from streams.bus import Bus
from streams.ledger import recent_claims
from streams.replay import end_offsets, follow, snapshot

FINAL = ("succeeded", "failed", "denied", "rejected", "dry_run", "duplicate")


async def pending_approvals(settings: Settings) -> dict[str, ApprovalRequest]:
    """Requests on the approvals topic that no tombstone has closed."""
    name = topic(settings.kafka.topic_prefix, "approvals")
    pending: dict[str, ApprovalRequest] = {}
    for env in await snapshot(settings.kafka, name, ApprovalRequest):
        if env.value is None and env.key:
            pending.pop(env.key, None)
        elif isinstance(env.value, ApprovalRequest):
            pending[env.value.id] = env.value
    return pending


async def results(settings: Settings) -> list[ActionResult]:
    name = topic(settings.kafka.topic_prefix, "action-results")
    envs = await snapshot(settings.kafka, name, ActionResult)
    out = [e.value for e in envs if isinstance(e.value, ActionResult)]
    return sorted(out, key=lambda r: r.finished_at)


async def _wait_result(
    settings: Settings, action_id: str, since: dict[int, int], wait_s: float
) -> ActionResult | None:
    found = await follow(
        settings.kafka,
        topic(settings.kafka.topic_prefix, "action-results"),
        ActionResult,
        since=since,
        # The same action asked again meanwhile (each re-analysis of the incident asks)
        # is recorded as a duplicate of the pending request: not what was decided.
        until=lambda r: r.action_id == action_id and r.status in FINAL and not still_pending(r),
        wait_s=wait_s,
    )
    return found if isinstance(found, ActionResult) else None


def when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


async def list_approvals(settings: Settings, now: datetime) -> int:
    pending = sorted((await pending_approvals(settings)).values(), key=lambda r: r.created_at)
    if not pending:
        print("no pending approvals")
        return 0
    for r in pending:
        expiry = "EXPIRED" if now > r.expires_at else f"expires {when(r.expires_at)}"
        a = r.action
        params = " ".join(f"{k}={v}" for k, v in sorted(a.params.items()))
        print(f"{r.id}  {a.type} {a.target.key} {params}".rstrip())
        print(f"    confidence {a.confidence:.2f}, {expiry}, hash {r.action_hash}")
        print(f"    why: {a.reason}")
        for e in r.evidence:
            print(f"    evidence: {e}")
    return 0


async def decide_approval(
    settings: Settings,
    request_id: str,
    decision: Decision,
    *,
    by: str,
    reason: str,
    wait_s: float,
) -> int:
    req = (await pending_approvals(settings)).get(request_id)
    if req is None:
        raise PermanentError(f"no pending approval request {request_id}")
    d = ApprovalDecision(
        id=new_id(),
        request_id=req.id,
        action_hash=req.action_hash,
        decision=decision,
        decided_by=by,
        decided_at=utcnow(),
        reason=reason,
    )
    since = await end_offsets(settings.kafka, topic(settings.kafka.topic_prefix, "action-results"))
    async with Bus(settings.kafka, metrics=Metrics(), name="cli") as bus:
        await bus.publish(bus.topic("decisions"), d)
    verb = "approved" if decision == "approve" else "rejected"
    print(f"{verb} {req.id} ({req.action.type} {req.action.target.key}) as {by}")
    done = REJECTED if decision == "reject" else DONE
    return await _report(settings, req.action.id, since, wait_s, done)


# Results that mean the command did what it asked. An approved action that comes back
# rejected was not executed (the approval was stale or expired): that is a failure.
DONE: frozenset[str] = frozenset({"succeeded", "duplicate"})
REJECTED = DONE | {"rejected"}  # what `approvals reject` asked for


async def _report(
    settings: Settings,
    action_id: str,
    since: dict[int, int],
    wait_s: float,
    done: frozenset[str] = DONE,
) -> int:
    if wait_s <= 0:
        return 0
    result = await _wait_result(settings, action_id, since, wait_s)
    if result is None:
        print(f"no result for action {action_id} within {wait_s:.0f}s", file=sys.stderr)
        return 1
    if result.status in done:
        print(f"{result.status}: {result.message}")
        return 0
    print(f"{result.status}: {result.message}", file=sys.stderr)
    return 1


async def list_actions(settings: Settings, limit: int) -> int:
    for r in (await results(settings))[-limit:]:
        undo = " [undoable]" if can_undo(r) else ""
        print(
            f"{when(r.finished_at)}  {r.action_id}  {r.type:16} {r.target.key}  "
            f"{r.status}/{r.outcome}{undo}: {r.message}"
        )
    return 0


async def show_budget(settings: Settings, now: datetime) -> int:
    """What the replicas' claims say is spent of the hourly budgets, and the node actions
    in flight (see streams.ledger)."""
    rem = settings.remediation
    name = topic(settings.kafka.topic_prefix, "budget-claims")
    claims = [e.value for e in await recent_claims(settings.kafka, name, rem)]
    usage = budget_usage([c for c in claims if isinstance(c, BudgetClaim)], rem, now)
    print(f"all namespaces: {usage.spent} of {rem.max_actions_per_hour} actions in the last hour")
    for ns, n in sorted(usage.by_namespace.items()):
        print(f"namespace {ns}: {n} of {rem.max_actions_per_namespace_per_hour}")
    for node, c in sorted(usage.nodes_in_flight.items()):
        print(f"node {node}: action {c.action_id} in flight since {when(c.at)} ({c.by})")
    return 0


async def undo_action(
    settings: Settings, ident: str, *, by: str, reason: str, wait_s: float
) -> int:
    original = undoable_result(await results(settings), ident)
    if original is None:
        raise PermanentError(f"no result of action {ident} records a prior state to restore")
    action = undo_request(original, requested_by=by, now=utcnow(), reason=reason)
    since = await end_offsets(settings.kafka, topic(settings.kafka.topic_prefix, "action-results"))
    async with Bus(settings.kafka, metrics=Metrics(), name="cli") as bus:
        await bus.publish(bus.topic("actions"), action)
    what = f"{original.type} {original.target.key}"
    print(f"requested undo {action.id} of {original.action_id} ({what})")
    return await _report(settings, action.id, since, wait_s)


def cmd_approvals(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.approvals_command == "list":
        return asyncio.run(list_approvals(settings, utcnow()))
    decision: Decision = "approve" if args.approvals_command == "approve" else "reject"
    return asyncio.run(
        decide_approval(
            settings, args.id, decision, by=args.by, reason=args.reason, wait_s=args.wait
        )
    )


def cmd_actions(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.actions_command == "list":
        return asyncio.run(list_actions(settings, args.limit))
    if args.actions_command == "budget":
        return asyncio.run(show_budget(settings, utcnow()))
    return asyncio.run(
        undo_action(settings, args.id, by=args.by, reason=args.reason, wait_s=args.wait)
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``approvals`` and ``actions`` on the top-level parser."""
    ap = sub.add_parser("approvals", help="pending approvals: list, approve, reject")
    ap_sub = ap.add_subparsers(dest="approvals_command", required=True)
    ls = ap_sub.add_parser("list", help="requests waiting for a decision")
    ls.add_argument("--config", default=None)
    for verb in ("approve", "reject"):
        p = ap_sub.add_parser(verb, help=f"{verb} a pending request (by its id)")
        _decision_args(p, wait_default=30.0 if verb == "approve" else 0.0)
    ap.set_defaults(func=cmd_approvals)

    act = sub.add_parser("actions", help="action results: list, undo; the hourly budgets")
    act_sub = act.add_subparsers(dest="actions_command", required=True)
    al = act_sub.add_parser("list", help="the latest action results")
    al.add_argument("--limit", type=int, default=20)
    al.add_argument("--config", default=None)
    undo = act_sub.add_parser("undo", help="restore the prior state an action recorded")
    _decision_args(undo, wait_default=60.0)
    bud = act_sub.add_parser(
        "budget", help="the hourly budgets spent, and node actions in flight, by every replica"
    )
    bud.add_argument("--config", default=None)
    act.set_defaults(func=cmd_actions)


def _decision_args(p: argparse.ArgumentParser, *, wait_default: float) -> None:
    p.add_argument("id")
    p.add_argument("--by", default=login_name(), help="who decides (default: the login name)")
    p.add_argument("--reason", default="")
    p.add_argument(
        "--wait",
        type=float,
        default=wait_default,
        help="seconds to wait for the action's result (0: do not wait)",
    )
    p.add_argument("--config", default=None)


def login_name() -> str:
    """Who runs the command, for --by: the login name, else "cli"."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"
