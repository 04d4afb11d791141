"""The Alertmanager API boundary: which alerts are active now (API v2).

Verification asks it whether an alert that triggered an action still fires (see
:mod:`handlers.verification`); the webhook receiver asks which alerts Alertmanager would
notify it of now, to announce them again (see :mod:`agent.webhook`). Errors are
translated once, as :mod:`agent.prom` does:
anything that keeps the answer from us (connection refused, timeout, an HTTP error, a
malformed reply naming the field) is :class:`DependencyUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
from pydantic import ConfigDict

from agent.alerts import AmAlert
from agent.codec import from_obj, from_objs
from agent.errors import DependencyUnavailable, InvalidEvent, plain
from agent.models import Labels

# A reply this large is not an answer we should hold: a runaway of alerts.
MAX_REPLY_BYTES = 64 << 20
_T = TypeVar("_T")
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    """One ``gettableAlert``: only what verification reads."""

    __pydantic_config__ = ConfigDict(extra="ignore")
    labels: Labels


def matcher(name: str, value: str) -> str:
    """An equality matcher of the API's ``filter`` parameter; the value is quoted with
    ``\\``, ``"`` and newlines escaped (untrusted text: an alert name may hold any of them)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{name}="{escaped}"'


def re2_literal(text: str) -> str:
    """A Go (RE2) regular expression matching ``text`` only, the server anchoring it:
    Python's ``re.escape`` also escapes spaces, which RE2 refuses."""
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _alert_list(raw: bytes) -> list[Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise DependencyUnavailable(f"alertmanager reply: not valid JSON ({err})") from err
    if not isinstance(doc, list):
        raise DependencyUnavailable(
            f"alertmanager reply: expected a list of alerts, got {type(doc).__name__}"
        )
    return doc


def _validated(cls: type[_T], docs: list[Any]) -> list[_T]:
    try:
        return from_objs(cls, docs)
    except InvalidEvent as err:
        raise DependencyUnavailable(f"alertmanager reply: {'; '.join(err.problems)}") from err


def parse_alerts(raw: bytes) -> list[ActiveAlert]:
    """Validate a ``GET /api/v2/alerts`` reply; a malformed one names the field."""
    return _validated(ActiveAlert, _alert_list(raw))


# What a gettableAlert shares with the alerts a webhook carries. Its ``status`` is an
# object (state, silencedBy, inhibitedBy), not the webhook's "firing"/"resolved": left out,
# so an alert's state comes from ``endsAt``, as for the API's other alert form.
_NOTIFIED_FIELDS = ("labels", "annotations", "startsAt", "endsAt", "generatorURL")


@dataclass(frozen=True, slots=True)
class Notified:
    """The alerts of a ``GET /api/v2/alerts`` reply to announce, and the problems of those
    that are no valid alert (``[2].labels: ...``), left out."""

    alerts: list[AmAlert]
    refused: tuple[str, ...] = ()


def parse_notified(raw: bytes) -> Notified:
    """Validate a ``GET /api/v2/alerts`` reply as alerts to announce. A reply that is no
    list of alerts is :class:`DependencyUnavailable`, naming what is wrong; an alert that
    is invalid (Alertmanager takes alerts without ``alertname``, which the webhook
    refuses alone) is left out, named in ``refused``: failing the whole reply for it,
    the receiver was never refreshed again and ``alertmanager-unavailable`` fired for as
    long as that alert was active."""
    docs = [
        {k: doc[k] for k in _NOTIFIED_FIELDS if k in doc} if isinstance(doc, dict) else doc
        for doc in _alert_list(raw)
    ]
    try:
        return Notified(from_objs(AmAlert, docs))
    except InvalidEvent:
        pass  # one bad alert: validate them one by one to keep the others
    alerts: list[AmAlert] = []
    refused: list[str] = []
    for i, doc in enumerate(docs):
        try:
            alerts.append(from_obj(AmAlert, doc))
        except InvalidEvent as err:
            refused += [_in_reply(i, p) for p in err.problems]
    return Notified(alerts, tuple(refused))


def _in_reply(i: int, problem: str) -> str:
    """``labels: ...`` of alert 3 -> ``[3].labels: ...``, ``<root>: ...`` -> ``[3]: ...``."""
    if problem.startswith("<root>"):
        return f"[{i}]{problem.removeprefix('<root>')}"
    return f"[{i}].{problem}"


class AlertmanagerAPI:
    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def firing(self, alertname: str) -> list[Labels]:
        """The label sets of the alerts named ``alertname`` that have not resolved, silenced
        and inhibited ones included: a muted alert is a condition that still holds."""
        body = await self._alerts({"filter": matcher("alertname", alertname)})
        # The filter is the server's; the name is checked here too, as the labels are read.
        return [a.labels for a in parse_alerts(body) if a.labels.get("alertname") == alertname]

    async def notified(self, receiver: str) -> Notified:
        """The active alerts routed to ``receiver`` that Alertmanager notifies it of:
        neither silenced nor inhibited (and the problems of the invalid ones)."""
        body = await self._alerts(
            {
                "receiver": re2_literal(receiver),
                "active": "true",
                "silenced": "false",
                "inhibited": "false",
                "unprocessed": "false",
            }
        )
        return parse_notified(body)

    async def _alerts(self, params: dict[str, str]) -> bytes:
        """The body of ``GET /api/v2/alerts`` with these parameters."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), raise_for_status=False
            )
        try:
            async with self._http.get(f"{self.url}/api/v2/alerts", params=params) as resp:
                body = await resp.content.read(MAX_REPLY_BYTES + 1)
                if resp.status != 200:
                    text = plain(body[:800].decode(errors="replace"), 200)
                    raise DependencyUnavailable(
                        f"alertmanager {self.url}: HTTP {resp.status}: {text}"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            why = str(err) or type(err).__name__  # a timeout says nothing else
            raise DependencyUnavailable(f"alertmanager {self.url}: {why}") from err
        if len(body) > MAX_REPLY_BYTES:
            raise DependencyUnavailable(f"alertmanager reply: over {MAX_REPLY_BYTES} bytes")
        return body

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
