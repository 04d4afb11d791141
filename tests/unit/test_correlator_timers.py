"""group_wait / group_interval in the correlator itself: which events go out, and when,
as the fold, the timer and hand-overs change incidents. The worker runs in-process with
its Kafka edges replaced by recorders; the clock is the test's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import streams.correlator as correlator_module
from agent.codec import encode
from agent.metrics import Metrics
from agent.models import Anomaly, Incident
from streams.correlation import NO_MARKS, CorrelationRules, Marks, correlate_batch, key_of
from streams.correlator import Correlator, Stored
from streams.topology import EMPTY, FactIndex, build_index, facts_of
from tests.unit.factories import anomaly, at, settings


@dataclass
class Clock:
    """The test's clock, shared by the workers of a test (one taking over from another)."""

    now: datetime


class Recording(Correlator):
    """The correlator with its Kafka edges recorded instead of sent: one partition, owned."""

    def __init__(self, doc: Mapping[str, Any], clock: Clock) -> None:
        super().__init__(settings(doc), metrics=Metrics(CollectorRegistry()))
        self.partitions = 1
        self.published: list[tuple[datetime, Incident]] = []
        self.routed: list[tuple[str, Anomaly]] = []
        self.index: FactIndex = EMPTY
        self.clock = clock

    @property
    def now(self) -> datetime:
        return self.clock.now

    @now.setter
    def now(self, value: datetime) -> None:
        self.clock.now = value

    async def _emit(
        self,
        events: list[Incident],
        encoded: dict[int, bytes] | None = None,
        *,
        recount: bool = True,
    ) -> None:
        self._changelog.clear()
        self.published.extend((self.now, e) for e in events)

    async def _route(self, key: str, a: Anomaly, absorbed_by: str | None) -> None:
        self.routed.append((key, a))

    async def _publish_facts(self, incidents: Iterable[Incident | None]) -> None:
        pass  # the test hands the worker its view (fact_index)

    def _owned_partitions(self) -> set[int]:
        return {0}

    def fact_index(self, now: datetime) -> FactIndex:
        return self.index

    def events(self, key: str) -> list[tuple[float, str, str, int]]:
        """(seconds after T0, incident id, status, revision) of each event of ``key``."""
        return [
            ((when - at(0)).total_seconds(), e.id, e.status, e.revision)
            for when, e in self.published
            if e.key == key
        ]


@pytest.fixture
def clocked(monkeypatch: pytest.MonkeyPatch) -> Any:
    clock = Clock(at(0))
    monkeypatch.setattr(correlator_module, "utcnow", lambda: clock.now)

    def make(doc: Mapping[str, Any]) -> Recording:
        return Recording(doc, clock)

    return make


async def fold(c: Recording, t: float, *anomalies: Anomaly) -> None:
    c.now = at(t)
    await c._fold(0, [(key_of(a, c.rules), a, NO_MARKS) for a in anomalies])


async def tick(c: Recording, t: float) -> None:
    c.now = at(t)
    await c._tick()


def pod(name: str, node: str) -> dict[str, str]:
    return {"cluster": "c1", "namespace": "shop", "service": "checkout", "pod": name, "node": node}


async def test_a_hand_over_during_group_wait_still_publishes_the_incident_at_group_wait(
    clocked: Any,
) -> None:
    c = clocked({"correlation": {"group_wait": "30s", "group_interval": "5m"}})
    crash = "pod-crash-loop"
    a1 = anomaly(crash, labels=pod("checkout-1", "n1"))
    a2 = anomaly(crash, labels=pod("checkout-2", "n2"))
    key = key_of(a1, c.rules)
    await fold(c, 1, a1, a2)
    # n1's node anomaly opens its own incident; the view sees it from t=5.
    node = anomaly("node-not-ready", labels={"cluster": "c1", "node": "n1"}, t=4)
    states, _ = correlate_batch({}, [node], at(4), c.rules)
    c.index = build_index(facts_of(states[key_of(node, c.rules)], True, ()), at(5), 300)
    for t in range(5, 100):
        await tick(c, t)
        if t % 20 == 0:  # checkout-2 keeps crash-looping; the watcher repeats it
            await fold(c, t, anomaly(crash, labels=pod("checkout-2", "n2"), t=t))
    assert [(k, a.labels["pod"]) for k, a in c.routed] == [(key_of(node, c.rules), "checkout-1")]
    # Out at group_wait, as "open", showing checkout-1 handed over and checkout-2 firing.
    [(when, event)] = c.published
    assert (when, event.key, event.status) == (at(30), key, "open")
    assert {m.labels["pod"]: (m.status, m.absorbed_by) for m in event.members} == {
        "checkout-1": ("resolved", "node/n1"),
        "checkout-2": ("firing", None),
    }


async def test_a_hand_over_that_empties_a_never_published_incident_publishes_nothing(
    clocked: Any,
) -> None:
    c = clocked({"correlation": {"group_wait": "30s"}})
    a1 = anomaly("pod-crash-loop", labels=pod("checkout-1", "n1"))
    await fold(c, 1, a1)
    node = anomaly("node-not-ready", labels={"cluster": "c1", "node": "n1"}, t=4)
    states, _ = correlate_batch({}, [node], at(4), c.rules)
    c.index = build_index(facts_of(states[key_of(node, c.rules)], True, ()), at(5), 300)
    for t in range(5, 100):
        await tick(c, t)
    stored = c._get(key_of(a1, c.rules))
    assert stored is not None and stored.incident is not None
    assert stored.incident.status == "resolved"
    assert c.published == []


async def test_each_new_incident_of_a_group_waits_group_wait_and_opens_as_open(
    clocked: Any,
) -> None:
    c = clocked(
        {"correlation": {"group_wait": "30s", "group_interval": "5m", "reopen_window": "2m"}}
    )
    key = key_of(anomaly("errors"), c.rules)
    clock = 0

    async def until(t: int) -> None:
        nonlocal clock
        for s in range(clock + 1, t + 1):
            await tick(c, s)
        clock = t

    await fold(c, 0, anomaly("errors"))
    await until(40)
    await fold(c, 60, anomaly("errors", status="resolved", t=60))
    # A: ten minutes later, past reopen_window and group_interval: a new incident.
    await fold(c, 660, anomaly("errors", t=660))
    await until(699)
    await fold(c, 700, anomaly("errors", status="resolved", t=700))
    # B: three minutes after that one resolved: past reopen_window, within group_interval
    # of its last event. A second anomaly joins while it waits.
    await fold(c, 880, anomaly("latency", severity="warning", t=880))
    await fold(c, 890, anomaly("errors", t=890))
    await until(1100)
    events = c.events(key)
    first, second, third = (e[1] for e in events[:5:2])
    assert events == [
        (30, first, "open", 1),
        (60, first, "resolved", 2),
        (690, second, "open", 1),
        (700, second, "resolved", 2),
        (910, third, "open", 2),
    ]
    assert len({first, second, third}) == 3


def test_a_state_written_with_timers_per_group_still_loads_with_its_own_timers() -> None:
    states, _ = correlate_batch({}, [anomaly("errors", t=880)], at(880), CorrelationRules())
    [held] = states.values()
    doc = b'{"p":0,"e":"%s","q":%s,"i":%s}'
    # Held in group_wait with the earlier incident's last event time (t=700): its own
    # timers are none, and it is still owed its "open".
    legacy = doc % (at(700).isoformat().encode(), b"true", encode(held))
    assert Stored.load(legacy) == Stored(0, held, None, True)
    # Published at t=910 (after it opened): those timers are its own.
    legacy = doc % (at(910).isoformat().encode(), b"false", encode(held))
    assert Stored.load(legacy) == Stored(0, held, at(910), False)
    # Written now: the timers name their incident, and round-trip as they are.
    for stored in (Stored(0, held, at(700), True), Stored(0, held, at(910), False)):
        assert Stored.load(stored.dump()) == stored


async def take_over(old: Recording, new: Recording, t: float) -> None:
    """``new`` takes the partition over: its table recovered from ``old``'s changelog."""
    new.table.data.update(old.table.data)
    new.now = at(t)
    await new._recovered()


async def test_a_worker_taking_over_a_held_incident_publishes_its_open_once_at_group_wait(
    clocked: Any,
) -> None:
    doc = {"correlation": {"group_wait": "30s", "group_interval": "5m"}}
    old, new = clocked(doc), clocked(doc)
    a = anomaly("errors")
    key = key_of(a, old.rules)
    await fold(old, 1, a)
    await take_over(old, new, 5)  # the old owner died inside the incident's group_wait
    for t in range(5, 200):
        await tick(new, t)
    assert old.published == []
    assert [(t, s, r) for t, _, s, r in new.events(key)] == [(30, "open", 1)]


async def test_a_worker_taking_over_republishes_a_state_whose_event_may_be_lost(
    clocked: Any,
) -> None:
    doc = {"correlation": {"group_wait": "30s", "group_interval": "5m"}}
    old, new = clocked(doc), clocked(doc)
    a = anomaly("errors")
    key = key_of(a, old.rules)
    await fold(old, 1, a)
    for t in range(1, 31):
        await tick(old, t)  # published at group_wait: its state says so
    await take_over(old, new, 40)  # died after writing that state, maybe before its event
    for t in range(40, 200):
        await tick(new, t)
    assert [(t, s, r) for t, _, s, r in old.events(key)] == [(30, "open", 1)]
    assert [(t, s, r) for t, _, s, r in new.events(key)] == [(40, "open", 1)]


async def test_a_worker_taking_over_republishes_a_resolution_whose_event_may_be_lost(
    clocked: Any,
) -> None:
    # Only restored open incidents were re-published: a worker killed after writing a
    # resolved state but before its event left subscribers with an incident open for good
    # (the resolving record changes nothing when folded again, the timer finds it resolved).
    doc = {"correlation": {"resolve_timeout": "60s"}}
    old, new = clocked(doc), clocked(doc)
    errors, quiet = anomaly("errors"), anomaly("latency", labels={"service": "cart"})
    await fold(old, 1, errors, quiet)
    await fold(old, 10, anomaly("errors", status="resolved", t=10))
    for t in range(10, 70):
        await tick(old, t)  # "latency", last seen at 0, resolves as quiet at 60
    await take_over(old, new, 65)  # died after writing both states, maybe before the events
    await fold(new, 66, anomaly("errors", status="resolved", t=10))  # the record again
    for t in range(65, 200):
        await tick(new, t)
    for a, resolved_at in ((errors, 10), (quiet, 60)):
        key = key_of(a, old.rules)
        assert [(t, s, r) for t, _, s, r in old.events(key)] == [
            (1, "open", 1),
            (resolved_at, "resolved", 2),
        ]
        assert [(t, s, r) for t, _, s, r in new.events(key)] == [(65, "resolved", 2)]
    # The new owner counts no resolution a second time.
    histogram = new.metrics.resolution
    assert (
        sum(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))
        == 0
    )


async def test_a_worker_taking_over_republishes_no_resolution_long_told_or_never_told(
    clocked: Any,
) -> None:
    doc = {"correlation": {"group_wait": "30s", "resolve_timeout": "60s"}}
    old, new = clocked(doc), clocked(doc)
    told, untold = anomaly("errors"), anomaly("latency", labels={"service": "cart"}, t=40)
    await fold(old, 1, told)
    for t in range(1, 40):
        await tick(old, t)  # "errors" opens at group_wait
    await fold(old, 40, anomaly("errors", status="resolved", t=40), untold)
    await fold(old, 45, anomaly("latency", labels={"service": "cart"}, status="resolved", t=45))
    await take_over(old, new, 101)  # "errors" resolved 61 s ago, "latency" never opened
    for t in range(101, 200):
        await tick(new, t)
    assert new.published == []


async def test_an_incident_opened_silenced_waits_group_wait_like_any_other(clocked: Any) -> None:
    # A new incident whose first member is silenced went out at once as "silenced", so
    # the loud anomaly that joined it a second later counted as an update of a published
    # incident and waited group_interval (5 min) instead of group_wait.
    c = clocked({"correlation": {"group_wait": "30s", "group_interval": "5m"}})
    quiet = anomaly("latency", t=1)
    key = key_of(quiet, c.rules)
    c.now = at(1)
    await c._fold(0, [(key, quiet, Marks(silenced_by="s1"))])
    await fold(c, 2, anomaly("errors", t=2))
    for t in range(2, 200):
        await tick(c, t)
    assert [(t, s, r) for t, _, s, r in c.events(key)] == [(31, "open", 2)]
    # One that is still all silenced at group_wait goes out then, as "silenced".
    other = anomaly("latency", labels={"cluster": "c1", "service": "cart"}, t=500)
    c.now = at(500)
    await c._fold(0, [(key_of(other, c.rules), other, Marks(silenced_by="s1"))])
    for t in range(500, 600):
        await tick(c, t)
    assert [(t, s, r) for t, _, s, r in c.events(key_of(other, c.rules))] == [(530, "silenced", 1)]


async def test_an_incident_resolved_within_group_wait_is_never_published(clocked: Any) -> None:
    c = clocked({"correlation": {"group_wait": "30s"}})
    a = anomaly("errors")
    await fold(c, 1, a)
    await fold(c, 10, anomaly("errors", status="resolved", t=10))
    for t in range(10, 100):
        await tick(c, t)
    stored = c._get(key_of(a, c.rules))
    assert stored is not None and stored.incident is not None
    assert (stored.incident.status, stored.emitted_at, stored.pending) == ("resolved", None, False)
    assert c.published == []


async def test_an_incident_gone_quiet_within_group_wait_is_never_published(clocked: Any) -> None:
    c = clocked({"correlation": {"group_wait": "30s", "resolve_timeout": "20s"}})
    a = anomaly("errors")
    await fold(c, 1, a)
    for t in range(1, 100):
        await tick(c, t)
    stored = c._get(key_of(a, c.rules))
    assert stored is not None and stored.incident is not None
    assert (stored.incident.status, stored.emitted_at, stored.pending) == ("resolved", None, False)
    assert c.published == []


async def test_an_incident_reopened_before_it_was_published_opens_once_at_group_wait(
    clocked: Any,
) -> None:
    c = clocked({"correlation": {"group_wait": "30s", "reopen_window": "5m"}})
    a = anomaly("errors")
    await fold(c, 1, a)
    await fold(c, 5, anomaly("errors", status="resolved", t=5))
    await fold(c, 10, anomaly("errors", t=10))
    for t in range(10, 100):
        await tick(c, t)
    [(when, _, status, revision)] = c.events(key_of(a, c.rules))
    assert (when, status, revision) == (30, "open", 3)
