"""The unresolved-incident watch: an incident still open past escalation.unresolved_after
is escalated once; a resolved or silenced one, or an older transition, is not."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import orjson
import pytest
from aiohttp import web

from agent.escalation_watch import (
    Level,
    UnresolvedWatch,
    due,
    levels_of,
    runbook_plan,
    seed_window,
    track,
)
from agent.metrics import Metrics
from agent.models import Escalation, Incident, Matcher, Silence
from agent.notifier import Notifier
from agent.server import serve
from agent.settings import EscalationLevel, FileRunbook, FileStep, Settings
from streams.bus import Envelope
from tests.fakes.incidents import OPENED, incident, member
from tests.unit.factories import settings as make_settings


def test_track_keeps_the_latest_open_state_and_drops_closed_ones() -> None:
    open_: dict[str, Incident] = {}
    inc = incident(member(), revision=3)
    track(open_, inc)
    track(open_, replace(inc, revision=2, status="updated"))  # a redelivered older one
    assert open_[inc.id].revision == 3
    track(open_, replace(inc, revision=4, status="mitigating"))
    assert open_[inc.id].status == "mitigating"
    track(open_, replace(inc, revision=5, status="resolved"))
    assert open_ == {}
    track(open_, replace(inc, id="inc-2", status="silenced"))
    assert open_ == {}


def test_due_are_the_open_incidents_past_the_bound_not_yet_escalated() -> None:
    old, new = incident(member(), id="old"), incident(member(), id="new")
    new = replace(new, opened_at=OPENED + timedelta(minutes=10))
    open_ = {"old": old, "new": new}
    now = OPENED + timedelta(minutes=15)
    assert [(i.id, n) for i, n in due(open_, {}, now, [15 * 60])] == [("old", 1)]
    assert [(i.id, n) for i, n in due(open_, {}, now, [60])] == [("old", 1), ("new", 1)]
    assert due(open_, {"old": 1, "new": 1}, now, [60]) == []


def test_each_level_is_due_once_when_its_age_is_reached() -> None:
    inc = incident(member(), id="inc")
    levels = [15 * 60, 60 * 60, 4 * 3600]

    def at(minutes: float, escalated: dict[str, int]) -> list[int]:
        now = OPENED + timedelta(minutes=minutes)
        return [n for _, n in due({"inc": inc}, escalated, now, levels)]

    assert at(14, {}) == []
    assert at(15, {}) == [1]
    assert at(59, {"inc": 1}) == []
    assert at(60, {"inc": 1}) == [2]
    assert at(300, {"inc": 2}) == [3]
    assert at(300, {"inc": 3}) == []
    assert at(300, {}) == [1, 2, 3]  # a watch that knows nothing (a restart): all, in order


async def test_the_watch_escalates_once_and_forgets_what_closed() -> None:
    sent: list[tuple[str, object]] = []

    async def publish(topic: str, value: object) -> None:
        sent.append((topic, value))

    metrics = Metrics()
    watch = UnresolvedWatch(after=900, topic="t.escalations", publish=publish, metrics=metrics)
    inc = incident(member())
    await watch.handle([Envelope("t.incidents", 0, 0, inc.key, inc)])
    assert await watch.sweep(OPENED + timedelta(minutes=14)) == []
    (e,) = await watch.sweep(OPENED + timedelta(minutes=16))
    assert isinstance(e, Escalation) and (e.reason, e.incident_id) == ("unresolved", inc.id)
    assert e.summary == f"{inc.key}: open for 16 min, open"
    assert e.severity == "critical"
    assert await watch.sweep(OPENED + timedelta(minutes=30)) == []  # once
    assert sent == [("t.escalations", e)]
    resolved = replace(inc, revision=2, status="resolved")
    await watch.handle([Envelope("t.incidents", 0, 1, inc.key, resolved)])
    assert watch.open == {} and watch.escalated == {}
    assert metrics.escalations.labels(reason="unresolved")._value.get() == 1


async def test_a_later_level_is_a_second_escalation_under_its_own_id() -> None:
    sent: list[Escalation] = []

    async def publish(topic: str, value: object) -> None:
        assert isinstance(value, Escalation)
        sent.append(value)

    watch = UnresolvedWatch(
        after=900, again=(3600,), topic="t.escalations", publish=publish, metrics=Metrics()
    )
    inc = incident(member())
    await watch.handle([Envelope("t.incidents", 0, 0, inc.key, inc)])
    (first,) = await watch.sweep(OPENED + timedelta(minutes=16))
    assert await watch.sweep(OPENED + timedelta(minutes=59)) == []
    (second,) = await watch.sweep(OPENED + timedelta(minutes=61))
    assert (first.level, second.level) == (1, 2) and first.id != second.id
    assert second.summary == f"{inc.key}: open for 61 min, open (level 2)"
    assert await watch.sweep(OPENED + timedelta(hours=5)) == []  # no third level
    # Level 1 keeps the id it had before there were levels: receivers still dedupe it.
    assert first.id == Escalation.of_incident(inc, "unresolved", "x", OPENED, ()).id
    assert sent == [first, second]


def test_the_seed_reaches_back_to_the_last_level_and_an_hour() -> None:
    one = make_settings({"escalation": {"unresolved_after": "15m"}}).escalation
    assert seed_window(levels_of(one)) == 900 + 3600
    more = {"unresolved_after": "15m", "unresolved_again_after": ["1h", "4h"]}
    levels = levels_of(make_settings({"escalation": more}).escalation)
    assert levels == (900, 3600, 4 * 3600) and seed_window(levels) == 4 * 3600 + 3600


def flapping() -> list[Incident]:
    """Open at OPENED, resolved 20 min later, reopened at 30 min (the correlator keeps the
    id and opened_at; the reopening revision's update time is when it reopened)."""
    inc = incident(member())
    resolved_at = OPENED + timedelta(minutes=20)
    resolved = replace(inc, revision=2, status="resolved", updated_at=resolved_at)
    resolved = replace(resolved, resolved_at=resolved_at)
    reopened = replace(
        inc, revision=3, status="reopened", updated_at=OPENED + timedelta(minutes=30)
    )
    return [inc, resolved, reopened]


def envelopes(incidents: list[Incident]) -> list[Envelope]:
    return [Envelope("t.incidents", 0, n, i.key, i) for n, i in enumerate(incidents)]


@pytest.mark.parametrize("one_batch", [False, True], ids=["two-batches", "one-batch"])
async def test_a_reopened_incident_pages_again_from_level_1_counted_from_the_reopening(
    one_batch: bool,
) -> None:
    sent: list[Escalation] = []

    async def publish(topic: str, value: object) -> None:
        assert isinstance(value, Escalation)
        sent.append(value)

    watch = UnresolvedWatch(
        after=900, again=(3600,), topic="t.escalations", publish=publish, metrics=Metrics()
    )
    inc, resolved, reopened = flapping()
    await watch.handle(envelopes([inc]))
    (first,) = await watch.sweep(OPENED + timedelta(minutes=16))
    if one_batch:
        await watch.handle(envelopes([resolved, reopened]))
    else:
        await watch.handle(envelopes([resolved]))
        await watch.handle(envelopes([reopened]))
    # Not due at once on the first episode's age: 15 min after the reopening.
    assert await watch.sweep(OPENED + timedelta(minutes=31)) == []
    assert await watch.sweep(OPENED + timedelta(minutes=44)) == []
    (again,) = await watch.sweep(OPENED + timedelta(minutes=46))
    assert again.level == 1 and again.incident_id == inc.id
    # Its own id: the notifier drops an id it delivered (the first episode's page).
    assert again.id != first.id
    assert again.summary == f"{inc.key}: open for 16 min since it reopened, reopened"
    assert await watch.sweep(OPENED + timedelta(minutes=89)) == []
    (later,) = await watch.sweep(OPENED + timedelta(minutes=91))
    assert later.level == 2 and later.id not in {first.id, again.id}
    assert sent == [first, again, later]


async def test_replicas_and_a_restart_escalate_an_episode_under_the_same_id() -> None:
    """A watch that seeds itself from the topic finds the same episode as one that read
    it live; a redelivered older revision neither reopens a closed incident nor starts an
    episode."""
    history = envelopes(flapping())

    async def recent(seconds: float) -> list[Envelope]:
        return history

    async def publish(topic: str, value: object) -> None:
        return None

    live = UnresolvedWatch(after=900, topic="t", publish=publish, metrics=Metrics())
    await live.handle(history)
    seeded = UnresolvedWatch(
        after=900, topic="t", publish=publish, metrics=Metrics(), recent=recent
    )
    await seeded.start()
    await seeded.stop()
    now = OPENED + timedelta(minutes=46)
    (a,), (b,) = await live.sweep(now), await seeded.sweep(now)
    assert a.id == b.id and "since it reopened" in a.summary

    closed = UnresolvedWatch(after=900, topic="t", publish=publish, metrics=Metrics())
    inc, resolved, _ = flapping()
    await closed.handle(envelopes([inc, resolved, inc]))  # rev 1 redelivered after rev 2
    assert closed.open == {} and await closed.sweep(now) == []


def silenced_for_a_while() -> list[Incident]:
    """Open at OPENED, silenced 20 min later, its silence ended at 40 min while it still
    fires (the correlator's next revision after the silence is an open one, not reopened)."""
    inc = incident(member())
    silenced = replace(
        inc, revision=2, status="silenced", updated_at=OPENED + timedelta(minutes=20)
    )
    loud = replace(inc, revision=3, status="updated", updated_at=OPENED + timedelta(minutes=40))
    return [inc, silenced, loud]


@pytest.mark.parametrize("one_batch", [False, True], ids=["two-batches", "one-batch"])
async def test_an_incident_still_firing_when_its_silence_ends_pages_again_once(
    one_batch: bool,
) -> None:
    """It used to be escalated again under the ids of the pages before the silence, which
    the notifier drops as delivered: it never paged again. Now the end of the silence pages
    the levels reached, each once; a redelivered escalation is still dropped."""
    sent: list[Escalation] = []

    async def publish(topic: str, value: object) -> None:
        assert isinstance(value, Escalation)
        sent.append(value)

    def watch() -> UnresolvedWatch:
        return UnresolvedWatch(
            after=900, again=(3600,), topic="t.escalations", publish=publish, metrics=Metrics()
        )

    live = watch()
    inc, silenced, loud = silenced_for_a_while()
    await live.handle(envelopes([inc]))
    (first,) = await live.sweep(OPENED + timedelta(minutes=16))
    if one_batch:
        await live.handle(envelopes([silenced, loud]))
    else:
        await live.handle(envelopes([silenced]))
        assert await live.sweep(OPENED + timedelta(minutes=30)) == []  # silenced: no page
        await live.handle(envelopes([loud]))
    (again,) = await live.sweep(OPENED + timedelta(minutes=41))
    assert (again.level, again.incident_id) == (1, inc.id) and again.id != first.id
    assert f"silence ended {loud.updated_at.isoformat()} (revision 3)" in again.details
    # Still counted from its opening (the silence did not heal it), and once.
    assert again.summary == f"{inc.key}: open for 41 min, updated"
    assert await live.sweep(OPENED + timedelta(minutes=59)) == []
    await live.handle(envelopes([silenced, loud]))  # a redelivery: nothing ended again
    assert await live.sweep(OPENED + timedelta(minutes=59)) == []
    (later,) = await live.sweep(OPENED + timedelta(minutes=61))
    assert later.level == 2 and later.id not in {first.id, again.id}

    # A replica, or a restart seeded from the topic, pages the end under the same id.
    history = envelopes(silenced_for_a_while())

    async def recent(seconds: float) -> list[Envelope]:
        return history

    seeded = UnresolvedWatch(
        after=900, topic="t.escalations", publish=publish, metrics=Metrics(), recent=recent
    )
    await seeded.start()
    await seeded.stop()
    (same,) = await seeded.sweep(OPENED + timedelta(minutes=41))
    assert same.id == again.id

    # The notifier delivers the page after the silence, and still drops a redelivery.
    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(orjson.loads(await request.read())["id"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/pager", hook)
    runner, port = await serve(app, "127.0.0.1", 0)
    hooks = {"webhooks": [{"name": "pager", "url": f"http://127.0.0.1:{port}/pager"}]}
    notifier = Notifier(make_settings({"escalation": hooks}), metrics=Metrics(), env={})
    try:
        pages = [first, again, same, first, again]  # each posted once, redeliveries dropped
        await notifier.handle(
            [Envelope("t.escalations", 0, n, e.key, e) for n, e in enumerate(pages)]
        )
    finally:
        await notifier.close()
        await runner.cleanup()
    assert got == [first.id, again.id]


async def test_the_notifier_sends_a_routed_escalation_only_to_its_channels() -> None:
    """The pager takes only level 2 globally, yet the runbook routes level 1 to it; the
    chat, which takes everything globally, is not sent the routed one."""
    got: list[tuple[str, int]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((request.path, orjson.loads(await request.read())["level"]))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        hooks = [
            {"name": "chat", "url": f"http://127.0.0.1:{port}/chat"},
            {"name": "pager", "url": f"http://127.0.0.1:{port}/pager", "levels": [2]},
        ]
        notifier = Notifier(
            make_settings({"escalation": {"webhooks": hooks}}), metrics=Metrics(), env={}
        )
        inc = incident(member())
        plain = Escalation.of_incident(inc, "unresolved", "open", OPENED, (), 1)
        routed = replace(plain, id="routed", channels=("pager",))
        try:
            await notifier.handle(
                [Envelope("t", 0, i, inc.key, e) for i, e in enumerate([plain, routed])]
            )
        finally:
            await notifier.close()
    finally:
        await runner.cleanup()
    assert got == [("/chat", 1), ("/pager", 1)]


ORDERS = FileRunbook(
    name="orders",
    alert="CheckoutErrors",
    path="orders.yaml",
    steps=(FileStep(name="look", action="check_recent_deployments"),),
    escalation=(
        EscalationLevel(1, 300.0, (("chat", "#sre-alerts"),)),
        EscalationLevel(2, 1800.0, (("pager", "orders-oncall"), ("nowhere", "x"))),
    ),
)
HOOKS = [{"name": n, "url": f"https://{n}.example/h"} for n in ("chat", "pager", "other")]


def runbook_settings() -> Settings:
    s = make_settings({"escalation": {"unresolved_after": "15m", "webhooks": HOOKS}})
    return replace(s, file_runbooks=(ORDERS,))


def test_a_runbooks_escalation_plan_applies_to_the_incidents_it_matches() -> None:
    s = runbook_settings()
    assert runbook_plan(incident(member("CheckoutErrors")), s) == (
        "orders",
        (
            Level(300.0, ("chat",), ("chat #sre-alerts",)),
            Level(1800.0, ("pager",), ("pager orders-oncall", "nowhere x")),
        ),
    )
    assert runbook_plan(incident(member("high-error-rate")), s) is None


async def test_the_watch_follows_a_runbooks_levels_and_routes_them() -> None:
    sent: list[Escalation] = []

    async def publish(topic: str, value: object) -> None:
        assert isinstance(value, Escalation)
        sent.append(value)

    watch = UnresolvedWatch(
        after=900, topic="t", publish=publish, metrics=Metrics(), settings=runbook_settings()
    )
    ours = incident(member("CheckoutErrors"), id="ours")
    other = incident(member("high-error-rate"), id="other")
    await watch.handle(
        [Envelope("t.incidents", 0, i, x.key, x) for i, x in enumerate([ours, other])]
    )
    (first,) = await watch.sweep(OPENED + timedelta(minutes=6))  # the runbook's 5m
    assert (first.incident_id, first.level, first.channels) == ("ours", 1, ("chat",))
    assert "runbook orders escalation level 1: chat #sre-alerts" in first.details
    (glob,) = await watch.sweep(OPENED + timedelta(minutes=16))  # the global 15m
    assert (glob.incident_id, glob.level, glob.channels) == ("other", 1, ())
    (second,) = await watch.sweep(OPENED + timedelta(minutes=31))
    assert (second.incident_id, second.level, second.channels) == ("ours", 2, ("pager",))
    assert await watch.sweep(OPENED + timedelta(hours=5)) == []  # the runbook has 2 levels


def silence(starts: timedelta, ends: timedelta) -> Silence:
    return Silence(
        id=f"sil-{starts}-{ends}",
        matchers=(Matcher("service", "cart"),),
        starts_at=OPENED + starts,
        ends_at=OPENED + ends,
        created_by="ops",
        comment="maintenance",
        created_at=OPENED + starts,
    )


def test_the_seed_reaches_back_to_the_start_of_each_silence_in_force_within_it() -> None:
    levels, hour = (900.0, 3600.0), 3600.0
    now = OPENED + timedelta(hours=10)
    base = seed_window(levels)
    assert base == 2 * hour
    in_force = silence(timedelta(minutes=20), timedelta(hours=10, minutes=20))
    assert seed_window(levels, [in_force], now) == (10 * hour - 20 * 60) + hour
    ended_within = silence(timedelta(hours=3), timedelta(hours=9))  # 7 h ago to 1 h ago
    assert seed_window(levels, [ended_within], now) == 7 * hour + hour
    long_over = silence(timedelta(hours=1), timedelta(hours=7))  # ended 3 h ago: reopened
    pending = silence(timedelta(hours=11), timedelta(hours=12))
    recent = silence(timedelta(hours=9), timedelta(hours=11))  # within the window anyway
    assert seed_window(levels, [long_over, pending, recent], now) == base
    assert seed_window(levels, [long_over, in_force, ended_within], now) == 10 * hour - 1200 + hour


async def test_a_restart_during_a_long_silence_pages_its_end_under_new_ids() -> None:
    """Silenced 20 min after it opened, for 10 h; the executor restarted at 10 h. Its seed
    reached back 2 h (the last level and an hour): it never read the silenced revision,
    took the incident for one open all along, and paged the end of the silence under
    the ids of the pages before it, which receivers drop as sent. It reads back to the
    silence's start now, and pages as a watch that never restarted does."""
    sent: list[Escalation] = []

    async def publish(topic: str, value: object) -> None:
        assert isinstance(value, Escalation)
        sent.append(value)

    inc = incident(member())
    silenced = replace(
        inc, revision=2, status="silenced", updated_at=OPENED + timedelta(minutes=20)
    )
    loud = replace(
        inc, revision=3, status="updated", updated_at=OPENED + timedelta(hours=10, minutes=21)
    )
    restart = OPENED + timedelta(hours=10)
    long_silence = silence(timedelta(minutes=20), timedelta(hours=10, minutes=20))
    asked: list[float] = []

    async def recent(seconds: float) -> list[Envelope]:
        """The records Kafka finds written in the last ``seconds`` at the restart."""
        asked.append(seconds)
        since = restart - timedelta(seconds=seconds)
        return envelopes([i for i in (inc, silenced) if i.updated_at >= since])

    async def silences() -> list[Silence]:
        return [long_silence]

    def watch(seeded: bool) -> UnresolvedWatch:
        return UnresolvedWatch(
            after=900,
            again=(3600,),
            topic="t.escalations",
            publish=publish,
            metrics=Metrics(),
            recent=recent if seeded else None,
            silences=silences if seeded else None,
            clock=lambda: restart,
        )

    live = watch(seeded=False)
    await live.handle(envelopes([inc]))
    (first,) = await live.sweep(OPENED + timedelta(minutes=16))
    await live.handle(envelopes([silenced]))
    seeded = watch(seeded=True)
    await seeded.start()
    await seeded.stop()
    assert seeded.open == {} and await seeded.sweep(restart) == []  # still silenced

    after = OPENED + timedelta(hours=10, minutes=22)
    await live.handle(envelopes([loud]))
    await seeded.handle(envelopes([loud]))
    pages = await live.sweep(after)
    assert [e.level for e in pages] == [1, 2] and first.id not in {e.id for e in pages}
    assert [e.id for e in await seeded.sweep(after)] == [e.id for e in pages]
    assert asked == [(10 * 3600 - 20 * 60) + 3600]  # back to the silence's start, and an hour
