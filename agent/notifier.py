"""Delivers escalations to people: each one POSTed as JSON to every configured webhook
(``escalation.webhooks``: a chat or paging integration).

Consumed from the escalations topic by a :class:`~streams.bus.BatchConsumer`, which gives
the delivery its retries: a webhook that times out, is unreachable or answers 429/5xx is
retried with backoff, and one that refuses the escalation (another 4xx), or still fails
after the retries, has it dead-lettered, never dropped silently. A webhook that already
took an escalation is not sent it again when another webhook's failure retries the event;
the body carries the escalation's stable ``id`` (also the ``Idempotency-Key`` header), so
a receiver can drop a repeat after a restart.

Changes of the run-time switches (the switches topic, ``sre-agent switches``) are announced
the same way, as escalations of the informational reason ``switch``: a channel that lists
it hears who stopped the agent acting, or put it in shadow mode, and why.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import aiohttp
import orjson

from agent.errors import DependencyUnavailable, PermanentError, plain
from agent.metrics import Metrics
from agent.models import Escalation, SwitchChange
from agent.redaction import redact
from agent.settings import Settings, WebhookSection
from streams.bus import Envelope, handle_each

log = logging.getLogger(__name__)

MAX_REMEMBERED = 10_000


def payload(e: Escalation) -> bytes:
    """The JSON a webhook receives. ``text`` is the whole of it for a human (the field chat
    webhooks show); secrets in the details (they quote cluster and model messages) are
    redacted."""
    details = [redact(d) for d in e.details]
    tag = f"{e.label}, {e.severity}" if e.severity else e.label
    lines = [f"[{tag}] {redact(e.summary)}", *(f"- {d}" for d in details)]
    doc = {
        "id": e.id,
        "reason": e.reason,
        "severity": e.severity,
        "level": e.level,
        "summary": redact(e.summary),
        "incident_id": e.incident_id,
        "incident_key": e.incident_key,
        "action_id": e.action_id,
        "target": e.target,
        "service": e.service,
        "details": details,
        "at": e.at,
        "text": "\n".join(lines),
    }
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z)


class Notifier:
    def __init__(
        self, settings: Settings, *, metrics: Metrics, env: Mapping[str, str] | None = None
    ) -> None:
        self.webhooks: tuple[WebhookSection, ...] = settings.escalation.webhooks
        self.metrics = metrics
        self._env = os.environ if env is None else env
        self._delivered: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._http: aiohttp.ClientSession | None = None

    async def handle(self, batch: Sequence[Envelope]) -> None:
        await handle_each(batch, self._one)

    async def _one(self, env: Envelope) -> None:
        e = env.value
        if isinstance(e, SwitchChange):
            e = Escalation.of_switch(e)  # announced where "switch" is asked for
        if not isinstance(e, Escalation):
            return
        for w in self.webhooks:
            # A runbook's own route names its webhooks: their filters are the global route's.
            routed = w.name in e.channels if e.channels else w.takes(e.reason, e.severity, e.level)
            if not routed or (e.id, w.name) in self._delivered:
                continue
            await self._post(w, e)
            self._delivered[(e.id, w.name)] = None
            while len(self._delivered) > MAX_REMEMBERED:
                self._delivered.popitem(last=False)

    async def _post(self, w: WebhookSection, e: Escalation) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json", "Idempotency-Key": e.id}
        token = self._env.get(w.token_env, "") if w.token_env else ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=w.timeout)
        try:
            async with self._http.post(
                w.url, data=payload(e), headers=headers, timeout=timeout
            ) as resp:
                body = (await resp.content.read(800)).decode(errors="replace")
                status, text = resp.status, plain(body, 200)
                retry_after = resp.headers.get("Retry-After", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            self.metrics.notifications.labels(webhook=w.name, result="retried").inc()
            raise DependencyUnavailable(
                f"webhook {w.name}: {str(err) or type(err).__name__}"
            ) from err
        if 200 <= status < 300:
            self.metrics.notifications.labels(webhook=w.name, result="delivered").inc()
            log.info("escalation %s (%s) delivered to %s", e.id[:12], e.reason, w.name)
            return
        if status == 429 or status >= 500:
            self.metrics.notifications.labels(webhook=w.name, result="retried").inc()
            raise DependencyUnavailable(
                f"webhook {w.name} answered {status}: {text}",
                retry_after=float(retry_after) if retry_after.isdigit() else 1.0,
            )
        self.metrics.notifications.labels(webhook=w.name, result="failed").inc()
        raise PermanentError(f"webhook {w.name} refused escalation {e.id}: HTTP {status}: {text}")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
