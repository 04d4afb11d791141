"""The Alertmanager API boundary: a malformed reply names what is wrong; the filter
quotes untrusted alert names."""

from __future__ import annotations

import pytest

from agent.alertmanager_api import matcher, parse_alerts
from agent.errors import DependencyUnavailable


def test_a_reply_is_read_for_its_labels() -> None:
    raw = b'[{"labels": {"alertname": "A", "service": "s"}, "status": {"state": "active"}}]'
    assert [a.labels for a in parse_alerts(raw)] == [{"alertname": "A", "service": "s"}]
    assert parse_alerts(b"[]") == []


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"<html>", "not valid JSON"),
        (b'{"alerts": []}', "expected a list of alerts, got dict"),
        (b'[{"labels": {"alertname": "A"}}, {"status": {}}]', "[1].labels"),
        (b'[{"labels": {"alertname": ["A"]}}]', "[0].labels.alertname"),
    ],
)
def test_a_malformed_reply_names_the_field(raw: bytes, named: str) -> None:
    with pytest.raises(DependencyUnavailable) as err:
        parse_alerts(raw)
    assert named in str(err.value)


def test_the_filter_quotes_what_would_end_or_escape_the_value() -> None:
    assert matcher("alertname", "A") == 'alertname="A"'
    assert matcher("alertname", 'a"b\\c\nd') == 'alertname="a\\"b\\\\c\\nd"'
