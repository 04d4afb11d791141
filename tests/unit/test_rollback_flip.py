"""No rollback flip-flop: after a rollback v2 -> v1 the re-activated v1 is a recent rollout
(it just became current), so the rules propose rolling it "back" once more when the
incident goes on or comes back, which would re-deploy v2, the release just left. Within
one episode of one incident the remedy verified ineffective is not proposed again
(``Context.ineffective``) and the same action id is a repeat; a reopening or another
incident gets a new id, and after the cooldown no other rule stopped it. Policy rule 7c
(``rollback_flip``) sends such a rollback to a person: the pure property, then the real
analysis stage, executor and in-process cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.analysis_stage import AnalysisStage
from agent.context import ContextGatherer
from agent.metrics import Metrics
from agent.models import (
    ActionRequest,
    ActionResult,
    Analysis,
    Escalation,
    Incident,
    Member,
    Target,
    fingerprint,
    utcnow,
)
from agent.policy import Executed, Facts, Switches, decide
from agent.settings import Settings, parse_settings
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from streams.bus import Envelope
from tests.fakes.incidents import PATTERNS, SHOP
from tests.fakes.publisher import MemoryBus
from tests.unit.factories import action, at, result_of

CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")
WINDOW = 6 * 3600.0  # repeat_window's default


def autonomous(**rem: Any) -> Settings:
    """Rollbacks run on their own: no cooldown in the way (it has passed by the time an
    incident reopens or a new one opens), verification left to the test."""
    doc = {
        "rollout_window": "30m",
        "cooldown": 0,
        "verify_after": "1h",
        "require_approval": [],
        **rem,
    }
    return parse_settings({"patterns": PATTERNS, "remediation": doc}, env={})


# --- the pure rule -------------------------------------------------------------------------
IMAGES = st.sampled_from(["v1", "v2", "v3"])
AGES = st.floats(0, 2 * WINDOW, allow_nan=False)


@settings(max_examples=300)
@given(
    ours=st.lists(st.tuples(IMAGES, AGES, st.booleans()), max_size=4),
    theirs=st.lists(st.tuples(IMAGES, AGES), max_size=3),
    restores=IMAGES,
    repeats=st.booleans(),
)
def test_the_agent_never_rolls_back_to_a_template_a_rollback_left_within_the_window(
    ours: list[tuple[str, float, bool]],
    theirs: list[tuple[str, float]],
    restores: str,
    repeats: bool,
) -> None:
    """Whatever the history: a rollback re-deploying an image that a rollback (the agent's,
    on this target; or any, in the cluster's rollout history) moved the target away from
    within repeat_window is never executed on its own; one that re-deploys nothing left
    within it is (these settings stop nothing else)."""
    s = autonomous(**({} if repeats else {"ineffective_after": 0, "max_repeats": 0}))
    now = at(3 * WINDOW)
    history = [
        Executed(
            target_key=CHECKOUT.key if here else "Deployment/shop/other",
            namespace="shop",
            at=now - timedelta(seconds=age),
            action_id=f"rb-{i}",
            type="rollback",
            moved_from=image,
        )
        for i, (image, age, here) in enumerate(ours)
    ]
    facts = Facts(
        replicas=4,
        restores=restores,
        rolled_back_from=tuple((image, now - timedelta(seconds=age)) for image, age in theirs),
    )
    rollback = replace(action("rollback", action_id="next", confidence=0.95), target=CHECKOUT)
    v = decide(rollback, s, history, Switches(), now, facts)
    left = {img for img, age, here in ours if here and age < WINDOW} | {
        img for img, age in theirs if age < WINDOW
    }
    if restores in left:
        assert v.kind == "approve", v
        if v.rule == "rollback_flip":
            assert f"re-deploy {restores}" in v.reason
    elif not repeats:
        assert (v.kind, v.rule) == ("execute", "autonomous"), v
    # An undo is a person's own request to go back: exempt, as from the cooldown.
    undo = replace(rollback, params={"undo_of": "rb-0", "revision": 2})
    assert decide(undo, s, history, Switches(), now, facts).rule != "rollback_flip"


def test_a_rollback_that_re_deploys_what_one_left_names_both_releases() -> None:
    now = at(0)
    ours = Executed(
        CHECKOUT.key, "shop", now - timedelta(minutes=10), "rb-1", "rollback", moved_from="v2"
    )
    rollback = replace(action("rollback", action_id="rb-2", confidence=0.95), target=CHECKOUT)
    v = decide(rollback, autonomous(), [ours], Switches(), now, Facts(restores="v2"))
    assert (v.kind, v.rule) == ("approve", "rollback_flip")
    assert "re-deploy v2, which the agent's rollback rb-1 moved it away from" in v.reason
    assert v.reason.endswith("a person decides which release runs")
    # A person approved it: theirs to choose (rule 7 comes first).
    approved = replace(rollback, approved_by="alice")
    assert decide(approved, autonomous(), [ours], Switches(), now, Facts(restores="v2")).kind == (
        "execute"
    )
    # Another image, or the same one left longer ago than repeat_window: no flip.
    assert decide(rollback, autonomous(), [ours], Switches(), now, Facts(restores="v0")).rule == (
        "autonomous"
    )
    old = replace(ours, at=now - timedelta(hours=7))
    assert decide(rollback, autonomous(), [old], Switches(), now, Facts(restores="v2")).rule == (
        "autonomous"
    )


# --- the real stage, executor and cluster ----------------------------------------------------
def member(t: datetime, status: str = "firing") -> Member:
    return Member(
        fingerprint=fingerprint("prometheus", "high-error-rate", SHOP),
        name="high-error-rate",
        source="prometheus",
        severity="critical",
        status=status,  # type: ignore[arg-type]
        labels=dict(SHOP),
        first_seen=t,
        last_seen=t,
        value=0.2,
    )


def opened(id: str, t: datetime) -> Incident:
    return Incident(
        id=id,
        key="c1/shop/checkout",
        status="open",
        severity="critical",
        labels=dict(SHOP),
        members=(member(t),),
        opened_at=t,
        updated_at=t,
        revision=1,
    )


@dataclass
class Loop:
    """The analysis stage (rules) and the executor on one in-process cluster, the bus
    between them delivered by hand."""

    cluster: FakeCluster
    stage: AnalysisStage
    executor: Executor
    bus: MemoryBus
    offset: int = 0

    def requests(self, incident_id: str) -> list[ActionRequest]:
        return [
            a
            for a, _ in self.bus.on("actions")
            if isinstance(a, ActionRequest) and a.incident_id == incident_id
        ]

    async def incident(self, inc: Incident) -> None:
        self.offset += 1
        await self.stage.handle([Envelope("mem.incidents", 0, self.offset, None, inc)])

    async def verdict(self, req: ActionRequest, outcome: Any) -> None:
        """Its verification, as both read it from the action-results topic."""
        self.offset += 1
        result = result_of(req, outcome, at=utcnow())
        env = Envelope("mem.action-results", 0, self.offset, None, result)
        await self.executor.on_results([env])
        await self.stage.on_watch([env])

    async def act(self, req: ActionRequest) -> ActionResult:
        return await self.executor.on_action(req)

    async def image(self) -> str:
        return (await self.cluster.workload(CHECKOUT)).image


@pytest.fixture
async def loop() -> AsyncIterator[Loop]:
    now = utcnow()
    cluster = FakeCluster()
    cluster.create_deployment(
        "shop", "checkout", image="v1", replicas=2, at=now - timedelta(days=2)
    )
    cluster.rollout("shop", "checkout", image="v2", at=now - timedelta(minutes=4))  # the bad one
    s, bus = autonomous(), MemoryBus()
    gatherer = ContextGatherer(s, cluster=cluster, source=cluster, prom=None, logs=False)
    stage = AnalysisStage(s, bus=bus, cluster=cluster, metrics=Metrics(), gatherer=gatherer)  # type: ignore[arg-type]
    ex = Executor(s, bus=bus, cluster=cluster, metrics=Metrics(), sweep_interval=0.05)
    try:
        yield Loop(cluster, stage, ex, bus)
    finally:
        await ex.stop()


async def rolled_back(loop: Loop, inc: Incident) -> ActionRequest:
    """The bad rollout v2 is analysed and rolled back to v1, as it should be."""
    await loop.incident(inc)
    (first,) = loop.requests(inc.id)
    assert first.type == "rollback"
    assert (await loop.act(first)).status == "succeeded"
    assert await loop.image() == "v1"
    return first


def flip_held(result: ActionResult, loop: Loop) -> None:
    assert result.status == "pending_approval", result.message
    assert "re-deploy v2" in result.message, result.message
    pages = [e for e, _ in loop.bus.on("escalations") if isinstance(e, Escalation)]
    asked = [
        e for e in pages if e.reason == "approval_requested" and e.action_id == result.action_id
    ]
    assert asked and "re-deploy v2" in asked[0].details[0], pages


async def test_a_reopening_after_a_healed_rollback_does_not_redeploy_the_bad_release(
    loop: Loop,
) -> None:
    """v2 rolled back to v1, healed, resolved; the symptom comes back (another fault) and
    the incident reopens: a new episode, so a new action id, and v1 is now the recent
    rollout. The rules propose rolling it back, to v2: the policy asks a person."""
    inc = opened("inc-1", utcnow())
    first = await rolled_back(loop, inc)
    await loop.verdict(first, "healed")
    gone = replace(inc, status="resolved", revision=2, members=(member(inc.opened_at, "resolved"),))
    await loop.incident(replace(gone, resolved_at=utcnow()))
    await loop.incident(replace(inc, status="reopened", revision=3, updated_at=utcnow()))
    again = loop.requests(inc.id)[1:]
    assert [(a.type, a.target) for a in again] == [("rollback", CHECKOUT)]
    assert again[0].id != first.id
    # The analysis says what the rollback would bring back.
    analysis = [a for a, _ in loop.bus.on("analyses") if isinstance(a, Analysis)][-1]
    restored = "revision 3 re-activated an older template in place of v2: rolling it back"
    assert f"{restored} re-deploys v2" in analysis.evidence, analysis.evidence
    flip_held(await loop.act(again[0]), loop)
    assert await loop.image() == "v1"


async def test_an_incident_that_goes_on_after_the_rollback_does_not_flip_back(
    loop: Loop,
) -> None:
    """v1 is bad too: the rollback is verified not_healed. Within the incident the rules do
    not propose it again (the remedy tried without effect); the next incident on the
    service (the first one closed, its symptom back) has no such memory, and the repeat
    rule needs two failures: the policy holds the rollback to v2 for a person."""
    inc = opened("inc-1", utcnow())
    first = await rolled_back(loop, inc)
    await loop.verdict(first, "not_healed")
    assert loop.requests(inc.id) == [first]  # analysed again: no second rollback
    later = opened("inc-2", utcnow())
    await loop.incident(later)
    (again,) = loop.requests(later.id)
    assert again.type == "rollback"
    flip_held(await loop.act(again), loop)
    assert await loop.image() == "v1"


async def test_a_rollback_done_by_hand_is_not_undone_by_the_agent(loop: Loop) -> None:
    """A person ran `kubectl rollout undo` (v2 -> v1, renumbered 3) before the agent saw the
    incident: the agent's history has no rollback, the cluster's revision history has."""
    loop.cluster.rollout("shop", "checkout", image="v1", at=utcnow())  # re-activates v1
    inc = opened("inc-1", utcnow())
    await loop.incident(inc)
    (req,) = loop.requests(inc.id)
    assert req.type == "rollback"
    result = await loop.act(req)
    flip_held(result, loop)
    assert "a rollback in its rollout history" in result.message
    assert await loop.image() == "v1"
