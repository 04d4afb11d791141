"""The action consumer: policy, execution, approvals, verification and undo.

Consumes ``actions`` (keyed by target, so one target's actions are serialized) and
``decisions`` in the group; every replica also reads all of ``approvals`` (to know what is
pending, whoever asked) and ``incidents`` (to know which incidents are closed). Each action
ends in an :class:`ActionResult`; the input offset is committed by the consumer only after
that result is durable.

Policy runs twice: first without cluster facts (kill switch, namespaces, mode, cooldown,
budgets: no blast-radius read for a denied action), then with the blast-radius facts read
from the cluster (:meth:`Cluster.footprint`). Before either, one read of the target
(:meth:`Cluster.applied`) tells whether an earlier delivery already took effect: such a
redelivery is recorded, never judged by the state it left (policy rule 0).

Effect-once: the cluster adapter records the action id on the target in the same
conditional write that acts, and reports a repeat as not applied. A repeat whose result is
known is a ``duplicate``; one without (a delivery died between acting and recording) is
recorded as the executed action it was, with the prior state the write noted on the target
(so it can be undone), and verified.
Transient cluster errors are retried here a few times; the retry is safe for the same
reason.

Approvals: a request pins the target's version (:meth:`Cluster.version`) and expires after
``approval_ttl``. The pending set is rebuilt at start from the compacted approvals topic, so
approvals survive restarts, and then follows that topic outside the group, so the replica
that owns a decision's partition knows its request whoever asked. A decision executes only
if it names a pending request and its action hash, is not dated before the request, and
comes before the expiry, while the target is unchanged and the incident still open; a
decision for an unknown request (once this replica has read every request published before
it), with the wrong hash or dated before the request (one for an earlier request of the
same action, redelivered or replayed) is dead-lettered with the reason; an expired, stale
or rejected one ends in a ``rejected`` result saying why, unless its action's id is
already on the target (carried out, then the executor died): that is recorded as the
success it was; or a drain begun and cut half way (:meth:`Cluster.partly_applied`; past
the expiry, only one begun after the request, as the approval's own cordon would be):
that is resumed, under every rule, and one a rule stops pages a person (as any drain cut
half way and then stopped does). The approval is
tombstoned only after the action's result is out, so a crash in between re-runs the
decision, and the action id makes that harmless. Requests that expire undecided are
escalated by a sweeper, on the one replica that owns the request's decisions partition
(see :attr:`Executor.owns`): every replica knows every request, and one expiry is enough.
A decision, the expiry and a withdrawal each claim the request before their first await,
so a request has one outcome.

Verification re-checks after ``verify_after``: the triggering patterns on Prometheus, each
where it fired, and the target's state in the cluster (:mod:`handlers.verification`); a
second result for the same action id carries the outcome (healed / not_healed / worse /
unknown); anything but healed is escalated. It runs in the background: each of its steps
is retried with a bounded backoff, and one that still fails is logged and counted, never
lost silently.

Undo (``sre-agent actions undo``): a new action of the same type with ``undo_of`` and the
original's ``prior_state`` as params, executed like any other (policy, idempotency, result).
Its ``approved_by`` stands only if it restores a prior state this executor knows; on any
other request from the actions topic, ``approved_by`` is ignored (see
:func:`agent.policy.unearned_approval`): approvals come through the decisions topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from agent.alertmanager_api import AlertmanagerAPI
from agent.budget import backoff_delay
from agent.codec import encode
from agent.errors import ActionFailed, AgentError, PermanentError, TransientError
from agent.labels import normalise
from agent.memory import remember
from agent.metrics import Metrics
from agent.models import (
    CLOSED_STATUSES,
    FOLLOW_UPS,
    INFORMATIONAL_REASONS,
    ActionRequest,
    ActionResult,
    Anomaly,
    ApprovalDecision,
    ApprovalRequest,
    Escalation,
    EscalationReason,
    Incident,
    Mitigation,
    Outcome,
    ResultStatus,
    SwitchChange,
    new_id,
    stable_id,
    utcnow,
)
from agent.policy import (
    BUDGET_WINDOW,
    DISRUPTIVE_ACTIONS,
    NODE_ACTIONS,
    SCALE_ACTIONS,
    UNDO_PARAM,
    Executed,
    Facts,
    PriorState,
    Switches,
    Verdict,
    bounded_replicas,
    decide,
    drain_params,
    halt_reason,
    held_back,
    history_window,
    learned,
    merged,
    moved_from,
    revision_param,
    scale_problem,
    switches_for,
    undo_param_problem,
    undo_params,
    undo_scale_problem,
    unearned_approval,
    unknown_undo,
)
from agent.prom import PromClient
from agent.settings import RemediationSection
from handlers.cluster import (
    UNDOABLE,
    Cluster,
    Effect,
    Observation,
    PartialFailure,
    rollback_choice,
    rolled_back_from,
)
from handlers.verification import (
    fires_at,
    judge,
    partial_reply,
    plan_recheck,
    recheck_verdict,
    reported,
    to_recheck,
)
from streams.bus import Envelope, handle_each
from streams.replay import RecentSource

_P = ParamSpec("_P")
_R = TypeVar("_R")

log = logging.getLogger(__name__)

# sre_agent_remediation_total counts executed actions only, under the reference's labels,
# so its success / all is a success rate; a result that executed nothing (pending_approval,
# denied, rejected, dry_run, duplicate) goes to sre_agent_remediation_decisions_total.
EXECUTED_RESULT: dict[str, str] = {"succeeded": "success", "failed": "failure"}
TRANSIENT_ATTEMPTS = 3
# A verification's steps are retried this often, backing off from 1 s to at most 60 s
# (about two minutes in all: a broker restart), before it is given up, loudly.
VERIFY_ATTEMPTS = 8
VERIFY_BACKOFF = (1.0, 60.0)


class Publisher(Protocol):
    """What the executor needs of the bus (streams.bus.Bus)."""

    def topic(self, name: str) -> str: ...

    async def publish(self, topic_name: str, event: Any, key: str | None = None) -> None: ...

    async def dead_letter(
        self,
        *,
        source_topic: str,
        raw: bytes | None,
        error: str,
        consumer: str,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None: ...


ApprovalSource = Callable[[], Awaitable[Iterable[Envelope]]]
# Waits up to the given seconds until every incident published before the call has been
# handed to Executor.on_incidents; False if that did not happen in time.
CaughtUp = Callable[[float], Awaitable[bool]]
# The anomalies reported for a correlation group (its key) since a moment.
ReportSource = Callable[[str, datetime], Awaitable[list[Anomaly]]]


class BudgetArbiter(Protocol):
    """Settles the hourly budgets between replicas (streams.ledger.BudgetLedger)."""

    async def claim(
        self, action: ActionRequest, now: datetime, cordoned: tuple[str, ...] = ()
    ) -> Verdict | None: ...

    async def release(self, action: ActionRequest, now: datetime) -> None: ...

    async def done(self, action: ActionRequest, now: datetime) -> None: ...

    async def stop(self) -> None: ...


# How long an action waits for the executor watch (incidents, action results) to catch up
# before it is retried.
CATCH_UP_WAIT = 5.0


def replay_window(remediation: RemediationSection) -> float:
    """Seconds of incidents the executor replays at start: long enough for any action or
    approval that can still arrive for them (the repeat window is the policy's memory of
    outcomes, not of incidents)."""
    return max(remediation.approval_ttl, remediation.cooldown, BUDGET_WINDOW)


class Executor:
    def __init__(
        self,
        settings: Any,
        *,
        bus: Publisher,
        cluster: Cluster,
        metrics: Metrics,
        prom: PromClient | None = None,
        alertmanager: AlertmanagerAPI | None = None,
        switches: Callable[[], Switches] | None = None,
        approvals: ApprovalSource | None = None,
        results: RecentSource | None = None,
        actions: RecentSource | None = None,
        incidents: RecentSource | None = None,
        watch_read: CaughtUp | None = None,
        switch_log: ApprovalSource | None = None,
        reports: ReportSource | None = None,
        budget: BudgetArbiter | None = None,
        sweep_interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.cluster = cluster
        self.metrics = metrics
        self.prom = prom
        self.alertmanager = alertmanager
        self.switches = switches or (lambda: Switches())
        # The latest change of each switch on the switches topic, with its offset: the
        # replay at start and the watch overlap, and an older record must not win.
        self.remote_switches: dict[str, tuple[int, SwitchChange]] = {}
        self._switch_log = switch_log
        # Read at scrape time, so a dashboard shows a switch the moment any source sets it.
        metrics.switch_on.labels(switch="kill_switch", namespace="").set_function(
            lambda: float(self.current_switches().kill_switch or settings.agent.kill_switch)
        )
        metrics.switch_on.labels(switch="dry_run", namespace="").set_function(
            lambda: float(self.current_switches().dry_run or settings.agent.dry_run)
        )
        # Executed actions by action id, of every replica (see on_results): the policy's
        # memory for cooldowns, budgets and repeats.
        self.history: dict[str, Executed] = {}
        # The prior states executed actions recorded, by action id, of every replica: what
        # an undo read from the actions topic must restore for its approval to stand.
        self.prior_states: OrderedDict[str, tuple[PriorState, ...]] = OrderedDict()
        self.pending: dict[str, ApprovalRequest] = {}
        # incident id -> (latest revision seen, whether it is closed): fed by a reader of
        # every partition of the incidents topic (see on_incidents), since an action and
        # its incident's resolution are on partitions another replica may own.
        self.incidents: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        self._held: OrderedDict[str, None] = OrderedDict()  # actions escalated as denied
        # Actions paged as left half done by an earlier delivery and stopped by a rule.
        self._left_half_done: OrderedDict[str, None] = OrderedDict()
        self._reported: OrderedDict[str, None] = OrderedDict()  # dry runs reported
        # Requests no longer pending, and why: a late decision is told (best effort: a
        # restart remembers only what the replayed tombstones say).
        self.closed_approvals: OrderedDict[str, str] = OrderedDict()
        # The offset of the latest approvals record read per request id: the snapshot at
        # start and the watch overlap, and an older request must not outlive its tombstone.
        self._approval_offsets: OrderedDict[str, int] = OrderedDict()
        # Requests a decision, the expiry or a withdrawal is closing now, and why: each
        # claims its request before its first await, so one request has one outcome.
        self._settling: dict[str, str] = {}
        # Whether this replica answers for a request id: owns its partition of the decisions
        # topic (the composition root asks the group). Only it withdraws or expires the
        # request; alone, every request is this replica's.
        self.owns: Callable[[str], bool] = lambda request_id: True
        # Test-only: called between the cluster write and the result (the composition root
        # sets it from SRE_AGENT_TEST_CRASH_AFTER_APPLY to simulate a crash there).
        self.after_apply: Callable[[ActionRequest, Effect], None] | None = None
        self._approvals = approvals
        self._results = results
        self._actions = actions
        self._incidents = incidents
        self._watch_read = watch_read
        self._reports = reports
        self._budget = budget
        self._sweep_interval = sweep_interval
        self._verifications: set[asyncio.Task[None]] = set()
        self.verify_attempts = VERIFY_ATTEMPTS
        self.verify_backoff = VERIFY_BACKOFF  # (base, cap) seconds
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Rebuild the pending approvals (the consumer group's offsets would skip them) and
        the recent actions, so a restart neither forgets a cooldown nor refills a budget."""
        self._stopped = False
        if self._switch_log is not None:
            await self.on_switches(await self._switch_log())  # logs each switch's state
        if self._incidents is not None:
            await self.on_incidents(await self._incidents(replay_window(self.settings.remediation)))
            closed = sum(held[1] for held in self.incidents.values())
            log.info(
                "executor: %d incidents known after replay, %d closed", len(self.incidents), closed
            )
        if self._approvals is not None:
            records = list(await self._approvals())
            self._apply_approval_records(records)
            log.info("executor: %d approvals pending after replay", len(self.pending))
        if self._results is not None:
            window = history_window(self.settings.remediation)
            results = [
                e.value for e in await self._results(window) if isinstance(e.value, ActionResult)
            ]
            self._learn(results)
            log.info(
                "executor: %d recent actions restored for cooldowns/budgets", len(self.history)
            )
            await self._resume_verifications(results, window)
        self._ensure_sweeper()

    async def _resume_verifications(self, results: list[ActionResult], window: float) -> None:
        """Verify again what a previous run executed but never verified (it stopped or died
        within verify_after): the request comes from the actions topic; the observation
        from before the action is gone, so the outcome rests on the re-check and the
        target's state now."""
        pending = unverified(results)
        if not pending or self._actions is None:
            return
        requests = {
            e.value.id: e.value
            for e in await self._actions(window)
            if isinstance(e.value, ActionRequest)
        }
        now = utcnow()
        for result in pending:
            action = requests.get(result.action_id)
            if action is None:
                log.warning("executor: no request for unverified action %s", result.action_id)
                continue
            waited = (now - result.finished_at).total_seconds()
            delay = max(0.0, self.settings.remediation.verify_after - waited)
            self._schedule_verification(action, result, None, delay=delay)
        log.info("executor: %d unverified actions scheduled for verification", len(pending))

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._verifications)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
            self._sweeper = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._budget is not None:
            await self._budget.stop()

    # --- intake ----------------------------------------------------------------------------------
    async def handle(self, batch: Sequence[Envelope]) -> None:
        await handle_each(batch, self._handle_one)
        self._ensure_sweeper()

    async def _handle_one(self, env: Envelope) -> None:
        value = env.value
        if isinstance(value, Incident):
            self.on_incident(value)
        elif isinstance(value, ApprovalDecision):
            await self.on_decision(value)
        elif isinstance(value, ActionRequest):
            await self.on_action(value)

    async def on_approvals(self, batch: Iterable[Envelope]) -> None:
        """Approval requests and tombstones of every replica, read outside the group (as
        incidents are): a decision reaches whichever replica owns its partition of the
        decisions topic, which need not be the one that asked, nor the one that read the
        request in the group; and a request decided elsewhere is forgotten here too."""
        self._apply_approval_records(e for e in batch if e.topic == self.bus.topic("approvals"))
        self._ensure_sweeper()

    def _apply_approval_records(self, records: Iterable[Envelope]) -> None:
        for env in records:
            rid = env.key or (env.value.id if isinstance(env.value, ApprovalRequest) else None)
            if rid is None:
                continue
            seen = self._approval_offsets.get(rid)
            if seen is not None and env.offset <= seen:
                continue  # read already, or older than what was (a key stays on its partition)
            remember(self._approval_offsets, rid, env.offset)
            if env.value is None:  # tombstone: decided or expired
                if self.pending.pop(rid, None) is not None:
                    self._close(rid, "it was already decided or expired")
            elif isinstance(env.value, ApprovalRequest):
                self.pending[env.value.id] = env.value

    async def on_switches(self, batch: Iterable[Envelope]) -> None:
        """Switch changes from the switches topic (one partition, so offsets order them)."""
        for env in batch:
            change = env.value
            if not isinstance(change, SwitchChange):
                continue
            known = self.remote_switches.get(change.key)
            if known is None or env.offset > known[0]:
                if known is None or known[1].on != change.on:
                    log.warning("%s %s", change.name, change.describe())
                self.remote_switches[change.key] = (env.offset, change)
                if change.namespace:  # the cluster-wide ones are read at scrape time
                    self.metrics.switch_on.labels(
                        switch=change.name, namespace=change.namespace
                    ).set(float(change.on))

    def current_switches(self, namespace: str = "") -> Switches:
        """The switches as of now for a target in ``namespace``: the file (or the
        caller's), merged with the topic's cluster-wide ones and that namespace's."""
        remote = switches_for((c for _, c in self.remote_switches.values()), namespace)
        return merged(self.switches(), remote)

    def _halted(self, namespace: str) -> str | None:
        """Why an action in progress stops now: the kill switch or shadow mode, read live
        from every source (settings, file, switches topic) as each decision reads them."""
        return halt_reason(self.current_switches(namespace), self.settings, namespace)

    async def on_incidents(self, batch: Iterable[Envelope]) -> None:
        for env in batch:
            if isinstance(env.value, Incident):
                self.on_incident(env.value)

    def on_incident(self, incident: Incident) -> None:
        held = self.incidents.get(incident.id)
        if held is not None and incident.revision < held[0]:
            return  # older than what is known (the replay at start, a redelivery)
        # A silenced incident is not acted on either: its approvals lapse like a resolved one's.
        remember(
            self.incidents, incident.id, (incident.revision, incident.status in CLOSED_STATUSES)
        )

    async def closed(self, incident_id: str) -> bool:
        """Whether the incident is resolved or silenced, as of every incident published
        before this call: a resolution written just before the action must not lose the
        race between the two topics."""
        await self._caught_up(f"cannot tell whether incident {incident_id} is still open")
        return self._known_closed(incident_id)

    async def _caught_up(self, what: str) -> None:
        """Wait until the executor watch has handled everything published before this call:
        incidents, every replica's action results (for the cooldowns, budgets and repeats)
        and the switches. A watch that lags is a retriable error, never a blind decision."""
        if self._watch_read is not None and not await self._watch_read(CATCH_UP_WAIT):
            raise TransientError(
                f"{what}: the executor watch is more than {CATCH_UP_WAIT:g}s behind"
            )

    def _known_closed(self, incident_id: str) -> bool:
        held = self.incidents.get(incident_id)
        return held is not None and held[1]

    async def on_action(self, action: ActionRequest) -> ActionResult:
        """An action read from the actions topic, where ``approved_by`` is only a claim: it
        stands for an undo of a prior state this executor knows (see
        :func:`unearned_approval`); any other is decided as if unapproved, and its result
        says why."""
        if UNDO_PARAM in action.params:
            # The original's result may be on a partition the watch has not read yet.
            await self._caught_up(f"cannot decide undo {action.id}")
        why = unearned_approval(action, self.prior_states)
        if why is None:
            return await self._act(action)
        note = f"approved_by {action.approved_by!r} not honoured: {why}"
        log.warning("action %s on %s: %s", action.id, action.target.key, note)
        return await self._act(replace(action, approved_by=None), note)

    async def _act(
        self, action: ActionRequest, note: str = "", *, partial: str | None = None
    ) -> ActionResult:
        """``action`` decided and carried out; ``approved_by``, if any, is trusted here.
        ``note``: what the result adds (why a claimed approval did not stand); ``partial``:
        how an earlier delivery left the target half done, already read and in ``note`` (an
        approved drain resumed). Whether an undo restores a recorded prior state is read
        here, on every path (a request, an approval decision): one restoring none has no
        exemption from the limits, however it was approved."""

        def noted(message: str) -> str:
            return f"{message}; {note}" if note else message

        if UNDO_PARAM in action.params:
            # An undo is exempt from the incident's state, not from the switches and limits.
            await self._caught_up(f"cannot decide undo {action.id}")
            closed = False
        else:
            closed = await self.closed(action.incident_id)
        # After the wait: the original's result may just have been read.
        unknown = unknown_undo(action, self.prior_states)
        now = utcnow()  # after the wait for the executor watch
        found = await self._found(action)
        if found is not None:
            # Its id is on the target: an earlier delivery acted and died before its result.
            # Judged by the state it left, it would be denied (a scale to 6 on its own 6
            # replicas), or closed (by the incident it healed), and paged as never run.
            verdict = decide(
                action,
                self.settings,
                self.history.values(),
                self.current_switches(action.target.namespace),
                now,
                applied=True,
            )
            if action.id not in self.history:
                # The earlier delivery's claim ended with it: a node no longer in flight.
                await self._claim_ended(action, now, changed=True)
            return await self._redelivered(action, verdict, found, now, note)
        if closed:
            # Asked for while open, arriving after it closed (analysis lag, a backlog): the
            # problem went away or an operator silenced it. Acting now only adds risk, and
            # asking for an approval would page someone for nothing. An undo is a human's.
            return await self._record_stopped(
                action,
                "denied",
                noted(f"incident_closed: incident {action.incident_id} is resolved or silenced"),
                now,
                partial,
            )
        ns = action.target.namespace
        verdict = decide(
            action,
            self.settings,
            self.history.values(),
            self.current_switches(ns),
            now,
            unknown_undo=unknown,
        )
        facts = Facts()
        if verdict.kind != "deny":
            try:
                facts = await self._facts(action)
            except AgentError as err:
                return await self._record(
                    action,
                    "failed",
                    "unknown",
                    noted(f"cannot check the blast-radius limits on {action.target.key}: {err}"),
                    now,
                )
            # The switches are read again, not reused: the cluster reads took time, and a
            # kill switch turned on meanwhile must hold.
            verdict = decide(
                action,
                self.settings,
                self.history.values(),
                self.current_switches(ns),
                now,
                facts,
                unknown_undo=unknown,
            )
        if verdict.kind == "execute" and self._budget is not None:
            # The replicas' one order of claims settles who got the budget's last unit.
            verdict = await self._claim(self._budget, action, now, facts.cordoned_nodes) or verdict
            if verdict.kind == "execute":
                # So did the claim's round trip: the last look at the switches before acting.
                late = decide(
                    action,
                    self.settings,
                    self.history.values(),
                    self.current_switches(ns),
                    now,
                    facts,
                    unknown_undo=unknown,
                )
                if late.kind != "execute":
                    await self._claim_ended(action, now, changed=False)  # its unit goes back
                    verdict = late
        if note:
            verdict = replace(verdict, reason=noted(verdict.reason))
        if verdict.kind == "execute":
            return await self._execute(action, verdict, now, note)
        if verdict.kind == "approve":
            return await self._request_approval(action, verdict, now)
        status: ResultStatus = "dry_run" if verdict.kind == "dry_run" else "denied"
        message = (
            f"would have executed {action.type} on {action.target.key} ({verdict.reason})"
            if status == "dry_run"
            else f"{verdict.rule}: {verdict.reason}"
        )
        result = await self._record_stopped(action, status, message, now, partial)
        if status == "dry_run" and action.id not in self._reported:
            # Once per action (its id is per incident, type and target): each re-analysis
            # asks for it again. What shadow mode would have done is how it is evaluated.
            await self._escalate("dry_run", action, message, now)
            remember(self._reported, action.id, None)
        # Once per action here: each re-analysis of the incident asks for it again. One
        # that left its target half done has been paged for that already, naming the rule.
        if (
            held_back(verdict, action, self.history.values())
            and action.id not in self._held
            and action.id not in self._left_half_done
        ):
            await self._escalate("denied", action, message, now)
            remember(self._held, action.id, None)
        return result

    async def _record_stopped(
        self,
        action: ActionRequest,
        status: ResultStatus,
        message: str,
        now: datetime,
        partial: str | None,
    ) -> ActionResult:
        """Record ``action`` as a rule stopped it (``message``). If an earlier delivery left
        its target half done (a drain cut half way: cordoned, pods left; ``partial`` when
        the caller read it already), the result says so and a person is paged, once per
        action: nothing else will finish the drain or uncordon the node, and a node left
        cordoned and half drained is a hazard nobody would know of."""
        left = partial if partial is not None else await self._partly_applied(action)
        why = message
        if left is not None and partial is None:
            message = f"{message}; partly applied: {left}"
        result = await self._record(action, status, "not_applicable", message, now)
        if left is not None and action.id not in self._left_half_done:
            await self._escalate(
                "action_failed",
                action,
                f"{action.target.kind} {action.target.name} left half done by {action.type} "
                f"{action.id}: {left}. Cut half way, then a rule stopped it from finishing "
                f"({why}): finish it or undo it by hand",
                now,
                # Its own id: not the repeat of an earlier "failed" page of the same action.
                key="left_half_done",
            )
            remember(self._left_half_done, action.id, None)
        return result

    async def _claim(
        self, budget: BudgetArbiter, action: ActionRequest, now: datetime, cordoned: tuple[str, ...]
    ) -> Verdict | None:
        """The budgets' denial, if any, as every replica's claims settle it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            denied = await budget.claim(action, now, cordoned)
        except AgentError:
            self.metrics.budget_claims.labels(result="unavailable").inc()
            raise
        finally:
            self.metrics.budget_claim_duration.observe(loop.time() - started)
        self.metrics.budget_claims.labels(result="granted" if denied is None else "denied").inc()
        return denied

    async def _found(self, action: ActionRequest) -> Effect | None:
        """What the cluster says an earlier delivery of ``action`` left on its target, if
        it took effect (policy rule 0). A target that cannot be read (a namespace the agent
        may not read, a kind no action applies to) is judged as not applied: every rule
        then holds. A cluster that does not answer is retried, never a blind decision."""
        try:
            return await self.cluster.applied(
                action.target,
                action_id=action.id,
                action_type=action.type,
                undo=bool(action.params.get(UNDO_PARAM)),
                # An update_config's note must name the key it writes, as its repeat reads it.
                must={"key": action.params["key"]}
                if action.type == "update_config"
                and "key" in action.params
                and not action.params.get(UNDO_PARAM)
                else None,
            )
        except PermanentError as err:
            log.debug("cannot tell whether %s is on %s: %s", action.id, action.target.key, err)
            return None

    async def _partly_applied(self, action: ActionRequest) -> str | None:
        """How an earlier delivery of ``action`` left its target half done, if it did (see
        :meth:`Cluster.partly_applied`); None too when the target cannot be read."""
        if action.params.get(UNDO_PARAM):
            return None  # an undo is one write
        try:
            return await self.cluster.partly_applied(
                action.target, action_id=action.id, action_type=action.type
            )
        except PermanentError as err:
            log.debug("cannot tell whether %s is on %s: %s", action.id, action.target.key, err)
            return None

    async def _facts(self, action: ActionRequest) -> Facts:
        if action.type not in SCALE_ACTIONS | DISRUPTIVE_ACTIONS | NODE_ACTIONS:
            return Facts()
        fp = await self.cluster.footprint(action.target)
        wanted = None
        if action.type in SCALE_ACTIONS and not action.params.get(UNDO_PARAM):
            try:
                wanted = target_replicas(action, fp.replicas)
            except ValueError as err:
                raise ActionFailed(f"replicas {action.params.get('replicas')!r}: {err}") from err
        restores: str | None = None
        moved: tuple[tuple[str, datetime], ...] = ()
        if action.type == "rollback" and not action.params.get(UNDO_PARAM):
            # What it would re-deploy, and what rollbacks moved away from (policy rule 7c).
            w = await self.cluster.workload(action.target)
            chosen = rollback_choice(
                w.revisions, w.revision, _checked(revision_param, action.params)
            )
            restores = chosen.image if chosen is not None else None
            moved = rolled_back_from(w.revisions)
        return Facts(
            replicas=None if action.target.kind == "Node" else fp.replicas,
            target_replicas=wanted,
            pods_disrupted=fp.disruption,
            pdb_headroom=fp.pdb_headroom,
            pdbs=fp.pdbs,
            cordoned_nodes=fp.cordoned_nodes,
            restores=restores,
            rolled_back_from=moved,
        )

    async def on_decision(self, d: ApprovalDecision) -> None:
        req = self.pending.get(d.request_id)
        if req is None:
            # Its request was published before it: once the executor watch has read that
            # far, an unknown request is really unknown.
            await self._caught_up(f"cannot look up approval request {d.request_id}")
            req = self.pending.get(d.request_id)
        if req is None:
            closed = self.closed_approvals.get(d.request_id)
            reason = (
                f"approval request {d.request_id} is closed: {closed}"
                if closed
                else f"unknown approval request {d.request_id}"
            )
            await self._reject_decision(d, reason)
            return
        if d.action_hash != req.action_hash:
            await self._reject_decision(
                d, f"action hash {d.action_hash} does not match request {req.id}"
            )
            return
        if d.decided_at < req.created_at:
            # A request's id is stable per action: the same action asked again after its
            # request was decided or expired gets the same id and hash. A decision made
            # before this request (redelivered, replayed) was for an earlier one, and must
            # not approve, or reject, what nobody has seen yet.
            await self._reject_decision(
                d,
                f"decided at {d.decided_at.isoformat()}, before request {req.id} was made at "
                f"{req.created_at.isoformat()}: it is for an earlier request",
            )
            return
        settling = self._settling.get(req.id)
        if settling is not None:
            await self._reject_decision(d, f"approval request {req.id} is closed: {settling}")
            return
        self._settling[req.id] = f"already decided ({d.decision} by {d.decided_by})"
        try:
            await self._decided(req, d)
        finally:
            self._settling.pop(req.id, None)

    async def _decided(self, req: ApprovalRequest, d: ApprovalDecision) -> None:
        """The one outcome of ``req``: ``d`` claimed it (see _settling)."""
        now = utcnow()
        if d.decision == "approve" and await self._found(req.action) is not None:
            # Carried out, then its executor died before the result: judged again, the
            # target's version its own write moved (or the expiry passed since) would
            # reject as stale, and page as not executed, an approval that was executed.
            await self._act(replace(req.action, approved_by=d.decided_by))
        elif (
            d.decision == "approve"
            and (partial := await self._partly_applied(req.action))
            and (now <= req.expires_at or await self._begun_since(req))
        ):
            # Begun, then its executor died half way (a drain: cordoned, pods left). This
            # decision was honoured then, before the expiry and on the target as approved;
            # only its own cordon moved the version since. Rejected as stale, it would page
            # "approved, not executed" and leave the node half drained: it finishes the
            # drain it was approved for instead, under every rule a redelivery of a drain
            # cut half way goes through (switches, limits, the incident still open). Past
            # the expiry that holds only if the drain began after the request: one half
            # done before it (a delivery cut half way, then asked for approval) was not
            # begun by this decision, which came too late to begin anything.
            log.info("approved %s on %s resumed: %s", req.action.id, req.action.target.key, partial)
            await self._act(
                replace(req.action, approved_by=d.decided_by),
                f"resumed, partly applied: {partial}",
                partial=partial,
            )
        elif now > req.expires_at:
            # Stopped like any rule stops an action: a node left half drained is paged.
            await self._record_stopped(
                req.action,
                "rejected",
                f"decision by {d.decided_by} came after approval {req.id} expired at "
                f"{req.expires_at.isoformat()}",
                now,
                None,
            )
        elif d.decision == "reject":
            await self._record_stopped(
                req.action, "rejected", f"rejected by {d.decided_by}: {d.reason}", now, None
            )
        else:
            problem = await self._no_longer_valid(req)
            if problem:
                await self._record(
                    req.action,
                    "rejected",
                    "not_applicable",
                    f"approval {req.id} by {d.decided_by} is no longer valid: {problem}",
                    now,
                )
                await self._escalate(
                    "approval_stale", req.action, f"approved, not executed: {problem}", now
                )
            else:
                await self._act(replace(req.action, approved_by=d.decided_by))
        # Only now: a crash before this line re-runs the decision, and the action id on the
        # target makes the repeat a no-op.
        await self._retire(req, f"already decided ({d.decision} by {d.decided_by})")

    async def _begun_since(self, req: ApprovalRequest) -> bool:
        """Whether a delivery of ``req``'s action changed its target after ``req`` pinned
        it (a drain's own cordon moves a node's version): the one sign that an approval,
        honoured before its expiry, began what is half done. An unpinned request, or a
        target that cannot be read, shows no such sign."""
        if not req.target_version:
            return False
        try:
            version = await self.cluster.version(req.action.target)
        except PermanentError:
            return False
        return version != req.target_version

    async def _no_longer_valid(self, req: ApprovalRequest) -> str | None:
        incident = req.action.incident_id
        if await self.closed(incident):
            return f"incident {incident} is resolved or silenced"
        if req.target_version:
            try:
                version = await self.cluster.version(req.action.target)
            except PermanentError as err:
                return f"cannot read {req.action.target.key}: {err}"
            if version != req.target_version:
                return (
                    f"{req.action.target.key} changed since the request "
                    f"({req.target_version} -> {version})"
                )
        return None

    async def _reject_decision(self, d: ApprovalDecision, reason: str) -> None:
        await self.bus.dead_letter(
            source_topic=self.bus.topic("decisions"),
            raw=d.id.encode(),
            error=f"decision {d.id} by {d.decided_by} refused: {reason}",
            consumer="executor",
        )

    # --- outcomes --------------------------------------------------------------------------------
    async def _execute(
        self, action: ActionRequest, verdict: Verdict, now: datetime, note: str = ""
    ) -> ActionResult:
        before = await self._observe(action)
        try:
            effect = await self._apply_retrying(action, now)
        except PartialFailure as err:
            # It changed something: counts for cooldown/budgets.
            self._remember(action, now, err.prior_state)
            await self._claim_ended(action, now, changed=True)
            await self._escalate("action_failed", action, f"failed half-way: {err}", now)
            return await self._record(action, "failed", "unknown", str(err), now, err.prior_state)
        except AgentError as err:
            if isinstance(err, TransientError) and (found := await self._lost_answer(action)):
                # The write went through; its answer was lost (a timeout on the last
                # attempt). Recorded as failed, it would hold no cooldown nor budget, never
                # be verified, and page a failure for a change that was made.
                await self._claim_ended(action, now, changed=True)
                rule = f"{verdict.rule}; {note}" if note else verdict.rule
                message = f"{found.message}, though its answer was lost ({err}) [{rule}]"
                return await self._succeeded(action, message, found, now, before)
            await self._claim_ended(action, now, changed=False)  # its unit goes back
            await self._escalate("action_failed", action, f"failed: {err}", now)
            return await self._record(action, "failed", "unknown", str(err), now)
        if self.after_apply is not None:
            self.after_apply(action, effect)
        await self._claim_ended(action, now, changed=True)
        if not effect.applied:
            return await self._redelivered(action, verdict, effect, now, note)
        rule = f"{verdict.rule}; {note}" if note else verdict.rule
        return await self._succeeded(action, f"{effect.message} [{rule}]", effect, now, before)

    async def _lost_answer(self, action: ActionRequest) -> Effect | None:
        """After a transient failure: the action's effect, if its id is on the target after
        all. A target that still cannot be read shows none (the failure stands)."""
        try:
            return await self._found(action)
        except AgentError as err:
            log.info("cannot tell whether %s is on %s: %s", action.id, action.target.key, err)
            return None

    async def _redelivered(
        self, action: ActionRequest, verdict: Verdict, effect: Effect, now: datetime, note: str
    ) -> ActionResult:
        """``action`` found nothing to do (``effect``): a ``duplicate``, or, when its id is
        on the target and no result says so, the earlier delivery's success."""
        if not effect.found_id or action.id in self.history:  # nothing done, or known
            return await self._record(action, "duplicate", "unknown", effect.message, now)
        # A delivery acted, then died before recording it. Recorded now, or the action would
        # count for no cooldown, budget or repeat, and never be verified; with the prior
        # state that write noted on the target, so it can be undone. The observation before
        # it is gone.
        rule = f"{verdict.rule}; {note}" if note else verdict.rule
        message = f"{effect.message}, by a delivery that stopped before its result [{rule}]"
        return await self._succeeded(action, message, effect, now, None)

    async def _succeeded(
        self,
        action: ActionRequest,
        message: str,
        effect: Effect,
        now: datetime,
        before: Observation | None,
    ) -> ActionResult:
        """Record ``action`` as applied, with the prior state its write noted, mark its
        incident mitigating and schedule its verification against ``before``."""
        self._remember(action, now, effect.prior_state)
        result = await self._record(
            action, "succeeded", "unknown", message, now, prior=effect.prior_state
        )
        await self._mitigating(action, now)
        self._schedule_verification(action, result, before)
        return result

    async def _claim_ended(self, action: ActionRequest, now: datetime, *, changed: bool) -> None:
        """Tell the other replicas the action ended: having changed nothing, its budget unit
        goes back; a node action's node no longer counts as in flight either way."""
        if self._budget is None:
            return
        try:
            if changed:
                await self._budget.done(action, now)
            else:
                await self._budget.release(action, now)
        except AgentError as err:  # the unit, or the node, stays claimed: the safe side
            log.warning("cannot tell the budget claims that %s ended: %s", action.id, err)

    def _remember(self, action: ActionRequest, now: datetime, prior: Mapping[str, Any]) -> None:
        self.history[action.id] = Executed(
            target_key=action.target.key,
            namespace=action.target.namespace,
            at=now,
            action_id=action.id,
            type=action.type,
            moved_from=moved_from(action.type, prior),
        )

    def _verified(self, action_id: str, outcome: Outcome) -> None:
        """The policy learns how its action ended (rule 7b counts the ineffective ones)
        before the record of it comes back through on_results."""
        known = self.history.get(action_id)
        if known is not None:
            self.history[action_id] = replace(known, outcome=outcome)

    async def on_results(self, batch: Iterable[Envelope]) -> None:
        """Action results of every replica, read outside the group (as incidents are):
        the budgets are global, and after a rebalance a target's cooldown and repeats must
        be known to whichever replica now owns it. Own results come back too; an action
        id is counted once."""
        results = [e.value for e in batch if isinstance(e.value, ActionResult)]
        if results:  # most of the watch's batches are incidents only: no pruning for them
            self._learn(results)

    def _learn(self, results: Iterable[ActionResult]) -> None:
        for r in results:
            self._learn_prior_state(r)
            h = learned(self.history.get(r.action_id), r)
            if h is not None:
                self.history[r.action_id] = h
        # Bounded by what the policy still looks at.
        horizon = utcnow() - timedelta(seconds=history_window(self.settings.remediation))
        self.history = {k: h for k, h in self.history.items() if h.at > horizon}

    def _learn_prior_state(self, r: ActionResult) -> None:
        if not r.prior_state:
            return
        state = PriorState.of(r)
        known = self.prior_states.get(r.action_id, ())
        if state not in known:
            remember(self.prior_states, r.action_id, (*known, state))

    async def _observe(self, action: ActionRequest) -> Observation | None:
        try:
            return await self.cluster.observe(action.target)
        except AgentError as err:
            log.info("cannot observe %s: %s", action.target.key, err)
            return None

    async def _apply_retrying(self, action: ActionRequest, now: datetime) -> Effect:
        """Transient failures are retried: the action id on the target makes it safe."""
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                return await self._apply(action, now)
            except TransientError as err:
                if attempt == TRANSIENT_ATTEMPTS:
                    raise
                log.warning("%s on %s: %s; retrying", action.type, action.target.key, err)
                hint = err.retry_after
                await asyncio.sleep(min(hint if hint is not None else 1.0, 5.0))
        raise AssertionError("unreachable")

    async def _apply(self, action: ActionRequest, now: datetime) -> Effect:
        t, rem, p = action.target, self.settings.remediation, action.params
        if p.get(UNDO_PARAM):
            prior = {k: v for k, v in p.items() if k != UNDO_PARAM}
            if action.type in SCALE_ACTIONS and unknown_undo(action, self.prior_states):
                # Restoring no recorded count: the bounds hold against the count now, which
                # may have moved since the policy read it (an HPA, a person).
                current = (await self.cluster.workload(t)).replicas
                problem = undo_param_problem(action, rem) or undo_scale_problem(
                    current, int(str(p.get("replicas")).strip()), rem
                )
                if problem is not None:
                    raise ActionFailed(f"{t.key}: {problem}")
            return await self.cluster.undo(
                t, action_id=action.id, action_type=action.type, prior=prior
            )
        if action.type == "rollback":
            return await self.cluster.rollback(
                t, action_id=action.id, to_revision=_checked(revision_param, p)
            )
        if action.type in SCALE_ACTIONS:
            current = (await self.cluster.workload(t)).replicas
            try:
                requested = target_replicas(action, current)
            except ValueError as err:
                raise ActionFailed(f"replicas {p.get('replicas')!r}: {err}") from err
            # The count may have moved since the policy read it (an HPA, a person).
            problem = scale_problem(action.type, current, requested, rem)
            if problem is not None:
                raise ActionFailed(f"{t.key}: {problem}")
            return await self.cluster.scale(
                t,
                action_id=action.id,
                replicas=bounded_replicas(requested, rem),
                direction="up" if action.type == "scale_up" else "down",
            )
        if action.type == "restart_workload":
            return await self.cluster.restart(t, action_id=action.id, at=now)
        if action.type == "restart_pod":
            return await self.cluster.restart_pod(t, action_id=action.id)
        if action.type == "cordon_node":
            return await self.cluster.cordon(t, action_id=action.id)
        if action.type == "drain_node":
            grace, timeout = _checked(drain_params, p, rem)
            return await self.cluster.drain(
                t,
                action_id=action.id,
                grace_period=grace,
                drain_timeout=timeout,
                stop=lambda: self._halted(t.namespace),
            )
        if action.type == "update_config":
            key, value = p.get("key"), p.get("value")
            if not isinstance(key, str) or not key or value is None:
                raise ActionFailed(f"update_config of {t.key} needs params 'key' and 'value'")
            return await self.cluster.update_config(
                t, action_id=action.id, key=key, value=str(value)
            )
        raise ActionFailed(f"{action.type} is not supported")

    async def _request_approval(
        self, action: ActionRequest, verdict: Verdict, now: datetime
    ) -> ActionResult:
        outstanding = self.pending.get(stable_id("approval", action.id))
        if outstanding is not None and outstanding.action_hash == action.digest():
            # The same action again (a redelivery, a second analysis of the incident): one
            # request, one page, and its expiry is not pushed back. Its record is one
            # still_pending knows (the CLI waiting for a decision's result skips it).
            return await self._record(
                action,
                "duplicate",
                "not_applicable",
                f"approval {outstanding.id} already pending since "
                f"{outstanding.created_at.isoformat()}",
                now,
            )
        try:
            version = await self.cluster.version(action.target)
            # A drain cut half way and now asked for: whoever decides must know the node is
            # cordoned with pods left, whether approved (it resumes) or not (it stays so).
            left = await self._partly_applied(action)
        except AgentError as err:
            return await self._record(
                action, "failed", "unknown", f"cannot read {action.target.key}: {err}", now
            )
        why = verdict.reason if left is None else f"{verdict.reason}; partly applied: {left}"
        req = ApprovalRequest(
            id=stable_id("approval", action.id),
            action=action,
            action_hash=action.digest(),
            root_cause=action.reason,
            evidence=(why,),
            created_at=now,
            expires_at=now + timedelta(seconds=self.settings.remediation.approval_ttl),
            target_version=version,
        )
        self.pending[req.id] = req
        await self.bus.publish(self.bus.topic("approvals"), req)
        # The page that asks for the decision: nobody polls the approvals topic. Its id
        # is per request, so the same action asked again after an expiry pages again.
        await self._escalate(
            "approval_requested",
            action,
            f"approval {req.id} requested: {why}",
            now,
            key=req.created_at.isoformat(),
            more=(
                f"confidence {action.confidence:.2f}: {action.reason}",
                f"approve: sre-agent approvals approve {req.id} --by NAME",
                f"reject: sre-agent approvals reject {req.id} --reason TEXT",
                f"expires {req.expires_at.isoformat()}",
            ),
        )
        return await self._record(
            action,
            "pending_approval",
            "not_applicable",
            f"approval {req.id} requested: {why}",
            now,
        )

    async def _mitigating(self, action: ActionRequest, at: datetime) -> None:
        """Tell the correlator the incident is being mitigated (keyed like its anomalies)."""
        if not action.incident_key or UNDO_PARAM in action.params:
            return  # an undo is not a mitigation of the incident
        m = Mitigation(
            incident_id=action.incident_id,
            incident_key=action.incident_key,
            action_id=action.id,
            at=at,
        )
        await self.bus.publish(
            self.bus.topic("anomalies"), encode({"mitigation": m}), key=action.incident_key
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
        self._learn_prior_state(result)  # before the watch brings it back: an undo may follow
        executed = EXECUTED_RESULT.get(status)
        counter = self.metrics.remediation if executed else self.metrics.remediation_decisions
        counter.labels(service=result.service, action=action.type, result=executed or status).inc()
        log.info("action %s %s on %s: %s", action.type, status, action.target.key, message)
        return result

    # --- approvals that expire undecided -------------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._stopped or not self.pending:
            return
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="approval-sweeper")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await self.sweep(utcnow())
            except AgentError as err:
                log.warning("approval sweep failed, retrying: %s", err)
            except Exception:
                # A bug in one sweep must not end the loop: nothing would expire (and
                # escalate) an undecided approval again until the next record arrived.
                log.exception("approval sweep failed (a bug); retrying")

    async def sweep(self, now: datetime) -> list[ApprovalRequest]:
        """Withdraw the pending approvals whose incident closed; escalate the ones that
        expired without a decision."""
        await self._withdraw_closed(now)
        due = [r for r in self.pending.values() if now > r.expires_at and self.owns(r.id)]
        expired = []
        for req in due:
            why = f"it expired at {req.expires_at.isoformat()} without a decision"
            if not self._settle(req, why):
                continue  # decided (or being decided) meanwhile: that is its outcome
            try:
                await self._expire(req, why, now)
            finally:
                self._settling.pop(req.id, None)
            expired.append(req)
        return expired

    def _settle(self, req: ApprovalRequest, why: str) -> bool:
        """Claim ``req`` for closing with ``why``; False if it is closed or closing."""
        if req.id in self._settling or req.id not in self.pending:
            return False
        self._settling[req.id] = why
        return True

    async def _expire(self, req: ApprovalRequest, why: str, now: datetime) -> None:
        # Stopped like any rule stops an action: a node left half drained is paged as such,
        # since nothing will finish the drain now that nobody approved it.
        await self._record_stopped(
            req.action,
            "rejected",
            f"approval {req.id} expired at {req.expires_at.isoformat()} without a "
            "decision; escalated",
            now,
            None,
        )
        await self._escalate(
            "approval_expired",
            req.action,
            f"approval {req.id} expired at {req.expires_at.isoformat()} undecided",
            now,
        )
        await self._retire(req, why)

    async def _withdraw_closed(self, now: datetime) -> None:
        """An approval asked for an incident that has since resolved or been silenced is
        withdrawn, not left to expire: its expiry would page someone an hour later for a
        problem gone, and ``approvals list`` would still offer it. Whoever was asked is
        told (approval_withdrawn, routed as the request was, not counted as an
        escalation); a late decision is told why."""
        for req in list(self.pending.values()):
            if not self._known_closed(req.action.incident_id) or not self.owns(req.id):
                continue
            why = f"withdrawn: incident {req.action.incident_id} is resolved or silenced"
            if not self._settle(req, why):
                continue  # decided (or being decided) meanwhile: that is its outcome
            try:
                # A node left half drained is paged as such: nothing will finish it now.
                await self._record_stopped(
                    req.action, "rejected", f"approval {req.id} {why}", now, None
                )
                await self._retire(req, why)
                # Whoever was asked to decide is told there is nothing to decide.
                await self._escalate(
                    "approval_withdrawn",
                    req.action,
                    f"approval {req.id} {why}",
                    now,
                    key=req.created_at.isoformat(),
                )
            finally:
                self._settling.pop(req.id, None)

    async def _retire(self, req: ApprovalRequest, why: str) -> None:
        """No longer pending: forgotten here, remembered as closed (a late decision is told
        ``why``) and tombstoned on the approvals topic."""
        self.pending.pop(req.id, None)
        self._close(req.id, why)
        await self.bus.publish(self.bus.topic("approvals"), None, key=req.id)

    def _close(self, request_id: str, why: str) -> None:
        remember(self.closed_approvals, request_id, why)

    # --- verification ----------------------------------------------------------------------------
    def _schedule_verification(
        self,
        action: ActionRequest,
        result: ActionResult,
        before: Observation | None,
        *,
        delay: float | None = None,
    ) -> None:
        wait = self.settings.remediation.verify_after if delay is None else delay
        task = asyncio.create_task(
            self._verify(action, result, before, wait), name=f"verify-{action.id}"
        )
        self._verifications.add(task)
        task.add_done_callback(self._verifications.discard)

    async def recheck_trigger(
        self, action: ActionRequest, since: datetime | None = None
    ) -> tuple[Outcome, str] | None:
        """The trigger re-run where it came from (patterns on Prometheus, alerts at
        Alertmanager), each read where it fired; a feed's signals, by what the feed
        reported after ``since`` (when the action took effect). None with nothing to
        re-run."""
        plan = plan_recheck(
            to_recheck(action),
            has_pattern=lambda name: self.settings.pattern(name) is not None,
            prometheus=self.prom is not None,
            alertmanager=self.alertmanager is not None,
            feeds=self._reports is not None and since is not None,
        )
        still: list[str] = []
        cleared: list[str] = []
        unchecked = list(plan.unchecked)
        if plan.feed and self._reports is not None and since is not None:
            try:
                reports = await self._reports(action.incident_key, since)
            except AgentError as err:
                unchecked.extend((name, f"re-check failed: {err}") for name in plan.feed)
            else:
                s, c, u = reported(plan.feed, reports, since)
                still.extend(s)
                cleared.extend(c)
                unchecked.extend(u)
        for source, places in (
            ("prometheus", plan.prometheus),
            ("alertmanager", plan.alertmanager),
        ):
            for name, where in places.items():
                try:
                    found, warnings = await self._firing_now(source, name)
                except AgentError as err:
                    # The rest still counts: a pattern still firing is not healed however
                    # the other source fared.
                    unchecked.append((name, f"re-check failed: {err}"))
                    continue
                series = [normalise(labels, self.settings.agent.cluster) for labels in found]
                fired = any(fires_at(series, place) for place in where)
                if fired:
                    still.append(name)
                elif warnings:
                    # A partial reply (a Thanos store, a Mimir ingester missing) may lack
                    # the very series still firing: its absence proves nothing.
                    log.warning(
                        "re-check of %s for %s %s: partial reply, %s",
                        name,
                        action.type,
                        action.id,
                        "; ".join(warnings),
                    )
                    unchecked.append((name, partial_reply(warnings)))
                else:
                    cleared.append(name)
        return recheck_verdict(still, cleared, unchecked)

    async def _firing_now(
        self, source: str, name: str
    ) -> tuple[list[Mapping[str, str]], tuple[str, ...]]:
        """The raw label sets of what ``name`` fires at now, asked where it came from, and
        the warnings of the reply (non-empty: it may be partial)."""
        if source == "alertmanager":
            assert self.alertmanager is not None
            return list(await self.alertmanager.firing(name)), ()
        pattern = self.settings.pattern(name)
        assert self.prom is not None and pattern is not None
        reply = await self.prom.query_vector(pattern.condition)
        # (Prometheus' own annotations of the expression miss nothing: see Vector.partial)
        return [s.labels for s in reply.samples], reply.warnings if reply.partial else ()

    async def _escalate(
        self,
        reason: EscalationReason,
        action: ActionRequest,
        message: str,
        now: datetime,
        *,
        key: str = "",
        more: tuple[str, ...] = (),
    ) -> None:
        """Log it, and publish it for the notifier (and any Kafka client) to deliver.
        ``key``: what else makes it a new escalation of this action and reason."""
        informational = reason in INFORMATIONAL_REASONS or reason in FOLLOW_UPS
        if informational:
            log.info("REPORT: %s on %s: %s", action.type, action.target.key, message)
        else:
            level = logging.WARNING if reason == "approval_requested" else logging.ERROR
            log.log(level, "ESCALATE: %s on %s: %s", action.type, action.target.key, message)
        escalation = Escalation(
            # Stable: a redelivered action escalates the same escalation, not a second one.
            id=stable_id("escalation", action.id, reason, *((key,) if key else ())),
            incident_id=action.incident_id,
            incident_key=action.incident_key,
            reason=reason,
            summary=f"{action.type} on {action.target.key}: {reason.replace('_', ' ')}",
            at=now,
            action_id=action.id,
            target=action.target.key,
            service=action.labels.get("service", ""),
            details=(message[:2000], *more),
            severity=action.severity,
        )
        await self.bus.publish(self.bus.topic("escalations"), escalation)
        if not informational:  # the action outcome metrics count those already
            self.metrics.escalations.labels(reason=reason).inc()

    async def verify_now(
        self,
        action: ActionRequest,
        before: Observation | None = None,
        since: datetime | None = None,
        evicted_uid: str = "",
    ) -> tuple[Outcome, str]:
        """The outcome; ``since``: when the action took effect (a feed's reports count
        from then on); ``evicted_uid``: the pod a restart_pod evicted."""
        trigger = await self.recheck_trigger(action, since)
        after = await self._observe(action)
        return judge(action.type, before, after, trigger, evicted_uid)

    async def _verify(
        self, action: ActionRequest, result: ActionResult, before: Observation | None, wait: float
    ) -> None:
        """A background task: nothing awaits it, so nothing may end it unseen. Each step is
        retried; one that still fails is logged and counted, and the action stays without
        a verification record, which the next start resumes (see unverified)."""
        await asyncio.sleep(wait)
        try:
            await self._verify_once(action, result, before)
        except Exception:
            self.metrics.verification_failed.labels(action=action.type).inc()
            log.exception(
                "verification of %s %s on %s given up after %d attempts; no outcome "
                "recorded (the next start verifies it again)",
                action.type,
                action.id,
                action.target.key,
                self.verify_attempts,
            )

    async def _persisting(self, what: str, step: Callable[[], Awaitable[_R]]) -> _R:
        """``step``, retried with a bounded backoff on any failure (the publish during a
        broker restart, a bug); the last failure is raised."""
        base, cap = self.verify_backoff
        for attempt in range(self.verify_attempts):
            try:
                return await step()
            except Exception as err:
                if attempt + 1 >= self.verify_attempts:
                    raise
                hint = err.retry_after if isinstance(err, TransientError) else None
                delay = backoff_delay(attempt, base=base, cap=cap, retry_after=hint)
                delay = cap if delay is None else delay
                log.warning("%s failed, retrying in %.1fs: %r", what, delay, err)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _verify_once(
        self, action: ActionRequest, result: ActionResult, before: Observation | None
    ) -> None:
        evicted = str(result.prior_state.get("uid", "")) if action.type == "restart_pod" else ""
        # Judged once: a retry publishes the same record (same id), not a second verdict.
        outcome, message = await self._persisting(
            f"verifying {action.id}",
            lambda: self.verify_now(action, before, result.finished_at, evicted),
        )
        verified = replace(
            result, id=new_id(), outcome=outcome, message=message, finished_at=utcnow()
        )
        await self._persisting(
            f"recording the verification of {action.id}",
            lambda: self.bus.publish(self.bus.topic("action-results"), verified),
        )
        self._verified(action.id, outcome)
        self.metrics.verification.labels(
            service=result.service, action=action.type, outcome=outcome
        ).inc()
        if outcome in ("not_healed", "worse", "healed"):
            reason: EscalationReason = (
                "worse" if outcome == "worse" else "healed" if outcome == "healed" else "not_healed"
            )
            try:
                # The escalation's id is stable: a retry after a lost acknowledgement is
                # one page.
                await self._persisting(
                    f"escalating {reason} of {action.id}",
                    lambda: self._escalate(reason, action, message, verified.finished_at),
                )
            except Exception:  # the outcome is recorded: a restart would not page again
                self.metrics.verification_failed.labels(action=action.type).inc()
                log.exception(
                    "ESCALATE: %s on %s: %s, but its escalation was given up after %d attempts: %s",
                    action.type,
                    action.target.key,
                    reason,
                    self.verify_attempts,
                    message,
                )
        elif outcome == "unknown":
            log.warning("unverified %s on %s: %s", action.type, action.target.key, message)
        else:
            log.info("verified %s on %s: %s", action.type, action.target.key, message)


def unverified(results: Iterable[ActionResult]) -> list[ActionResult]:
    """Executed actions with no verification record yet: a succeeded result is followed by
    a second succeeded result of the same action once verified (whatever the outcome)."""
    by_action: dict[str, list[ActionResult]] = {}
    for r in results:
        if r.status == "succeeded":
            by_action.setdefault(r.action_id, []).append(r)
    return [rs[0] for rs in by_action.values() if len(rs) == 1 and rs[0].outcome == "unknown"]


def _checked(parse: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """A param parser's result; the policy denies bad params first, this only keeps a
    request that bypassed it from reaching the cluster."""
    try:
        return parse(*args, **kwargs)
    except ValueError as err:
        raise ActionFailed(str(err)) from err


def target_replicas(action: ActionRequest, current: int) -> int:
    """'+2' / '-1' relative, '5' absolute; default one step in the action's direction."""
    raw = str(action.params.get("replicas", "+1" if action.type == "scale_up" else "-1"))
    n = int(raw)
    value = current + n if raw.startswith(("+", "-")) else n
    return max(0, value)


def still_pending(result: ActionResult) -> bool:
    """Whether ``result`` records its action asked again while its approval request is
    pending (see Executor._request_approval): nothing was decided, nor done."""
    return result.status == "duplicate" and result.outcome == "not_applicable"


def can_undo(result: ActionResult) -> bool:
    """Whether :func:`undo_request` restores what ``result``'s action changed (what
    ``actions list`` marks undoable)."""
    return result.type in UNDOABLE and bool(result.prior_state)


def undo_request(
    result: ActionResult, *, requested_by: str, now: datetime, reason: str = ""
) -> ActionRequest:
    """The action that restores what ``result``'s action changed (``sre-agent actions undo``).

    Its id derives from the original's, so undoing twice acts once.
    """
    if result.type not in UNDOABLE:
        raise PermanentError(f"{result.type} cannot be undone (nothing to restore)")
    if not result.prior_state:
        raise PermanentError(
            f"result {result.id} of action {result.action_id} ({result.status}) records no "
            "prior state to restore"
        )
    params = undo_params(result.prior_state)
    params[UNDO_PARAM] = result.action_id
    why = f": {reason}" if reason else ""
    return ActionRequest(
        id=stable_id("undo", result.action_id),
        incident_id=result.incident_id,
        incident_key=result.incident_key,
        analysis_id=f"undo-{result.action_id}",
        type=result.type,
        target=result.target,
        confidence=1.0,
        reason=f"undo of action {result.action_id} requested by {requested_by}{why}",
        requested_at=now,
        params=params,
        labels={"service": result.service} if result.service else {},
        approved_by=requested_by,
    )


def undoable_result(results: Iterable[ActionResult], ident: str) -> ActionResult | None:
    """The latest result of action (or result id) ``ident`` that records a prior state."""
    found = None
    for r in results:
        if (r.action_id == ident or r.id == ident) and r.prior_state:
            found = r
    return found


def kill_switch_file(path: str) -> Callable[[], Switches]:
    """Switches read at each decision: touching the file stops execution immediately."""

    def read() -> Switches:
        on = bool(path) and Path(path).exists()
        return Switches(kill_switch=on, why=f"file {path} exists" if on else "")

    return read
