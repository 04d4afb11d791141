"""Remediation policy: a pure function from (action, history, switches, facts, now) to a
verdict.

Order of the rules (first match wins), safety rules before convenience rules:

0. the action's own id is already on its target (``applied``: an earlier delivery acted,
   then its executor died before recording the result) -> applied: recorded as the
   success it was, never judged again; nothing is done, so no rule below can stop it,
   and each would misjudge it by the state it left (a scale to 6 on the 6 replicas it
   made, a cooldown or budget filled since, a PDB its rollout holds down); a drain's id
   lands with its cordon, so the adapter reports a drain applied only once its node has
   no pod left to evict nor still terminating (``handlers.cluster.drain_finished``)
1. ``remediation.enabled`` false            -> deny
2. kill switch on                           -> deny (stops all execution at once)
3. namespace denied / not allowed           -> deny
4. mode ``manual``                          -> deny (the agent only recommends)
   a. params malformed or beyond their bounds -> deny (see :func:`param_problem`)
   b. the action does not apply to the target's kind -> deny (see :func:`kind_problem`)
5. same target acted on within ``cooldown`` -> deny (an undo restoring a recorded prior state
   is exempt: it repairs the last act; so is the next runbook step once every action within
   it was verified ineffective)
6. the hourly action budget is spent        -> deny
   a. ... or the namespace's hourly budget  -> deny
   b. a scale whose requested count is not 1..MAX_SCALE_STEP in its direction (up for
      scale_up, down for scale_down), or that the replica bounds would clamp to no
      move that way                                                  -> deny
   c. a restart/rollback taking down more than ``max_restart_fraction``
      of the workload's pods at once (one pod always may)          -> deny
   d. ... or more than its PodDisruptionBudgets allow              -> deny
   e. a cordon/drain with ``max_nodes_cordoned`` other nodes already cordoned -> deny
      (not the undo of one that uncordons: it adds no cordoned node, see :func:`cordons`)

An undo (``undo_of``) restoring a prior state its original recorded is exempt from each
limit it cannot worsen: the params (4a: the recorded state), the cooldown (5: it repairs the
last act), the replica bounds (6b: the recorded count) and, when it uncordons,
``max_nodes_cordoned`` (6e, here and in the budget claims). It still spends a unit of the
hourly budgets (6, 6a: it is an action within the hour), and an undo of a rollback is a
rollout, held to 6c-6d like any. An undo restoring no recorded prior state (``unknown_undo``:
forged, or older than the executor's memory) has no exemption, approved or not: its params
are the shape and bounds the adapters' undo reads (4a), the cooldown holds (5), and a
scale's restored count stays within the replica bounds and MAX_SCALE_STEP of the current
count, in either direction (6b: an undo moves opposite to its type).
7. already approved by a human              -> execute (the executor clears an
   ``approved_by`` it did not earn: see :func:`unearned_approval`)
   a. an undo restoring no prior state the executor knows     -> approval
   b. the same action on the same target was verified ineffective (not_healed, worse)
      ``ineffective_after`` times, or ran ``max_repeats`` times, within ``repeat_window``
                                            -> approval (a person decides whether to try again)
   c. a rollback re-deploying a template that a rollback moved the target away from
      within ``repeat_window`` (see :func:`flip_problem`) -> approval
8. mode ``supervised``                      -> approval
9. the action type requires approval        -> approval
10. confidence below the threshold          -> approval
11. otherwise                               -> execute

Rules 6b-6e (blast radius) need :class:`Facts` about the target, which the executor reads
from the cluster just before deciding; with no facts they do not apply (``Facts()``), so
the executor first decides without them, and reads the cluster only for a verdict that
could act. Rule 0's fact is read from the target before any rule (the id is there exactly
when the action took effect); an action whose id is not there goes through every rule, so
the kill switch, dry run and limits hold for all that has yet to act. Human approval never
lifts a safety limit: rules 1-6 come before rule 7. Rule 7b
is not a limit but a remediation loop breaker: a restart that keeps "healing" a crash that
keeps coming back hides its cause, so the agent stops doing it on its own and asks. Rule
7c is one too: a rolled-back-to template is a recent rollout to the analysis (it just
became current), so an incident that goes on after a rollback would have the agent roll
"back" to the very release it rolled back from; a person decides which release runs.

Shadow mode (``dry_run``) turns every "execute" into "dry_run": decided and recorded,
never applied.

Rules 4 and 8-10 and shadow mode read the mode, threshold, approval list and dry-run of the
target's namespace: the first ``remediation.overrides`` entry matching it, else the global
ones (see :func:`scope_for`). Rules 1-3 and 5-6 are the same everywhere.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from agent.models import (
    ACTION_TYPES,
    ActionRequest,
    ActionResult,
    BudgetClaim,
    Outcome,
    ParamValue,
    SwitchChange,
)
from agent.settings import Mode, RemediationSection, Settings

# "applied": the action already took effect (rule 0); the executor records it, acts on nothing.
VerdictKind = Literal["execute", "approve", "deny", "dry_run", "applied"]

SCALE_ACTIONS = frozenset({"scale_up", "scale_down"})
DISRUPTIVE_ACTIONS = frozenset({"restart_pod", "restart_workload", "rollback"})
NODE_ACTIONS = frozenset({"cordon_node", "drain_node"})

# The kinds each action acts on, as the cluster adapters carry it out; every layer (the
# analyzers, the LLM's allow-list, this policy) holds an action to it.
ACTION_KINDS: Mapping[str, frozenset[str]] = {
    "rollback": frozenset({"Deployment", "StatefulSet", "DaemonSet"}),
    "scale_up": frozenset({"Deployment", "StatefulSet"}),
    "scale_down": frozenset({"Deployment", "StatefulSet"}),
    "restart_workload": frozenset({"Deployment", "StatefulSet", "DaemonSet"}),
    "restart_pod": frozenset({"Pod"}),
    "cordon_node": frozenset({"Node"}),
    "drain_node": frozenset({"Node"}),
    "update_config": frozenset({"ConfigMap"}),
}
assert set(ACTION_KINDS) == set(ACTION_TYPES)
# Why a workload action does not apply to a kind, where the bare "not a X" would not say.
_KIND_WHY: Mapping[tuple[str, str], str] = {
    (t, "DaemonSet"): "a DaemonSet runs one pod per eligible node: it has no replica count to scale"
    for t in SCALE_ACTIONS
}


def kind_problem(action_type: str, kind: str) -> str | None:
    """Why ``action_type`` must not act on a target of ``kind``, or None when it may."""
    kinds = ACTION_KINDS.get(action_type, frozenset())
    if kind in kinds:
        return None
    why = _KIND_WHY.get((action_type, kind), f"it acts on a {' or '.join(sorted(kinds))} only")
    return f"{action_type} does not apply to a {kind}: {why}"


UNDO_PARAM = "undo_of"  # an action that restores what action <undo_of> changed
# A scale moves the replica count by at most this much at once, whoever asked (a rule,
# the LLM, a person): the next step waits for the cooldown and the verification.
MAX_SCALE_STEP = 5


@dataclass(frozen=True, slots=True)
class Scope:
    """The policy a namespace gets; ``source`` names the override it came from, if any."""

    mode: Mode
    confidence_threshold: float
    require_approval: tuple[str, ...]
    dry_run: bool
    source: str = ""

    def why(self, reason: str) -> str:
        return f"{reason} ({self.source})" if self.source else reason


def scope_for(namespace: str, settings: Settings) -> Scope:
    """The first override whose patterns match ``namespace`` over the global policy. A
    node's actions (no namespace) get the global one."""
    rem = settings.remediation
    base = Scope(
        settings.agent.mode, rem.confidence_threshold, rem.require_approval, settings.agent.dry_run
    )
    if not namespace:
        return base
    for i, o in enumerate(rem.overrides):
        if any(fnmatch.fnmatchcase(namespace, p) for p in o.namespaces):
            return Scope(
                o.mode or base.mode,
                base.confidence_threshold
                if o.confidence_threshold is None
                else o.confidence_threshold,
                base.require_approval if o.require_approval is None else o.require_approval,
                base.dry_run or o.dry_run,
                f"remediation.overrides[{i}]",
            )
    return base


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
    action_id: str = ""
    type: str = ""
    outcome: Outcome = "unknown"  # until its verification says otherwise
    # A rollback's: the image it moved the target away from (its prior state's), which a
    # rollback must not bring back on its own (rule 7c).
    moved_from: str = ""

    @property
    def ineffective(self) -> bool:
        return self.outcome in INEFFECTIVE


INEFFECTIVE: frozenset[Outcome] = frozenset({"not_healed", "worse"})
BUDGET_WINDOW = 3600.0  # the hourly action budgets look back this far


def claims_held(rem: RemediationSection) -> float:
    """Seconds a budget claim can still count: a unit for BUDGET_WINDOW, a node claim for
    ``rem.node_claim_lifetime`` (a drain may run longer than the hour)."""
    return max(BUDGET_WINDOW, rem.node_claim_lifetime)


def history_window(rem: RemediationSection) -> float:
    """Seconds of past actions the policy looks at: the cooldown, the hourly budgets and
    the repeat window (rule 7c looks there whatever the repeat checks)."""
    return max(rem.cooldown, BUDGET_WINDOW, rem.repeat_window)


def moved_from(action_type: str, prior_state: Mapping[str, object]) -> str:
    """The image a rollback moved its target away from, as its prior state records it;
    "" for any other action."""
    image = prior_state.get("image") if action_type == "rollback" else None
    return image if isinstance(image, str) else ""


def learned(known: Executed | None, r: ActionResult) -> Executed | None:
    """What one record of the action-results topic teaches the history, so every replica
    and a restarted executor keep one set of cooldowns, budgets and outcomes: the entry
    ``r`` makes, or ``known`` with the outcome its verification (a later record of the same
    action) gave, or None when it changes nothing. An action counts when it changed the
    cluster: succeeded, or failed half-way (a failure that recorded the prior state it had
    started to change)."""
    if known is not None:
        if r.status == "succeeded" and r.outcome not in ("unknown", known.outcome):
            return replace(known, outcome=r.outcome)
        return None
    if r.status == "succeeded" or (r.status == "failed" and r.prior_state):
        return Executed(
            target_key=r.target.key,
            namespace=r.target.namespace,
            at=r.started_at,
            action_id=r.action_id,
            type=r.type,
            outcome=r.outcome,
            moved_from=moved_from(r.type, r.prior_state),
        )
    return None


def repeat_problem(
    action: ActionRequest, rem: RemediationSection, history: Collection[Executed], now: datetime
) -> str | None:
    """Why rule 7b sends ``action`` to a person, or None: earlier runs of the same action
    type on the same target within ``repeat_window`` (an undo is exempt, as from the
    cooldown: it repairs)."""
    if action.params.get(UNDO_PARAM) or not (rem.ineffective_after or rem.max_repeats):
        return None
    since = now - timedelta(seconds=rem.repeat_window)
    runs = [
        h
        for h in history
        if h.target_key == action.target.key
        and h.type == action.type
        and h.at > since
        and h.action_id != action.id
    ]
    what = f"{action.type} on {action.target.key}"
    window = _span(rem.repeat_window)
    bad = sum(1 for h in runs if h.ineffective)
    if rem.ineffective_after and bad >= rem.ineffective_after:
        return f"{what} was verified ineffective {bad} times in the last {window}"
    if rem.max_repeats and len(runs) >= rem.max_repeats:
        return f"{what} ran {len(runs)} times in the last {window}: it keeps masking a cause"
    return None


def flip_problem(
    action: ActionRequest,
    rem: RemediationSection,
    history: Collection[Executed],
    facts: Facts,
    now: datetime,
) -> str | None:
    """Why rule 7c sends ``action`` to a person, or None: a rollback that would re-deploy
    (``facts.restores``, read from the cluster) a template a rollback moved the target away
    from within ``repeat_window``: one of the agent's (its history, exact) or any other
    (the cluster's revision history: ``kubectl rollout undo``, a patch back to an older
    template). After a rollback the restored template is itself a recent rollout, so an
    incident that goes on would otherwise flip the workload back to the release it left.
    An undo is exempt: a person asked for exactly that."""
    restores = facts.restores
    if action.type != "rollback" or action.params.get(UNDO_PARAM) or not restores:
        return None
    since = now - timedelta(seconds=rem.repeat_window)
    key = action.target.key
    what = f"rollback of {key} would re-deploy {restores}"
    ours = [
        h
        for h in history
        if h.target_key == key
        and h.type == "rollback"
        and h.moved_from == restores
        and h.at > since
        and h.action_id != action.id
    ]
    if ours:
        last = max(ours, key=lambda h: h.at)
        return (
            f"{what}, which the agent's rollback {last.action_id} moved it away from at "
            f"{last.at.isoformat()}: rolling back again would flip between the two releases"
        )
    theirs = [t for image, t in facts.rolled_back_from if image == restores and t > since]
    if theirs:
        return (
            f"{what}, which a rollback in its rollout history (kubectl rollout undo, the "
            f"agent's, or a patch back to an older template) moved it away from at "
            f"{max(theirs).isoformat()}"
        )
    return None


def _next_step(action: ActionRequest, recent: Sequence[Executed]) -> bool:
    """Whether ``action`` escalates past what the cooldown holds: every recent action on
    the target was verified ineffective and was of another type. The cooldown lets an
    action take effect and be judged before the next; once judged a failure, waiting out
    the rest only prolongs the outage (the repeat rule and the limits still hold)."""
    return all(h.ineffective and h.type != action.type for h in recent)


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the blast-radius rules know about the target; ``None``/empty: unknown."""

    replicas: int | None = None  # the workload's desired replicas now (a pod's owner's)
    target_replicas: int | None = None  # scale: the replicas asked for, before the bounds
    pods_disrupted: int = 0  # ready pods the action takes down at once
    pdb_headroom: int | None = None  # disruptions the tightest covering budget allows
    pdbs: tuple[str, ...] = ()
    cordoned_nodes: tuple[str, ...] = ()  # nodes already unschedulable
    # rollback: the image of the revision it would re-activate, and (image, when) of each
    # template a re-activation in the rollout history moved the target away from
    restores: str | None = None
    rolled_back_from: tuple[tuple[str, datetime], ...] = ()


def bounded_replicas(desired: int, rem: RemediationSection) -> int:
    """Scale targets are clamped into the policy's [min_replicas, max_replicas]."""
    return max(rem.min_replicas, min(rem.max_replicas, desired))


def scale_problem(
    action_type: str, current: int, requested: int, rem: RemediationSection
) -> str | None:
    """Why a scale from ``current`` replicas to ``requested`` (before the bounds) must not
    run, or None. The bounds clamp a target, never across the current count: a workload
    already above ``max_replicas`` clamped to it by a scale_up would lose capacity."""
    up = action_type == "scale_up"
    way = "up" if up else "down"
    step = requested - current if up else current - requested
    if not 1 <= step <= MAX_SCALE_STEP:
        # An absolute count is checked here, where the current one is known: "1" on a
        # scale_up of 20 replicas is a scale-down by 19.
        return (
            f"{current} replicas now; {action_type} to {requested} is not {way} by "
            f"1..{MAX_SCALE_STEP}"
        )
    bounded = bounded_replicas(requested, rem)
    if (bounded > current) if up else (bounded < current):
        return None
    return (
        f"{current} replicas now; {action_type} to {requested} within the policy bounds "
        f"{rem.min_replicas}..{rem.max_replicas} gives {bounded}, which is not {way}"
    )


def replicas_param_problem(action_type: str, value: ParamValue) -> str | None:
    """What is wrong with a scale's ``replicas`` param without knowing the current count:
    its form, a relative step the wrong way or beyond MAX_SCALE_STEP, a scale_up to 0."""
    raw = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[+-]?[0-9]{1,6}", raw):
        return f"params.replicas: expected +N, -N or N, got {value!r}"
    n = int(raw)
    up = action_type == "scale_up"
    sign = "+" if up else "-"
    if raw[0] in "+-" and (raw[0] != sign or not 1 <= abs(n) <= MAX_SCALE_STEP):
        return (
            f"params.replicas: a {action_type} moves by {sign}1..{sign}{MAX_SCALE_STEP}, "
            f"got {raw!r}"
        )
    if up and raw[0] not in "+-" and n == 0:
        return "params.replicas: a scale_up to 0 replicas is never up"
    return None


def restart_limit(replicas: int, rem: RemediationSection) -> int:
    """Pods a restart may take down at once: the fraction, but always at least one."""
    return max(1, int(rem.max_restart_fraction * replicas))


def _number(params: Mapping[str, ParamValue], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"params.{name}: expected a number of seconds, got {value!r}")
    try:
        n = float(value)
    except ValueError:
        raise ValueError(f"params.{name}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(n):
        raise ValueError(f"params.{name}: expected a finite number of seconds, got {value!r}")
    return n


def drain_params(
    params: Mapping[str, ParamValue], rem: RemediationSection
) -> tuple[float | None, float]:
    """(grace period, timeout) of a drain; ValueError names the param that is out of bounds.

    The configured ``drain_timeout`` is a ceiling an action may only lower: a drain holds
    the executor's partition while it runs, and liveness counts on its bound. A grace of 0
    would delete pods with no graceful termination at all, and one past the timeout could
    never finish within it. The configured ``drain_grace_period`` is a default, not a
    request: an action that shortens the timeout below it gets the timeout as its grace
    (what an explicit ``grace_period`` may be at most), unless that timeout is under 1 s,
    which leaves no graceful termination at all (refused, naming ``params.timeout``)."""
    timeout = _number(params, "timeout")
    if timeout is None:
        timeout = rem.drain_timeout
    elif not 0 < timeout <= rem.drain_timeout:
        raise ValueError(
            f"params.timeout: {timeout:g}s is outside (0, remediation.drain_timeout="
            f"{rem.drain_timeout:g}s]"
        )
    grace = _number(params, "grace_period")
    if grace is None:
        grace = rem.drain_grace_period
        if grace is not None and grace > timeout:
            if timeout < 1:
                raise ValueError(
                    f"params.timeout: {timeout:g}s is below 1s, the least grace period, and "
                    f"remediation.drain_grace_period={grace:g}s applies"
                )
            grace = timeout
    elif not 1 <= grace <= timeout:
        raise ValueError(f"params.grace_period: {grace:g}s is outside [1, timeout={timeout:g}s]")
    return grace, timeout


def revision_param(params: Mapping[str, ParamValue]) -> int | None:
    """The rollback's target revision (None: the previous one); ValueError names the param.
    ``0`` is the previous one too, as in the reference (and Kubernetes' ``rollbackTo``):
    a runbook or a model writing it asks for the plain rollback, not for nothing."""
    value = params.get("revision")
    if value is None:
        return None
    if isinstance(value, bool) or not re.fullmatch(r"0|[1-9][0-9]{0,9}", str(value).strip()):
        raise ValueError(
            f"params.revision: expected a positive revision number (or 0: the previous "
            f"one), got {value!r}"
        )
    return int(str(value).strip()) or None


def param_problem(
    action: ActionRequest, rem: RemediationSection, unknown_undo: str | None = None
) -> str | None:
    """Why ``action``'s params must not run, or None. Params come from the analysis, a
    runbook or a person; the executor must never be the one to find out they are bad.
    ``unknown_undo``: why ``action``, an undo, restores no recorded prior state (see
    :func:`unknown_undo`); its params are then held to :func:`undo_param_problem`."""
    p = action.params
    if p.get(UNDO_PARAM):
        if unknown_undo:
            return undo_param_problem(action, rem)
        return None  # the prior state an earlier action recorded; the cluster restores it
    try:
        if action.type == "drain_node":
            drain_params(p, rem)
        elif action.type == "rollback":
            revision_param(p)
        elif action.type in SCALE_ACTIONS and "replicas" in p:
            problem = replicas_param_problem(action.type, p["replicas"])
            if problem is not None:
                raise ValueError(problem)
        elif action.type == "update_config":
            key = p.get("key")
            if not isinstance(key, str) or not key:
                raise ValueError("params.key: update_config needs the config key to set")
            if p.get("value") is None:
                raise ValueError("params.value: update_config needs the value to set")
    except ValueError as err:
        return str(err)
    return None


# The params the adapters' undo reads, by action type (``Cluster.undo``): an undo restoring
# no recorded prior state may carry no other, so none reaches the cluster unchecked.
_UNDO_KEYS: Mapping[str, frozenset[str]] = {
    "scale_up": frozenset({"replicas"}),
    "scale_down": frozenset({"replicas"}),
    "rollback": frozenset({"revision"}),
    "cordon_node": frozenset({"unschedulable"}),
    "drain_node": frozenset({"unschedulable"}),
    "update_config": frozenset({"key", "existed", "value"}),
}


def undo_param_problem(action: ActionRequest, rem: RemediationSection) -> str | None:
    """Why the params of ``action``, an undo restoring no recorded prior state (forged, or
    of an action older than the executor's memory), must not run, or None. Nothing vouches
    for them, so they are held to the hard bounds a forward action is: a scale restores an
    absolute count within ``min_replicas..max_replicas`` (the step is checked against the
    current count, rule 6b: see :func:`undo_scale_problem`), a rollback a positive
    revision, a cordon/drain a boolean ``unschedulable``. HPA bounds are restored only
    from a recorded prior state: the HPA an undo names cannot be told to be the target's."""
    p = {k: v for k, v in action.params.items() if k != UNDO_PARAM}
    keys = _UNDO_KEYS.get(action.type)
    if keys is None:
        return f"params.{UNDO_PARAM}: a {action.type} cannot be undone (nothing to restore)"
    extra = sorted(set(p) - keys)
    if extra:
        return (
            f"params.{extra[0]}: an undo of {action.type} restoring no recorded prior state "
            f"carries {', '.join(sorted(keys))} only"
        )
    if action.type in SCALE_ACTIONS:
        value = p.get("replicas")
        if isinstance(value, bool) or not re.fullmatch(r"[0-9]{1,6}", str(value).strip()):
            return f"params.replicas: an undo restores an absolute count, got {value!r}"
        n = int(str(value).strip())
        if not rem.min_replicas <= n <= rem.max_replicas:
            return (
                f"params.replicas: {n} is outside the policy bounds "
                f"{rem.min_replicas}..{rem.max_replicas} (min_replicas..max_replicas)"
            )
    elif action.type == "rollback":
        try:
            if revision_param(p) is None:
                return "params.revision: an undo of a rollback names the revision it restores"
        except ValueError as err:
            return str(err)
    elif action.type in NODE_ACTIONS:
        if not isinstance(p.get("unschedulable", False), bool):
            return f"params.unschedulable: expected true or false, got {p['unschedulable']!r}"
    else:  # update_config
        key, existed = p.get("key"), p.get("existed", False)
        if not isinstance(key, str) or not key:
            return "params.key: an undo of update_config needs the config key it restores"
        if not isinstance(existed, bool):
            return f"params.existed: expected true or false, got {existed!r}"
        if existed and p.get("value") is None:
            return "params.value: an undo restoring an existing key needs its value"
    return None


def undo_scale_problem(current: int, requested: int, rem: RemediationSection) -> str | None:
    """Why an undo restoring no recorded prior state must not scale from ``current`` to
    ``requested`` replicas, or None. Held to the bounds and to the step's size, not to its
    direction: an undo moves the count the way opposite to its action's type (the undo of
    a scale_up scales down), and the step it reverses was at most MAX_SCALE_STEP."""
    if not rem.min_replicas <= requested <= rem.max_replicas:
        return (
            f"undo to {requested} replicas is outside the policy bounds "
            f"{rem.min_replicas}..{rem.max_replicas} (min_replicas..max_replicas)"
        )
    if abs(requested - current) > MAX_SCALE_STEP:
        return (
            f"{current} replicas now; an undo to {requested} restoring no recorded prior "
            f"state moves by more than {MAX_SCALE_STEP}"
        )
    return None


def undo_params(prior_state: Mapping[str, object]) -> dict[str, ParamValue]:
    """The params an undo of an action carries: the prior state it recorded (the scalar
    part, all a request can carry), without the :data:`UNDO_PARAM`."""
    return {k: v for k, v in prior_state.items() if isinstance(v, str | int | float | bool)}


@dataclass(frozen=True, slots=True)
class PriorState:
    """What an executed action recorded it changed: what an undo of it may restore."""

    type: str
    target_key: str
    params: Mapping[str, ParamValue]  # undo_params of the result's prior state

    @classmethod
    def of(cls, r: ActionResult) -> PriorState:
        return cls(type=r.type, target_key=r.target.key, params=undo_params(r.prior_state))


def unknown_undo(
    action: ActionRequest, recorded: Mapping[str, Collection[PriorState]]
) -> str | None:
    """Why ``action``, an undo, does not restore (on the same target, with the same action
    type) a prior state the action it names recorded (``recorded``: by action id); None
    when it does, or is no undo."""
    original = action.params.get(UNDO_PARAM)
    if not original:
        return None
    known = recorded.get(str(original))
    if not known:
        return f"undo of action {original}, which records no prior state known here"
    wanted = PriorState(
        type=action.type,
        target_key=action.target.key,
        params={k: v for k, v in action.params.items() if k != UNDO_PARAM},
    )
    if wanted not in known:
        return (
            f"the undo does not restore the prior state action {original} recorded on "
            f"{action.type} {action.target.key}"
        )
    return None


def unearned_approval(
    action: ActionRequest, recorded: Mapping[str, Collection[PriorState]]
) -> str | None:
    """Why the ``approved_by`` of ``action``, as read from the actions topic, is not
    honoured; None when it is (or there is none). Approvals reach the executor through the
    approvals and decisions topics, never inside a request; the one exception is an undo
    (``sre-agent actions undo``), earned when it restores a recorded prior state (see
    :func:`unknown_undo`). Anything else claiming approval, a writer of the topic or an
    upstream bug, is decided as the unapproved request it is."""
    if not action.approved_by:
        return None
    if not action.params.get(UNDO_PARAM):
        return "an approval is given on the approvals topic, never in the request"
    return unknown_undo(action, recorded)


@dataclass(frozen=True, slots=True)
class Switches:
    """Run-time switches; they override the file so an operator can act without a restart."""

    kill_switch: bool = False
    dry_run: bool = False
    why: str = ""  # who or what turned the kill switch on, for the verdict
    dry_run_why: str = ""  # who or what turned shadow mode on, for a drain it stops


def switches_for(changes: Iterable[SwitchChange], namespace: str) -> Switches:
    """The switches the latest ``changes`` (one per switch and scope) turn on for a target
    in ``namespace``: the cluster-wide ones, and that namespace's ("" for a node: only
    the cluster-wide ones)."""
    on = [c for c in changes if c.on and c.namespace in ("", namespace)]
    return Switches(
        kill_switch=any(c.name == "kill_switch" for c in on),
        dry_run=any(c.name == "dry_run" for c in on),
        why="; ".join(c.describe() for c in on if c.name == "kill_switch"),
        dry_run_why="; ".join(c.describe() for c in on if c.name == "dry_run"),
    )


def merged(*sources: Switches) -> Switches:
    """A switch is on when any source turns it on (a file, the switches topic): no source
    can turn off what another turned on."""
    kill = [s for s in sources if s.kill_switch]
    shadow = [s for s in sources if s.dry_run]
    return Switches(
        kill_switch=bool(kill),
        dry_run=bool(shadow),
        why="; ".join(s.why for s in kill if s.why),
        dry_run_why="; ".join(s.dry_run_why for s in shadow if s.dry_run_why),
    )


def halt_reason(switches: Switches, settings: Settings, namespace: str) -> str | None:
    """Why an action in progress (a drain, between evictions) stops now, else None: the
    kill switch, or shadow mode, from whichever source. Shadow mode turned on mid-drain
    promises that nothing more is applied, as the kill switch does; the drain ends
    half done and is paged, not finished in the mode that forbids it."""
    if switches.kill_switch or settings.agent.kill_switch:
        return f"the kill switch ({switches.why})" if switches.why else "the kill switch"
    scope = scope_for(namespace, settings)
    if switches.dry_run or scope.dry_run:
        why = switches.dry_run_why or ("agent.dry_run" if settings.agent.dry_run else scope.source)
        return f"shadow mode (dry run: {why})" if why else "shadow mode (dry run)"
    return None


# The rules by which the agent holds itself back: the remedy it chose did not run, so a
# human should know. The operator's own choices (remediation disabled, the kill switch,
# namespaces, manual mode) are not news to the operator.
LIMITS = frozenset(
    {
        "params",
        "cooldown",
        "max_actions_per_hour",
        "max_actions_per_namespace_per_hour",
        "replica_bounds",
        "max_restart_fraction",
        "pod_disruption_budget",
        "max_nodes_cordoned",
    }
)


def held_back(verdict: Verdict, action: ActionRequest, history: Collection[Executed]) -> bool:
    """A limit denied an action that has not run: not the repeat of one that did (a
    re-analysis asks for the same action id, and its own cooldown denies it)."""
    return (
        verdict.kind == "deny"
        and verdict.rule in LIMITS
        and not any(h.action_id == action.id for h in history)
    )


def _over_budget(spent: Sequence[str], ns: str, rem: RemediationSection) -> Verdict | None:
    """The hourly budgets' denial, given the namespaces of the actions of the last hour."""
    if len(spent) >= rem.max_actions_per_hour:
        return Verdict(
            "deny",
            "max_actions_per_hour",
            f"{len(spent)} actions in the last hour (budget reached)",
        )
    in_ns = sum(1 for n in spent if n == ns) if ns else 0
    if ns and in_ns >= rem.max_actions_per_namespace_per_hour:
        return Verdict(
            "deny",
            "max_actions_per_namespace_per_hour",
            f"{in_ns} actions in namespace {ns!r} in the last hour (budget reached)",
        )
    return None


def budget_grants(claims: Sequence[BudgetClaim], rem: RemediationSection) -> list[Verdict | None]:
    """The answer to each claim of the budget-claims topic, in the topic's order: None
    when granted, else the denial. Every replica reads the one order, so all agree which
    of two claims made at the same instant got the last unit.

    Budgets: a claim counts the units held by claims granted before it within
    BUDGET_WINDOW of its time; a released unit no longer counts; an action that holds a
    unit is granted again (a redelivery of it) without spending another.
    Nodes: a node action's claim counts as cordoned, besides the nodes its replica saw
    cordoned, every node of an earlier granted node action not yet done or released
    (within ``drain_timeout`` and a margin: a replica that died mid-drain does not hold
    its node for ever; by then the cluster shows the cordon)."""
    return _replay(claims, rem)[0]


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What the claims say is spent now (``sre-agent actions budget``)."""

    spent: int  # units of the global hourly budget
    by_namespace: Mapping[str, int]
    nodes_in_flight: Mapping[str, BudgetClaim]  # node -> the claim of its action


def budget_usage(
    claims: Sequence[BudgetClaim], rem: RemediationSection, now: datetime
) -> BudgetUsage:
    """The units held within the hour before ``now``, and the node actions in flight."""
    _, held, busy = _replay(claims, rem)
    hour = [h for h in held.values() if h.at > now - timedelta(seconds=BUDGET_WINDOW)]
    by_ns: dict[str, int] = {}
    for h in hour:
        if h.namespace:
            by_ns[h.namespace] = by_ns.get(h.namespace, 0) + 1
    return BudgetUsage(len(hour), by_ns, {b.node: b for b in _in_flight(busy, now, rem)})


def _in_flight(
    busy: Mapping[str, BudgetClaim], at: datetime, rem: RemediationSection
) -> list[BudgetClaim]:
    horizon = at - timedelta(seconds=rem.node_claim_lifetime)
    return [b for b in busy.values() if b.at > horizon]


def _replay(
    claims: Sequence[BudgetClaim], rem: RemediationSection
) -> tuple[list[Verdict | None], dict[str, BudgetClaim], dict[str, BudgetClaim]]:
    """The answers, and the units held and node actions in flight after the last claim."""
    held: dict[str, BudgetClaim] = {}  # action id -> its granted, unreleased claim
    busy: dict[str, BudgetClaim] = {}  # action id -> its granted node claim, not yet done
    out: list[Verdict | None] = []
    for c in claims:
        if c.released or c.done:
            busy.pop(c.action_id, None)
            if c.released:
                held.pop(c.action_id, None)
            out.append(None)
            continue
        if c.action_id in held:
            out.append(None)
            continue
        since = c.at - timedelta(seconds=BUDGET_WINDOW)
        over = _over_budget([h.namespace for h in held.values() if h.at > since], c.namespace, rem)
        if over is None and c.node:
            in_flight = {b.node for b in _in_flight(busy, c.at, rem)}
            over = _too_many_cordoned(c.node, {*c.cordoned, *in_flight}, rem)
        if over is None:
            held[c.action_id] = c
            if c.node:
                busy[c.action_id] = c
        out.append(over)
    return out, held, busy


def cordons(action: ActionRequest) -> bool:
    """Whether ``action`` may leave its node cordoned, the one thing ``max_nodes_cordoned``
    bounds: a cordon or drain, or the undo of one that restores a cordoned node (its node
    may have been uncordoned since), read as the adapters' undo reads it. An undo restoring
    a schedulable node (an uncordon) never adds a cordoned node: neither the policy nor the
    budget claims hold it back for the nodes cordoned elsewhere, however many."""
    if action.type not in NODE_ACTIONS:
        return False
    if action.params.get(UNDO_PARAM):
        return bool(action.params.get("unschedulable", False))
    return True


def budget_claim(
    action: ActionRequest, now: datetime, *, by: str = "", cordoned: tuple[str, ...] = ()
) -> BudgetClaim:
    """The claim ``action`` appends before it executes: a unit of the hourly budgets (an
    undo is an action within the hour like any other), and its node with the nodes its
    replica saw ``cordoned`` only when it may cordon that node (see :func:`cordons`)."""
    node = action.target.name if cordons(action) else ""
    return BudgetClaim(
        action.id,
        action.target.namespace,
        now,
        by=by,
        node=node,
        cordoned=cordoned if node else (),
    )


def _too_many_cordoned(
    node: str, cordoned: Iterable[str], rem: RemediationSection
) -> Verdict | None:
    others = sorted({n for n in cordoned if n != node})
    if len(others) >= rem.max_nodes_cordoned:
        return Verdict(
            "deny",
            "max_nodes_cordoned",
            f"{len(others)} nodes already cordoned ({', '.join(others)}); "
            f"at most {rem.max_nodes_cordoned} at once",
        )
    return None


def decide(
    action: ActionRequest,
    settings: Settings,
    history: Collection[Executed],
    switches: Switches,
    now: datetime,
    facts: Facts | None = None,
    unknown_undo: str | None = None,
    applied: bool = False,
) -> Verdict:
    """``unknown_undo``: why ``action``, an undo, restores no prior state the executor
    knows (see :func:`unknown_undo`); None for an undo says it restores one. It is not
    one a person asked for, so a person decides (7a), and nothing vouches for it, so it
    has none of an undo's exemptions: approved or not, it is held to the params' bounds
    (4a, :func:`undo_param_problem`), the cooldown (5) and the replica bounds (6b,
    :func:`undo_scale_problem`). ``applied``: the action's id is on its target, as the
    cluster read it (rule 0); False when not, or unknown."""
    rem = settings.remediation
    ns = action.target.namespace
    if applied:
        return Verdict(
            "applied",
            "already_applied",
            f"action {action.id} is on {action.target.key}: an earlier delivery applied it",
        )
    if not rem.enabled:
        return Verdict("deny", "remediation.enabled", "remediation is disabled")
    if switches.kill_switch or settings.agent.kill_switch:
        why = f" ({switches.why})" if switches.why else ""
        return Verdict("deny", "kill_switch", f"the kill switch is on{why}: no action executes")
    if ns and ns in rem.denied_namespaces:
        return Verdict("deny", "denied_namespaces", f"namespace {ns!r} is denied")
    if ns and rem.allowed_namespaces and ns not in rem.allowed_namespaces:
        return Verdict("deny", "allowed_namespaces", f"namespace {ns!r} is not allowed")
    scope = scope_for(ns, settings)
    if scope.mode == "manual":
        return Verdict("deny", "mode.manual", scope.why("manual mode: recommendation only"))
    problem = param_problem(action, rem, unknown_undo)
    if problem is not None:
        return Verdict("deny", "params", problem)
    problem = kind_problem(action.type, action.target.kind)
    if problem is not None:
        return Verdict("deny", "target_kind", f"{action.target.key}: {problem}")
    cooldown_start = now - timedelta(seconds=rem.cooldown)
    recent = [h for h in history if h.target_key == action.target.key and h.at > cooldown_start]
    earned_undo = bool(action.params.get(UNDO_PARAM)) and not unknown_undo
    if recent and not earned_undo and not _next_step(action, recent):
        last = max(h.at for h in recent)
        return Verdict(
            "deny",
            "cooldown",
            f"{action.target.key} was acted on at {last.isoformat()}, "
            f"within the {rem.cooldown:.0f}s cooldown",
        )
    hour_ago = now - timedelta(seconds=BUDGET_WINDOW)
    spent = [h.namespace for h in history if h.at > hour_ago]
    over = _over_budget(spent, ns, rem)
    if over is not None:
        return over
    limit = _blast_radius(action, rem, facts or Facts(), earned_undo)
    if limit is not None:
        return limit
    shadow = switches.dry_run or scope.dry_run
    go: VerdictKind = "dry_run" if shadow else "execute"
    if action.approved_by:
        return Verdict(go, "approved", f"approved by {action.approved_by}")
    if unknown_undo:
        return Verdict("approve", "unknown_undo", f"{unknown_undo}; a person decides")
    repeated = repeat_problem(action, rem, history, now)
    if repeated is not None:
        return Verdict("approve", "repeat", f"{repeated}; a person decides whether to try again")
    flip = flip_problem(action, rem, history, facts or Facts(), now)
    if flip is not None:
        return Verdict("approve", "rollback_flip", f"{flip}; a person decides which release runs")
    if scope.mode == "supervised":
        return Verdict(
            "approve", "mode.supervised", scope.why("supervised mode: every action is approved")
        )
    if action.type in scope.require_approval:
        return Verdict("approve", "require_approval", scope.why(f"{action.type} requires approval"))
    threshold = scope.confidence_threshold
    if action.confidence < threshold:
        return Verdict(
            "approve",
            "confidence_threshold",
            scope.why(f"confidence {action.confidence:.2f} < threshold {threshold:.2f}"),
        )
    return Verdict(
        go, "autonomous", scope.why(f"confidence {action.confidence:.2f} meets the threshold")
    )


def _blast_radius(
    action: ActionRequest, rem: RemediationSection, f: Facts, earned_undo: bool
) -> Verdict | None:
    """Rules 6b-6e; None when none applies. ``earned_undo``: ``action`` is an undo restoring
    a recorded prior state (an undo restoring none is held to every bound)."""
    key = action.target.key
    if action.type in SCALE_ACTIONS and f.replicas is not None and not earned_undo:
        # An earned undo restores the count it recorded, whatever the step or bounds.
        problem = None
        if action.params.get(UNDO_PARAM):
            # Its params passed undo_param_problem (rule 4a): an absolute count.
            requested = int(str(action.params.get("replicas")).strip())
            problem = undo_scale_problem(f.replicas, requested, rem)
        elif f.target_replicas is not None:
            problem = scale_problem(action.type, f.replicas, f.target_replicas, rem)
        if problem is not None:
            return Verdict("deny", "replica_bounds", f"{key}: {problem}")
    if action.type in DISRUPTIVE_ACTIONS and f.replicas:
        limit = restart_limit(f.replicas, rem)
        if f.pods_disrupted > limit:
            return Verdict(
                "deny",
                "max_restart_fraction",
                f"{action.type} of {key} would take down {f.pods_disrupted} of {f.replicas} pods "
                f"at once; at most {limit} ({rem.max_restart_fraction:.0%}) may be",
            )
    if (
        action.type in DISRUPTIVE_ACTIONS
        and f.pdb_headroom is not None
        and f.pods_disrupted > f.pdb_headroom
    ):
        return Verdict(
            "deny",
            "pod_disruption_budget",
            f"{action.type} of {key} would take down {f.pods_disrupted} pods; "
            f"PodDisruptionBudget {', '.join(f.pdbs) or '?'} allows {f.pdb_headroom}",
        )
    if cordons(action):
        return _too_many_cordoned(action.target.name, f.cordoned_nodes, rem)
    return None
