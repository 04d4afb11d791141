"""Incident JSON for the correlator's hot path, re-using the JSON of unchanged members.

Every change of an incident is written twice (changelog and event) as the whole incident.
orjson spends ~3 us on each member dataclass, so an incident of 25 members cost ~85 us to
encode, per change, although a change touches one member. Members are immutable and a new
revision carries the unchanged ones over by identity, so their JSON is kept per group and
spliced in with :class:`orjson.Fragment`. The bytes are exactly those of
:func:`agent.codec.encode` (tests/unit/test_incident_json.py holds it to that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import orjson

from agent.models import Incident, Member
from streams.correlation import for_event

_FIELDS = tuple(f.name for f in dataclasses.fields(Incident))
_OPTS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS  # as agent.codec.encode


def member_json(m: Member) -> bytes:
    """``encode(m)``: orjson reads a slotted dataclass field by field through its
    descriptors, about 1.6x the cost of this dict of the same fields in the same order."""
    return orjson.dumps(
        {
            "fingerprint": m.fingerprint,
            "name": m.name,
            "source": m.source,
            "severity": m.severity,
            "status": m.status,
            "labels": m.labels,
            "first_seen": m.first_seen,
            "last_seen": m.last_seen,
            "value": m.value,
            "silenced_by": m.silenced_by,
            "inhibited_by": m.inhibited_by,
            "absorbed_by": m.absorbed_by,
        },
        option=_OPTS,
    )


def _tail_json(m: Member) -> bytes:
    """``member_json(m)`` from "last_seen" on, as a JSON object of those fields."""
    return orjson.dumps(
        {
            "last_seen": m.last_seen,
            "value": m.value,
            "silenced_by": m.silenced_by,
            "inhibited_by": m.inhibited_by,
            "absorbed_by": m.absorbed_by,
        },
        option=_OPTS,
    )


# Where the fields a repeat changes begin in a member's JSON: its last occurrence, as
# neither a date, a number nor a string (its quotes escaped) can hold a bare quote.
_LAST_SEEN = b',"last_seen":'


def _refreshed_json(old: Member, old_json: bytes, m: Member) -> bytes:
    """``member_json(m)``, re-using ``old_json`` (``member_json(old)``) up to "last_seen"
    when the fields before it are the same. A repeat of an anomaly, most of what changes
    members, makes a member that differs from the last only from there on (see
    streams.correlation._with); the labels were most of the cost of its JSON."""
    if (
        # The same objects, not equal ones: labels in another order, or a time in another
        # zone, are equal yet written otherwise.
        m.labels is old.labels
        and m.first_seen is old.first_seen
        and m.fingerprint == old.fingerprint
        and m.name == old.name
        and m.source == old.source
        and m.severity == old.severity
        and m.status == old.status
    ):
        return old_json[: old_json.rindex(_LAST_SEEN) + 1] + _tail_json(m)[1:]
    return member_json(m)


class IncidentEncoder:
    def __init__(self) -> None:
        # group key -> the members of its last remembered revision, their JSON and that
        # JSON as fragments. Members keep their positions from one revision to the next (a
        # change replaces one in place, a new one is appended), so reuse is an identity
        # check per position, and a member that replaced one re-uses that one's JSON up to
        # what a repeat changes.
        self._last: dict[str, tuple[tuple[Member, ...], list[bytes], list[orjson.Fragment]]] = {}

    def encode(self, incident: Incident, *, remember: bool = True) -> bytes:
        """``encode(incident)``; ``remember``: this is the group's latest state, keep its
        members' JSON for the next revision (intermediate revisions of a batch are not)."""
        known, known_json, known_parts = self._last.get(incident.key, ((), [], []))
        n = len(known)
        texts: list[bytes] = []
        parts: list[orjson.Fragment] = []
        for i, m in enumerate(incident.members):
            if i < n:
                old = known[i]
                if old is m:
                    texts.append(known_json[i])
                    parts.append(known_parts[i])
                    continue
                text = _refreshed_json(old, known_json[i], m)
            else:
                text = member_json(m)
            texts.append(text)
            parts.append(orjson.Fragment(text))
        if remember:
            self._last[incident.key] = (incident.members, texts, parts)
        doc = {name: getattr(incident, name) for name in _FIELDS}
        doc["members"] = parts
        return orjson.dumps(doc, option=_OPTS)

    def event(
        self, incident: Incident, limit: int, max_bytes: int, encoded: bytes | None = None
    ) -> bytes:
        """The bytes of the incident's event: the incident itself, or a view of at most
        ``limit`` members (see :func:`streams.correlation.for_event`), fewer while it is
        over ``max_bytes`` (labels are free text: 200 members can be megabytes).
        ``encoded``: the whole incident's bytes when the caller has them."""
        if len(incident.members) <= limit:
            value = encoded if encoded is not None else self.encode(incident, remember=False)
            if len(value) <= max_bytes:
                return value
        while True:
            value = self.encode(for_event(incident, limit), remember=False)
            if len(value) <= max_bytes or limit == 0:
                return value
            limit //= 2

    def forget_where(self, gone: Callable[[str], bool]) -> None:
        """Forget the groups whose key ``gone`` accepts."""
        for key in [k for k in self._last if gone(k)]:
            del self._last[key]
