"""The action consumer: policy, execution, approvals and verification.

Consumes ``actions`` (keyed by target, so one target's actions are serialized),
``approvals`` (to know what is pending, so approvals survive restarts) and ``decisions``.
Each action ends in an :class:`ActionResult`; the input offset is committed by the consumer
only after that result is durable.

Effect-once: the cluster adapter records the action id on the target in the same write that
acts, and reports a repeat as not applied (result ``duplicate``). Verification re-runs the
triggering patterns after ``verify_after`` and publishes a second result for the same
action id with the outcome (healed / not_healed / unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent.errors import ActionFailed, AgentError
from agent.metrics import Metrics
from agent.models import (
    ActionRequest,
    ActionResult,
    ApprovalDecision,
    ApprovalRequest,
    Outcome,
    ResultStatus,
    new_id,
    stable_id,
    utcnow,
)
from agent.policy import Executed, Switches, Verdict, decide
from agent.prom import PromClient
from handlers.cluster import Cluster, Effect
from streams.bus import Bus, Envelope

log = logging.getLogger(__name__)

METRIC_RESULT: dict[str, str] = {
    "succeeded": "success",
    "failed": "failure",
    "denied": "denied",
    "pending_approval": "pending_approval",
    "rejected": "rejected",
    "dry_run": "dry_run",
    "duplicate": "duplicate",
}


def still_firing(samples_labels: Sequence[dict[str, str]], labels: dict[str, str]) -> bool:
    """Does any series of the re-checked condition belong to the action's service?"""
    keys = [k for k in ("namespace", "service") if labels.get(k)]
    return any(all(s.get(k) == labels[k] for k in keys) for s in samples_labels)


class Executor:
    def __init__(
        self,
        settings: Any,
        *,
        bus: Bus,
        cluster: Cluster,
        metrics: Metrics,
        prom: PromClient | None = None,
        switches: Callable[[], Switches] | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.cluster = cluster
        self.metrics = metrics
        self.prom = prom
        self.switches = switches or (lambda: Switches())
        self.history: list[Executed] = []
        self.pending: dict[str, ApprovalRequest] = {}
        self._verifications: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        tasks = list(self._verifications)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # --- intake ----------------------------------------------------------------------------------
    async def handle(self, batch: Sequence[Envelope]) -> None:
        for env in batch:
            value = env.value
            if value is None and env.key:  # tombstone: the approval was decided elsewhere
                self.pending.pop(env.key, None)
            elif isinstance(value, ApprovalRequest):
                self.pending[value.id] = value
            elif isinstance(value, ApprovalDecision):
                await self.on_decision(value)
            elif isinstance(value, ActionRequest):
                await self.on_action(value)

    async def on_action(self, action: ActionRequest) -> ActionResult:
        now = utcnow()
        verdict = decide(action, self.settings, self.history, self.switches(), now)
        if verdict.kind == "execute":
            return await self._execute(action, verdict, now)
        if verdict.kind == "approve":
            return await self._request_approval(action, verdict, now)
        status: ResultStatus = "dry_run" if verdict.kind == "dry_run" else "denied"
        message = (
            f"would have executed {action.type} on {action.target.key} ({verdict.reason})"
            if status == "dry_run"
            else f"{verdict.rule}: {verdict.reason}"
        )
        return await self._record(action, status, "not_applicable", message, now)

    async def on_decision(self, d: ApprovalDecision) -> None:
        req = self.pending.get(d.request_id)
        if req is None:
            await self._reject_decision(d, f"unknown approval request {d.request_id}")
            return
        if d.action_hash != req.action_hash:
            await self._reject_decision(d, "action hash does not match the request")
            return
        now = utcnow()
        del self.pending[d.request_id]
        await self.bus.publish(self.bus.topic("approvals"), None, key=req.id)  # tombstone
        if now > req.expires_at:
            await self._record(
                req.action,
                "rejected",
                "not_applicable",
                f"approval expired at {req.expires_at.isoformat()}",
                now,
            )
            return
        if d.decision == "reject":
            await self._record(
                req.action,
                "rejected",
                "not_applicable",
                f"rejected by {d.decided_by}: {d.reason}",
                now,
            )
            return
        await self.on_action(replace(req.action, approved_by=d.decided_by))

    async def _reject_decision(self, d: ApprovalDecision, reason: str) -> None:
        await self.bus.dead_letter(
            source_topic=self.bus.topic("decisions"),
            raw=d.id.encode(),
            error=f"decision {d.id} by {d.decided_by} refused: {reason}",
            consumer="executor",
        )

    # --- outcomes --------------------------------------------------------------------------------
    async def _execute(
        self, action: ActionRequest, verdict: Verdict, now: datetime
    ) -> ActionResult:
        try:
            effect = await self._apply(action, now)
        except AgentError as err:
            return await self._record(action, "failed", "unknown", str(err), now)
        if not effect.applied:
            return await self._record(action, "duplicate", "unknown", effect.message, now)
        self.history.append(
            Executed(target_key=action.target.key, namespace=action.target.namespace, at=now)
        )
        result = await self._record(
            action,
            "succeeded",
            "unknown",
            f"{effect.message} [{verdict.rule}]",
            now,
            prior=effect.prior_state,
        )
        self._schedule_verification(action, result)
        return result

    async def _apply(self, action: ActionRequest, now: datetime) -> Effect:
        t = action.target
        if action.type == "rollback":
            rev = action.params.get("revision")
            return await self.cluster.rollback(
                t, action_id=action.id, to_revision=int(rev) if rev is not None else None
            )
        if action.type in ("scale_up", "scale_down"):
            current = (await self.cluster.workload(t)).replicas
            return await self.cluster.scale(
                t, action_id=action.id, replicas=target_replicas(action, current)
            )
        if action.type == "restart_workload":
            return await self.cluster.restart(t, action_id=action.id, at=now)
        raise ActionFailed(f"{action.type} is not supported by this cluster adapter")

    async def _request_approval(
        self, action: ActionRequest, verdict: Verdict, now: datetime
    ) -> ActionResult:
        req = ApprovalRequest(
            id=stable_id("approval", action.id),
            action=action,
            action_hash=action.digest(),
            root_cause=action.reason,
            evidence=(verdict.reason,),
            created_at=now,
            expires_at=now + timedelta(seconds=self.settings.remediation.approval_ttl),
        )
        self.pending[req.id] = req
        await self.bus.publish(self.bus.topic("approvals"), req)
        return await self._record(
            action,
            "pending_approval",
            "not_applicable",
            f"approval {req.id} requested: {verdict.reason}",
            now,
        )

    async def _record(
        self,
        action: ActionRequest,
        status: ResultStatus,
        outcome: Outcome,
        message: str,
        started: datetime,
        prior: Any = None,
    ) -> ActionResult:
        result = ActionResult(
            id=new_id(),
            action_id=action.id,
            incident_id=action.incident_id,
            incident_key=action.incident_key,
            type=action.type,
            target=action.target,
            status=status,
            outcome=outcome,
            message=message,
            started_at=started,
            finished_at=utcnow(),
            prior_state=prior or {},
            service=action.labels.get("service", ""),
        )
        await self.bus.publish(self.bus.topic("action-results"), result)
        self.metrics.remediation.labels(
            service=result.service, action=action.type, result=METRIC_RESULT[status]
        ).inc()
        log.info("action %s %s on %s: %s", action.type, status, action.target.key, message)
        return result

    # --- verification ----------------------------------------------------------------------------
    def _schedule_verification(self, action: ActionRequest, result: ActionResult) -> None:
        task = asyncio.create_task(self._verify(action, result), name=f"verify-{action.id}")
        self._verifications.add(task)
        task.add_done_callback(self._verifications.discard)

    async def verify_now(self, action: ActionRequest) -> tuple[Outcome, str]:
        if self.prom is None or not action.trigger:
            return "unknown", "no condition to re-check"
        for name in action.trigger:
            pattern = self.settings.pattern(name)
            if pattern is None:
                return "unknown", f"pattern {name} no longer configured"
            try:
                samples = await self.prom.query(pattern.condition)
            except AgentError as err:
                return "unknown", f"re-check of {name} failed: {err}"
            if still_firing([dict(s.labels) for s in samples], dict(action.labels)):
                return "not_healed", f"{name} still firing after the action"
        return "healed", f"{', '.join(action.trigger)} cleared"

    async def _verify(self, action: ActionRequest, result: ActionResult) -> None:
        await asyncio.sleep(self.settings.remediation.verify_after)
        outcome, message = await self.verify_now(action)
        verified = replace(
            result, id=new_id(), outcome=outcome, message=message, finished_at=utcnow()
        )
        await self.bus.publish(self.bus.topic("action-results"), verified)
        self.metrics.verification.labels(
            service=result.service, action=action.type, outcome=outcome
        ).inc()
        if outcome != "healed":
            log.error("ESCALATE: %s on %s: %s", action.type, action.target.key, message)
        else:
            log.info("verified %s on %s: %s", action.type, action.target.key, message)


def target_replicas(action: ActionRequest, current: int) -> int:
    """'+2' / '-1' relative, '5' absolute; default one step in the action's direction."""
    raw = str(action.params.get("replicas", "+1" if action.type == "scale_up" else "-1"))
    n = int(raw)
    value = current + n if raw.startswith(("+", "-")) else n
    return max(0, value)


def kill_switch_file(path: str) -> Callable[[], Switches]:
    """Switches read at each decision: touching the file stops execution immediately."""

    def read() -> Switches:
        return Switches(kill_switch=bool(path) and Path(path).exists())

    return read
