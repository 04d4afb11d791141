"""A webhook-only receiver hears Alertmanager's heartbeat (the always-firing ``Watchdog``).

Without the API, an Alertmanager that is down, or a broken way from it to the webhook,
looked exactly like one with nothing to say: the incidents of alerts still firing resolved
as quiet after resolve_timeout. A heartbeat not received within its bound now raises
``alertmanager-unavailable``, which the correlator holds those incidents open for; the
heartbeat itself never becomes an anomaly. Over real HTTP to the receiver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.models import Anomaly, Heartbeat
from agent.server import HealthServer
from agent.settings import parse_settings
from agent.webhook import HEARTBEAT_SKEW, AlertmanagerReceiver, heartbeat_blind, heartbeat_missing
from streams.correlation import CorrelationRules, correlate_batch, expire
from streams.topology import build_index, facts_of
from tests.unit.factories import at

TOKEN = "t0ken"
UNAVAILABLE = "alertmanager-unavailable"


@given(
    last=st.integers(0, 10_000),
    elapsed=st.integers(0, 10_000),
    within=st.floats(0.001, 5_000, allow_nan=False),
)
def test_blind_since_the_last_heartbeat_once_it_is_later_than_its_bound(
    last: int, elapsed: int, within: float
) -> None:
    since = heartbeat_missing(at(last), at(last + elapsed), within)
    assert since == (at(last) if elapsed > within else None)


@given(
    started=st.integers(0, 1_000),
    seen=st.lists(st.integers(-100, 3_000), max_size=5),
    now=st.integers(0, 2_000),
    within=st.floats(0.001, 500, allow_nan=False),
)
def test_blind_across_replicas_iff_none_heard_it_within_its_bound(
    started: int, seen: list[int], now: int, within: float
) -> None:
    """Each replica's heartbeats are seen by all: blind iff no replica received one within
    ``within`` (and this one has waited that long since its start); blind since the
    latest. One dated further ahead than the skew allowed is no heartbeat."""
    since = heartbeat_blind(at(started), [at(t) for t in seen], at(now), within)
    heard = [t for t in seen if t <= now + HEARTBEAT_SKEW]
    latest = max([started, *heard])
    assert (since is not None) == (now - latest > within)
    assert since is None or since == at(latest)


@pytest.mark.parametrize(
    ("heartbeat", "correlation", "field"),
    [
        ({"within": "soon"}, {}, "detectors.alertmanager.heartbeat.within"),
        ({"within": "0s"}, {}, "detectors.alertmanager.heartbeat.within"),
        ({"alertname": ""}, {}, "detectors.alertmanager.heartbeat.alertname"),
        ({"every": "1m"}, {}, "detectors.alertmanager.heartbeat.every"),
        ({"within": "5m"}, {"resolve_timeout": "5m"}, "detectors.alertmanager.heartbeat.within"),
    ],
)
def test_a_bad_heartbeat_setting_names_its_field(
    heartbeat: dict[str, str], correlation: dict[str, str], field: str
) -> None:
    doc = {"correlation": correlation, "detectors": {"alertmanager": {"heartbeat": heartbeat}}}
    with pytest.raises(ConfigError) as err:
        parse_settings(doc, env={})
    assert any(p.startswith(f"{field}:") for p in err.value.problems), err.value.problems


def test_the_heartbeat_is_off_unless_set_and_watchdog_by_default() -> None:
    assert parse_settings({}, env={}).detectors.alertmanager.heartbeat is None
    doc = {"detectors": {"alertmanager": {"heartbeat": {}}}}
    beat = parse_settings(doc, env={}).detectors.alertmanager.heartbeat
    assert beat is not None and (beat.alertname, beat.within) == ("Watchdog", 180.0)


class Recorder:
    def __init__(self) -> None:
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        self.items.extend(a for _, a, _ in items)


class Clock:
    def __init__(self) -> None:
        self.now = at(0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Recorder, Clock, AlertmanagerReceiver]]:
    settings = parse_settings(
        {
            "agent": {"cluster": "c1"},
            "correlation": {"resolve_timeout": "300s"},
            "detectors": {
                "alertmanager": {"enabled": True, "heartbeat": {"within": "120s"}},
            },
        },
        env={},
    )
    rec, clock, metrics = Recorder(), Clock(), Metrics()
    server = HealthServer(host="127.0.0.1", port=0, metrics=metrics)
    am = AlertmanagerReceiver(
        settings, token=TOKEN, publish=rec, topic="t", metrics=metrics, clock=clock
    )
    am.install(server.app)
    await server.start()
    await am.start()
    try:
        yield f"http://127.0.0.1:{server.bound_port}/webhooks/alertmanager", rec, clock, am
    finally:
        await am.stop()
        await server.stop()


def notification(*names: str) -> bytes:
    alerts = [
        {
            "status": "firing",
            "labels": {"alertname": n, "service": "cart", "severity": "critical"},
            "annotations": {},
            "startsAt": "2024-05-01T12:00:00Z",
        }
        for n in names
    ]
    return orjson.dumps({"version": "4", "status": "firing", "receiver": "agent", "alerts": alerts})


async def post(url: str, body: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, await r.json()


async def test_a_missing_heartbeat_holds_the_alerts_incidents_open_and_opens_none_itself(
    served: tuple[str, Recorder, Clock, AlertmanagerReceiver],
) -> None:
    url, rec, clock, am = served
    assert await post(url, notification("Watchdog", "QueueStuck")) == (200, {"accepted": 1})
    assert [a.name for a in rec.items] == ["QueueStuck"]  # the heartbeat is no anomaly
    for t in range(30, 121, 30):  # heard at t=0: not late yet
        clock.now = at(t)
        await am.check_heartbeat()
    assert [a.name for a in rec.items] == ["QueueStuck"]
    for t in range(150, 1000, 30):  # Alertmanager went down after t=0
        clock.now = at(t)
        await am.check_heartbeat()
    blind = [a for a in rec.items if a.name == UNAVAILABLE]
    assert blind and all(a.status == "firing" for a in blind)  # repeated: its liveness
    assert blind[0].starts_at == at(0) and blind[0].labels["cluster"] == "c1"
    assert blind[0].labels["heartbeat"] == "Watchdog"
    rules = CorrelationRules(resolve_timeout=300)
    # Quiet since t=0, so without the heartbeat it resolved at t=300.
    assert _alert_incident(rec.items, at(990), rules) == "open"
    clock.now = at(1000)
    assert await post(url, notification("Watchdog")) == (200, {"accepted": 0})
    assert rec.items[-1].name == UNAVAILABLE and rec.items[-1].status == "resolved"
    assert rec.items[-1].starts_at == at(0)
    clock.now = at(1100)
    await am.check_heartbeat()  # heard at t=1000: nothing to tell
    assert rec.items[-1].observed_at == at(1000)
    # The alert not announced again since it came back: it resolves as quiet, counted
    # from when Alertmanager was heard again.
    assert _alert_incident(rec.items, at(1299), rules) == "open"
    assert _alert_incident(rec.items, at(1301), rules) == "resolved"
    assert not [a for a in rec.items if a.name == "Watchdog"]


async def test_a_resolved_heartbeat_is_no_heartbeat(
    served: tuple[str, Recorder, Clock, AlertmanagerReceiver],
) -> None:
    """Alertmanager resolves the Watchdog when Prometheus stops sending it: that says
    nothing is watching, not that all is well."""
    url, rec, clock, am = served
    clock.now = at(100)
    body = orjson.loads(notification("Watchdog"))
    body["alerts"][0]["status"] = "resolved"
    assert await post(url, orjson.dumps(body)) == (200, {"accepted": 0})
    clock.now = at(130)
    await am.check_heartbeat()
    [blind] = rec.items
    assert (blind.name, blind.status, blind.starts_at) == (UNAVAILABLE, "firing", at(0))


def _alert_incident(items: list[Anomaly], now: datetime, rules: CorrelationRules) -> str:
    """The QueueStuck incident's status, folded and expired as the correlator does."""
    states, _ = correlate_batch({}, items, now, rules)
    incidents = [i for i in states.values() if i is not None]
    assert not [i for i in incidents if any(m.name == "Watchdog" for m in i.members)]
    facts = [f for i in incidents for f in facts_of(i, True, ())]
    blind = build_index(facts, now, rules.resolve_timeout).blind
    [inc] = [i for i in incidents if i.members[0].name == "QueueStuck"]
    quiet = now - max(m.last_seen for m in inc.members) >= timedelta(seconds=rules.resolve_timeout)
    assert quiet or expire(inc, now, rules, blind)[0].status == "open"
    return expire(inc, now, rules, blind)[0].status


class SharedTopic:
    """The heartbeats topic as a compacted view shows it to every replica: the latest
    record per key. Also the replicas' publisher (anomalies to ``items``)."""

    def __init__(self) -> None:
        self.beats: dict[str, Heartbeat] = {}
        self.items: list[Anomaly] = []

    async def publish_many(self, items: Sequence[tuple[str, Any, str | None]]) -> None:
        for topic, value, key in items:
            if topic == "beats":
                assert isinstance(value, Heartbeat) and key == value.key
                self.beats[key] = value
            else:
                self.items.append(value)


class View:
    def __init__(self, topic: SharedTopic) -> None:
        self.topic = topic
        self.started = False

    @property
    def items(self) -> Mapping[str, Heartbeat]:
        return self.topic.beats

    @property
    def failure(self) -> BaseException | None:
        return None

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False


@pytest.fixture
async def replicas() -> AsyncIterator[
    tuple[list[str], SharedTopic, Clock, list[AlertmanagerReceiver]]
]:
    settings = parse_settings(
        {
            "agent": {"cluster": "c1"},
            "correlation": {"resolve_timeout": "300s"},
            "detectors": {"alertmanager": {"enabled": True, "heartbeat": {"within": "120s"}}},
        },
        env={},
    )
    shared, clock, metrics = SharedTopic(), Clock(), Metrics()
    urls, servers, receivers = [], [], []
    for name in ("pod-a", "pod-b"):
        server = HealthServer(host="127.0.0.1", port=0, metrics=metrics)
        am = AlertmanagerReceiver(
            settings,
            token=TOKEN,
            publish=shared,
            topic="t",
            metrics=metrics,
            clock=clock,
            shared=View(shared),
            shared_topic="beats",
            replica=name,
        )
        am.install(server.app)
        await server.start()
        await am.start()
        servers.append(server)
        receivers.append(am)
        urls.append(f"http://127.0.0.1:{server.bound_port}/webhooks/alertmanager")
    try:
        yield urls, shared, clock, receivers
    finally:
        for am, server in zip(receivers, servers, strict=True):
            await am.stop()
            await server.stop()


async def test_replicas_judge_the_heartbeat_from_the_latest_any_of_them_received(
    replicas: tuple[list[str], SharedTopic, Clock, list[AlertmanagerReceiver]],
) -> None:
    """Behind one Service Alertmanager's notification reaches one replica: the other
    raised a false blindness, holding every Alertmanager incident open."""
    [url_a, _], shared, clock, receivers = replicas

    async def check(t: int) -> None:
        clock.now = at(t)
        for am in receivers:
            await am.check_heartbeat()

    for t in range(0, 600, 30):  # only pod-a hears it, every 30 s
        clock.now = at(t)
        assert await post(url_a, notification("Watchdog")) == (200, {"accepted": 0})
        await check(t + 15)
    assert shared.beats["c1/Watchdog"].replica == "pod-a"
    assert not [a for a in shared.items if a.name == UNAVAILABLE]
    for t in range(600, 900, 30):  # it stops (last heard at 570)
        await check(t)
    blind = [a for a in shared.items if a.name == UNAVAILABLE]
    # Both tell it, as one anomaly: one fingerprint, blind since the last heartbeat.
    assert {(a.fingerprint, a.starts_at, a.status) for a in blind} == {
        (blind[0].fingerprint, at(570), "firing")
    }
    assert len(blind) >= 4
    clock.now = at(900)
    assert await post(url_a, notification("Watchdog")) == (200, {"accepted": 0})
    await check(915)
    ended = [a for a in shared.items if a.name == UNAVAILABLE][len(blind) :]
    assert [a.status for a in ended] == ["resolved", "resolved"]
    assert {(a.fingerprint, a.starts_at) for a in ended} == {(blind[0].fingerprint, at(570))}
    await check(945)  # nothing more to tell
    assert len([a for a in shared.items if a.name == UNAVAILABLE]) == len(blind) + 2


async def test_a_heartbeat_dated_in_the_future_keeps_no_replica_from_blindness(
    replicas: tuple[list[str], SharedTopic, Clock, list[AlertmanagerReceiver]],
) -> None:
    """Whoever writes the topic once cannot buy 'never blind' with a far-future date."""
    _, shared, clock, [a, _] = replicas
    forged = Heartbeat(cluster="c1", alertname="Watchdog", seen_at=at(10**6), replica="x")
    shared.beats[forged.key] = forged
    clock.now = at(130)
    await a.check_heartbeat()
    [blind] = shared.items
    assert (blind.name, blind.status, blind.starts_at) == (UNAVAILABLE, "firing", at(0))
