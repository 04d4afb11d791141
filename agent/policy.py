"""Remediation policy: a pure function from (action, history, switches, now) to a verdict.

Order of the rules (first match wins), safety rules before convenience rules:

1. ``remediation.enabled`` false            -> deny
2. kill switch on                           -> deny (stops all execution at once)
3. namespace denied / not allowed           -> deny
4. mode ``manual``                          -> deny (the agent only recommends)
5. same target acted on within ``cooldown`` -> deny
6. the hourly action budget is spent        -> deny
7. already approved by a human              -> execute
8. mode ``supervised``                      -> approval
9. the action type requires approval        -> approval
10. confidence below the threshold          -> approval
11. otherwise                               -> execute

Shadow mode (``dry_run``) turns every "execute" into "dry_run": decided and recorded,
never applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from agent.models import ActionRequest
from agent.settings import Settings

VerdictKind = Literal["execute", "approve", "deny", "dry_run"]


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Executed:
    """An action that touched the cluster, as the policy remembers it."""

    target_key: str
    namespace: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Switches:
    """Run-time switches; they override the file so an operator can act without a restart."""

    kill_switch: bool = False
    dry_run: bool = False


def decide(
    action: ActionRequest,
    settings: Settings,
    history: Sequence[Executed],
    switches: Switches,
    now: datetime,
) -> Verdict:
    rem = settings.remediation
    ns = action.target.namespace
    if not rem.enabled:
        return Verdict("deny", "remediation.enabled", "remediation is disabled")
    if switches.kill_switch or settings.agent.kill_switch:
        return Verdict("deny", "kill_switch", "the kill switch is on: no action executes")
    if ns and ns in rem.denied_namespaces:
        return Verdict("deny", "denied_namespaces", f"namespace {ns!r} is denied")
    if ns and rem.allowed_namespaces and ns not in rem.allowed_namespaces:
        return Verdict("deny", "allowed_namespaces", f"namespace {ns!r} is not allowed")
    if settings.agent.mode == "manual":
        return Verdict("deny", "mode.manual", "manual mode: recommendation only")
    cooldown_start = now - timedelta(seconds=rem.cooldown)
    recent = [h for h in history if h.target_key == action.target.key and h.at > cooldown_start]
    if recent:
        last = max(h.at for h in recent)
        return Verdict(
            "deny",
            "cooldown",
            f"{action.target.key} was acted on at {last.isoformat()}, "
            f"within the {rem.cooldown:.0f}s cooldown",
        )
    hour_ago = now - timedelta(hours=1)
    spent = sum(1 for h in history if h.at > hour_ago)
    if spent >= rem.max_actions_per_hour:
        return Verdict(
            "deny", "max_actions_per_hour", f"{spent} actions in the last hour (budget reached)"
        )
    shadow = switches.dry_run or settings.agent.dry_run
    go: VerdictKind = "dry_run" if shadow else "execute"
    if action.approved_by:
        return Verdict(go, "approved", f"approved by {action.approved_by}")
    if settings.agent.mode == "supervised":
        return Verdict("approve", "mode.supervised", "supervised mode: every action is approved")
    if action.type in rem.require_approval:
        return Verdict("approve", "require_approval", f"{action.type} requires approval")
    if action.confidence < rem.confidence_threshold:
        return Verdict(
            "approve",
            "confidence_threshold",
            f"confidence {action.confidence:.2f} < threshold {rem.confidence_threshold:.2f}",
        )
    return Verdict(go, "autonomous", f"confidence {action.confidence:.2f} meets the threshold")
