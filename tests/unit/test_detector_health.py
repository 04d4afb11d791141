"""The detector's own failures as anomalies, the breaker in the loop, and slot alignment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.detector import Health, PromQLDetector, health_step, next_slot
from agent.errors import ConfigError, DependencyUnavailable
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import Anomaly, Fact
from agent.prom import InvalidQuery, Sample, Vector
from agent.settings import parse_settings
from streams.correlation import CorrelationRules, correlate_batch, expire
from streams.topology import build_index, facts_of
from tests.helpers import eventually
from tests.unit.factories import at


class FakeProm:
    """Answers from a script: a list of samples, or an exception to raise."""

    url = "http://prom.test:9090"

    def __init__(self) -> None:
        self.answer: list[Sample] | Exception = []
        self.warnings: tuple[str, ...] = ()
        self.calls: list[tuple[str, datetime | None]] = []

    async def query(self, expr: str, *, at: datetime | None = None) -> list[Sample]:
        return (await self.query_vector(expr, at=at)).samples

    async def query_vector(self, expr: str, *, at: datetime | None = None) -> Vector:
        self.calls.append((expr, at))
        if isinstance(self.answer, Exception):
            raise self.answer
        return Vector(self.answer, self.warnings)


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []
        self.keys: list[str | None] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)
        self.keys.extend(k for _, _, k in items)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def detector(threshold: int = 3) -> tuple[PromQLDetector, FakeProm, Recorder, Clock, Metrics]:
    settings = parse_settings(
        {
            "agent": {"cluster": "c1"},
            "detectors": {"prometheus": {"failure_threshold": threshold, "reset_timeout": "30s"}},
            "patterns": [{"name": "p", "condition": "errors > 1"}],
        },
        env={},
    )
    prom, rec, clock, metrics = FakeProm(), Recorder(), Clock(), Metrics()
    d = PromQLDetector(
        settings,
        prom=prom,
        publish=rec,
        topic="t",
        metrics=metrics,
        clock=clock,  # type: ignore[arg-type]
    )
    return d, prom, rec, clock, metrics


async def test_an_outage_opens_the_breaker_raises_an_agent_anomaly_and_resolves() -> None:
    d, prom, rec, clock, metrics = detector()
    p = d.settings.patterns[0]
    prom.answer = DependencyUnavailable("connection refused")
    up = {"endpoint": prom.url}
    value = metrics.registry.get_sample_value
    for t in range(3):
        clock.now = t
        await d.evaluate_once(p, at(t))
        # Readiness does not say it (the webhook's must not depend on Prometheus): this does.
        assert value("sre_agent_detector_prometheus_up", up) == (0 if t == 2 else 1)
    [down] = rec.items
    assert (down.source, down.name, down.status, down.severity) == (
        "agent",
        "prometheus-unavailable",
        "firing",
        "critical",
    )
    assert down.labels == normalise({"service": "sre-agent", "endpoint": prom.url}, "c1")
    assert "connection refused" in down.annotations["error"]
    # Open: no more queries until reset_timeout; the anomaly is re-published as liveness.
    calls = len(prom.calls)
    clock.now = 10
    await d.evaluate_once(p, at(10))
    assert len(prom.calls) == calls
    assert [a.status for a in rec.items] == ["firing", "firing"]
    # After the timeout one probe goes out; it succeeds: resolved, and the breaker closes.
    prom.answer = []
    clock.now = 40
    await d.evaluate_once(p, at(40))
    assert len(prom.calls) == calls + 1
    assert [a.status for a in rec.items] == ["firing", "firing", "resolved"]
    assert {a.fingerprint for a in rec.items} == {down.fingerprint}
    assert rec.items[-1].starts_at == at(2) and rec.items[-1].observed_at == at(40)
    assert not d.breaker.is_open
    assert value("sre_agent_detector_prometheus_up", up) == 1
    assert value("sre_agent_detector_errors_total", {"pattern": "p", "reason": "unavailable"}) == 3
    assert value("sre_agent_detector_errors_total", {"pattern": "p", "reason": "circuit_open"}) == 1


async def test_a_rejected_query_is_an_agent_anomaly_of_that_pattern_and_not_an_outage() -> None:
    d, prom, rec, _, _ = detector(threshold=2)
    p = d.settings.patterns[0]
    prom.answer = InvalidQuery("bad_data: many-to-many matching not allowed")
    await d.evaluate_once(p, at(0))
    assert rec.items == []  # one failure is not yet an anomaly
    await d.evaluate_once(p, at(15))
    [failed] = rec.items
    assert (failed.name, failed.status, failed.severity) == (
        "pattern-query-failed",
        "firing",
        "warning",
    )
    assert failed.labels["pattern"] == "p"
    assert "many-to-many" in failed.annotations["error"]
    assert not d.breaker.is_open  # Prometheus answered: the endpoint is fine
    prom.answer = [Sample({"service": "cart"}, 3.0)]
    anomalies = await d.evaluate_once(p, at(30))
    assert [a.name for a in anomalies] == ["p"]
    assert [(a.name, a.status) for a in rec.items[1:]] == [
        ("p", "firing"),
        ("pattern-query-failed", "resolved"),
    ]


def test_health_step() -> None:
    h, out = health_step(Health(), False, at(0), 2)
    assert out is None and h.failures == 1
    h, out = health_step(h, False, at(1), 2)
    assert out == "firing" and h.since == at(1)
    h, out = health_step(h, False, at(2), 2)
    assert out == "firing" and h.since == at(1)
    h, out = health_step(h, True, at(3), 2)
    assert out == "resolved" and h == Health()
    assert health_step(h, True, at(4), 2) == (Health(), None)


async def test_replicas_evaluating_one_slot_publish_identical_anomalies() -> None:
    (d1, p1, r1, _, _), (d2, p2, r2, _, _) = detector(), detector()
    for p in (p1, p2):
        p.answer = [Sample({"namespace": "shop", "service": "cart", "pod": "cart-1"}, 2.0)]
    slot = at(30)
    await d1.evaluate_once(d1.settings.patterns[0], slot)
    await d2.evaluate_once(d2.settings.patterns[0], slot)
    assert r1.items == r2.items and len(r1.items) == 1  # id included
    assert r1.items[0].observed_at == slot and p1.calls == [("errors > 1", slot)]
    assert r1.keys == ["c1/shop/cart"]


@pytest.mark.parametrize(
    ("now", "interval", "delay", "slot"),
    [
        (100.0, 15, 1, 105),  # next multiple of 15
        (105.5, 15, 1, 105),  # query time 106 still ahead
        (106.0, 15, 1, 105),
        (106.1, 15, 1, 120),
        (119.0, 15, 0, 120),
        (120.0, 15, 0, 120),
    ],
)
def test_next_slot(now: float, interval: float, delay: float, slot: float) -> None:
    assert next_slot(now, interval, delay) == slot
    assert slot % interval == 0


async def test_loop_evaluates_on_aligned_slots() -> None:
    """Two replicas started at different wall times evaluate the same instants."""
    d, prom, _, _, _ = detector()
    d.settings = parse_settings(
        {
            "detectors": {"prometheus": {"evaluation_delay": "0.05s"}},
            "patterns": [{"name": "p", "condition": "x > 1", "interval": "0.2s"}],
        },
        env={},
    )
    await d.start()
    try:
        await eventually(lambda: len(prom.calls) >= 3, timeout=5, interval=0.05, what="3 slots")
    finally:
        await d.stop()
    stamps = [c[1] for c in prom.calls]
    assert all(s is not None and round(s.timestamp() * 1000) % 200 == 0 for s in stamps), stamps
    assert len(set(stamps)) == len(stamps)


async def test_a_partial_reply_resolves_nothing_that_is_missing_from_it() -> None:
    # Thanos/Mimir answer "success" with a warning when a store is down: the series it
    # held are missing, and were published as resolved.
    d, prom, rec, _, metrics = detector()
    p = d.settings.patterns[0]
    cart, checkout = (
        {"namespace": "shop", "service": "cart"},
        {"namespace": "shop", "service": "co"},
    )
    prom.answer = [Sample(cart, 5.0), Sample(checkout, 5.0)]
    await d.evaluate_once(p, at(0))
    prom.answer, prom.warnings = [Sample(cart, 5.0)], ("partial response: store eu-1 down",)
    out = await d.evaluate_once(p, at(15))
    assert [(a.labels["service"], a.status) for a in out] == [("cart", "firing")]
    value = metrics.registry.get_sample_value
    labels = {"pattern": "p", "reason": "partial_response"}
    assert value("sre_agent_detector_errors_total", labels) == 1
    # A full reply decides again: what is still missing resolves then.
    prom.warnings = ()
    out = await d.evaluate_once(p, at(30))
    assert sorted((a.labels["service"], a.status) for a in out) == [
        ("cart", "firing"),
        ("co", "resolved"),
    ]
    assert rec.items[-2:] == out


async def test_a_partial_reply_is_a_failure_of_the_pattern_s_query() -> None:
    # What a partial reply misses was kept pending, unresolved, but nothing repeated it:
    # its incident resolved as quiet after resolve_timeout though nobody could see it.
    # Partial replies fail the pattern's query (pattern-query-failed, the blindness the
    # correlator holds the pattern's members by); a whole reply ends it.
    d, prom, rec, _, _ = detector(threshold=2)
    p = d.settings.patterns[0]
    cart = Sample({"namespace": "shop", "service": "cart"}, 5.0)
    prom.answer, prom.warnings = [cart], ("partial response: store eu-1 down",)
    for t in (0, 15, 30):
        await d.evaluate_once(p, at(t))
    failed = [a for a in rec.items if a.name == "pattern-query-failed"]
    assert [(a.status, a.observed_at) for a in failed] == [("firing", at(15)), ("firing", at(30))]
    assert failed[0].labels["pattern"] == "p" and failed[0].starts_at == at(15)
    assert "partial reply: partial response: store eu-1 down" in failed[0].annotations["error"]
    prom.warnings = ()
    await d.evaluate_once(p, at(45))
    assert rec.items[-1].name == "pattern-query-failed" and rec.items[-1].status == "resolved"


async def test_prometheus_own_annotation_is_no_partial_reply() -> None:
    # "PromQL warning: ..." (Prometheus >= 2.46) annotates the expression at every
    # evaluation: taken as a partial reply, nothing of the pattern would ever resolve.
    d, prom, rec, _, _ = detector(threshold=1)
    p = d.settings.patterns[0]
    cart, co = ({"namespace": "shop", "service": s} for s in ("cart", "co"))
    prom.answer = [Sample(cart, 5.0), Sample(co, 5.0)]
    prom.warnings = ("PromQL warning: quantile value should be between 0 and 1",)
    await d.evaluate_once(p, at(0))
    prom.answer = [Sample(cart, 5.0)]
    out = await d.evaluate_once(p, at(15))
    assert sorted((a.labels["service"], a.status) for a in out) == [
        ("cart", "firing"),
        ("co", "resolved"),
    ]
    assert not any(a.name == "pattern-query-failed" for a in rec.items)


# --- the pattern library -----------------------------------------------------------------------

LIBRARY = (
    "crash-looping",
    "replicas-mismatch",
    "container-oom-killed",
    "node-filesystem-filling",
    "cpu-throttling",
    "hpa-maxed-out",
)


def test_pattern_library_loads_and_inline_patterns_replace_library_ones() -> None:
    s = parse_settings(
        {
            "pattern_files": ["patterns/kubernetes.yaml"],
            "patterns": [{"name": "hpa-maxed-out", "condition": "up == 0", "for": "1m"}],
        },
        env={},
    )
    assert sorted(p.name for p in s.patterns) == sorted(LIBRARY)
    hpa = s.pattern("hpa-maxed-out")
    assert hpa is not None and hpa.condition == "up == 0"
    crash = s.pattern("crash-looping")
    assert crash is not None and crash.for_ == 300 and crash.severity == "critical"


def test_pattern_file_problems_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("patterns:\n  - name: x\n    condition: up == 0\n    severity: loud\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("patterns:\n  - name: x\n    condition: up == 0\n")
    with pytest.raises(ConfigError) as err:
        parse_settings(
            {"pattern_files": [str(bad), "missing.yaml", str(dup), str(dup)]},
            env={},
            base_dir=tmp_path,
        )
    problems = err.value.problems
    assert problems[0].startswith(f"pattern_files[0] ({bad}): patterns[0].severity:")
    assert problems[1].startswith("pattern_files[1]: cannot read")
    assert problems[2] == f"pattern_files[3].patterns[0].name: 'x' already defined in {dup}"
    assert len(problems) == 3


def test_shipped_library_passes_promtool() -> None:
    from agent.cli import promtool_problems

    s = parse_settings({"pattern_files": ["patterns/kubernetes.yaml"]}, env={})
    assert promtool_problems(s) == []


async def test_an_outage_is_blindness_the_correlator_resolves_no_pattern_incident_by() -> None:
    """What the detector publishes through an outage, folded as the correlator does: the
    pattern's incident, quiet for 16 min, is not resolved; without the view it would be."""
    d, prom, rec, clock, _ = detector()
    p = d.settings.patterns[0]
    prom.answer = [Sample({"namespace": "shop", "service": "checkout"}, 5.0)]
    await d.evaluate_once(p, at(0))
    prom.answer = DependencyUnavailable("connection refused")
    for t in range(15, 1000, 15):
        clock.now = t
        await d.evaluate_once(p, at(t))
    rules = CorrelationRules(resolve_timeout=300)
    states, _ = correlate_batch({}, rec.items, at(1000), rules)
    facts = [f for inc in states.values() if inc is not None for f in facts_of(inc, True, ())]
    blind = build_index(facts, at(1000), rules.resolve_timeout).blind
    [pattern] = [inc for inc in states.values() if inc and inc.members[0].source == "prometheus"]
    assert expire(pattern, at(1000), rules, blind) == (pattern, None)
    assert expire(pattern, at(1000), rules)[0].status == "resolved"


async def test_an_outage_blinds_what_the_detector_saw_of_other_clusters_too() -> None:
    """Behind Thanos the detector (agent.cluster c1) reads series of cluster eu-1: its
    outage is its blindness to them too, so their incident, quiet for 16 min, stays open;
    a blind detector of another cluster holds none of them."""
    d, prom, rec, clock, _ = detector()
    p = d.settings.patterns[0]
    prom.answer = [Sample({"cluster": "eu-1", "namespace": "shop", "service": "co"}, 5.0)]
    await d.evaluate_once(p, at(0))
    prom.answer = DependencyUnavailable("connection refused")
    for t in range(15, 1000, 15):
        clock.now = t
        await d.evaluate_once(p, at(t))
    rules = CorrelationRules(resolve_timeout=300)
    states, _ = correlate_batch({}, rec.items, at(1000), rules)
    facts = [f for inc in states.values() if inc is not None for f in facts_of(inc, True, ())]
    blind = build_index(facts, at(1000), rules.resolve_timeout).blind
    assert set(blind) == {("prometheus", "c1")}
    [pattern] = [inc for inc in states.values() if inc and inc.members[0].source == "prometheus"]
    assert pattern.labels["cluster"] == "eu-1"
    assert expire(pattern, at(1000), rules, blind) == (pattern, None)
    elsewhere = {("prometheus", "eu-1"): blind[("prometheus", "c1")]}
    assert expire(pattern, at(1000), rules, elsewhere)[0].status == "resolved"


async def test_a_failing_pattern_query_is_blindness_to_that_pattern_only() -> None:
    """Pattern p's query is rejected from t=15 to t=1000 (pattern-query-failed fires for
    it), while Prometheus answers: p's incident, quiet for 16 min, is not resolved, and its
    quiet counts from p's first answer; q's, of the same cluster, resolves as quiet."""
    d, prom, rec, clock, _ = detector(threshold=1)
    p = d.settings.patterns[0]
    q = replace(p, name="q", condition="other > 1")
    prom.answer = [Sample({"namespace": "shop", "service": "checkout"}, 5.0)]
    await d.evaluate_once(p, at(0))
    prom.answer = [Sample({"namespace": "shop", "service": "cart"}, 5.0)]
    await d.evaluate_once(q, at(0))  # q's last firing: its series' detector stops there
    prom.answer = InvalidQuery('bad_data: parse error: unexpected "}"')
    for t in range(15, 1000, 15):
        clock.now = t
        await d.evaluate_once(p, at(t))
    # p answers at t=1000, partially: what is missing is neither resolved nor repeated.
    prom.answer, prom.warnings = [], ("store unavailable",)
    await d.evaluate_once(p, at(1000))
    rules = CorrelationRules(resolve_timeout=300)

    def expired(now: float, pattern: str, items: list[Anomaly]) -> str:
        states, _ = correlate_batch({}, items, at(now), rules)
        incs = [inc for inc in states.values() if inc is not None]
        facts = [f for inc in incs for f in facts_of(inc, True, ())]
        blind = build_index(facts, at(now), rules.resolve_timeout).blind
        [inc] = [
            i for i in incs if i.members[0].source == "prometheus" and i.members[0].name == pattern
        ]
        return expire(inc, at(now), rules, blind)[0].status

    while_failing = [a for a in rec.items if a.observed_at < at(1000)]
    assert any(a.name == "pattern-query-failed" for a in while_failing)
    assert not any(a.name == "prometheus-unavailable" for a in rec.items)
    assert expired(999, "p", while_failing) == "open"
    assert expired(999, "q", while_failing) == "resolved"
    assert expired(1299, "p", rec.items) == "open"
    assert expired(1300, "p", rec.items) == "resolved"


def recorded_facts(items: list[Anomaly], now: float) -> dict[str, Fact]:
    """The correlation facts the correlator records of what a detector published."""
    states, _ = correlate_batch({}, items, at(now), CorrelationRules(resolve_timeout=300))
    facts = [f for inc in states.values() if inc is not None for f in facts_of(inc, True, ())]
    return {f.fingerprint: f for f in facts}


async def test_a_restarted_detector_that_sees_ends_the_blindness_the_facts_still_record() -> None:
    """The detector restarts during an outage and Prometheus answers before it ever fails
    again: nothing in its new life said it sees again, so the pattern incidents stayed
    held until the fact lapsed. It reads the facts at its first answer and ends what they
    record as going on, once; a replica that finds no open blindness announces nothing."""
    old, prom, rec, _, _ = detector(threshold=1)
    p = old.settings.patterns[0]
    prom.answer = InvalidQuery("bad_data: parse error")
    await old.evaluate_once(replace(p, name="q"), at(0))
    prom.answer = DependencyUnavailable("connection refused")
    await old.evaluate_once(p, at(15))
    [failed, down] = rec.items
    assert (down.name, failed.name) == ("prometheus-unavailable", "pattern-query-failed")
    facts = recorded_facts(rec.items, 30)
    reads: list[int] = []

    async def read() -> dict[str, Fact]:
        reads.append(1)
        return facts

    new, prom, rec, _, _ = detector(threshold=1)
    new.read_facts = read
    prom.answer = [Sample({"namespace": "shop", "service": "checkout"}, 5.0)]
    await new.evaluate_once(p, at(60))
    agent = [(a.name, a.status, a.starts_at) for a in rec.items if a.source == "agent"]
    assert agent == [("prometheus-unavailable", "resolved", at(15))]
    # Pattern q's query failed in the former life: its first answer ends that, once.
    await new.evaluate_once(replace(p, name="q"), at(60))
    await new.evaluate_once(replace(p, name="q"), at(75))
    await new.evaluate_once(p, at(75))
    agent = [(a.name, a.status, a.labels.get("pattern")) for a in rec.items if a.source == "agent"]
    assert agent == [
        ("prometheus-unavailable", "resolved", None),
        ("pattern-query-failed", "resolved", "q"),
    ]
    assert [a.fingerprint for a in rec.items if a.source == "agent"] == [
        down.fingerprint,
        failed.fingerprint,
    ]
    assert len(reads) == 1
    # The blindness already ended (or was never recorded): nothing to announce.
    for recorded in (recorded_facts([down, replace(down, status="resolved")], 30), {}):
        facts = recorded
        other, prom, rec, _, _ = detector(threshold=1)
        other.read_facts = read
        prom.answer = [Sample({"namespace": "shop", "service": "checkout"}, 5.0)]
        await other.evaluate_once(p, at(60))
        assert [a for a in rec.items if a.source == "agent"] == []


async def test_reading_the_facts_past_its_bound_costs_no_evaluation() -> None:
    """The facts view not loaded within its bound (runtime.read_facts: CompactedView.start
    gives up with TimeoutError) lost the pattern's whole evaluation, counted as an internal
    error, at every slot the read was tried again."""
    d, prom, rec, _, _ = detector(threshold=1)
    p = d.settings.patterns[0]
    reads: list[int] = []

    async def slow() -> dict[str, Fact]:
        reads.append(1)
        raise TimeoutError

    d.read_facts = slow
    prom.answer = [Sample({"namespace": "shop", "service": "checkout"}, 5.0)]
    found = await d.evaluate_once(p, at(0))
    assert [(a.name, a.status) for a in rec.items] == [("p", "firing")]
    assert found == rec.items
    # Read again at the next answer, as after any failed read.
    await d.evaluate_once(p, at(15))
    assert len(reads) == 2 and len(rec.items) == 2
