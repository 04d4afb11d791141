"""Silences: matchers, activity windows, and silenced anomalies recorded, not acted on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.errors import ConfigError
from agent.models import Anomaly, Matcher, Silence
from agent.silence_cli import describe, ended, new_silence, parse_matcher
from streams.correlation import CorrelationRules, correlate, correlate_batch, silenced_by
from streams.silences import apply
from streams.topology import match_labels
from tests.unit.factories import anomaly, at

RULES = CorrelationRules()
SHOP = {"cluster": "c1", "namespace": "shop", "service": "checkout"}


def silence(*matchers: Matcher, start: float = 0, end: float = 3600, sid: str = "s1") -> Silence:
    return Silence(
        id=sid,
        matchers=matchers,
        starts_at=at(start),
        ends_at=at(end),
        created_by="alice",
        comment="maintenance",
        created_at=at(start),
    )


@pytest.mark.parametrize(
    ("text", "labels", "hit"),
    [
        ("service=checkout", SHOP, True),
        ("service=cart", SHOP, False),
        ("service!=cart", SHOP, True),
        ("namespace=~sh.p", SHOP, True),
        ("namespace=~sh", SHOP, False),  # anchored, like Alertmanager
        ("namespace!~sh.*", SHOP, False),
        ("missing=", SHOP, True),  # an absent label matches the empty string
    ],
)
def test_matchers(text: str, labels: dict[str, str], hit: bool) -> None:
    assert parse_matcher(text).matches(labels) is hit


@pytest.mark.parametrize("text", ["service", "=x", "namespace=~(", "1abc=x"])
def test_bad_matchers_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ConfigError, match="matcher"):
        parse_matcher(text)


def test_a_silence_applies_only_inside_its_window_and_to_all_matchers() -> None:
    s = silence(Matcher("service", "checkout"), Matcher("namespace", "shop"), start=10, end=20)
    assert silenced_by(anomaly(labels=SHOP, t=15), [s]) == "s1"
    assert silenced_by(anomaly(labels=SHOP, t=5), [s]) is None
    assert silenced_by(anomaly(labels=SHOP, t=20), [s]) is None
    other = {**SHOP, "namespace": "prod"}
    assert silenced_by(anomaly(labels=other, t=15), [s]) is None


def test_a_silence_on_alertname_silences_the_agents_own_patterns() -> None:
    # `silence add -m alertname=high-error-rate`: the pattern's name is the anomaly's
    # name, not one of its labels, as for every pattern and Kubernetes signal.
    s = silence(parse_matcher("alertname=high-error-rate"))
    a = anomaly("high-error-rate", labels=SHOP, t=1)
    assert "alertname" not in a.labels
    _states, (inc,) = correlate_batch({}, [a], at(1), RULES, [s])
    assert inc.status == "silenced" and inc.members[0].silenced_by == "s1"
    oom = anomaly("k8s-oomkilling", labels=SHOP, source="kubernetes", severity="warning", t=1)
    assert silenced_by(oom, [silence(parse_matcher("alertname=~k8s-.*"))]) == "s1"
    assert silenced_by(oom, [silence(parse_matcher("source=kubernetes"))]) == "s1"
    assert silenced_by(oom, [silence(parse_matcher("severity=critical"))]) is None
    # An Alertmanager alert's own alertname label wins, as for inhibition.
    relabelled = anomaly("high-error-rate", labels={**SHOP, "alertname": "HighErrors"}, t=1)
    assert silenced_by(relabelled, [s]) is None


_SEVERITY_NAMES = ("info", "warning", "critical")
_ANOMALY = st.builds(
    lambda name, severity, source, svc, t: anomaly(
        name, severity=severity, source=source, labels={**SHOP, "service": svc}, t=t
    ),
    st.sampled_from(["high-error-rate", "k8s-oomkilling", "node-not-ready"]),
    st.sampled_from(_SEVERITY_NAMES),
    st.sampled_from(["prometheus", "kubernetes", "alertmanager"]),
    st.sampled_from(["checkout", "cart"]),
    st.integers(0, 100),
)
_MATCHER = st.builds(
    Matcher,
    st.sampled_from(["alertname", "severity", "source", "service"]),
    st.sampled_from(
        ["high-error-rate", "k8s-oomkilling", "warning", "critical", "kubernetes", "checkout"]
    ),
    st.sampled_from(["=", "!="]),
)


@settings(max_examples=300, deadline=None)
@given(_ANOMALY, st.lists(_MATCHER, min_size=1, max_size=3))
def test_silences_match_the_labels_inhibition_matches(a: Anomaly, matchers: list[Matcher]) -> None:
    s = silence(*matchers, end=1000)
    expected = all(m.matches(match_labels(a)) for m in matchers)
    assert (silenced_by(a, [s]) == "s1") is expected


def test_silenced_anomalies_are_recorded_in_a_silenced_incident() -> None:
    s = silence(Matcher("service", "checkout"))
    _states, events = correlate_batch({}, [anomaly(labels=SHOP, t=1)], at(1), RULES, [s])
    (inc,) = events
    assert inc.status == "silenced"
    assert inc.members[0].silenced_by == "s1"
    assert inc.firing == ()  # nothing for the analyzer or the executor
    # A second, unsilenced anomaly in the group makes it a live incident again.
    loud = anomaly("high-latency", labels=SHOP, t=2)
    _new, event = correlate(inc, loud, at(2), RULES)
    assert event is not None and event.status == "updated"
    assert [m.name for m in event.firing] == ["high-latency"]


def test_expiry_of_a_silence_turns_a_repeat_into_an_update() -> None:
    s = silence(Matcher("service", "checkout"), end=10)
    _, (inc,) = correlate_batch({}, [anomaly(labels=SHOP, t=1)], at(1), RULES, [s])
    _states, events = correlate_batch(
        {inc.key: inc}, [anomaly(labels=SHOP, t=11)], at(11), RULES, [s]
    )
    assert [e.status for e in events] == ["updated"]
    assert events[0].members[0].silenced_by is None


def test_store_applies_records_and_tombstones() -> None:
    from agent.codec import encode

    store: dict[str, Silence] = {}
    s = silence(Matcher("service", "checkout"))
    apply(store, "s1", encode(s))
    apply(store, "junk", b"not json")  # ignored, with a warning
    assert store == {"s1": s}
    apply(store, "s1", None)
    assert store == {}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["checkout", "cart"]),
            st.integers(0, 50),
            st.sampled_from(["firing", "resolved"]),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_silenced_members_never_reach_analysis(steps: list[tuple[str, int, str]]) -> None:
    s = silence(Matcher("service", "checkout"), end=timedelta(days=1).total_seconds())
    items = [
        anomaly(f"p{t % 3}", labels={**SHOP, "service": svc}, t=t, status=status)  # type: ignore[arg-type]
        for svc, t, status in sorted(steps, key=lambda x: x[1])
    ]
    states, events = correlate_batch({}, items, at(60), RULES, [s])
    for inc in [*events, *(v for v in states.values() if v is not None)]:
        assert all(m.labels["service"] != "checkout" for m in inc.firing)
        if inc.labels["service"] == "checkout":
            assert inc.status in ("silenced", "resolved")


def _add(tmp_path: Path, *argv: str) -> int:
    # No broker listens there: a refused silence must be refused before Kafka is tried.
    config = tmp_path / "agent.yaml"
    config.write_text("kafka:\n  bootstrap_servers: 127.0.0.1:1\n")
    return main(["silence", "add", *argv, "--config", str(config)])


@pytest.mark.parametrize(
    "matchers",
    [["env!=prod"], ["namespace=~.*"], ["env!=prod", "team!~ops|sre", "zone=~"]],
)
def test_a_silence_every_matcher_of_which_matches_the_empty_string_is_refused(
    tmp_path: Path, matchers: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a for m in matchers for a in ("-m", m)]
    assert _add(tmp_path, *argv, "--author", "bob", "--comment", "maint") == 1
    out, err = capsys.readouterr()
    assert err.startswith("--matcher: ") and "must not match the empty string" in err
    assert out == ""


def test_a_silence_a_reader_would_drop_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _add(tmp_path, "-m", "service=checkout", "--author", "", "--comment", "x") == 1
    out, err = capsys.readouterr()
    assert err.startswith("--author (created_by: ")
    assert out == ""  # no id printed


def test_one_matcher_that_needs_a_value_makes_a_silence() -> None:
    matchers = (parse_matcher("env!=prod"), parse_matcher("service=checkout"))
    made = new_silence("s1", matchers, at(0), 7200, "bob", "maint", at(0))
    assert made.matches({**SHOP, "env": "staging"}, at(60))
    assert not made.matches({**SHOP, "service": "cart"}, at(60))
    assert made.ends_at == at(7200)


@settings(max_examples=200)
@given(st.integers(-5000, 5000), st.integers(1, 5000), st.integers(-100, 100))
def test_an_expired_silence_silences_nothing_from_now_on_and_is_listed_expired(
    start: int, length: int, probe: int
) -> None:
    # Expiring a pending silence (one starting later) ended it a millisecond after its
    # start: it still silenced then, and `silence list` showed it pending until it did.
    s = silence(Matcher("service", "checkout"), start=start, end=start + length)
    now = at(0)
    if s.ends_at <= now:
        return  # already expired: the CLI says so and writes nothing
    out = ended(s, now)
    assert (out.id, out.matchers, out.created_by, out.comment) == (
        s.id,
        s.matchers,
        s.created_by,
        s.comment,
    )
    assert out.ends_at == now
    assert not out.active(at(probe)) or (s.active(at(probe)) and at(probe) < now)
    assert " expired " in describe(out, now)
