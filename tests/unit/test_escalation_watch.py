"""The unresolved-incident watch: an incident still open past escalation.unresolved_after
is escalated once; a resolved or silenced one, or an older transition, is not."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from agent.escalation_watch import UnresolvedWatch, due, track
from agent.metrics import Metrics
from agent.models import Escalation, Incident
from streams.bus import Envelope
from tests.fakes.incidents import OPENED, incident, member


def test_track_keeps_the_latest_open_state_and_drops_closed_ones() -> None:
    open_: dict[str, Incident] = {}
    inc = incident(member(), revision=3)
    track(open_, inc)
    track(open_, replace(inc, revision=2, status="updated"))  # a redelivered older one
    assert open_[inc.id].revision == 3
    track(open_, replace(inc, revision=4, status="mitigating"))
    assert open_[inc.id].status == "mitigating"
    track(open_, replace(inc, revision=5, status="resolved"))
    assert open_ == {}
    track(open_, replace(inc, id="inc-2", status="silenced"))
    assert open_ == {}


def test_due_are_the_open_incidents_past_the_bound_not_yet_escalated() -> None:
    old, new = incident(member(), id="old"), incident(member(), id="new")
    new = replace(new, opened_at=OPENED + timedelta(minutes=10))
    open_ = {"old": old, "new": new}
    now = OPENED + timedelta(minutes=15)
    assert [i.id for i in due(open_, set(), now, 15 * 60)] == ["old"]
    assert [i.id for i in due(open_, set(), now, 60)] == ["old", "new"]  # oldest first
    assert due(open_, {"old", "new"}, now, 60) == []


async def test_the_watch_escalates_once_and_forgets_what_closed() -> None:
    sent: list[tuple[str, object]] = []

    async def publish(topic: str, value: object) -> None:
        sent.append((topic, value))

    metrics = Metrics()
    watch = UnresolvedWatch(after=900, topic="t.escalations", publish=publish, metrics=metrics)
    inc = incident(member())
    await watch.handle([Envelope("t.incidents", 0, 0, inc.key, inc)])
    assert await watch.sweep(OPENED + timedelta(minutes=14)) == []
    (e,) = await watch.sweep(OPENED + timedelta(minutes=16))
    assert isinstance(e, Escalation) and (e.reason, e.incident_id) == ("unresolved", inc.id)
    assert e.summary == f"{inc.key}: open for 16 min, open"
    assert e.severity == "critical"
    assert await watch.sweep(OPENED + timedelta(minutes=30)) == []  # once
    assert sent == [("t.escalations", e)]
    resolved = replace(inc, revision=2, status="resolved")
    await watch.handle([Envelope("t.incidents", 0, 1, inc.key, resolved)])
    assert watch.open == {} and watch.escalated == set()
    assert metrics.escalations.labels(reason="unresolved")._value.get() == 1
