"""A blindness covers what the blind detector observed, whichever cluster its series name.

A detector labels its own anomalies (prometheus-unavailable, pattern-query-failed) with its
agent.cluster; behind Thanos, Mimir or federation its series name other clusters. Its
blindness held only those of its own cluster: the others, unseen, resolved as quiet.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from agent.detector import SOURCE, PatternState, evaluate, instance_labels
from agent.models import fingerprint
from agent.prom import Sample
from agent.settings import parse_settings
from streams.correlation import Blindness, CorrelationRules, correlate_batch, expire
from tests.unit.factories import at

PATTERN = parse_settings({"patterns": [{"name": "p", "condition": "errors > 1"}]}, env={}).patterns[
    0
]
RULES = CorrelationRules(resolve_timeout=300)
clusters = st.text("abcxyz-", min_size=1, max_size=4)


@given(
    agent=clusters,
    other=clusters,
    series=st.none() | clusters,
    own=st.none() | clusters,  # the series' own label of the observer's name, if any
    whole=st.booleans(),
)
def test_a_blindness_holds_what_its_detector_observed_and_nothing_else(
    agent: str, other: str, series: str | None, own: str | None, whole: bool
) -> None:
    labels = {"service": "cart", "namespace": "shop"}
    if series is not None:
        labels["cluster"] = series
    if own is not None:
        labels["agent_cluster"] = own
    sample = Sample(labels, 5.0)
    _, [anomaly] = evaluate(PATTERN, [sample], PatternState(), at(0), agent)
    # Who saw it is not which one it is: the fingerprint is the series' alone.
    assert anomaly.fingerprint == fingerprint(SOURCE, "p", instance_labels(sample, agent))
    assert anomaly.labels["cluster"] == (series or agent)
    states, _ = correlate_batch({}, [anomaly], at(0), RULES)
    [incident] = [i for i in states.values() if i is not None]
    now = at(1000)  # quiet for 1000 s, blind since t=60

    def status(blind_cluster: str) -> str:
        where = ("prometheus", blind_cluster) if whole else ("prometheus", blind_cluster, "p")
        blind = {where: Blindness(since=at(60))}
        return expire(incident, now, RULES, blind)[0].status

    assert status(agent) == "open"
    if other != agent:
        assert status(other) == "resolved"
    assert expire(incident, now + timedelta(seconds=1), RULES)[0].status == "resolved"
