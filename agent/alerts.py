"""Alertmanager's alerts as anomalies: the payload model and its normalisation.

Used by the webhook receiver (:mod:`agent.webhook`) and by Kafka feeds in Alertmanager
format (:mod:`agent.feeds`). Payloads are validated once, here, into frozen dataclasses;
a violation raises :class:`~agent.errors.InvalidEvent` naming the field
(``alerts[0].labels: ...``).

Identity: an alert's fingerprint is ours, ``fingerprint("alertmanager", alertname,
labels)`` over the normalised label set, not Alertmanager's own ``fingerprint`` field.
Both are functions of the label set only, so they agree on what "the same alert" is, but
ours is also defined for producers that send no fingerprint (feeds, older versions), is
the same whichever transport delivered the alert (webhook or feed) and is the same on every
agent replica and for every Alertmanager peer of an HA cluster: duplicate deliveries
collapse in the correlator's fingerprint dedup.

``observed_at`` is the time of receipt (a repeated notification is liveness for the
correlator's ``resolve_timeout``); ``starts_at`` is the alert's ``startsAt``. Annotations
are kept verbatim as untrusted data (they are attacker-reachable text) and never
interpreted.

Alerts that are no anomaly: the agent's own alerts (``alertname`` starting with
``detectors.own_alerts_prefix``, ``SREAgent`` as in deploy/monitoring/self-healing-rules.yml)
and the configured heartbeat (``detectors.alertmanager.heartbeat``). One predicate,
:func:`ignored_reason`, decides it for the webhook and the feeds alike; each counts and logs
what it ignores through :class:`IgnoredAlerts`. Made anomalies, the agent's own alerts would
have it "heal" itself (or page about its own paging in a loop) and would be lost while it
is down: they are for a human (deploy/monitoring/alertmanager.yml routes them away).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, AwareDatetime, ConfigDict, Field

from agent.codec import from_obj
from agent.errors import InvalidEvent
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import (
    Anomaly,
    AnomalySource,
    Labels,
    Severity,
    fingerprint,
    observed,
    outside_window,
    stable_id,
)
from agent.settings import Settings

log = logging.getLogger(__name__)

MAX_ALERTS = 1000

# Alert names whose first ignoring is remembered (logged once). Past them, a new name is
# logged at most once per IGNORED_LOG_INTERVAL seconds, with how many went unlogged since:
# SREAgent<random> in a feed must flood neither memory nor the log.
MAX_IGNORED_NAMES = 1000
IGNORED_LOG_INTERVAL = 60.0

# Distinct alert names a source's sre_agent_ignored_alerts_total labels, and the longest:
# any writer of a feed or holder of the webhook token picks them (SREAgent<random>), and
# each new one would be a series kept for the process's life. Past them, name="other".
# The shipped SREAgent* rules are a handful; the heartbeat is always named.
MAX_IGNORED_METRIC_NAMES = 50
MAX_IGNORED_METRIC_NAME_LEN = 128
OTHER_NAME = "other"

IgnoreReason = Literal["own", "heartbeat"]

_SEVERITY: Mapping[str, Severity] = {
    "critical": "critical",
    "page": "critical",
    "error": "critical",
    "high": "critical",
    "warning": "warning",
    "warn": "warning",
    "medium": "warning",
    "info": "info",
    "informational": "info",
    "low": "info",
    "none": "info",
}


def _has_alertname(labels: Mapping[str, str]) -> Mapping[str, str]:
    if not labels.get("alertname"):
        raise ValueError("labels.alertname is required")
    return labels


def _go_zero_is_unset(value: datetime | None) -> datetime | None:
    # Go clients (amtool, client_golang, anything using strfmt.DateTime) send the zero time
    # 0001-01-01T00:00:00Z for "not set"; Alertmanager reads it so. Taken as a time, a
    # status-less alert's endsAt was in the past and the firing alert "resolved".
    if value is not None and value.replace(tzinfo=None) == datetime(1, 1, 1):
        return None
    return value


def _in_window(value: datetime | None) -> datetime | None:
    # Refused here, naming the alert's field, rather than by the Anomaly it becomes.
    if value is not None and (problem := outside_window(value)) is not None:
        raise ValueError(problem)
    return value


# An alert time; None when unset (absent, null or Go's zero time).
_AlertTime = Annotated[AwareDatetime | None, AfterValidator(_go_zero_is_unset)]


_LENIENT = ConfigDict(extra="ignore")


@dataclass(frozen=True, slots=True)
class AmAlert:
    """One alert as Alertmanager sends it (webhook ``alerts[]``, API v2 ``postableAlert``)."""

    __pydantic_config__ = _LENIENT
    labels: Annotated[Labels, AfterValidator(_has_alertname)]
    # Wire names are camelCase. Unset (Go's zero time): the time of receipt, as
    # Alertmanager takes it.
    startsAt: Annotated[_AlertTime, AfterValidator(_in_window)]
    status: Literal["firing", "resolved"] | None = None
    annotations: Labels = field(default_factory=dict)
    endsAt: _AlertTime = None
    generatorURL: Annotated[str, Field(max_length=4096)] = ""

    def state(self, now: datetime) -> Literal["firing", "resolved"]:
        """``status`` if given, else what ``endsAt`` says (the API v2 form has no status)."""
        if self.status is not None:
            return self.status
        return "resolved" if self.endsAt is not None and self.endsAt <= now else "firing"


@dataclass(frozen=True, slots=True)
class AmWebhook:
    """Alertmanager's webhook payload (version 4); only ``alerts`` is required."""

    __pydantic_config__ = _LENIENT
    alerts: Annotated[tuple[AmAlert, ...], Field(max_length=MAX_ALERTS)]
    version: str = "4"
    status: Literal["firing", "resolved"] | None = None
    receiver: str = ""
    groupKey: str = ""
    truncatedAlerts: int = 0


@dataclass(frozen=True, slots=True)
class _Envelope:
    """:class:`AmWebhook` with its alerts left unread: the webhook checks each apart."""

    __pydantic_config__ = _LENIENT
    alerts: Annotated[tuple[Any, ...], Field(max_length=MAX_ALERTS)]
    version: str = "4"
    status: Literal["firing", "resolved"] | None = None
    receiver: str = ""
    groupKey: str = ""
    truncatedAlerts: int = 0


@dataclass(frozen=True, slots=True)
class Notification:
    """A webhook payload whose envelope is valid, its alerts checked one by one."""

    receiver: str
    alerts: tuple[tuple[int, AmAlert], ...]  # the valid ones, by their index in the payload
    problems: tuple[tuple[int, str], ...]  # each other one's index and ``alerts[i].<field>: ...``


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """Which alerts are no anomaly: the agent's own (``own_prefix``; empty: none) and the
    heartbeat (None: none)."""

    own_prefix: str = "SREAgent"
    heartbeat: str | None = None


def alert_filter(settings: Settings) -> AlertFilter:
    beat = settings.detectors.alertmanager.heartbeat
    return AlertFilter(
        own_prefix=settings.detectors.own_alerts_prefix,
        heartbeat=beat.alertname if beat is not None else None,
    )


def ignored_reason(labels: Mapping[str, str], rules: AlertFilter) -> IgnoreReason | None:
    """Pure: why an alert (by its labels) is no anomaly, or None when it is one. The
    heartbeat first: it is the heartbeat even if its name carries the own prefix."""
    name = labels.get("alertname", "")
    if rules.heartbeat is not None and name == rules.heartbeat:
        return "heartbeat"
    if rules.own_prefix and name.startswith(rules.own_prefix):
        return "own"
    return None


@dataclass(frozen=True, slots=True)
class Ignored:
    """An alert of a feed record left out by :func:`ignored_reason` (counted by the feed)."""

    name: str
    reason: IgnoreReason


class IgnoredAlerts:
    """Counts the alerts a source ignores (``sre_agent_ignored_alerts_total``) and logs the
    first of each name at INFO: never silently, nor once per notification. The metric
    names the first MAX_IGNORED_METRIC_NAMES names of own alerts (and the heartbeat);
    any later one is counted as ``name="other"``, its name in the log. Past the first
    MAX_IGNORED_NAMES names, one line per IGNORED_LOG_INTERVAL (``clock``, seconds) logs
    the latest and how many were not logged."""

    def __init__(
        self, metrics: Metrics, *, source: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics = metrics
        self.source = source
        self.clock = clock
        self._logged: set[tuple[str, str]] = set()
        self._overflow_logged_at: float | None = None
        self._unlogged = 0  # ignorings past the remembered names since the last such line
        self._named: set[str] = set()  # the names the metric carries

    def metric_name(self, name: str, reason: IgnoreReason) -> str:
        """The ``name`` label ``name`` is counted under: bounded, whoever sends alerts."""
        if reason == "heartbeat" or name in self._named:
            return name  # one configured name
        if len(self._named) < MAX_IGNORED_METRIC_NAMES and len(name) <= MAX_IGNORED_METRIC_NAME_LEN:
            self._named.add(name)
            return name
        return OTHER_NAME

    def record(self, name: str, reason: IgnoreReason) -> None:
        label = self.metric_name(name, reason)
        self.metrics.ignored_alerts.labels(source=self.source, reason=reason, name=label).inc()
        if (name, reason) in self._logged:
            return
        why = "the heartbeat" if reason == "heartbeat" else "the agent's own alert"
        if len(self._logged) < MAX_IGNORED_NAMES:
            self._logged.add((name, reason))
            log.info(
                "%s: ignoring alert %r, %s: it opens no incident (logged once per alert name)",
                self.source,
                name,
                why,
            )
            return
        now = self.clock()
        last = self._overflow_logged_at
        if last is not None and now - last < IGNORED_LOG_INTERVAL:
            self._unlogged += 1
            return
        self._overflow_logged_at = now
        unlogged, self._unlogged = self._unlogged, 0
        log.info(
            "%s: ignoring alert %r, %s: it opens no incident (past %d alert names, one line "
            "per %.0fs: %d more ignored alerts not logged since the last; all are counted)",
            self.source,
            name,
            why,
            MAX_IGNORED_NAMES,
            IGNORED_LOG_INTERVAL,
            unlogged,
        )


def severity_of(labels: Mapping[str, str]) -> Severity:
    return _SEVERITY.get(labels.get("severity", "").strip().lower(), "warning")


def to_anomaly(
    alert: AmAlert, *, cluster: str, now: datetime, source: AnomalySource = "alertmanager"
) -> Anomaly:
    """Pure: one alert -> one anomaly (``now`` is the time of receipt)."""
    labels = normalise(alert.labels, cluster)
    name = labels["alertname"]
    # "alertmanager" names the identity whatever the transport (see module docstring).
    fp = fingerprint("alertmanager", name, labels)
    if source == "alertmanager":  # what the receiver's blindness covers (agent.models.OBSERVER)
        labels = observed(labels, cluster)
    status = alert.state(now)
    annotations = dict(alert.annotations)
    if alert.generatorURL:
        annotations.setdefault("generatorURL", alert.generatorURL)
    return Anomaly(
        fingerprint=fp,
        source=source,
        name=name[:1024],
        severity=severity_of(labels),
        status=status,
        labels=labels,
        annotations=annotations,
        starts_at=alert.startsAt or now,
        observed_at=now,
        id=stable_id(source, fp, status, now.isoformat()),
    )


def still_firing(alerts: Iterable[AmAlert], *, cluster: str, now: datetime) -> list[Anomaly]:
    """Pure: the anomalies of the alerts that still fire at ``now``, to announce again (a
    repeat is liveness to the correlator; resolutions come as notifications)."""
    return [to_anomaly(a, cluster=cluster, now=now) for a in alerts if a.state(now) == "firing"]


def parse_webhook(obj: Any) -> AmWebhook:
    """Validate a decoded webhook payload; :class:`InvalidEvent` names the bad field."""
    if not isinstance(obj, dict):
        raise InvalidEvent("AmWebhook", [f"<body>: expected a JSON object, got {_kind(obj)}"])
    return from_obj(AmWebhook, obj)


def parse_notification(obj: Any) -> Notification:
    """A decoded webhook payload, each alert validated apart: one bad alert must not cost
    the others their delivery (refused whole, Alertmanager drops the notification on a
    4xx). A bad envelope (not an object, ``alerts`` not a list of at most MAX_ALERTS, a
    field of the wrong type) raises :class:`InvalidEvent` naming the field."""
    if not isinstance(obj, dict):
        raise InvalidEvent("AmWebhook", [f"<body>: expected a JSON object, got {_kind(obj)}"])
    try:
        envelope = from_obj(_Envelope, obj)
    except InvalidEvent as err:
        raise InvalidEvent("AmWebhook", err.problems) from err
    good: list[tuple[int, AmAlert]] = []
    problems: list[tuple[int, str]] = []
    for i, item in enumerate(envelope.alerts):
        try:
            good.append((i, from_obj(AmAlert, item)))
        except InvalidEvent as err:
            problems += [(i, in_alert(i, p)) for p in err.problems]
    return Notification(envelope.receiver, tuple(good), tuple(problems))


def in_alert(i: int, problem: str) -> str:
    """A problem of one alert as the payload names it: ``labels: ...`` of alert 3 ->
    ``alerts[3].labels: ...``, ``<root>: ...`` -> ``alerts[3]: ...``."""
    if problem.startswith("<root>"):
        return f"alerts[{i}]{problem.removeprefix('<root>')}"
    return f"alerts[{i}].{problem}"


def parse_alertmanager_record(raw: bytes) -> tuple[AmAlert, ...]:
    """A feed record in Alertmanager format: a webhook payload (an object with ``alerts``),
    a single alert (an object with ``labels``), or a JSON array of alerts (API v2 form)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidEvent("AmWebhook", [f"<body>: not valid JSON ({err})"]) from err
    if isinstance(obj, list):
        if len(obj) > MAX_ALERTS:
            raise InvalidEvent("AmAlert", [f"<body>: more than {MAX_ALERTS} alerts"])
        return from_obj(AmWebhook, {"alerts": obj}).alerts
    if isinstance(obj, dict) and "alerts" not in obj and "labels" in obj:
        return (from_obj(AmAlert, obj),)
    return parse_webhook(obj).alerts


def _kind(obj: object) -> str:
    return {list: "array", str: "string", type(None): "null"}.get(type(obj), type(obj).__name__)
