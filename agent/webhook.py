"""Alertmanager webhook receiver: ``POST <detectors.alertmanager.path>`` on the agent's
HTTP server.

Order of checks, cheapest and least revealing first:

====  =======================================================================
503   the agent has no token (its ``token_env`` variable unset or empty): every
      request, whatever it carries, until it is set and the agent restarted
401   missing or wrong ``Authorization: Bearer <token>`` (constant-time compare)
415   the body is not ``application/json``
413   the body is larger than ``max_body_bytes`` (declared or actually sent)
400   the body is not JSON
422   JSON, but not an Alertmanager payload (not an object, ``alerts`` not a list, an
      envelope field of the wrong type): nothing is published; ``problems`` name each
      bad field. Also when some alerts are invalid (no ``labels.alertname``, a bad
      ``startsAt``, ...), would not make a valid anomaly (e.g. a label value longer
      than the anomaly schema allows) or make one larger than a Kafka record may be
      (which the producer refuses on every retry, with the alerts published beside
      it), or than the anomalies topic takes (its max.message.bytes; the broker
      refuses it, at every retry too): those are refused, named in ``problems``
      (``alerts[1].labels.owner: ...``, ``alerts[2]: the anomaly is 1100000 bytes ...``)
      and counted, and the others are
      published (``accepted``). Refused whole, the valid alerts would be lost:
      Alertmanager does not retry a 4xx
503   not started yet, or Kafka did not take the anomalies (Alertmanager retries)
200   ``{"accepted": n}``: every alert was published to the anomalies topic
====  =======================================================================

Every error body is ``{"error": <code>, "reason": <text>}`` (plus ``problems``); nothing
about the request is echoed back beyond the field paths.

Alertmanager repeats a notification only every ``repeat_interval`` (4h by default), while
the correlator resolves an incident none of whose members it has seen for
``resolve_timeout``. With the Alertmanager API at hand (``monitoring.alertmanager.url``),
the receiver asks it every third of ``resolve_timeout`` which alerts it would notify each
known receiver of now, and announces those that still fire again. While it cannot ask,
it is blind: ``alertmanager-unavailable`` fires, and the correlator resolves none of the
cluster's Alertmanager members as quiet until it answers again (their quiet counts from
then). Without the API nothing tells that Alertmanager, or the way from it, is down,
unless it sends a heartbeat (``detectors.alertmanager.heartbeat``: an always-firing alert,
kube-prometheus' ``Watchdog``): not received within its bound, ``alertmanager-unavailable``
fires likewise, until it arrives again. The heartbeat itself is no anomaly, and opens no
incident; nor do the agent's own alerts (``SREAgent*``, see :mod:`agent.alerts`), should
Alertmanager route them here: both are counted and logged, never published.
Behind one Service, Alertmanager's notification reaches one replica of the receiver: the
one that receives the heartbeat shares when on the compacted heartbeats topic (the same
compacted-view mechanism as silences and correlation facts), and every replica judges it
missing from the latest time any of them received it. Not on the correlation facts topic:
every record there is a fact the correlator routes and inhibits by, and is written by the
correlator; a heartbeat is neither.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson
from aiohttp import web

from agent.alertmanager_api import AlertmanagerAPI
from agent.alerts import (
    AmAlert,
    IgnoredAlerts,
    Notification,
    alert_filter,
    ignored_reason,
    in_alert,
    parse_notification,
    still_firing,
    to_anomaly,
)
from agent.detector import Publisher, Refused, agent_anomaly, publish_refusing, refusals
from agent.errors import AgentError, InvalidEvent, cancel_and_wait, plain, task_failure
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import Anomaly, Heartbeat, heartbeat_key, utcnow
from agent.settings import Settings

log = logging.getLogger(__name__)

# The agent's own anomaly while it cannot ask Alertmanager (see agent.models.BLINDING).
UNAVAILABLE = "alertmanager-unavailable"

# Receivers learned from payloads, at the most (the configured ones come on top).
MAX_LEARNED_RECEIVERS = 100


def heartbeat_missing(last: datetime, now: datetime, within: float) -> datetime | None:
    """Pure: since when the receiver is blind, the heartbeat last received (or the start
    of waiting for one) at ``last`` and expected within ``within`` seconds; None while it
    is not late. Blind since ``last``: from then on nothing said Alertmanager could reach
    the webhook."""
    return last if now - last > timedelta(seconds=within) else None


# How far after this replica's clock a heartbeat another replica shared may be dated
# (their clocks differ): one dated later is ignored, so that a record forged into the far
# future cannot keep every replica from ever judging the heartbeat missing.
HEARTBEAT_SKEW = 30.0


def heartbeat_blind(
    started: datetime, seen: Iterable[datetime], now: datetime, within: float
) -> datetime | None:
    """Pure: since when the receivers are blind, judged across replicas: from the latest
    heartbeat any replica received (``seen``, this one's own included), or from this
    replica's start of waiting for one (``started``: a replica that just started waits
    ``within`` before judging, whatever the others last heard), once that is longer than
    ``within`` ago; None while it is not. A heartbeat dated more than
    :data:`HEARTBEAT_SKEW` after ``now`` counts for nothing."""
    bound = now + timedelta(seconds=HEARTBEAT_SKEW)
    return heartbeat_missing(max([started, *(t for t in seen if t <= bound)]), now, within)


class SharedHeartbeats(Protocol):
    """The heartbeats topic as every replica reads it in full and follows:
    :class:`streams.view.CompactedView` of :class:`~agent.models.Heartbeat`."""

    @property
    def items(self) -> Mapping[str, Heartbeat]: ...

    @property
    def failure(self) -> BaseException | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class AlertmanagerReceiver:
    def __init__(
        self,
        settings: Settings,
        *,
        token: str | None,
        publish: Publisher,
        topic: str,
        metrics: Metrics,
        clock: Callable[[], datetime] = utcnow,
        api: AlertmanagerAPI | None = None,
        shared: SharedHeartbeats | None = None,
        shared_topic: str | None = None,
        replica: str = "",
    ) -> None:
        # None: no token configured. An empty one would match an empty bearer credential.
        if token == "":
            raise ValueError("the webhook receiver's bearer token is empty; pass None")
        self.settings = settings
        self.cfg = settings.detectors.alertmanager
        self._token = token.encode() if token is not None else None
        self.publisher = publish
        self.topic = topic
        self.metrics = metrics
        self.clock = clock
        self.accepting = False
        self.api = api
        self.receivers: set[str] = set(self.cfg.receivers)
        # (At least a second: a resolve_timeout of 0 must not spin on Alertmanager's API.)
        self.refresh_every = max(1.0, settings.correlation.resolve_timeout / 3)
        self._refresher: asyncio.Task[None] | None = None
        # When the refresh first found Alertmanager not answering (None: it answers).
        self.unavailable_since: datetime | None = None
        self.heartbeat = self.cfg.heartbeat
        # The agent's own alerts and the heartbeat: received, never published.
        self.ignore = alert_filter(settings)
        self.ignored = IgnoredAlerts(metrics, source="alertmanager")
        # The heartbeat's last arrival, or the start of waiting for it (set at start).
        self.heartbeat_at: datetime | None = None
        # Since when the heartbeat is missing, as told (None: not blind for it).
        self.heartbeat_lost: datetime | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # The other replicas' heartbeats, and where this one shares those it receives
        # (None: judged from its own alone, a single receiver's).
        self.shared = shared if self.heartbeat is not None else None
        self.shared_topic = shared_topic
        self.replica = replica

    def install(self, app: web.Application) -> None:
        app.router.add_post(self.cfg.path, self.handle)

    # Component lifecycle: accept only while the bus can take what we receive.
    async def start(self) -> None:
        self.accepting = True
        if self.api is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="alert-refresh")
        if self.heartbeat is not None and self._watchdog is None:
            if self.shared is not None:
                await self.shared.start()  # read to its end: what the others heard
            if self.heartbeat_at is None:
                self.heartbeat_at = self.clock()  # its first one is due within the bound
            self._watchdog = asyncio.create_task(self._heartbeat_loop(), name="alert-heartbeat")

    async def stop(self) -> None:
        self.accepting = False
        await cancel_and_wait(self._refresher)
        await cancel_and_wait(self._watchdog)
        self._refresher = self._watchdog = None
        if self.shared is not None:
            await self.shared.stop()

    @property
    def failure(self) -> BaseException | None:
        """Why the refresh or heartbeat task died, if one did (see
        agent.runtime.run_until_signalled)."""
        shared = self.shared.failure if self.shared is not None else None
        return task_failure(self._refresher) or task_failure(self._watchdog) or shared

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat is not None
        # Often enough to notice a late heartbeat soon after its bound, and to repeat the
        # blindness (its liveness) well within resolve_timeout.
        every = max(0.2, min(self.heartbeat.within, self.settings.correlation.resolve_timeout) / 4)
        while True:
            await asyncio.sleep(every)
            await self.check_heartbeat()

    async def check_heartbeat(self) -> None:
        """``alertmanager-unavailable`` while the heartbeat is late for every replica
        (repeated at each check), resolved when one receives it again (this one, see
        :meth:`_heartbeat_arrived`; another, at this one's next check). Every replica
        judges from the same latest heartbeat, so those that tell it tell the same
        anomaly (one fingerprint, blind since then): repeats, not duplicates."""
        if self.heartbeat is None or self.heartbeat_at is None:
            return
        now = self.clock()
        since = heartbeat_blind(self.heartbeat_at, self._shared(), now, self.heartbeat.within)
        if since is None:
            if self.heartbeat_lost is not None:  # it arrived while the loss was being told
                await self._tell_heartbeat(False, self.heartbeat_lost, now)
            return
        if self.heartbeat_lost is None:
            log.error(
                "alertmanager heartbeat %s not received for %.0fs: blind to Alertmanager",
                self.heartbeat.alertname,
                (now - since).total_seconds(),
            )
        await self._tell_heartbeat(True, since, now)

    def _shared(self) -> list[datetime]:
        """When any replica last received the heartbeat, as the heartbeats topic says."""
        if self.shared is None or self.heartbeat is None:
            return []
        cluster, name = self.settings.agent.cluster, self.heartbeat.alertname
        beat = self.shared.items.get(heartbeat_key(cluster, name))
        if beat is None or (beat.cluster, beat.alertname) != (cluster, name):
            return []
        return [beat.seen_at]

    async def _heartbeat_arrived(self, now: datetime) -> None:
        self.heartbeat_at = now
        # Shared first: the other replicas' next checks find it, rather than tell the
        # blindness again after this one ended it.
        await self._share(now)
        if self.heartbeat_lost is not None:
            await self._tell_heartbeat(False, self.heartbeat_lost, now)

    async def _share(self, now: datetime) -> None:
        if self.shared_topic is None or self.heartbeat is None:
            return
        beat = Heartbeat(
            cluster=self.settings.agent.cluster,
            alertname=self.heartbeat.alertname,
            seen_at=now,
            replica=self.replica,
        )
        try:
            await self.publisher.publish_many([(self.shared_topic, beat, beat.key)])
        except AgentError as err:  # this one knows; the others hear of the next one
            log.warning("sharing the alertmanager heartbeat failed: %s", err)

    async def _tell_heartbeat(self, lost: bool, since: datetime, now: datetime) -> None:
        assert self.heartbeat is not None
        name = self.heartbeat.alertname
        told = await self._tell_unavailable(
            lost,
            # Its own fingerprint (not the API refresh's): each ends on its own evidence.
            {"endpoint": self.cfg.path, "heartbeat": name},
            since,
            now,
            f"heartbeat {name} not received since {since.isoformat()}" if lost else "",
        )
        if not told:  # the next check, or heartbeat, tells it again
            return
        if lost:
            self.heartbeat_lost = since
        else:
            self.heartbeat_lost = None
            log.info("alertmanager heartbeat %s received again", name)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_every)
            await self.refresh()

    async def refresh(self) -> int:
        """Announce again the alerts Alertmanager would notify the known receivers of now
        that still fire; returns how many. A receiver Alertmanager cannot answer for is
        tried again next time; meanwhile ``alertmanager-unavailable`` fires, and the
        correlator resolves none of this cluster's Alertmanager members as quiet."""
        if self.api is None:
            return 0
        announced = 0
        unanswered: list[str] = []
        for receiver in sorted(self.receivers):
            try:
                reply = await self.api.notified(receiver)
            except AgentError as err:
                log.warning("alertmanager refresh of receiver %r failed: %s", receiver, err)
                unanswered.append(f"receiver {receiver!r}: {err}")
                continue
            alerts = reply.alerts
            if reply.refused:  # as the webhook refuses them: the others are announced
                log.warning(
                    "alertmanager refresh of receiver %r: %d invalid alerts left out: %s",
                    receiver,
                    len(reply.refused),
                    plain("; ".join(reply.refused[:5]), 800),
                )
            anomalies = [
                a
                for a in still_firing(
                    # Counted when received, not at each refresh.
                    [x for x in alerts if ignored_reason(x.labels, self.ignore) is None],
                    cluster=self.settings.agent.cluster,
                    now=self.clock(),
                )
                if not refusals(a, self.settings.correlation.group_by)
            ]
            try:
                refused = await self._publish(anomalies)
            except AgentError as err:  # Kafka: the next refresh announces them again
                log.warning(
                    "alertmanager refresh of receiver %r: publishing failed: %s", receiver, err
                )
                continue
            announced += len(anomalies) - len(refused)
        await self._tell_blind(unanswered)
        return announced

    async def _tell_blind(self, unanswered: list[str]) -> None:
        """``alertmanager-unavailable``: firing (repeated, its liveness) while a refresh
        finds a receiver Alertmanager does not answer for, resolved at the first refresh
        it answers for all. Without it, an Alertmanager down longer than resolve_timeout
        resolved its alerts' incidents as quiet though nobody could see them."""
        down, since, now = bool(unanswered), self.unavailable_since, self.clock()
        if since is None:
            if not down:
                return
            since = self.unavailable_since = now
            log.error("alertmanager %s unavailable: %s", self.api_url, unanswered[0])
        told = await self._tell_unavailable(
            down, {"endpoint": self.api_url}, since, now, "; ".join(unanswered)
        )
        if not told:  # the next refresh tells it again
            return
        if not down:
            self.unavailable_since = None
            log.info("alertmanager %s answers again", self.api_url)

    async def _tell_unavailable(
        self, firing: bool, labels: dict[str, str], since: datetime, now: datetime, error: str
    ) -> bool:
        """Publish ``alertmanager-unavailable`` (firing or resolved) with the agent's own
        labels and ``labels``; False when Kafka refused it (logged)."""
        anomaly = agent_anomaly(
            UNAVAILABLE,
            "firing" if firing else "resolved",
            severity="critical",
            labels=normalise(
                {"service": self.settings.agent.name, **labels}, self.settings.agent.cluster
            ),
            since=since,
            now=now,
            error=error,
        )
        try:
            await self._publish([anomaly])
        except AgentError as err:
            log.warning("publishing %s failed: %s", UNAVAILABLE, err)
            return False
        return True

    @property
    def api_url(self) -> str:
        return self.api.url if self.api is not None else ""

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._handle(request)
        self.metrics.webhook_requests.labels(
            receiver="alertmanager", code=str(response.status)
        ).inc()
        return response

    async def unready(self) -> str | None:
        """A readiness check: without a token the webhook takes nothing, so its pods leave
        the Service (and a rollout that lost the token stalls before the old pods go)."""
        if self._token is None:
            return f"no bearer token: environment variable {self.cfg.token_env} is unset"
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        if self._token is None:
            # Nothing to check a caller against: refuse everyone, retryably (Alertmanager
            # drops a notification answered 4xx), never accept unauthenticated alerts.
            return _error(
                503,
                "no_token",
                f"the webhook has no bearer token ({self.cfg.token_env} unset); it takes "
                "nothing until it is set and the agent restarted",
            )
        if not self._authorized(request.headers.get("Authorization", "")):
            return _error(
                401,
                "unauthorized",
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="sre-agent"'},
            )
        if request.content_type != "application/json":
            return _error(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, not {request.content_type[:100]!r}",
            )
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, "too_large", f"body larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                return _error(413, "too_large", f"body larger than {limit} bytes")
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            return _error(400, "malformed_json", f"<body>: not valid JSON ({err})")
        try:
            payload = parse_notification(obj)
        except InvalidEvent as err:
            return _error(422, "invalid_payload", str(err), problems=list(err.problems[:50]))
        if not self.accepting:
            return _error(503, "starting", "not accepting yet", headers={"Retry-After": "1"})
        learned = len(self.receivers) - len(set(self.cfg.receivers))
        if 0 < len(payload.receiver) <= 256 and learned < MAX_LEARNED_RECEIVERS:
            self.receivers.add(payload.receiver)
        now = self.clock()
        # The heartbeat and the agent's own alerts: never published, so they open no
        # incident (and the agent never acts on its own failures).
        kept: list[tuple[int, AmAlert]] = []
        beat = False
        for i, alert in payload.alerts:
            reason = ignored_reason(alert.labels, self.ignore)
            if reason is None:
                kept.append((i, alert))
                continue
            self.ignored.record(alert.labels["alertname"], reason)
            beat = beat or (reason == "heartbeat" and alert.state(now) == "firing")
        payload = replace(payload, alerts=tuple(kept))
        if beat:
            await self._heartbeat_arrived(now)
        cluster = self.settings.agent.cluster
        group_by = self.settings.correlation.group_by
        numbered, refused = _anomalies_of(payload, cluster=cluster, now=now, group_by=group_by)
        try:
            kafka_refused = await self._publish([a for _, a in numbered])
        except AgentError as err:
            log.warning("webhook: publishing %d anomalies failed: %s", len(numbered), err)
            return _error(
                503, "unavailable", "could not publish; retry", headers={"Retry-After": "5"}
            )
        # Refused by the broker for its size (the topic's max.message.bytes is lower than
        # the producer's limit): a 503 had Alertmanager retry it forever.
        why = {id(r.anomaly): r.problems for r in kafka_refused}
        if why:
            late = [(i, in_alert(i, p)) for i, a in numbered for p in why.get(id(a), ())]
            refused = sorted(refused + late, key=lambda p: p[0])
        anomalies = [a for _, a in numbered if id(a) not in why]
        log.info("webhook: %d alerts from %r", len(anomalies), payload.receiver)
        if refused:
            # Accepted would tell Alertmanager they were delivered, while the correlator
            # dead-letters them; 422 says they were not (it does not retry a 4xx).
            problems = [p for _, p in refused]
            count = len({i for i, _ in refused})
            self.metrics.webhook_refused_alerts.labels(receiver="alertmanager").inc(count)
            log.warning(
                "webhook: refused %d alerts from %r: %s",
                count,
                payload.receiver,
                "; ".join(problems[:5]),
            )
            return _error(
                422,
                "invalid_alerts",
                f"{count} alerts are invalid or would not make a valid anomaly; "
                f"the other {len(anomalies)} were accepted",
                problems=problems[:50],
                accepted=len(anomalies),
            )
        return web.json_response({"accepted": len(anomalies)})

    async def _publish(self, anomalies: list[Anomaly]) -> list[Refused]:
        return await publish_refusing(
            self.publisher,
            self.topic,
            anomalies,
            group_by=self.settings.correlation.group_by,
            metrics=self.metrics,
        )

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or self._token is None:
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)


def _anomalies_of(
    payload: Notification, *, cluster: str, now: datetime, group_by: tuple[str, ...]
) -> tuple[list[tuple[int, Anomaly]], list[tuple[int, str]]]:
    """Pure: the anomalies (with their alert's index) of the valid alerts that make ones
    the correlator can get, and (index, problem naming the field) of each other alert, in
    the payload's order."""
    good: list[tuple[int, Anomaly]] = []
    problems = list(payload.problems)
    for i, alert in payload.alerts:
        anomaly = to_anomaly(alert, cluster=cluster, now=now)
        bad = refusals(anomaly, group_by)
        if bad:
            problems += [(i, in_alert(i, p)) for p in bad]
        else:
            good.append((i, anomaly))
    return good, sorted(problems, key=lambda p: p[0])


def _error(
    status: int,
    error: str,
    reason: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = orjson.dumps({"error": error, "reason": reason, **extra})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
