"""The facts a correlator worker publishes for the cross-partition view, and what it
remembers of them: the worker runs in-process (see test_correlator_timers), its facts
topic recorded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import streams.correlator as correlator_module
from agent.codec import decode
from agent.models import Anomaly, Fact, Incident
from streams.correlation import key_of
from streams.correlator import Correlator
from streams.topology import build_index
from tests.unit.factories import anomaly, at
from tests.unit.test_correlator_timers import Clock, Recording, fold, tick


class SentFacts:
    """The facts topic: what was sent to it, in order."""

    def __init__(self) -> None:
        self.sent: list[Fact] = []

    async def send(self, *, key: bytes, value: bytes) -> None:
        fact = decode(Fact, value)
        assert key == fact.fingerprint.encode()
        self.sent.append(fact)


class Announcing(Recording):
    """A recording worker that publishes its facts (to a recorder)."""

    def __init__(self, doc: dict[str, Any], clock: Clock) -> None:
        super().__init__(doc, clock)
        self.facts_topic = SentFacts()

    async def _publish_facts(self, incidents: Iterable[Incident | None]) -> None:
        await Correlator._publish_facts(self, incidents)


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(doc: dict[str, Any]) -> Announcing:
        clock = Clock(at(0))
        monkeypatch.setattr(correlator_module, "utcnow", lambda: clock.now)
        return Announcing(doc, clock)

    return make


def node(name: str, t: float, status: str = "firing") -> Anomaly:
    return anomaly("node-not-ready", labels={"cluster": "c1", "node": name}, t=t, status=status)


def sent(c: Announcing) -> list[tuple[str, str, bool]]:
    return [(f.labels["node"], f.status, f.incident_open) for f in c.facts_topic.sent]


async def test_a_retracted_fact_is_forgotten_and_never_sent_again(worker: Any) -> None:
    c = worker({"correlation": {"reopen_window": "1m"}})
    for i in range(50):  # nodes failing and recovering, one after another, for weeks
        t = i * 1000
        await fold(c, t, node(f"n{i}", t))
        await fold(c, t + 10, node(f"n{i}", t + 10, "resolved"))
        await tick(c, t + 11)
    assert c._facts_sent == {}
    assert sent(c) == [
        (f"n{i}", status, is_open)
        for i in range(50)
        for status, is_open in (("firing", True), ("resolved", False))
    ]
    # A late copy of a resolution changes nothing and retracts nothing again.
    await fold(c, 50_000, node("n49", 49_010, "resolved"))
    assert len(c.facts_topic.sent) == 100


async def test_a_fact_no_incident_holds_any_more_is_forgotten_once_every_view_expired_it(
    worker: Any,
) -> None:
    c = worker({"correlation": {"member_retention": "1m", "resolve_timeout": "5m"}})
    await fold(c, 0, node("n1", 0), node("n2", 0))
    await fold(c, 10, node("n1", 10, "resolved"))
    # n3 joins after member_retention: the change drops n1's member, whose fact is no
    # longer any incident's to refresh or retract (views expire it 5 min after t=10).
    await fold(c, 100, node("n3", 100))
    for t in range(100, 1300, 60):  # n2 and n3 keep failing: the incident stays open
        await fold(c, t, node("n2", t), node("n3", t))
        await tick(c, t + 1)
    fingerprints = {node(n, 0).fingerprint: n for n in ("n1", "n2", "n3")}
    assert sorted(fingerprints[fp] for fp in c._facts_sent) == ["n2", "n3"]
    # A fact still held goes on being refreshed, the forgotten one is not sent again.
    assert [n for n, _, _ in sent(c)].count("n1") == 2
    assert [n for n, _, _ in sent(c)].count("n2") > 3


async def test_a_view_forgets_the_facts_no_index_uses_again(worker: Any) -> None:
    # The facts topic is compacted and nothing tombstones it: every node-level anomaly
    # ever seen stayed in every worker's view, and the index was rebuilt from all of them
    # every second.
    c = worker({"correlation": {"resolve_timeout": "5m", "reopen_window": "1m"}})
    for i in range(50):  # nodes failing and recovering, one after another, for weeks
        t = i * 1000
        await fold(c, t, node(f"n{i}", t))
        await fold(c, t + 10, node(f"n{i}", t + 10, "resolved"))
    await fold(c, 49_000, unavailable(49_000))  # a blindness, ended at 49_010
    await fold(c, 49_010, unavailable(49_010, "resolved"))
    await fold(c, 49_500, node("n50", 49_500))  # still failing
    for f in c.facts_topic.sent:  # the view reads the topic
        c.facts.items[f.fingerprint] = f
    assert len(c.facts.items) == 52
    fingerprints = {node(f"n{i}", 0).fingerprint: f"n{i}" for i in range(51)}
    index = Correlator.fact_index(c, at(49_600))
    # Kept: what ended within two timeouts (n49 at 49_010; nodes it took in stay held for
    # a timeout) and the blindness, whose end still dates its members' quiet.
    kept = {fingerprints.get(fp, "blind") for fp in c.facts.items}
    assert kept == {"n49", "n50", "blind"}
    assert list(index.nodes) == [("c1", "n50")]
    assert ("prometheus", "c1") in index.blind
    # Spent facts are gone for good, and one of them failing again comes back dated now.
    assert Correlator.fact_index(c, at(49_601)).nodes == index.nodes
    await fold(c, 49_700, node("n3", 49_700))
    c.facts.items[node("n3", 0).fingerprint] = c.facts_topic.sent[-1]
    assert sorted(Correlator.fact_index(c, at(49_701)).nodes) == [("c1", "n3"), ("c1", "n50")]


def unavailable(t: float, status: str = "firing") -> Anomaly:
    """The detector's anomaly while Prometheus does not answer (cluster c1, as SHOP's)."""
    labels = {"cluster": "c1", "service": "sre-agent", "endpoint": "http://prom:9090"}
    return anomaly(
        "prometheus-unavailable", labels=labels, source="agent", status=status, t=t, starts=45
    )


def see(c: Announcing) -> None:
    """The worker's view: the last fact of each fingerprint on the (shared) facts topic."""
    latest = {f.fingerprint: f for f in c.facts_topic.sent}
    c.index = build_index(latest.values(), c.now, c.rules.resolve_timeout)


def blind_gauge(c: Announcing) -> float | None:
    return c.metrics.registry.get_sample_value(
        "sre_agent_correlator_blind", {"source": "prometheus", "cluster": "c1"}
    )


async def test_a_prometheus_outage_resolves_no_pattern_incident_even_across_a_restart(
    worker: Any,
) -> None:
    """The pattern's last firing at t=0, then Prometheus is unreachable (the breaker opens
    at t=45) until t=2100, half an hour past resolve_timeout (5 min). The incident stays
    open; once Prometheus answers, quiet counts from then."""
    doc = {"correlation": {"resolve_timeout": "5m"}}
    c = worker(doc)
    c.persist_interval = 0  # every repeat in the changelog: the test's clock is not its
    errors = anomaly("high-error-rate", t=0)
    key = key_of(errors, c.rules)
    await fold(c, 0, errors)
    for t in range(45, 2100, 15):  # the detector repeats its own anomaly each evaluation
        await fold(c, t, unavailable(t))
        see(c)
        await tick(c, t + 1)
    assert blind_gauge(c) == 1
    # The worker restarts: its table from the changelog, its view from the facts topic;
    # the first it folds of the agent's incident is that Prometheus answers again.
    new = worker(doc)
    new.facts_topic = c.facts_topic
    new.table.data.update(c.table.data)
    new.now = at(2099)  # it comes back now, not at the epoch of the test
    see(new)
    await tick(new, 2099)
    assert blind_gauge(new) == 1
    await fold(new, 2100, unavailable(2100, "resolved"))
    for t in range(2100, 2401):
        see(new)
        await tick(new, t)
    assert [(e.key, e.status) for _, e in c.published + new.published] == [
        (key, "open"),
        (key_of(unavailable(0), c.rules), "open"),
        (key_of(unavailable(0), c.rules), "resolved"),
        (key, "resolved"),
    ]
    resolved = new.published[-1][1]
    assert (new.published[-1][0], resolved.resolved_at) == (at(2400), at(2400))
    assert blind_gauge(new) == 0


def query_failed(t: float, status: str = "firing", pattern: str = "high-error-rate") -> Anomaly:
    """The detector's anomaly while Prometheus rejects one pattern's query."""
    labels = {
        "cluster": "c1",
        "service": "sre-agent",
        "endpoint": "http://prom:9090",
        "pattern": pattern,
    }
    return anomaly(
        "pattern-query-failed", labels=labels, source="agent", status=status, t=t, starts=45
    )


async def test_a_failing_pattern_query_resolves_none_of_its_incidents_but_others_do(
    worker: Any,
) -> None:
    """high-error-rate last fired at t=0, then its query is rejected (pattern-query-failed
    from t=45) until t=2100; latency's last firing was at t=0 too, and its query answers
    (its detector state lost). Only latency's incident resolves as quiet meanwhile; the
    other's quiet counts from its query's first answer."""
    doc = {"correlation": {"resolve_timeout": "5m"}}
    c = worker(doc)
    c.persist_interval = 0
    errors = anomaly("high-error-rate", t=0)
    latency = anomaly(
        "latency", t=0, labels={"cluster": "c1", "namespace": "shop", "service": "cart"}
    )
    await fold(c, 0, errors, latency)
    for t in range(45, 2100, 15):
        await fold(c, t, query_failed(t))
        see(c)
        await tick(c, t + 1)
    await fold(c, 2100, query_failed(2100, "resolved"))
    for t in range(2100, 2401):
        see(c)
        await tick(c, t)
    agent_key = key_of(query_failed(0), c.rules)
    assert [(e.key, e.status) for _, e in c.published] == [
        (key_of(errors, c.rules), "open"),
        (key_of(latency, c.rules), "open"),
        (agent_key, "open"),
        (key_of(latency, c.rules), "resolved"),
        (agent_key, "resolved"),
        (key_of(errors, c.rules), "resolved"),
    ]
    assert c.published[3][1].resolved_at == at(300)
    assert c.published[-1][1].resolved_at == at(2400)
    assert blind_gauge(c) is None  # the source sees: only one pattern did not
