"""Judging an action's outcome: pure functions over what verification observed.

Two sources of truth, read after the settle time (``remediation.verify_after``):

- the *triggering condition* (the patterns that fired, re-run on Prometheus, and the
  Alertmanager alerts, looked up at Alertmanager; each read only where it fired, see
  :class:`~agent.models.Firing`): it decides healed / not healed whenever all of it
  could be checked;
- the *target's state* in the cluster (:class:`~handlers.cluster.Observation`): whether the
  action's intended state holds (rollout finished with every replica ready, node cordoned
  and empty, pod replaced), used when there is no condition to re-check.

Either way, a workload that has fewer ready pods than before the action, and fewer than it
wants, was made worse; one whose containers restarted since the action (a crash loop,
an OOM kill) was not healed, whatever the condition says: readiness at one instant can
catch a crash-looping pod between two crashes, its restart count cannot; and a restart or
rollback whose rollout has not settled is not judged healed yet (its new pods' restarts
cannot be read before it settles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.labels import service_of
from agent.models import ActionRequest, Anomaly, Firing, Outcome
from handlers.cluster import Observation

WORKLOAD_ACTIONS = frozenset({"rollback", "scale_up", "scale_down", "restart_workload"})
# These replace every pod: whatever restarted after them restarted since them.
REPLACING_ACTIONS = frozenset({"rollback", "restart_workload"})


def judge(
    action_type: str,
    before: Observation | None,
    after: Observation | None,
    trigger: tuple[Outcome, str] | None,
    evicted_uid: str = "",
) -> tuple[Outcome, str]:
    """The outcome and why, from the observations around the action and the re-check;
    ``evicted_uid``: the pod a restart_pod evicted (a StatefulSet reuses its name)."""
    if (
        after is not None
        and before is not None
        and after.exists
        and action_type in WORKLOAD_ACTIONS
        and after.ready < before.ready
        and after.ready < after.desired
    ):
        why = f"ready pods fell from {before.ready} to {after.ready} of {after.desired}"
        return "worse", why + (f"; {trigger[1]}" if trigger else "")
    crashed = restarts_since(action_type, before, after)
    if crashed is not None:
        why = f"containers restarted {crashed} times since the action"
        return "not_healed", why + (f"; {trigger[1]}" if trigger else "")
    if (
        trigger is not None
        and trigger[0] == "healed"
        and action_type in REPLACING_ACTIONS
        and after is not None
        and after.exists
        and not after.settled
    ):
        # Its new pods are not all up: whether they crash (restarts_since) cannot be read
        # before the rollout settles, and a condition cleared meanwhile proves nothing of them.
        return (
            "unknown",
            f"{trigger[1]}, but the rollout has not finished: its new pods are not judged",
        )
    if trigger is not None and trigger[0] in ("healed", "not_healed", "worse"):
        return trigger
    prefix = f"{trigger[1]}; " if trigger else "no condition to re-check; "
    if after is None:
        return "unknown", prefix + "the target could not be read"
    ok, state = target_state(action_type, after, evicted_uid)
    if ok is None:
        return "unknown", prefix + state
    return ("healed" if ok else "not_healed"), prefix + state


def restarts_since(
    action_type: str, before: Observation | None, after: Observation | None
) -> int | None:
    """Container restarts of the workload's pods since the action, when there were any
    and they can be told apart from earlier ones: after a pod-replacing action every
    restart of the (settled, all new) pods counts; after a scale, those beyond the count
    before it."""
    if after is None or not after.exists or action_type not in WORKLOAD_ACTIONS:
        return None
    if action_type in REPLACING_ACTIONS:
        if not after.settled:
            return None  # old pods may still run: their restarts are not news
        since = 0
    elif before is None:
        return None
    else:
        since = before.restarts
    return after.restarts - since if after.restarts > since else None


def target_state(
    action_type: str, o: Observation, evicted_uid: str = ""
) -> tuple[bool | None, str]:
    """Whether the action's intended state holds (None: nothing to tell), and a phrase.
    ``evicted_uid``: the pod a restart_pod evicted (its result's prior state)."""
    if action_type in WORKLOAD_ACTIONS:
        if not o.exists:
            return False, "the workload is gone"
        done = o.settled and o.ready >= o.desired
        phase = "rollout finished" if o.settled else "rollout not finished"
        return done, f"{o.ready}/{o.desired} replicas ready, {phase}"
    if action_type == "restart_pod":
        if not o.exists or not o.settled:
            return True, "the pod was replaced"
        if evicted_uid and o.uid and o.uid != evicted_uid:
            return True, "the pod was replaced (a new pod under its name)"
        return False, "the pod is still running"
    if action_type == "cordon_node":
        if not o.exists:
            return False, "the node is gone"
        return o.cordoned, "node cordoned" if o.cordoned else "node schedulable again"
    if action_type == "drain_node":
        if not o.exists:
            return False, "the node is gone"
        if not o.cordoned:
            return False, "node schedulable again"
        return o.evictable == 0, f"node cordoned, {o.evictable} pods still to evict"
    if action_type == "update_config":
        return None, "configuration applied" if o.exists else "the ConfigMap is gone"
    return None, "no check for this action"


def to_recheck(action: ActionRequest) -> tuple[Firing, ...]:
    """What fired, and where; a request of an earlier version names only the patterns,
    which it re-checks within the incident's namespace and service."""
    if action.firing:
        return action.firing
    return tuple(Firing(name, service_of(action.labels)) for name in action.trigger)


def fires_at(series: Sequence[Mapping[str, str]], where: Mapping[str, str]) -> bool:
    """Whether the re-run condition has a series where it fired. ``series``: its labels
    normalised as the detector normalised them when it fired (a series naming its service
    by ``app`` or ``container`` has a ``service`` then)."""
    return any(all(s.get(k) == v for k, v in where.items()) for s in series)


# Why a part of the trigger is not re-run, by its source (see plan_recheck).
NOT_RECHECKABLE = {
    "kubernetes": "a Kubernetes signal: the target's state tells",
    "feed": "an external feed's signal",
    "agent": "the agent's own signal",
}
NO_PATTERN = "not a configured Prometheus pattern"
NO_PROMETHEUS = "no Prometheus to re-run it on"
NO_ALERTMANAGER = "an Alertmanager alert, and monitoring.alertmanager.url is not set"
NO_REPORT = "its feed has reported nothing of it since the action"


def partial_reply(warnings: Sequence[str]) -> str:
    """Why a pattern absent from a reply with warnings is not re-checked: Thanos, Mimir
    and Cortex answer "success" with warnings when a store or ingester is missing, and
    the series still firing may be the missing one."""
    return f"Prometheus answered in part: {'; '.join(warnings)}"


Places = Mapping[str, tuple[Mapping[str, str], ...]]  # name -> where it fired


@dataclass(frozen=True, slots=True)
class RecheckPlan:
    """Where each part of a trigger is re-run: name -> the places it fired, per source
    that can re-run it; the rest with why not. ``feed``: the parts an external feed
    reported, judged by what it reported since the action (see :func:`reported`)."""

    prometheus: Places
    alertmanager: Places
    unchecked: tuple[tuple[str, str], ...] = ()
    feed: Places = field(default_factory=dict)


def plan_recheck(
    firing: Sequence[Firing],
    *,
    has_pattern: Callable[[str], bool],
    prometheus: bool = True,
    alertmanager: bool = False,
    feeds: bool = False,
) -> RecheckPlan:
    """A Prometheus pattern is re-run on Prometheus, an Alertmanager alert is looked up at
    Alertmanager (when one is configured), a feed's signal is looked up in what the feed
    reported since the action (when the caller can read that); a firing of an earlier
    request (no source) is a pattern. Each name is re-run once, however many places it
    fired at."""
    prom: dict[str, list[Mapping[str, str]]] = {}
    am: dict[str, list[Mapping[str, str]]] = {}
    fed: dict[str, list[Mapping[str, str]]] = {}
    unchecked: dict[str, str] = {}
    for f in firing:
        if f.source in (None, "prometheus"):
            if not has_pattern(f.name):
                unchecked.setdefault(f.name, NO_PATTERN)
            elif prometheus:
                prom.setdefault(f.name, []).append(f.labels)
            else:
                unchecked.setdefault(f.name, NO_PROMETHEUS)
        elif f.source == "alertmanager":
            if alertmanager:
                am.setdefault(f.name, []).append(f.labels)
            else:
                unchecked.setdefault(f.name, NO_ALERTMANAGER)
        elif f.source == "feed" and feeds:
            fed.setdefault(f.name, []).append(f.labels)
        else:
            why = NOT_RECHECKABLE.get(f.source, "no source to re-run it at")
            unchecked.setdefault(f.name, why)
    return RecheckPlan(
        {k: tuple(v) for k, v in prom.items()},
        {k: tuple(v) for k, v in am.items()},
        tuple(unchecked.items()),
        {k: tuple(v) for k, v in fed.items()},
    )


def reported(
    places: Places, reports: Iterable[Anomaly], since: datetime
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Still firing, cleared and unchecked (name, why) parts of a trigger that an external
    feed reports, by the feed's latest word on each of its signals observed after
    ``since`` (the action). A feed says nothing while a condition holds, or repeats
    itself: silence since the action proves nothing either way. At a place, any signal
    last reported firing still fires (it fired again, or never stopped, after the
    action); otherwise one reported resolved has cleared. A name fired at several places
    has cleared when it has at every one; an older report is the world before the action
    (event time: a report delivered late still carries when it was observed)."""
    latest: dict[tuple[str, str], Anomaly] = {}  # (name, fingerprint) -> last report
    for a in reports:
        if a.source != "feed" or a.name not in places or a.observed_at <= since:
            continue
        k = (a.name, a.fingerprint)
        known = latest.get(k)
        # Two words at the same instant: firing wins, which only ever withholds "healed".
        if (
            known is None
            or a.observed_at > known.observed_at
            or (a.observed_at == known.observed_at and a.status == "firing")
        ):
            latest[k] = a
    still: list[str] = []
    cleared: list[str] = []
    unchecked: list[tuple[str, str]] = []
    for name, where in places.items():
        said = [a for (n, _), a in latest.items() if n == name]
        verdicts = []
        for place in where:
            here = [a for a in said if all(a.labels.get(k) == v for k, v in place.items())]
            verdicts.append(None if not here else any(a.status == "firing" for a in here))
        if any(verdicts):
            still.append(name)
        elif verdicts and all(v is False for v in verdicts):
            cleared.append(name)
        else:
            unchecked.append((name, NO_REPORT))
    return still, cleared, unchecked


def recheck_verdict(
    still: Sequence[str], cleared: Sequence[str], unchecked: Sequence[tuple[str, str]]
) -> tuple[Outcome, str] | None:
    """The trigger's verdict from the parts still firing, cleared, and not re-checkable
    (name, why): a Kubernetes signal, a pattern no longer configured. Only a condition
    checked in full decides healed: with a part unchecked the verdict is "unknown" and the
    target's state decides (see :func:`judge`)."""
    if still:
        return "not_healed", f"{', '.join(still)} still firing after the action"
    gone = f"{', '.join(cleared)} cleared" if cleared else ""
    if not unchecked:
        return ("healed", gone) if cleared else None
    by_why: dict[str, list[str]] = {}
    for name, why in unchecked:
        by_why.setdefault(why, []).append(name)
    parts = [f"{', '.join(names)} not re-checked ({why})" for why, names in by_why.items()]
    return "unknown", "; ".join([gone, *parts] if gone else parts)
