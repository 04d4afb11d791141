"""The Alertmanager API boundary: a malformed reply names what is wrong; the filter
quotes untrusted alert names; a receiver's name is matched as itself."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from agent.alertmanager_api import matcher, parse_alerts, parse_notified, re2_literal
from agent.alerts import still_firing
from agent.errors import DependencyUnavailable


def test_a_reply_is_read_for_its_labels() -> None:
    raw = b'[{"labels": {"alertname": "A", "service": "s"}, "status": {"state": "active"}}]'
    assert [a.labels for a in parse_alerts(raw)] == [{"alertname": "A", "service": "s"}]
    assert parse_alerts(b"[]") == []


@pytest.mark.parametrize(
    ("parse", "raw", "named"),
    [
        (parse_alerts, b"<html>", "not valid JSON"),
        (parse_alerts, b'{"alerts": []}', "expected a list of alerts, got dict"),
        (parse_alerts, b'[{"labels": {"alertname": "A"}}, {"status": {}}]', "[1].labels"),
        (parse_alerts, b'[{"labels": {"alertname": ["A"]}}]', "[0].labels.alertname"),
        (parse_notified, b"<html>", "not valid JSON"),
        (parse_notified, b'{"alerts": []}', "expected a list of alerts, got dict"),
    ],
)
def test_a_malformed_reply_names_the_field(
    parse: Callable[[bytes], object], raw: bytes, named: str
) -> None:
    with pytest.raises(DependencyUnavailable) as err:
        parse(raw)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (b"3", "[1]"),
        (b'{"labels": {"service": "s"}, "startsAt": "2026-12-07T10:00:00Z"}', "[1].labels"),
        (b'{"labels": {"alertname": "A"}}', "[1].startsAt"),
    ],
)
def test_an_invalid_alert_of_a_reply_is_left_out_by_name_and_the_others_kept(
    bad: bytes, named: str
) -> None:
    # Alertmanager takes alerts without alertname: failing the whole reply for one, the
    # receiver's other alerts were never announced again and it counted as unavailable.
    good = b'{"labels": {"alertname": "A"}, "startsAt": "2026-12-07T10:00:00Z"}'
    reply = parse_notified(b"[" + good + b"," + bad + b"," + good + b"]")
    assert [a.labels["alertname"] for a in reply.alerts] == ["A", "A"]
    assert len(reply.refused) == 1 and reply.refused[0].startswith(named)


def test_the_filter_quotes_what_would_end_or_escape_the_value() -> None:
    assert matcher("alertname", "A") == 'alertname="A"'
    assert matcher("alertname", 'a"b\\c\nd') == 'alertname="a\\"b\\\\c\\nd"'


GETTABLE = b"""[{
  "labels": {"alertname": "HighErrorRate", "namespace": "shop", "service": "cart"},
  "annotations": {"summary": "5xx above 5%"},
  "startsAt": "2026-12-07T10:00:00Z",
  "endsAt": "2026-12-07T10:04:00Z",
  "generatorURL": "http://prometheus/graph",
  "fingerprint": "c5b1c3d9a5e1e3f0",
  "receivers": [{"name": "agent-webhook"}],
  "status": {"state": "active", "silencedBy": [], "inhibitedBy": []},
  "updatedAt": "2026-12-07T10:00:30Z"
}]"""


def test_a_gettable_alert_reads_as_the_alert_a_webhook_would_carry() -> None:
    reply = parse_notified(GETTABLE)
    [alert] = reply.alerts
    assert reply.refused == ()
    assert alert.labels["alertname"] == "HighErrorRate" and alert.status is None
    assert alert.annotations == {"summary": "5xx above 5%"}
    # Its state is what endsAt says: firing until then, resolved after.
    firing = still_firing([alert], cluster="c1", now=alert.startsAt)
    [a] = firing
    assert (a.source, a.status, a.labels["cluster"]) == ("alertmanager", "firing", "c1")
    assert a.starts_at == alert.startsAt and a.observed_at == alert.startsAt
    assert alert.endsAt is not None
    assert still_firing([alert], cluster="c1", now=alert.endsAt) == []


@pytest.mark.parametrize(
    "name", ["agent-webhook", "sre agent", "a.b", "x|y", "(team)[1]{2}^$*+?\\"]
)
def test_a_receiver_name_matches_itself_only(name: str) -> None:
    pattern = re2_literal(name)
    assert re.fullmatch(pattern, name)
    assert not re.fullmatch(pattern, name + "x") and not re.fullmatch(pattern, "x" + name)
    assert " " not in name or "\\ " not in pattern  # RE2 refuses an escaped space
