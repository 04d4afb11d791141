"""The pure PromQL detector step: pending -> firing -> resolved per series."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import encode
from agent.detector import PatternState, evaluate, instance_labels
from agent.models import Anomaly, fingerprint
from agent.prom import Sample
from agent.settings import PatternSpec
from streams.partitioning import decode_anomalies
from tests.unit.factories import at
from tests.unit.factories import settings as make_settings

CLUSTER = "c1"
CHECKOUT = {"__name__": "x", "namespace": "shop", "service": "checkout"}
CART = {"namespace": "shop", "service": "cart"}


@functools.cache
def pattern(for_: str = "0s", severity: str = "critical") -> PatternSpec:
    doc = {
        "patterns": [
            {
                "name": "high-error-rate",
                "condition": "  errors > 0.01\n",
                "for": for_,
                "severity": severity,
                "description": "too many 5xx",
            }
        ]
    }
    return make_settings(doc).patterns[0]


def run(
    p: PatternSpec, rounds: Sequence[tuple[float, Sequence[Mapping[str, str]]]]
) -> tuple[PatternState, list[list[Anomaly]]]:
    """Evaluate once per (time, series labels) round, threading the state through."""
    state = PatternState()
    out = []
    for t, series in rounds:
        samples = [Sample(labels=dict(labels), value=0.5) for labels in series]
        state, anomalies = evaluate(p, samples, state, at(t), CLUSTER)
        out.append(anomalies)
    return state, out


def test_without_for_a_series_fires_at_once() -> None:
    _, [[a]] = run(pattern(), [(0, [CHECKOUT])])
    assert a.status == "firing"
    assert a.source == "prometheus"
    assert a.name == "high-error-rate"
    assert a.severity == "critical"
    assert a.value == 0.5
    assert a.starts_at == a.observed_at == at(0)
    assert a.labels == {"namespace": "shop", "service": "checkout", "cluster": CLUSTER}
    assert a.annotations == {"condition": "errors > 0.01", "description": "too many 5xx"}


def test_for_keeps_a_series_pending_until_it_has_held() -> None:
    state, rounds = run(pattern("30s"), [(0, [CHECKOUT]), (15, [CHECKOUT]), (29, [CHECKOUT])])
    assert rounds == [[], [], []]
    (inst,) = state.instances.values()
    assert not inst.firing
    assert inst.since == at(0)
    state, fired = evaluate(pattern("30s"), [Sample(CHECKOUT, 0.7)], state, at(30), CLUSTER)
    (a,) = fired
    assert a.status == "firing"
    assert a.starts_at == at(30)
    assert a.value == 0.7


def test_pending_is_reset_when_the_series_disappears() -> None:
    _, rounds = run(pattern("30s"), [(0, [CHECKOUT]), (20, []), (40, [CHECKOUT]), (60, [CHECKOUT])])
    assert rounds == [[], [], [], []]
    _, rounds = run(pattern("30s"), [(0, [CHECKOUT]), (20, []), (40, [CHECKOUT]), (70, [CHECKOUT])])
    assert [len(r) for r in rounds] == [0, 0, 0, 1]


def test_firing_series_are_republished_every_evaluation_with_a_stable_fingerprint() -> None:
    _, rounds = run(pattern(), [(0, [CHECKOUT]), (15, [CHECKOUT]), (30, [CHECKOUT])])
    fps = {r[0].fingerprint for r in rounds}
    assert len(fps) == 1
    assert [r[0].observed_at for r in rounds] == [at(0), at(15), at(30)]
    assert {r[0].starts_at for r in rounds} == {at(0)}
    labels = {"namespace": "shop", "service": "checkout", "cluster": CLUSTER}
    assert fps == {fingerprint("prometheus", "high-error-rate", labels)}


def test_a_disappeared_series_is_resolved_exactly_once() -> None:
    state, rounds = run(
        pattern(), [(0, [CHECKOUT, CART]), (15, [CART]), (30, [CART]), (45, [CART])]
    )
    assert [[a.status for a in r] for r in rounds] == [
        ["firing", "firing"],
        ["firing", "resolved"],
        ["firing"],
        ["firing"],
    ]
    resolved = rounds[1][1]
    assert resolved.fingerprint == rounds[0][0].fingerprint
    assert resolved.labels["service"] == "checkout"
    assert resolved.value is None
    assert resolved.starts_at == at(0)
    assert resolved.observed_at == at(15)
    assert len(state.instances) == 1


def test_a_pending_series_that_disappears_is_not_resolved() -> None:
    _, rounds = run(pattern("1m"), [(0, [CHECKOUT]), (15, [])])
    assert rounds == [[], []]


def test_a_series_that_returns_fires_again_with_a_new_start() -> None:
    _, rounds = run(pattern(), [(0, [CHECKOUT]), (15, []), (30, [CHECKOUT])])
    assert [[a.status for a in r] for r in rounds] == [["firing"], ["resolved"], ["firing"]]
    assert rounds[2][0].starts_at == at(30)
    assert rounds[2][0].fingerprint == rounds[0][0].fingerprint


def test_series_differing_only_in_metric_name_are_one_instance() -> None:
    other = {**CHECKOUT, "__name__": "y"}
    _, [anomalies] = run(pattern(), [(0, [CHECKOUT, other])])
    assert len(anomalies) == 1


def test_instance_labels_fill_cluster_service_and_namespace() -> None:
    assert instance_labels(Sample({"__name__": "m", "app": "cart"}, 1.0), "c9") == {
        "app": "cart",
        "service": "cart",
        "cluster": "c9",
        "namespace": "default",
    }


def test_instance_labels_keep_what_the_series_says() -> None:
    labels = {"cluster": "east", "service": "api", "namespace": "prod", "job": "other"}
    assert instance_labels(Sample(labels, 1.0), "c9") == labels


def test_instance_labels_service_falls_back_in_order() -> None:
    def service(labels: dict[str, str]) -> str:
        return instance_labels(Sample(labels, 1.0), "c")["service"]

    assert service({"app": "a", "app_kubernetes_io_name": "b", "job": "c"}) == "a"
    assert service({"app": "", "app_kubernetes_io_name": "b", "job": "c"}) == "b"
    assert service({"job": "c"}) == "c"
    assert service({"pod": "p"}) == ""


@settings(max_examples=100, deadline=None)
@given(
    hold=st.integers(min_value=0, max_value=120),
    gaps=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=10),
)
def test_fires_first_at_the_first_evaluation_after_holding(hold: int, gaps: list[int]) -> None:
    times = [0]
    for g in gaps:
        times.append(times[-1] + g)
    _, rounds = run(replace(pattern(), for_=float(hold)), [(t, [CHECKOUT]) for t in times])
    firing = [t for t, r in zip(times, rounds, strict=True) if r]
    assert firing == [t for t in times if t >= hold]
    assert all(a.starts_at == at(firing[0]) for r in rounds for a in r)


def test_infinite_value_is_kept_as_text_not_lost() -> None:
    # histogram_quantile() in the +Inf bucket: JSON has no Infinity, so the detector keeps
    # the value readable in annotations and leaves the numeric value empty.
    _, out = evaluate(pattern(), [Sample(CHECKOUT, float("inf"))], PatternState(), at(0), CLUSTER)
    assert len(out) == 1
    assert out[0].value is None
    assert out[0].annotations["value"] == "inf"


def test_a_label_longer_than_an_anomaly_allows_is_cut_to_fit_not_refused() -> None:
    # Prometheus bounds no label value: a series carrying a whole SQL query published an
    # anomaly every slot that the correlator dead-lettered, and no incident ever opened.
    long_a = {**CART, "query": "SELECT " + "x," * 3000 + "a"}
    long_b = {**long_a, "query": long_a["query"][:-1] + "b"}  # differs past the cut only
    samples = [Sample(long_a, 3.5), Sample(long_b, 3.5), Sample({**CART, "l" * 300: "v"}, 1.0)]
    _, out = evaluate(pattern(), samples, PatternState(), at(0), CLUSTER)
    assert len(out) == 3 and len({a.fingerprint for a in out}) == 3
    for a in out:
        assert decode_anomalies(encode(a)) == ([a], [])  # the correlator folds it
        assert a.labels["service"] == "cart"
    query = out[0].labels["query"]
    assert len(query) == 4096 and query.startswith("SELECT x,x,")
    assert "...[cut from 6008 chars, " in query
    assert [len(k) for k in out[2].labels if k.startswith("l")] == [256]
