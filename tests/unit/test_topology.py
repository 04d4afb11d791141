"""Topology absorption and inhibition: pure decisions over the cross-partition fact view."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.models import SEVERITY_RANK, Anomaly, Fact, Incident
from agent.settings import InhibitRuleSection
from streams.correlation import (
    NO_MARKS,
    Blindness,
    CorrelationRules,
    Marks,
    correlate,
    expire,
    hand_over,
    key_of,
)
from streams.topology import (
    FactIndex,
    InhibitRule,
    absorber,
    as_anomaly,
    build_index,
    facts_of,
    inhibited_by,
    is_fact,
    match_labels,
    moves,
    placements,
    scope,
    spent,
)
from tests.unit.factories import anomaly, at

RULES = CorrelationRules(resolve_timeout=300.0, reopen_window=300.0)
NOW = at(1000)


def node_labels(node: str, cluster: str = "c1") -> dict[str, str]:
    return {"cluster": cluster, "node": node, "namespace": "", "service": ""}


def pod_labels(pod: str, node: str, workload: str = "checkout") -> dict[str, str]:
    return {
        "cluster": "c1",
        "namespace": "shop",
        "service": workload,
        "workload": workload,
        "pod": pod,
        "node": node,
    }


def fact(a: Anomaly, status: str = "firing", t: float = 1000, open_: bool = True) -> Fact:
    return Fact(
        fingerprint=a.fingerprint,
        labels=match_labels(a),
        incident_key=key_of(a, RULES),
        incident_id=f"inc-{a.fingerprint[:6]}",
        status=status,  # type: ignore[arg-type]
        incident_open=open_,
        observed_at=at(t),
    )


def index_of(*facts: Fact, rules: tuple[InhibitRule, ...] = ()) -> FactIndex:
    return build_index(facts, NOW, RULES.resolve_timeout, rules)


NODE_DOWN = anomaly("node-not-ready", labels=node_labels("n1"), source="kubernetes")
POD_CRASH = anomaly("pod-crash-loop", labels=pod_labels("checkout-1", "n1"), source="kubernetes")


def test_scope_reads_the_topology_from_labels() -> None:
    assert scope(node_labels("n1")) == "node/n1"
    assert scope({"namespace": "shop", "workload": "checkout"}) == "workload/shop/checkout"
    assert scope({"namespace": "shop", "deployment": "checkout", "node": "n1"}) == (
        "workload/shop/checkout"
    )
    assert scope({"namespace": "db", "statefulset": "pg"}) == "workload/db/pg"
    assert scope(pod_labels("p", "n1")) is None  # pod-level: absorbed, never absorbs
    assert scope({"namespace": "shop", "service": "checkout"}) is None


def test_a_node_fact_absorbs_pods_on_that_node_only() -> None:
    index = index_of(fact(NODE_DOWN))
    how, f = absorber(POD_CRASH.labels, index, fingerprint=POD_CRASH.fingerprint) or ("", None)
    assert how == "node/n1" and f is not None and f.fingerprint == NODE_DOWN.fingerprint
    assert absorber(pod_labels("checkout-2", "n2"), index, fingerprint="x") is None
    other_cluster = {**POD_CRASH.labels, "cluster": "c2"}
    assert absorber(other_cluster, index, fingerprint="x") is None


def test_node_wins_over_workload_and_workload_absorbs_its_pods() -> None:
    rollout = anomaly(
        "rollout-stuck", labels={"cluster": "c1", "namespace": "shop", "workload": "checkout"}
    )
    fp = POD_CRASH.fingerprint
    only_workload = index_of(fact(rollout))
    assert (absorber(POD_CRASH.labels, only_workload, fingerprint=fp) or ("",))[0] == (
        "workload/shop/checkout"
    )
    both = index_of(fact(rollout), fact(NODE_DOWN))
    assert (absorber(POD_CRASH.labels, both, fingerprint=fp) or ("",))[0] == "node/n1"
    assert absorber(pod_labels("cart-1", "n9", workload="cart"), both, fingerprint="x") is None


def test_a_fact_routes_while_its_incident_is_open_and_alive() -> None:
    assert index_of(fact(NODE_DOWN, open_=False)).nodes == {}
    # Not refreshed for resolve_timeout: its last update may be lost, it still ends.
    assert index_of(fact(NODE_DOWN, t=1000 - 300)).nodes == {}
    assert index_of(fact(NODE_DOWN, t=1000 - 299)).nodes != {}


def test_a_recovered_node_keeps_the_pods_it_took_in_and_takes_in_no_new_one() -> None:
    # n1 blipped NotReady and took in checkout-1's crash loop; n1 recovered, checkout-1
    # still crash-loops (its own bug), so the node's incident stays open.
    inc, _ = correlate(None, NODE_DOWN, NOW, RULES)
    assert inc is not None
    inc, _ = correlate(inc, POD_CRASH, NOW, RULES, key=inc.key, marks=absorbed("node/n1"))
    assert inc is not None
    recovered = anomaly(
        "node-not-ready", labels=node_labels("n1"), source="kubernetes", status="resolved", t=60
    )
    inc, _ = correlate(inc, recovered, NOW, RULES)
    assert inc is not None and inc.status == "updated"
    (f,) = facts_of(inc, True, ())
    assert (f.status, f.holds) == ("resolved", (POD_CRASH.fingerprint,))
    index = build_index([f], at(100), RULES.resolve_timeout)
    # The crash loop's repeats keep their home: nothing flips between incidents.
    again = anomaly("pod-crash-loop", labels=POD_CRASH.labels, source="kubernetes", t=100)
    assert [k for k, _ in placements(again, None, index, RULES)] == [inc.key]
    # A later OOM kill on n1 is its own incident, not the node's blip.
    oom = anomaly("oom-killed", labels=pod_labels("payments-7", "n1", "payments"), t=100)
    assert placements(oom, None, index, RULES) == [(key_of(oom, RULES), NO_MARKS)]
    # Nor does the timer hand an incident over to the recovered node.
    own, _ = correlate(None, oom, NOW, RULES)
    assert own is not None and moves(own, index) == {}
    # Once the crash loop resolves, the node holds nothing any more.
    done = anomaly(
        "pod-crash-loop", labels=POD_CRASH.labels, source="kubernetes", status="resolved", t=200
    )
    inc, _ = correlate(inc, done, NOW, RULES, key=inc.key, marks=absorbed("node/n1"))
    assert inc is not None and inc.status == "resolved"
    assert [f.incident_open for f in facts_of(inc, True, ())] == [False]


def absorbed(how: str) -> Marks:
    return Marks(absorbed_by=how)


def test_placements_route_firing_to_the_absorber_and_resolutions_to_both() -> None:
    index = index_of(fact(NODE_DOWN))
    node_key = key_of(NODE_DOWN, RULES)
    ((key, marks),) = placements(POD_CRASH, None, index, RULES)
    assert key == node_key and marks.absorbed_by == "node/n1"
    resolved = anomaly("pod-crash-loop", labels=POD_CRASH.labels, status="resolved", t=5)
    keys = [k for k, _ in placements(resolved, None, index, RULES)]
    assert keys == [key_of(POD_CRASH, RULES), node_key]
    # Topology off: every anomaly stays in its own group.
    assert [k for k, _ in placements(POD_CRASH, None, index, RULES, topology=False)] == [
        key_of(POD_CRASH, RULES)
    ]
    # Routed by another worker: folded where it was told, without deciding again.
    assert placements(POD_CRASH, ("k", "node/x"), index, RULES)[0][0] == "k"


CRITICAL_INHIBITS_WARNING = InhibitRule.from_section(
    InhibitRuleSection(
        name="crit-over-warn",
        source_matchers=("severity=critical",),
        target_matchers=("severity=warning",),
        equal=("cluster", "service"),
    )
)


def test_inhibition_needs_equal_labels_and_an_active_source() -> None:
    rules = (CRITICAL_INHIBITS_WARNING,)
    source = anomaly("errors", severity="critical")
    index = index_of(fact(source), rules=rules)
    target = anomaly("latency", severity="warning")
    assert inhibited_by(match_labels(target), target.fingerprint, rules, index) == (
        f"crit-over-warn:{source.fingerprint}"
    )
    elsewhere = anomaly("latency", severity="warning", labels={"cluster": "c1", "service": "x"})
    assert inhibited_by(match_labels(elsewhere), elsewhere.fingerprint, rules, index) is None
    not_target = anomaly("saturation", severity="critical")
    assert inhibited_by(match_labels(not_target), not_target.fingerprint, rules, index) is None
    # Only a firing source inhibits, even while its incident stays open.
    stale = index_of(fact(source, status="resolved"), rules=rules)
    assert inhibited_by(match_labels(target), target.fingerprint, rules, stale) is None


def test_equal_labels_missing_on_both_sides_count_as_equal() -> None:
    rule = InhibitRule.from_section(
        InhibitRuleSection(
            name="r",
            source_matchers=("alertname=a",),
            target_matchers=("alertname=b",),
            equal=("zone",),
        )
    )
    src, tgt = anomaly("a"), anomaly("b")
    index = index_of(fact(src), rules=(rule,))
    assert inhibited_by(match_labels(tgt), tgt.fingerprint, (rule,), index) is not None


def test_an_anomaly_matching_both_sides_never_inhibits_its_peers_or_itself() -> None:
    rule = InhibitRule.from_section(
        InhibitRuleSection(
            name="r",
            source_matchers=("namespace=shop",),
            target_matchers=("namespace=shop",),
            equal=("cluster",),
        )
    )
    a, b = anomaly("a"), anomaly("b")
    index = index_of(fact(a), fact(b), rules=(rule,))
    assert inhibited_by(match_labels(a), a.fingerprint, (rule,), index) is None
    assert inhibited_by(match_labels(b), b.fingerprint, (rule,), index) is None


def test_facts_are_topology_and_inhibition_sources() -> None:
    assert is_fact(match_labels(NODE_DOWN), True, ())
    assert not is_fact(match_labels(NODE_DOWN), False, ())
    assert not is_fact(match_labels(POD_CRASH), True, ())
    src = anomaly("errors", severity="critical")
    assert is_fact(match_labels(src), False, (CRITICAL_INHIBITS_WARNING,))


def test_facts_follow_their_incident() -> None:
    inc, _ = correlate(None, NODE_DOWN, NOW, RULES)
    assert inc is not None
    inc, _ = correlate(inc, POD_CRASH, NOW, RULES, key=inc.key)
    assert inc is not None
    (f,) = facts_of(inc, True, ())  # the pod is no fact
    assert (f.fingerprint, f.status, f.incident_open) == (NODE_DOWN.fingerprint, "firing", True)
    recovered = anomaly(
        "node-not-ready", labels=node_labels("n1"), source="kubernetes", status="resolved", t=30
    )
    inc, _ = correlate(inc, recovered, NOW, RULES)
    assert inc is not None and inc.status == "updated"  # the pod still fails
    (f,) = facts_of(inc, True, ())
    assert (f.status, f.incident_open, f.observed_at) == ("resolved", True, at(30))


def _unavailable(t: float, status: str = "firing", cluster: str = "c1") -> Anomaly:
    """The detector's anomaly while Prometheus does not answer."""
    labels = {"cluster": cluster, "service": "sre-agent", "endpoint": "http://prom:9090"}
    return anomaly(
        "prometheus-unavailable", labels=labels, source="agent", status=status, t=t, starts=100
    )


def test_a_source_that_cannot_see_is_a_fact_blind_while_it_fires_then_until_it_saw() -> None:
    blind, _ = correlate(None, _unavailable(100), NOW, RULES)
    assert blind is not None
    # Every worker must know, whatever else facts are for.
    (f,) = facts_of(blind, False, ())
    assert is_fact(f.labels, False, ())
    assert build_index([f], at(150), 300).blind == {("prometheus", "c1"): Blindness(at(100))}
    # Another agent anomaly keeps its incident open and alive after Prometheus answers
    # again at t=200: quiet still counts from t=200.
    failed = anomaly(
        "pattern-query-failed", labels=dict(_unavailable(0).labels, pattern="x"), source="agent"
    )
    inc, _ = correlate(blind, replace(failed, observed_at=at(150)), NOW, RULES)
    inc, _ = correlate(inc, _unavailable(200, "resolved"), NOW, RULES)
    inc, _ = correlate(inc, replace(failed, observed_at=at(400)), NOW, RULES)
    assert inc is not None and inc.status != "resolved"
    facts = facts_of(inc, False, ())
    seen = {("prometheus", "c1"): Blindness(at(100), at(200))}
    # (The failing query blinds its own pattern only, from when it started.)
    failing = {("prometheus", "c1", "x"): Blindness(at(0))}
    assert build_index(facts, at(450), 300).blind == seen | failing
    # Its incident closed (a retraction): the end still counts, also for a worker that
    # comes back long after.
    closed_inc, _ = correlate(blind, _unavailable(200, "resolved"), NOW, RULES)
    assert closed_inc is not None
    (closed,) = facts_of(closed_inc, False, ())
    assert not closed.incident_open
    assert build_index([closed], at(9000), 300).blind == seen
    # A blindness no longer refreshed (the detector gone too) ended when last seen.
    assert build_index(facts_of(blind, False, ()), at(399), 300).blind == {
        ("prometheus", "c1"): Blindness(at(100))
    }
    assert build_index(facts_of(blind, False, ()), at(400), 300).blind == {
        ("prometheus", "c1"): Blindness(at(100), at(100))
    }
    # Two endpoints of one cluster: blind while either is.
    other = replace(f, fingerprint="other", last_seen=at(300), status="firing")
    assert build_index([f, other], at(310), 300).blind == {("prometheus", "c1"): Blindness(at(100))}


def test_a_blindness_ends_when_its_own_anomaly_stops_not_when_its_incident_does() -> None:
    # Prometheus stopped answering the detector of one endpoint at t=100; that detector was
    # then removed (or pointed at another endpoint): nothing repeats nor resolves its
    # anomaly. A failing pattern query of the same agent keeps their incident alive.
    failed = anomaly(
        "pattern-query-failed", labels=dict(_unavailable(0).labels, pattern="x"), source="agent"
    )
    inc, _ = correlate(None, _unavailable(100), NOW, RULES)
    for t in range(150, 5000, 50):
        inc, _ = correlate(inc, replace(failed, observed_at=at(t), id=f"q{t}"), NOW, RULES)
    assert inc is not None and inc.status != "resolved"
    index = build_index(facts_of(inc, False, ()), at(5000), 300)
    # Blind until it was last told so, not for as long as its incident lives.
    assert index.blind[("prometheus", "c1")] == Blindness(at(100), at(100))
    pods = anomaly("errors", labels={"cluster": "c1", "service": "shop"}, t=50)
    state, _ = correlate(None, pods, NOW, RULES)
    assert state is not None
    new, event = expire(state, at(5000), RULES, index.blind)
    assert event is not None and new.resolved_at == at(400)


def test_a_fact_dated_far_ahead_of_the_clock_holds_nothing_open() -> None:
    # Anyone who writes the facts topic (or a bug) can date a fact a year ahead: as a
    # blindness going on, or one that ends then, it held the cluster's PromQL incidents
    # open for that year; as a node's failure, it took in the node's pods as long.
    blind, _ = correlate(None, _unavailable(100), NOW, RULES)
    assert blind is not None
    (f,) = facts_of(blind, False, ())
    year = at(1000 + 365 * 86400)
    going_on = replace(f, observed_at=year, last_seen=year)
    ended = replace(f, status="resolved", incident_open=False, last_seen=year)
    pods = anomaly("errors", labels={"cluster": "c1", "service": "shop"}, t=50)
    state, _ = correlate(None, pods, NOW, RULES)
    assert state is not None
    for forged in (going_on, ended):
        index = build_index([forged], at(5000), 300)
        assert index.blind == {}
        new, event = expire(state, at(5000), RULES, index.blind)
        assert event is not None and new.resolved_at == at(350)
    node = replace(fact(NODE_DOWN), observed_at=year)
    assert build_index([node], at(5000), 300).nodes == {}
    # Within the clock skew an anomaly may have, it counts.
    assert build_index([replace(node, observed_at=at(5300))], at(5000), 300).nodes


def test_a_failing_pattern_query_is_blindness_to_that_pattern_in_its_cluster() -> None:
    labels = dict(_unavailable(0).labels, pattern="errors")
    failed = anomaly(
        "pattern-query-failed", labels=labels, source="agent", status="firing", t=100, starts=100
    )
    inc, _ = correlate(None, failed, NOW, RULES)
    assert inc is not None
    (f,) = facts_of(inc, False, ())  # a fact whatever else facts are for
    assert build_index([f], at(150), 300).blind == {
        ("prometheus", "c1", "errors"): Blindness(at(100))
    }
    inc, _ = correlate(inc, replace(failed, status="resolved", observed_at=at(200)), NOW, RULES)
    assert inc is not None
    (f,) = facts_of(inc, False, ())
    assert build_index([f], at(250), 300).blind == {
        ("prometheus", "c1", "errors"): Blindness(at(100), at(200))
    }
    # Without the pattern's name it cannot say which anomalies are unseen: none.
    nameless = replace(failed, labels=_unavailable(0).labels, fingerprint="nameless")
    inc, _ = correlate(None, nameless, NOW, RULES)
    assert inc is not None
    assert build_index(facts_of(inc, False, ()), at(150), 300).blind == {}


def test_an_incident_all_on_one_node_hands_its_members_over_and_resolves() -> None:
    inc, _ = correlate(None, POD_CRASH, NOW, RULES)
    assert inc is not None
    other = anomaly("oom-killed", labels=pod_labels("checkout-2", "n1"), t=1)
    inc, _ = correlate(inc, other, NOW, RULES)
    assert inc is not None
    found = moves(inc, index_of(fact(NODE_DOWN)))
    assert {how for how, _ in found.values()} == {"node/n1"} and len(found) == 2
    moved = {fp: (how, f.incident_id) for fp, (how, f) in found.items()}
    closed, event = hand_over(inc, moved, at(10))
    assert event is closed and closed.status == "resolved"
    assert closed.absorbed_into == f"inc-{NODE_DOWN.fingerprint[:6]}"
    assert len(closed.members) == 2 and not closed.firing  # kept, firing elsewhere now
    assert {m.absorbed_by for m in closed.members} == {"node/n1"}
    handed = [as_anomaly(m) for m in inc.members]
    assert [(h.fingerprint, h.status, h.observed_at) for h in handed] == [
        (m.fingerprint, m.status, m.last_seen) for m in inc.members
    ]


def test_a_mixed_incident_hands_over_only_the_pods_on_the_failed_node() -> None:
    inc, _ = correlate(None, POD_CRASH, NOW, RULES)
    elsewhere = anomaly("oom-killed", labels=pod_labels("checkout-3", "n2"), t=2)
    inc, _ = correlate(inc, elsewhere, NOW, RULES)
    assert inc is not None
    found = moves(inc, index_of(fact(NODE_DOWN)))
    assert list(found) == [POD_CRASH.fingerprint]
    moved = {fp: (how, f.incident_id) for fp, (how, f) in found.items()}
    kept, event = hand_over(inc, moved, at(10))
    assert event is kept and kept.status == "updated" and kept.absorbed_into is None
    assert [m.fingerprint for m in kept.firing] == [elsewhere.fingerprint]
    # The node's own incident is never its own absorber.
    node_inc, _ = correlate(None, NODE_DOWN, NOW, RULES)
    assert node_inc is not None and moves(node_inc, index_of(fact(NODE_DOWN))) == {}


# --- the invariant, over random interleavings -----------------------------------------------


Seen = Callable[[Anomaly, set[str], dict[str, Incident | None], dict[str, Incident | None]], None]


def simulate(
    steps: list[tuple[str, int, int, bool]], seen: Seen | None = None
) -> tuple[dict[str, Incident | None], set[str]]:
    """The correlator's decisions in one process: fold each anomaly where placements() puts
    it, publish the facts of changed incidents, and run the hand-over tick after every
    step. Returns the states and the fingerprints whose last observation was firing;
    ``seen`` gets each step's anomaly, what fired and the states before it, and the states
    after it."""
    states: dict[str, Incident | None] = {}
    facts: dict[str, Fact] = {}
    firing: set[str] = set()

    def changed(inc: Incident) -> None:
        states[inc.key] = inc
        facts.update((f.fingerprint, f) for f in facts_of(inc, True, ()))

    for t, (kind, node, pod, fires) in enumerate(steps):
        status = "firing" if fires else "resolved"
        if kind == "node":
            a = anomaly("node-not-ready", labels=node_labels(f"n{node}"), status=status, t=t)
        else:
            # Pods of two severities, so a severity left stale by a change shows.
            severity = "warning" if pod % 2 else "critical"
            labels = pod_labels(f"p{pod}", f"n{node}")
            a = anomaly("crash", labels=labels, severity=severity, status=status, t=t)
        was, before = set(firing), dict(states)
        (firing.add if fires else firing.discard)(a.fingerprint)
        queue: list[tuple[Anomaly, tuple[str, str | None] | None]] = [(a, None)]
        while queue:
            item, routed = queue.pop(0)
            index = build_index(facts.values(), at(t), RULES.resolve_timeout)
            for key, marks in placements(item, routed, index, RULES):
                new, _ = correlate(states.get(key), item, at(t), RULES, key=key, marks=marks)
                if new is not None:
                    changed(new)
            if queue:
                continue
            index = build_index(facts.values(), at(t), RULES.resolve_timeout)  # the tick
            for inc in list(states.values()):
                found = moves(inc, index) if inc is not None else {}
                if inc is None or not found:
                    continue
                moved = {fp: (how, f.incident_id) for fp, (how, f) in found.items()}
                changed(hand_over(inc, moved, at(t))[0])
                for m in inc.members:
                    if m.fingerprint in found:
                        how, f = found[m.fingerprint]
                        queue.append((as_anomaly(m), (f.incident_key, how)))
        if seen is not None:
            seen(a, was, before, dict(states))
    return states, firing


step = st.tuples(
    st.sampled_from(["node", "pod", "pod", "pod"]),
    st.integers(0, 2),
    st.integers(0, 3),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=25))
def test_every_firing_anomaly_is_firing_in_exactly_one_open_incident(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    # A pod is always on the same node, as in a cluster (pod p<k> on node k % 3).
    steps = [(kind, pod % 3 if kind == "pod" else node, pod, f) for kind, node, pod, f in steps]
    states, firing = simulate(steps)
    where: Mapping[str, list[str]] = {fp: [] for fp in firing}
    for inc in states.values():
        if inc is None or inc.status == "resolved":
            continue
        for m in inc.members:
            if m.status == "firing":
                assert m.fingerprint in where, f"{m.fingerprint} fires but was resolved"
                where[m.fingerprint].append(inc.key)
    assert all(len(keys) == 1 for keys in where.values()), where


def firing_in(states: Mapping[str, Incident | None], fp: str) -> list[tuple[str, str, str | None]]:
    """(incident key, id, absorbed_by) of each open incident where ``fp`` fires."""
    return [
        (inc.key, inc.id, m.absorbed_by)
        for inc in states.values()
        if inc is not None and inc.status != "resolved"
        for m in inc.members
        if m.fingerprint == fp and m.status == "firing"
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=25))
def test_only_a_firing_node_takes_in_new_pods_and_absorbed_pods_never_flip(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    steps = [(kind, pod % 3 if kind == "pod" else node, pod, f) for kind, node, pod, f in steps]

    def seen(
        a: Anomaly,
        was: set[str],
        before: dict[str, Incident | None],
        after: dict[str, Incident | None],
    ) -> None:
        if "pod" not in a.labels or a.status != "firing":
            return
        node = anomaly("node-not-ready", labels=node_labels(a.labels["node"]), t=0)
        if a.fingerprint not in was and node.fingerprint not in was:
            # A pod failing anew on a node that is not down is not the node's doing.
            assert all(how is None for _, _, how in firing_in(after, a.fingerprint))
        for key, id_, how in firing_in(before, a.fingerprint):
            if how is not None:  # absorbed and still firing: it keeps its home
                assert [(k, i) for k, i, _ in firing_in(after, a.fingerprint)] == [(key, id_)]

    simulate(steps, seen)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=25))
# p1 (warning) and p0 (critical) fail, p0 recovers, p1's node fails and takes p1 in.
@example([("pod", 1, 1, True), ("pod", 0, 0, True), ("pod", 0, 0, False), ("node", 1, 0, True)])
def test_every_incident_has_the_severity_of_its_members_across_hand_overs(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    # Severity is the maximum of the firing members, of all members once resolved, however
    # the incident got there: an incident emptied by a hand-over kept the severity of
    # the members it last had firing.
    steps = [(kind, pod % 3 if kind == "pod" else node, pod, f) for kind, node, pod, f in steps]
    states, _ = simulate(steps)
    for inc in states.values():
        if inc is not None:
            pool = inc.firing or inc.members
            expected = max((m.severity for m in pool), key=lambda s: SEVERITY_RANK[s])
            assert inc.severity == expected, inc


SPENDABLE = (
    NODE_DOWN,
    anomaly("node-not-ready", labels=node_labels("n2"), source="kubernetes"),
    anomaly(
        "replicas-unavailable", labels={"cluster": "c1", "namespace": "shop", "workload": "cart"}
    ),
    anomaly("errors", severity="critical"),  # CRITICAL_INHIBITS_WARNING's source
    _unavailable(0),
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(SPENDABLE),
            st.sampled_from(["firing", "resolved"]),
            st.booleans(),
            st.integers(0, 3000),
            st.integers(0, 3000),
        ),
        max_size=8,
        unique_by=lambda f: f[0].fingerprint,
    ),
    st.integers(0, 4000),
)
def test_forgetting_spent_facts_changes_no_index(
    facts: list[tuple[Anomaly, str, bool, int, int]], now: int
) -> None:
    # A view forgets the facts spent at ``now`` (streams.correlator.fact_index): the index
    # it builds from the rest must be the one it built from all of them.
    rules = (CRITICAL_INHIBITS_WARNING,)
    view = [
        replace(
            fact(a, status, t=observed, open_=open_),
            first_seen=at(observed - 50),
            last_seen=at(last),
            holds=(POD_CRASH.fingerprint,) if status == "resolved" else (),
        )
        for a, status, open_, observed, last in facts
    ]
    kept = [f for f in view if not spent(f, at(now), RULES.resolve_timeout)]
    assert build_index(kept, at(now), RULES.resolve_timeout, rules) == build_index(
        view, at(now), RULES.resolve_timeout, rules
    )
