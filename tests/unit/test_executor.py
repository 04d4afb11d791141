"""The executor on the in-process cluster: policy with blast-radius facts, every action
type, effect-once, approvals (validity, expiry, restart), verification and undo."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.errors import ActionFailed, DependencyUnavailable, PermanentError, TransientError
from agent.metrics import Metrics
from agent.models import (
    ActionRequest,
    ActionResult,
    ApprovalDecision,
    ApprovalRequest,
    Escalation,
    Firing,
    Incident,
    Target,
    stable_id,
    utcnow,
)
from agent.policy import Switches, Verdict, unknown_undo
from agent.settings import Settings
from handlers.cluster import EVICTED_PODS_ANNOTATION, PartialFailure, drain_left
from handlers.executor import (
    Executor,
    still_pending,
    undo_request,
    undoable_result,
    unverified,
)
from handlers.fake_cluster import FakeCluster
from streams.bus import Envelope
from tests.fakes.publisher import MemoryBus
from tests.unit.factories import action, at
from tests.unit.factories import settings as make_settings
from tests.unit.test_reference_metrics import evaluate, reference_panels, reference_rules

CHECKOUT = Target(kind="Deployment", namespace="shop", name="checkout")
NODE = Target(kind="Node", name="n1")
CM = Target(kind="ConfigMap", namespace="shop", name="flags")


def cfg(**rem: Any) -> Settings:
    doc = {
        "remediation": {
            "require_approval": ["update_config"],
            "cooldown": 0,
            "verify_after": 0,
            "max_nodes_cordoned": 1,
            **rem,
        }
    }
    return make_settings(doc)


def cluster(kind: type[FakeCluster] = FakeCluster) -> FakeCluster:
    c = kind()
    c.create_deployment("shop", "checkout", image="v1", replicas=4, at=at(0))
    c.rollout("shop", "checkout", image="v2", at=at(60))
    for n in ("n1", "n2", "n3"):
        c.add_node(n)
    c.add_pod("shop", "checkout-a", node="n1", workload="checkout")
    c.add_pod("shop", "agent-x", node="n1", owner="DaemonSet")
    c.create_config_map("shop", "flags", {"mode": "fast"})
    return c


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Executor, MemoryBus, FakeCluster]]:
    bus, c = MemoryBus(), cluster()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), sweep_interval=0.05)
    try:
        yield ex, bus, c
    finally:
        await ex.stop()


def act(type_: str = "scale_up", target: Target = CHECKOUT, **kw: Any) -> ActionRequest:
    a = action(type_, **kw)  # type: ignore[arg-type]
    return replace(a, target=target)


async def test_every_action_type_executes_and_is_verified(rig: Any) -> None:
    ex, bus, c = rig
    cases = [
        act("rollback", action_id="a1"),
        act("scale_up", action_id="a2", params={"replicas": "+2"}),
        act("restart_workload", action_id="a3"),
        act("restart_pod", Target(kind="Pod", namespace="shop", name="checkout-a"), action_id="a4"),
        act("drain_node", NODE, action_id="a5"),
        act("update_config", CM, action_id="a6", params={"key": "mode", "value": "safe"}),
    ]
    for a in cases[:-1]:
        assert (await ex.on_action(a)).status == "succeeded", bus.results(a.id)
    await ex.on_decision(decision(await requested(ex, bus, cases[-1])))
    assert bus.results("a6")[-1].status == "succeeded"
    await bus.wait_for(
        lambda b: all(succeeded(b, a.id) == 2 for a in cases), 5, "a verification per action"
    )
    outcomes = {a.type: bus.results(a.id)[-1].outcome for a in cases}
    assert outcomes == {
        "rollback": "healed",
        "scale_up": "healed",
        "restart_workload": "healed",
        "restart_pod": "healed",
        "drain_node": "healed",
        "update_config": "unknown",  # nothing to re-check: applied, not judged
    }
    w = await c.workload(CHECKOUT)
    assert (w.image, w.replicas) == ("v1", 6)
    assert c.node("n1").unschedulable
    assert c.pod("shop", "checkout-a") is None and c.pod("shop", "agent-x") is not None
    assert c.config_map("shop", "flags").data == {"mode": "safe"}
    drained = bus.results("a5")[0]
    assert "skipped 1 DaemonSet/mirror pods" in drained.message
    assert drained.prior_state == {"unschedulable": False}


def succeeded(bus: MemoryBus, action_id: str) -> int:
    """Its execution, then its verification."""
    return sum(r.status == "succeeded" for r in bus.results(action_id))


class FlakyBus(MemoryBus):
    """Refuses the first ``failures`` verification records, as the real bus does while the
    broker restarts; the rest go through."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.refused = 0

    async def publish(self, topic_name: str, event: Any, key: str | None = None) -> None:
        verification = isinstance(event, ActionResult) and event.outcome != "unknown"
        if verification and self.refused < self.failures:
            self.refused += 1
            raise DependencyUnavailable("kafka publish failed: broker restarting")
        await super().publish(topic_name, event, key)


async def verified_with(bus: FlakyBus) -> Executor:
    ex = Executor(cfg(), bus=bus, cluster=cluster(), metrics=Metrics())
    ex.verify_backoff = (0.0, 0.0)  # the backoff's length is not what is tested
    assert (await ex.on_action(act("scale_up", action_id="s1"))).status == "succeeded"
    await asyncio.gather(*ex._verifications)  # a task that dies raises here
    await ex.stop()
    return ex


async def test_a_verification_lost_to_a_kafka_error_is_retried() -> None:
    bus = FlakyBus(failures=2)
    ex = await verified_with(bus)
    assert bus.refused == 2
    assert [r.outcome for r in bus.results("s1")] == ["unknown", "healed"]
    assert [e.reason for e, _ in bus.on("escalations")] == ["healed"]
    assert ex.history["s1"].outcome == "healed"
    assert ex.metrics.verification_failed.labels(action="scale_up")._value.get() == 0


async def test_a_verification_that_keeps_failing_is_given_up_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = FlakyBus(failures=100)
    ex = await verified_with(bus)
    assert bus.refused == ex.verify_attempts  # bounded
    assert [r.outcome for r in bus.results("s1")] == ["unknown"]  # resumed at the next start
    assert ex.metrics.verification_failed.labels(action="scale_up")._value.get() == 1
    assert "verification of scale_up s1 on Deployment/shop/checkout given up" in caplog.text


async def test_a_redelivered_action_is_a_duplicate(rig: Any) -> None:
    ex, _bus, c = rig
    a = act("restart_workload", action_id="r1")
    await ex.on_action(a)
    generation = (await c.workload(CHECKOUT)).generation
    again = await ex.on_action(a)
    assert again.status == "duplicate"
    assert (await c.workload(CHECKOUT)).generation == generation


class Killed(BaseException):
    """The executor's process dying (SIGKILL): nothing after it runs."""


def killed(_action: ActionRequest, _effect: Any) -> None:
    raise Killed


async def test_an_action_whose_delivery_died_before_its_result_counts_and_is_verified_once(
    rig: Any,
) -> None:
    first, _bus, c = rig
    first.settings = cfg(cooldown=300)
    first.after_apply = killed
    a = act("restart_workload", action_id="r1")
    with pytest.raises(Killed):
        await first.on_action(a)
    generation = (await c.workload(CHECKOUT)).generation
    # Restarted: no result of r1 to rebuild the history from; the action is redelivered.
    bus = MemoryBus()
    ex = Executor(cfg(cooldown=300), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert (await c.workload(CHECKOUT)).generation == generation  # not done twice
        assert "r1" in ex.history
        await bus.wait_for(lambda b: len(b.results("r1")) == 2, 5, "its verification")
        assert bus.results("r1")[-1].outcome == "healed"
        held = await ex.on_action(act("rollback", action_id="rb1"))
        assert held.status == "denied" and "cooldown" in held.message, held.message
        # Its result out, a further redelivery executes nothing: verified once.
        assert (await ex.on_action(a)).status == "duplicate"  # its id, and its result
        await asyncio.sleep(0.05)
        assert [x.status for x in bus.results("r1")] == ["succeeded", "succeeded", "duplicate"]
    finally:
        await ex.stop()


async def test_a_statefulset_pod_restart_redelivered_spares_its_replacement(rig: Any) -> None:
    first, _bus, c = rig
    c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    db0 = Target(kind="Pod", namespace="shop", name="db-0")
    first.after_apply = killed
    a = act("restart_pod", db0, action_id="p1")
    with pytest.raises(Killed):
        await first.on_action(a)
    new = c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert c.pod("shop", "db-0") == new  # one effect for one id
        await bus.wait_for(lambda b: len(b.results("p1")) == 2, 5, "its verification")
        verified = bus.results("p1")[-1]
        assert verified.outcome == "healed", verified.message
        assert "a new pod under its name" in verified.message
        assert not [e for e, _ in bus.on("escalations") if e.reason == "not_healed"]
    finally:
        await ex.stop()


async def test_a_statefulset_pod_restart_redelivered_before_the_pod_is_back_counts(
    rig: Any,
) -> None:
    # Redelivered while the StatefulSet has not yet recreated the pod: the StatefulSet's
    # record of the eviction shows the action acted, so it counts and is verified.
    first, _bus, c = rig
    old = c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    first.after_apply = killed
    a = act("restart_pod", Target(kind="Pod", namespace="shop", name="db-0"), action_id="p1")
    with pytest.raises(Killed):
        await first.on_action(a)
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == {"uid": old.uid} and "p1" in ex.history
    finally:
        await ex.stop()


async def test_a_deployment_pod_restart_redelivered_after_the_pod_is_gone_counts_once(
    rig: Any,
) -> None:
    # The id rode on the pod, gone with it: the Deployment's note of the eviction is what
    # shows the action acted, so it counts once and is verified, not a 'duplicate'.
    first, _bus, c = rig
    victim = c.pod("shop", "checkout-a")
    assert victim is not None
    first.after_apply = killed
    a = act("restart_pod", Target(kind="Pod", namespace="shop", name="checkout-a"))
    with pytest.raises(Killed):
        await first.on_action(a)
    assert c.pod("shop", "checkout-a") is None
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == {"uid": victim.uid} and a.id in ex.history
        assert (await ex.on_action(a)).status == "duplicate"  # once
        await bus.wait_for(lambda b: len(b.results(a.id)) == 3, 5, "its verification")
        assert [x.status for x in bus.results(a.id)] == ["succeeded", "duplicate", "succeeded"]
        assert bus.results(a.id)[-1].outcome == "healed", bus.results(a.id)[-1].message
    finally:
        await ex.stop()


async def test_a_pod_restart_redelivered_while_its_pod_still_terminates_counts_once(
    rig: Any,
) -> None:
    # A finalizer holds the evicted pod: the redelivery finds it terminating, not gone. Its
    # Deployment's note names this action and this very pod, so the eviction was this
    # action's: it counts once and is verified, not a 'duplicate' ("already terminating").
    first, _bus, c = rig
    victim = c.add_finalizer("shop", "checkout-a", "example.com/hold")
    first.after_apply = killed
    a = act("restart_pod", Target(kind="Pod", namespace="shop", name="checkout-a"))
    with pytest.raises(Killed):
        await first.on_action(a)
    held = c.pod("shop", "checkout-a")
    assert held is not None and held.terminating and held.uid == victim.uid
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == {"uid": victim.uid} and a.id in ex.history
        assert (await ex.on_action(a)).status == "duplicate"  # once
        await bus.wait_for(lambda b: len(b.results(a.id)) == 3, 5, "its verification")
        assert bus.results(a.id)[-1].outcome == "healed", bus.results(a.id)[-1].message
        # Another action's restart of a pod someone else is deleting has nothing to do.
        other = await ex.on_action(act("restart_pod", a.target, action_id="p2"))
        assert other.status == "duplicate" and "already terminating" in other.message
    finally:
        await ex.stop()
    c.remove_finalizer("shop", "checkout-a", "example.com/hold")
    assert c.pod("shop", "checkout-a") is None


async def test_a_pod_restart_noted_but_never_evicted_is_evicted_by_its_redelivery(
    rig: Any,
) -> None:
    # A delivery that noted the eviction on the Deployment and died before evicting: the
    # note names a pod still there, so it is not taken for done; the redelivery evicts it,
    # once, and a later one finds it gone and the note now true.
    ex, bus, c = rig
    victim = c.pod("shop", "checkout-a")
    assert victim is not None
    a = act("restart_pod", Target(kind="Pod", namespace="shop", name="checkout-a"))
    c.annotate(CHECKOUT, EVICTED_PODS_ANNOTATION, f"{a.id}={victim.uid}")
    r = await ex.on_action(a)
    assert r.status == "succeeded" and "evicted" in r.message, r.message
    assert "stopped before its result" not in r.message
    assert c.pod("shop", "checkout-a") is None
    again = Executor(cfg(), bus=MemoryBus(), cluster=c, metrics=Metrics())
    try:
        found = await again.on_action(a)
        assert found.status == "succeeded" and found.prior_state == {"uid": victim.uid}
    finally:
        await again.stop()
    await bus.wait_for(lambda b: len(b.results(a.id)) == 2, 5, "its verification")
    assert bus.results(a.id)[-1].outcome == "healed", bus.results(a.id)[-1].message


def db(c: FakeCluster) -> Target:
    c.create_workload("StatefulSet", "shop", "db", image="v1", replicas=3, at=at(0))
    return Target(kind="StatefulSet", namespace="shop", name="db")


async def replicas_of(c: FakeCluster, t: Target) -> int:
    return (await c.workload(t)).replicas


# What each action type changes, as a reading of the cluster: (the action, its reading).
CRASHED: dict[str, tuple[Any, Any]] = {
    "scale_up": (
        lambda c: act("scale_up", action_id="w1", params={"replicas": "+2"}),
        lambda c: replicas_of(c, CHECKOUT),
    ),
    "scale_down_statefulset": (
        lambda c: act("scale_down", db(c), action_id="w1", params={"replicas": "-1"}),
        lambda c: replicas_of(c, Target(kind="StatefulSet", namespace="shop", name="db")),
    ),
    "rollback": (
        lambda c: act("rollback", action_id="w1"),
        lambda c: _image(c),
    ),
    "update_config": (
        lambda c: act("update_config", CM, action_id="w1", params={"key": "mode", "value": "x"}),
        lambda c: _data(c),
    ),
    "update_config_new_key": (
        lambda c: act("update_config", CM, action_id="w1", params={"key": "new", "value": "x"}),
        lambda c: _data(c),
    ),
    "cordon_node": (
        lambda c: act("cordon_node", NODE, action_id="w1"),
        lambda c: _unschedulable(c),
    ),
}


async def _image(c: FakeCluster) -> str:
    return (await c.workload(CHECKOUT)).image


async def _data(c: FakeCluster) -> dict[str, str]:
    return dict(c.config_map("shop", "flags").data)


async def _unschedulable(c: FakeCluster) -> bool:
    return c.node("n1").unschedulable


@pytest.mark.parametrize("case", sorted(CRASHED))
async def test_an_action_whose_delivery_died_before_its_result_can_be_undone(
    rig: Any, case: str
) -> None:
    # Its executor died after the cluster write: the redelivery finds the id on the target,
    # and the prior state that write noted there, so the result it records can be undone.
    first, _bus, c = rig
    make, reading = CRASHED[case]
    a = make(c)
    before = await reading(c)
    applied: list[Any] = []

    def dies(_action: ActionRequest, effect: Any) -> None:
        applied.append(effect)
        raise Killed

    first.settings = cfg(require_approval=[])
    first.after_apply = dies
    with pytest.raises(Killed):
        await first.on_action(a)
    changed = await reading(c)
    assert changed != before
    bus = MemoryBus()
    ex = Executor(cfg(require_approval=[]), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result" in r.message
        assert r.prior_state == applied[0].prior_state != {}
        assert await reading(c) == changed  # not done twice
        undo = undo_request(r, requested_by="bob", now=utcnow())
        assert unknown_undo(undo, ex.prior_states) is None  # a recorded prior state
        done = await ex.on_action(undo)
        assert done.status == "succeeded", done.message
        assert await reading(c) == before
    finally:
        await ex.stop()


async def _crash(ex: Executor, a: ActionRequest) -> Any:
    """``a`` applied by ``ex``, whose process then dies before the result: the Effect."""
    applied: list[Any] = []

    def dies(_action: ActionRequest, effect: Any) -> None:
        applied.append(effect)
        raise Killed

    ex.after_apply = dies
    with pytest.raises(Killed):
        await ex.on_action(a)
    return applied[0]


def _escalated(bus: MemoryBus) -> list[str]:
    return [e.reason for e, _ in bus.on("escalations")]


@pytest.mark.parametrize(
    ("replicas", "bounds"),
    [("6", {}), ("+2", {"max_replicas": 6})],
    ids=["absolute", "relative_at_the_bound"],
)
async def test_a_scale_whose_delivery_died_is_not_judged_by_the_count_it_made(
    rig: Any, replicas: str, bounds: dict[str, Any]
) -> None:
    # 4 -> 6, then the executor died. Judged again, a scale_up to 6 (or +2, clamped to 6)
    # of the 6 replicas it made is "not up": denied before the adapter saw its id, so never
    # recorded, its prior state never read, and a person paged for a scale that ran.
    first, _bus, c = rig
    first.settings = cfg(**bounds)
    a = act("scale_up", action_id="s1", params={"replicas": replicas})
    effect = await _crash(first, a)
    assert await replicas_of(c, CHECKOUT) == 6
    bus = MemoryBus()
    ex = Executor(cfg(**bounds), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert "by a delivery that stopped before its result [already_applied]" in r.message
        assert r.prior_state == effect.prior_state == {"replicas": 4}
        assert await replicas_of(c, CHECKOUT) == 6  # not scaled twice
        assert "s1" in ex.history and "denied" not in _escalated(bus)
        await bus.wait_for(lambda b: len(b.results("s1")) == 2, 5, "its verification")
    finally:
        await ex.stop()


def _learn_other(target: Target) -> Any:
    async def since(ex: Executor, _c: FakeCluster) -> None:
        r = replace(_result(), action_id="other-1", target=target, started_at=utcnow())
        await ex.on_results([Envelope(ex.bus.topic("action-results"), 0, 0, "k", r)])

    return since


async def _budget_holds_down(_ex: Executor, c: FakeCluster) -> None:
    # The restart's own rollout holds the budget down.
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=0)


async def _other_node_cordoned(_ex: Executor, c: FakeCluster) -> None:
    await c.cordon(Target(kind="Node", name="n2"), action_id="someone")


async def _incident_healed(ex: Executor, _c: FakeCluster) -> None:
    ex.on_incident(_incident("resolved"))


async def _kill_switch(ex: Executor, _c: FakeCluster) -> None:
    ex.switches = lambda: Switches(kill_switch=True)


async def _dry_run(ex: Executor, _c: FakeCluster) -> None:
    ex.switches = lambda: Switches(dry_run=True)


CART = Target(kind="Deployment", namespace="shop", name="cart")
# What happens between a delivery that acted and died and its redelivery, under which
# settings, and the rule that judged the redelivery as if it had never run.
SINCE: dict[str, tuple[str, dict[str, Any], Any]] = {
    "cooldown": ("restart_workload", {"cooldown": "10m"}, _learn_other(CHECKOUT)),
    "max_actions_per_hour": ("restart_workload", {"max_actions_per_hour": 1}, _learn_other(CART)),
    "max_actions_per_namespace_per_hour": (
        "restart_workload",
        {"max_actions_per_namespace_per_hour": 1},
        _learn_other(CART),
    ),
    "pod_disruption_budget": ("restart_workload", {}, _budget_holds_down),
    "max_nodes_cordoned": ("cordon_node", {"max_nodes_cordoned": 1}, _other_node_cordoned),
    "incident_closed": ("restart_workload", {}, _incident_healed),
    "kill_switch": ("restart_workload", {}, _kill_switch),
    "dry_run": ("rollback", {}, _dry_run),
}


@pytest.mark.parametrize("rule", sorted(SINCE))
async def test_an_action_whose_delivery_died_is_not_judged_by_what_came_after(
    rig: Any, rule: str
) -> None:
    first, _bus, c = rig
    type_, settings, since = SINCE[rule]
    a = act(type_, NODE if type_ == "cordon_node" else CHECKOUT, action_id="a1")
    first.settings = cfg(**settings)
    effect = await _crash(first, a)
    before = (await c.workload(CHECKOUT), c.node("n1"))
    bus = MemoryBus()
    ex = Executor(cfg(**settings), bus=bus, cluster=c, metrics=Metrics())
    try:
        await since(ex, c)
        r = await ex.on_action(a)
        # It ran: recorded as it ran, counted, undoable; nothing done twice, nobody paged.
        assert (r.status, r.prior_state) == ("succeeded", effect.prior_state), r.message
        assert rule not in r.message
        assert "a1" in ex.history and "denied" not in _escalated(bus)
        assert (await c.workload(CHECKOUT), c.node("n1")) == before
    finally:
        await ex.stop()


async def test_another_actions_id_on_the_target_does_not_let_one_through(rig: Any) -> None:
    # Only an action's own id makes it "already applied": the kill switch and the limits
    # hold everything else.
    first, _bus, c = rig
    await _crash(first, act("restart_workload", action_id="r1"))
    ex = Executor(cfg(), bus=MemoryBus(), cluster=c, metrics=Metrics())
    try:
        ex.switches = lambda: Switches(kill_switch=True)
        generation = (await c.workload(CHECKOUT)).generation
        r = await ex.on_action(act("restart_workload", action_id="r2"))
        assert r.status == "denied" and r.message.startswith("kill_switch"), r.message
        ex.switches = lambda: Switches(dry_run=True)
        assert (await ex.on_action(act("rollback", action_id="b1"))).status == "dry_run"
        assert (await c.workload(CHECKOUT)).generation == generation
    finally:
        await ex.stop()


async def test_a_restart_whose_delivery_died_records_what_it_restarted(rig: Any) -> None:
    # A restart has nothing to go back to, but its result records the generation it moved
    # on from, as one whose delivery did not die.
    first, _bus, c = rig
    applied: list[Any] = []

    def dies(_action: ActionRequest, effect: Any) -> None:
        applied.append(effect)
        raise Killed

    first.after_apply = dies
    a = act("restart_workload", action_id="r1")
    with pytest.raises(Killed):
        await first.on_action(a)
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded", r.message
        assert r.prior_state == applied[0].prior_state == {"generation": 2}
        with pytest.raises(PermanentError, match="cannot be undone"):
            undo_request(r, requested_by="bob", now=utcnow())
    finally:
        await ex.stop()


async def test_a_restarted_statefulset_pod_back_under_its_name_is_healed(rig: Any) -> None:
    ex, bus, c = rig
    c.add_pod("shop", "db-0", node="n2", workload="db", owner="StatefulSet")
    ex.after_apply = lambda _a, _e: c.add_pod(  # the StatefulSet is quick
        "shop", "db-0", node="n2", workload="db", owner="StatefulSet"
    )
    a = act("restart_pod", Target(kind="Pod", namespace="shop", name="db-0"), action_id="p1")
    assert (await ex.on_action(a)).status == "succeeded"
    await bus.wait_for(lambda b: len(b.results("p1")) == 2, 5, "its verification")
    assert bus.results("p1")[-1].outcome == "healed", bus.results("p1")[-1].message


async def test_an_action_with_nothing_to_do_is_not_counted_as_executed(rig: Any) -> None:
    ex, bus, _c = rig
    gone = Target(kind="Pod", namespace="shop", name="checkout-gone")
    r = await ex.on_action(act("restart_pod", gone, action_id="p1"))
    assert r.status == "duplicate" and "already gone" in r.message
    assert "p1" not in ex.history
    assert len(bus.results("p1")) == 1


async def test_scale_is_clamped_to_the_policy_bounds(rig: Any) -> None:
    ex, _bus, c = rig
    ex.settings = cfg(max_replicas=5)
    await ex.on_action(act("scale_up", action_id="s1", params={"replicas": "+4"}))
    assert (await c.workload(CHECKOUT)).replicas == 5
    denied = await ex.on_action(act("scale_up", action_id="s2"))
    assert (denied.status, denied.message.split(":")[0]) == ("denied", "replica_bounds")


async def test_a_scale_is_never_clamped_against_its_direction(rig: Any) -> None:
    # A workload already above max_replicas (scaled by hand, or before the limit was
    # lowered): clamping its scale_up to the bound would cut 80 replicas to 50.
    ex, _bus, c = rig
    c.create_deployment("shop", "big", image="v1", replicas=80, at=at(0))
    big = Target(kind="Deployment", namespace="shop", name="big")
    up = await ex.on_action(act("scale_up", big, action_id="u1", params={"replicas": "+1"}))
    assert (up.status, up.message.split(":")[0]) == ("denied", "replica_bounds")
    assert "80 replicas now" in up.message and "1..50" in up.message
    assert (await c.workload(big)).replicas == 80
    # Mirror: below min_replicas, a scale_down must not scale up.
    ex.settings = cfg(min_replicas=6)
    down = await ex.on_action(act("scale_down", action_id="d1", approved_by="alice"))
    assert (down.status, down.message.split(":")[0]) == ("denied", "replica_bounds")
    assert "4 replicas now" in down.message and "6..50" in down.message
    assert (await c.workload(CHECKOUT)).replicas == 4


async def test_an_absolute_count_must_move_the_scale_its_way_by_at_most_the_step(
    rig: Any,
) -> None:
    # An LLM answer (prompt-injectable through log text) asking scale_up "1" of a
    # 20-replica Deployment, or "50" of a 2-replica one, at full confidence.
    ex, _bus, c = rig
    c.create_deployment("shop", "wide", image="v1", replicas=20, at=at(0))
    c.create_deployment("shop", "thin", image="v1", replicas=2, at=at(0))
    for name, asked, now in (("wide", "1", 20), ("thin", "50", 2)):
        t = Target(kind="Deployment", namespace="shop", name=name)
        r = await ex.on_action(act("scale_up", t, action_id=name, params={"replicas": asked}))
        assert (r.status, r.message.split(":")[0]) == ("denied", "replica_bounds"), r.message
        assert "not up by 1..5" in r.message
        assert (await c.workload(t)).replicas == now
    ok = await ex.on_action(act("scale_up", action_id="ok", params={"replicas": "9"}))
    assert ok.status == "succeeded" and (await c.workload(CHECKOUT)).replicas == 9


async def test_blast_radius_reads_the_cluster_and_denies(rig: Any) -> None:
    ex, _bus, c = rig
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=0)
    denied = await ex.on_action(act("restart_workload", action_id="r1"))
    assert denied.status == "denied"
    assert "pod_disruption_budget" in denied.message and "shop/checkout-pdb" in denied.message
    await ex.on_action(act("cordon_node", NODE, action_id="c1"))
    second = await ex.on_action(act("cordon_node", Target(kind="Node", name="n2"), action_id="c2"))
    assert second.status == "denied" and "max_nodes_cordoned" in second.message


# What happens between a drain that finished and died before its result and its
# redelivery: each would deny it, judged as if it had never run.
DRAIN_SINCE: dict[str, tuple[dict[str, Any], Any]] = {
    "cooldown": ({"cooldown": "10m"}, _learn_other(NODE)),
    "max_nodes_cordoned": ({"max_nodes_cordoned": 1}, _other_node_cordoned),
    "incident_closed": ({}, _incident_healed),
    "kill_switch": ({}, _kill_switch),
}


@pytest.mark.parametrize("rule", sorted(DRAIN_SINCE))
async def test_a_drain_whose_delivery_died_after_it_finished_is_not_judged_again(
    rig: Any, rule: str
) -> None:
    first, _bus, c = rig
    settings, since = DRAIN_SINCE[rule]
    a = act("drain_node", NODE, action_id="d1")
    first.settings = cfg(**settings)
    effect = await _crash(first, a)
    assert effect.applied and c.pod("shop", "checkout-a") is None
    before = c.node("n1")
    bus = MemoryBus()
    ex = Executor(cfg(**settings), bus=bus, cluster=c, metrics=Metrics())
    try:
        await since(ex, c)
        r = await ex.on_action(a)
        assert (r.status, r.prior_state) == ("succeeded", {"unschedulable": False}), r.message
        assert r.message.endswith("[already_applied]") and rule not in r.message
        assert "d1" in ex.history and "denied" not in _escalated(bus)
        assert c.node("n1") == before
    finally:
        await ex.stop()


async def test_a_drain_cut_half_way_is_finished_by_its_redelivery_then_recorded_once(
    rig: Any,
) -> None:
    first, _bus, c = rig
    c.add_pod("shop", "checkout-b", node="n1", workload="checkout")
    a = act("drain_node", NODE, action_id="d1")
    # The first delivery evicted one pod and died: the id is on the node with the cordon.
    stops = iter([None, "a dead executor"])
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            NODE, action_id="d1", grace_period=None, drain_timeout=60, stop=lambda: next(stops)
        )
    assert [c.pod("shop", p) is None for p in ("checkout-a", "checkout-b")] == [True, False]
    # Its redelivery is no "already applied": it evicts the pod left (and dies in turn).
    resumed = await _crash(first, a)
    assert resumed.applied and "resumed, evicted 1 pods (shop/checkout-b)" in resumed.message
    assert c.pod("shop", "checkout-b") is None and c.pod("shop", "agent-x") is not None
    # The next, with another node cordoned since, finds the drain done: recorded once,
    # not denied by max_nodes_cordoned, verified, and undoable.
    await _other_node_cordoned(first, c)
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert (r.status, r.prior_state) == ("succeeded", {"unschedulable": False}), r.message
        assert "by a delivery that stopped before its result [already_applied]" in r.message
        assert (await ex.on_action(a)).status == "duplicate"
        await bus.wait_for(lambda b: succeeded(b, "d1") == 2, 5, "the drain's verification")
        assert bus.results("d1")[-1].outcome == "healed"
        assert [x.status for x in bus.results("d1")] == ["succeeded", "duplicate", "succeeded"]
        assert "denied" not in _escalated(bus)
        n2 = Target(kind="Node", name="n2")
        await c.undo(n2, action_id="someone-undo", action_type="cordon_node", prior={})
        undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
        assert undo.status == "succeeded", undo.message
        assert not c.node("n1").unschedulable
    finally:
        await ex.stop()


async def test_a_drain_whose_evicted_pods_still_terminate_is_not_recorded_as_applied(
    rig: Any,
) -> None:
    # The first delivery evicted both pods and died while checkout-b still terminated.
    # Its redelivery waits for it, as the first would have, instead of recording a drain
    # done on a node a pod still runs on.
    _ex, _bus, c = rig
    c.add_pod("shop", "checkout-b", node="n1", workload="checkout")
    a = act("drain_node", NODE, action_id="d1")
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            NODE, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    c.terminate("shop", "checkout-b")
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "failed" and "still terminating" in r.message, r.message
        assert r.prior_state == {"unschedulable": False}
    finally:
        await ex.stop()
    c.remove_pod("shop", "checkout-b")  # its kubelet confirmed the end
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(a)
        assert r.status == "succeeded" and r.message.endswith("[already_applied]"), r.message
    finally:
        await ex.stop()


class _SwitchedMidDrain(FakeCluster):
    """Runs ``after_first_eviction`` once, between a drain's first and second eviction:
    an operator flipping a switch while the drain is under way."""

    after_first_eviction: Any = None

    def _evict(self, pod: Any) -> bool:
        held = super()._evict(pod)
        if self.after_first_eviction is not None:
            hook, self.after_first_eviction = self.after_first_eviction, None
            hook()
        return held


@pytest.mark.parametrize("switch", ["dry_run", "kill_switch"])
async def test_a_switch_turned_on_mid_drain_stops_it_cordoned_and_pages_what_is_left(
    switch: str,
) -> None:
    from agent.policy import switches_for

    c = cluster(_SwitchedMidDrain)
    assert isinstance(c, _SwitchedMidDrain)
    for name in ("checkout-b", "checkout-c"):
        c.add_pod("shop", name, node="n1", workload="checkout")
    bus = MemoryBus()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())

    def flip() -> None:  # `sre-agent switches dry-run on`, as the topic reader saw it
        ex.switches = lambda: switches_for([_switch(switch, True)], "")

    c.after_first_eviction = flip
    try:
        r = await ex.on_action(act("drain_node", NODE, action_id="d1"))
    finally:
        await ex.stop()
    what = (
        "shadow mode (dry run: turned on" if switch == "dry_run" else "the kill switch (turned on"
    )
    assert r.status == "failed" and f"stopped by {what} by alice" in r.message, r.message
    assert "before evicting shop/checkout-b, shop/checkout-c" in r.message, r.message
    assert "Evicted: shop/checkout-a. The node is left cordoned." in r.message, r.message
    assert r.prior_state == {"unschedulable": False}  # undoable: the cordon is known
    assert c.node("n1").unschedulable
    assert [c.pod("shop", p) is None for p in ("checkout-a", "checkout-b", "checkout-c")] == [
        True,
        False,
        False,
    ]
    (page,) = [e for e, _ in bus.on("escalations")]
    assert page.reason == "action_failed" and page.details[0].startswith("failed half-way: ")


def _stop_after(evictions: int) -> Any:
    """A drain's stop check that halts it after ``evictions``: its executor died there."""
    calls = iter(range(evictions + 1))
    return lambda: None if next(calls, evictions) < evictions else "a dead executor"


@pytest.mark.parametrize("type_", ["drain_node", "cordon_node"])
async def test_the_undo_of_a_drain_or_cordon_is_not_denied_for_another_node_cordoned(
    rig: Any, type_: str
) -> None:
    # max_nodes_cordoned: 1, and n2 cordoned since: the undo uncordons n1, which leaves
    # fewer nodes cordoned, never more. It was denied as if it cordoned a second node.
    ex, bus, c = rig
    r = await ex.on_action(act(type_, NODE, action_id="d1"))
    assert r.status == "succeeded" and c.node("n1").unschedulable
    await _other_node_cordoned(ex, c)
    undo = await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
    assert undo.status == "succeeded", undo.message
    assert "[approved]" in undo.message
    assert not c.node("n1").unschedulable and c.node("n2").unschedulable
    assert "denied" not in _escalated(bus)


async def test_facts_are_not_read_for_a_denied_action(rig: Any) -> None:
    ex, _bus, _c = rig
    ex.switches = lambda: Switches(kill_switch=True)
    missing = act("restart_workload", Target(kind="Deployment", namespace="shop", name="gone"))
    r = await ex.on_action(missing)
    assert (r.status, r.message.split(":")[0]) == ("denied", "kill_switch")


async def test_dry_run_records_what_would_have_happened(rig: Any) -> None:
    ex, _bus, c = rig
    ex.switches = lambda: Switches(dry_run=True)
    r = await ex.on_action(act("rollback", action_id="d1"))
    assert r.status == "dry_run" and r.message.startswith("would have executed rollback")
    assert (await c.workload(CHECKOUT)).image == "v2"


async def test_a_drain_blocked_by_a_budget_fails_naming_it_and_can_be_undone(rig: Any) -> None:
    ex, _bus, c = rig
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=0)
    r = await ex.on_action(act("drain_node", NODE, action_id="d1"))
    assert r.status == "failed"
    assert "pod shop/checkout-a blocked by PodDisruptionBudget shop/checkout-pdb" in r.message
    assert "left cordoned" in r.message
    assert r.prior_state == {"unschedulable": False}
    undo = undo_request(r, requested_by="bob", now=utcnow())
    assert (await ex.on_action(undo)).status == "succeeded"
    assert not c.node("n1").unschedulable


async def test_a_drain_asked_again_after_a_budget_stopped_it_finishes_and_is_verified(
    rig: Any,
) -> None:
    ex, bus, c = rig
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=0)
    d = act("drain_node", NODE, action_id="d1")
    assert (await ex.on_action(d)).status == "failed"
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=1)
    again = await ex.on_action(d)
    assert again.status == "succeeded", again.message
    assert again.prior_state == {"unschedulable": False}
    assert c.pod("shop", "checkout-a") is None
    await bus.wait_for(lambda b: len(b.results("d1")) == 3, 5, "the drain's verification")
    assert bus.results("d1")[-1].outcome == "healed"


async def test_a_failed_action_is_escalated_once_under_a_stable_id(rig: Any) -> None:
    ex, bus, c = rig
    c.add_budget("shop", "checkout-pdb", workload="checkout", disruptions_allowed=0)
    await ex.on_action(replace(act("drain_node", NODE, action_id="d1"), severity="critical"))
    (escalation,) = [e for e, _ in bus.on("escalations")]
    assert isinstance(escalation, Escalation)
    assert (escalation.reason, escalation.action_id) == ("action_failed", "d1")
    assert escalation.severity == "critical"  # the request's, for routing
    assert escalation.summary == "drain_node on Node//n1: action failed"
    assert "blocked by PodDisruptionBudget shop/checkout-pdb" in escalation.details[0]
    assert escalation.id == stable_id("escalation", "d1", "action_failed")
    assert ex.metrics.escalations.labels(reason="action_failed")._value.get() == 1


async def test_a_drain_asking_for_more_than_the_configured_timeout_never_starts(rig: Any) -> None:
    ex, bus, c = rig
    r = await ex.on_action(act("drain_node", NODE, action_id="d1", params={"timeout": 86_400}))
    assert (r.status, r.outcome) == ("denied", "not_applicable")
    assert "params.timeout: 86400s is outside (0, remediation.drain_timeout=120s]" in r.message
    assert not c.node("n1").unschedulable
    assert bus.results("d1") == [r]


async def test_bad_params_that_bypass_the_policy_fail_before_the_cluster(rig: Any) -> None:
    ex, _bus, c = rig
    with pytest.raises(ActionFailed, match=r"params\.revision"):
        await ex._apply(act("rollback", params={"revision": "HEAD~1"}), utcnow())
    with pytest.raises(ActionFailed, match=r"params\.grace_period"):
        await ex._apply(act("drain_node", NODE, params={"grace_period": 0}), utcnow())
    assert (await c.workload(CHECKOUT)).image == "v2"
    assert not c.node("n1").unschedulable


async def test_undo_restores_each_prior_state_once(rig: Any) -> None:
    ex, bus, c = rig
    done = [
        await ex.on_action(act("scale_up", action_id="s1", params={"replicas": "+1"})),
        await ex.on_action(act("cordon_node", NODE, action_id="c1")),
    ]
    config = act("update_config", CM, action_id="u1", params={"key": "new", "value": "1"})
    await ex.on_decision(decision(await requested(ex, bus, config)))
    done.append(bus.results("u1")[-1])
    for r in done:
        undo = undo_request(r, requested_by="bob", now=utcnow(), reason="bad idea")
        assert undo.params["undo_of"] == r.action_id and undo.approved_by == "bob"
        assert (await ex.on_action(undo)).status == "succeeded"
        assert (await ex.on_action(undo)).status == "duplicate"
    assert (await c.workload(CHECKOUT)).replicas == 4
    assert not c.node("n1").unschedulable
    assert c.config_map("shop", "flags").data == {"mode": "fast"}


async def test_undo_of_a_rollback_goes_back_to_the_prior_revision(rig: Any) -> None:
    ex, _bus, c = rig
    r = await ex.on_action(act("rollback", action_id="rb"))
    assert (await c.workload(CHECKOUT)).image == "v1"
    await ex.on_action(undo_request(r, requested_by="bob", now=utcnow()))
    assert (await c.workload(CHECKOUT)).image == "v2"


async def test_an_approval_claimed_in_a_request_is_not_honoured(rig: Any) -> None:
    # Only the approvals and decisions topics approve: a request on the actions topic that
    # says approved_by (a writer of the topic, an upstream bug) is decided as unapproved.
    ex, bus, c = rig
    claimed = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "x"})
    req = await requested(ex, bus, replace(claimed, approved_by="mallory"))
    assert "approved_by 'mallory' not honoured" in bus.results("u1")[0].message
    assert req.action.approved_by is None
    assert c.config_map("shop", "flags").data == {"mode": "fast"}
    # Supervised: executing would have needed the claim.
    ex.settings = make_settings({"agent": {"mode": "supervised"}, "remediation": {"cooldown": 0}})
    r = await ex.on_action(act("scale_up", action_id="s1", approved_by="mallory"))
    assert r.status == "pending_approval" and "supervised mode" in r.message, r.message
    assert (await c.workload(CHECKOUT)).replicas == 4
    # The request's own decision still executes it.
    await ex.on_decision(decision(req))
    assert c.config_map("shop", "flags").data == {"mode": "x"}


async def test_an_undo_keeps_its_approval_only_for_a_prior_state_it_restores(rig: Any) -> None:
    ex, bus, c = rig
    scaled = await ex.on_action(act("scale_up", action_id="s1", params={"replicas": "+1"}))
    ex.settings = cfg(require_approval=["scale_up"])
    forged = undo_request(
        replace(scaled, prior_state={"replicas": 7}), requested_by="m", now=utcnow()
    )
    r = await ex.on_action(forged)
    assert r.status == "pending_approval" and "not honoured" in r.message, r.message
    assert "does not restore the prior state action s1 recorded" in r.message
    assert (await c.workload(CHECKOUT)).replicas == 5
    # Without a claim of approval it is no undo anyone asked for either: a person decides,
    # in autonomous mode too.
    ex.settings = cfg()
    unclaimed = await ex.on_action(replace(forged, approved_by=None, id="forged-2"))
    assert unclaimed.status == "pending_approval", unclaimed.message
    assert "does not restore the prior state action s1 recorded" in unclaimed.message
    assert (await c.workload(CHECKOUT)).replicas == 5
    # Another replica (or this one restarted) learns the prior state from the results.
    other = Executor(ex.settings, bus=bus, cluster=c, metrics=Metrics())
    topic = bus.topic("action-results")
    await other.on_results([Envelope(topic, 0, 0, "k", scaled)])
    undo = undo_request(scaled, requested_by="bob", now=utcnow())
    assert (await other.on_action(undo)).status == "succeeded"
    assert (await c.workload(CHECKOUT)).replicas == 4


async def test_a_forged_undo_approved_by_a_person_is_held_to_the_replica_bounds(
    rig: Any,
) -> None:
    # Anyone who can write to the actions topic can ask to "undo" an action to any count.
    # Restoring no recorded prior state, it has none of an undo's exemptions, so an
    # approval (a person's click, or the approved_by it claims) never lifts max_replicas.
    ex, bus, c = rig
    ex.settings = cfg(max_replicas=8)
    scaled = await ex.on_action(act("scale_up", action_id="s1", params={"replicas": "+1"}))
    assert (await c.workload(CHECKOUT)).replicas == 5
    forged = undo_request(
        replace(scaled, prior_state={"replicas": 500}), requested_by="m", now=utcnow()
    )
    r = await ex.on_action(forged)
    assert r.status == "denied", r.message
    assert "params.replicas: 500 is outside the policy bounds 1..8" in r.message
    # One the bounds allowed when asked for, approved once an operator tightened them.
    req = await requested(
        ex,
        bus,
        undo_request(
            replace(scaled, action_id="s2", prior_state={"replicas": 7}),
            requested_by="m",
            now=utcnow(),
        ),
    )
    ex.settings = cfg(max_replicas=6)
    await ex.on_decision(decision(req))
    last = bus.results(req.action.id)[-1]
    assert last.status == "denied", last.message
    assert "params.replicas: 7 is outside the policy bounds 1..6 (min_replicas" in last.message
    assert (await c.workload(CHECKOUT)).replicas == 5


def test_restarts_cannot_be_undone() -> None:
    r = replace(_result(), type="restart_workload", prior_state={"generation": 3})
    with pytest.raises(PermanentError, match="cannot be undone"):
        undo_request(r, requested_by="bob", now=at(0))
    with pytest.raises(PermanentError, match="no prior state"):
        undo_request(replace(_result(), prior_state={}), requested_by="bob", now=at(0))


def test_the_undoable_result_is_found_by_action_or_result_id() -> None:
    first = _result()
    verified = replace(first, id="res-2", outcome="healed")
    denied = replace(first, id="res-3", action_id="other", prior_state={})
    assert undoable_result([first, verified, denied], first.action_id) == verified
    assert undoable_result([first, verified], "res-2") == verified
    assert undoable_result([denied], "other") is None


def _result() -> Any:
    from agent.models import ActionResult

    return ActionResult(
        id="res-1",
        action_id="s1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        type="scale_up",
        target=CHECKOUT,
        status="succeeded",
        outcome="unknown",
        message="scaled",
        started_at=at(0),
        finished_at=at(1),
        prior_state={"replicas": 2},
    )


# --- approvals -----------------------------------------------------------------------------------


def decision(req: ApprovalRequest, verdict: str = "approve", **kw: Any) -> ApprovalDecision:
    base: dict[str, Any] = {
        "id": f"d-{req.id[:6]}",
        "request_id": req.id,
        "action_hash": req.action_hash,
        "decision": verdict,
        "decided_by": "alice",
        "decided_at": utcnow(),
    }
    return ApprovalDecision(**{**base, **kw})


async def requested(ex: Executor, bus: MemoryBus, a: ActionRequest) -> ApprovalRequest:
    r = await ex.on_action(a)
    assert r.status == "pending_approval", r.message
    return bus.approvals()[-1]


async def test_an_approved_action_executes_and_the_request_is_tombstoned_after(rig: Any) -> None:
    ex, bus, _c = rig
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    assert req.target_version == "resourceVersion=1"
    await ex.on_decision(decision(req))
    statuses = [r.status for r in bus.results("u1")]
    assert statuses[:2] == ["pending_approval", "succeeded"]
    assert "[approved]" in bus.results("u1")[1].message
    assert bus.tombstones() == [req.id]
    # the tombstone comes after the result
    kinds = [type(e).__name__ if e is not None else "tombstone" for _, e, _ in bus.sent]
    assert kinds.index("tombstone") > kinds.index("ActionResult", 1)
    assert req.id not in ex.pending


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        ({"request_id": "nope"}, "unknown approval request nope"),
        ({"action_hash": "f" * 32}, "does not match request"),
    ],
)
async def test_forged_decisions_are_dead_lettered_with_the_reason(
    rig: Any, forge: dict[str, str], reason: str
) -> None:
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    await ex.on_decision(decision(req, **forge))
    assert len(bus.letters) == 1 and reason in bus.letters[0]
    assert "by alice refused" in bus.letters[0]
    assert req.id in ex.pending and c.config_map("shop", "flags").data == {"mode": "fast"}


async def test_a_decision_for_an_earlier_request_does_not_approve_the_same_action_asked_again(
    rig: Any,
) -> None:
    # Approved after its request expired: rejected, tombstoned. The incident goes on and
    # the same action is asked again: the new request has the same id and hash. The old
    # decision, redelivered (its executor died before committing it) or replayed, approved
    # the new request nobody had seen, and the action executed.
    ex, bus, c = rig
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    ex.pending[req.id] = replace(req, expires_at=utcnow() - timedelta(seconds=1))
    late = decision(req)
    await ex.on_decision(late)
    assert bus.results("u1")[-1].status == "rejected" and req.id not in ex.pending
    again = await requested(ex, bus, a)
    assert (again.id, again.action_hash) == (req.id, req.action_hash)
    assert again.created_at > late.decided_at
    await ex.on_decision(late)
    assert c.config_map("shop", "flags").data == {"mode": "fast"}
    assert bus.results("u1")[-1].status == "pending_approval"
    assert len(bus.letters) == 1 and "it is for an earlier request" in bus.letters[0]
    assert again.id in ex.pending
    await ex.on_decision(decision(again))  # a decision for the new request stands
    assert c.config_map("shop", "flags").data == {"mode": "safe"}
    assert bus.results("u1")[-1].status == "succeeded"


class _AnswerLost(FakeCluster):
    """A cluster whose restarts go through, and whose every answer to one is lost."""

    async def restart(self, target: Target, *, action_id: str, at: datetime) -> Any:
        await super().restart(target, action_id=action_id, at=at)
        raise TransientError(f"{target.key}: timed out waiting for the answer", retry_after=0)


async def test_an_action_whose_answer_was_lost_is_recorded_as_the_success_it_was() -> None:
    # The restart went through on the first attempt; every answer timed out. It was
    # recorded as failed and paged, and, holding no cooldown and no verification, left
    # for the next analysis to restart again.
    bus, c = MemoryBus(), cluster(_AnswerLost)
    ex = Executor(cfg(cooldown=300), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(act("restart_workload", action_id="r1"))
        assert r.status == "succeeded", r.message
        assert "its answer was lost" in r.message and "timed out" in r.message
        assert r.prior_state == {"generation": 2}  # as the write noted it
        assert "r1" in ex.history and "action_failed" not in _escalated(bus)
        again = await ex.on_action(act("restart_workload", action_id="r2"))
        assert (again.status, again.message.split(":")[0]) == ("denied", "cooldown")
    finally:
        await ex.stop()


async def test_the_reference_success_rate_counts_executed_remediations_only(
    rig: Any, tmp_path: Path
) -> None:
    ex, bus, _c = rig
    # Two remediations, both succeeded: one after its approval, one delivered twice.
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    await ex.on_decision(decision(await requested(ex, bus, a)))
    r = act("restart_workload", action_id="r1")
    assert (await ex.on_action(r)).status == "succeeded"
    assert (await ex.on_action(r)).status == "duplicate"
    service = a.labels["service"]
    rate = reference_rules()["sre:selfhealing_success_rate"]
    (gauge,) = reference_panels()["Self-Healing Success Rate"]
    decided = f'sre_agent_remediation_decisions_total{{service="{service}"}}'
    tests = [
        {
            "expr": "sre:selfhealing_success_rate",
            "exp_samples": [
                {"labels": f'sre:selfhealing_success_rate{{service="{service}"}}', "value": 1}
            ],
        },
        {"expr": rate, "exp_samples": [{"labels": f'{{service="{service}"}}', "value": 1}]},
        {"expr": gauge, "exp_samples": [{"labels": "{}", "value": 100}]},
        {
            "expr": f"sum({decided}) by (result)",
            "exp_samples": [
                {"labels": '{result="pending_approval"}', "value": 1},
                {"labels": '{result="duplicate"}', "value": 1},
            ],
        },
    ]
    out = evaluate(ex.metrics, tests, tmp_path)
    assert out is None, out


async def test_a_dry_run_is_no_remediation_in_the_reference_success_rate(
    rig: Any, tmp_path: Path
) -> None:
    ex, _bus, _c = rig
    ex.switches = lambda: Switches(dry_run=True)
    assert (await ex.on_action(act("rollback", action_id="d1"))).status == "dry_run"
    (gauge,) = reference_panels()["Self-Healing Success Rate"]
    tests = [
        # Nothing executed: no rate at all, rather than a rate of 0 %.
        {"expr": "sre:selfhealing_success_rate", "exp_samples": []},
        {"expr": gauge, "exp_samples": []},
        {
            "expr": "sum(sre_agent_remediation_decisions_total) by (result)",
            "exp_samples": [{"labels": '{result="dry_run"}', "value": 1}],
        },
    ]
    out = evaluate(ex.metrics, tests, tmp_path)
    assert out is None, out


async def test_an_expired_approval_is_rejected_and_escalated(rig: Any) -> None:
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    ex.pending[req.id] = replace(req, expires_at=utcnow() - timedelta(seconds=1))
    await ex.on_decision(decision(req))
    last = bus.results()[-1]
    assert last.status == "rejected" and "expired" in last.message
    assert c.config_map("shop", "flags").data == {"mode": "fast"}


async def test_a_rejection_is_recorded_with_who_and_why(rig: Any) -> None:
    ex, bus, _c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    await ex.on_decision(decision(req, "reject", reason="not now"))
    assert bus.results()[-1].message == "rejected by alice: not now"
    assert bus.tombstones() == [req.id]


async def test_an_approval_for_a_changed_target_is_not_executed(rig: Any) -> None:
    ex, bus, c = rig
    req = await requested(ex, bus, act("rollback", action_id="rb", confidence=0.1))
    c.rollout("shop", "checkout", image="v3", at=at(120))  # someone else changed it
    await ex.on_decision(decision(req))
    last = bus.results("rb")[-1]
    assert last.status == "rejected"
    assert "changed since the request (generation=2 -> generation=3)" in last.message
    assert (await c.workload(CHECKOUT)).image == "v3"


async def test_an_approval_for_a_resolved_incident_is_not_executed(rig: Any) -> None:
    ex, bus, _c = rig
    req = await requested(ex, bus, act("rollback", action_id="rb", confidence=0.1))
    ex.on_incident(_incident("resolved"))
    await ex.on_decision(decision(req))
    assert "incident inc-1 is resolved or silenced" in bus.results("rb")[-1].message
    ex.on_incident(_incident("reopened"))
    assert not await ex.closed("inc-1")


def _incident(status: Any) -> Incident:
    return Incident(
        id="inc-1",
        key="c1/shop/checkout",
        status=status,
        severity="critical",
        labels={},
        members=(),
        opened_at=at(0),
        updated_at=at(1),
    )


async def test_undecided_approvals_expire_through_the_sweeper(rig: Any) -> None:
    ex, bus, _c = rig
    ex.settings = cfg(approval_ttl=0.1)
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    ex._ensure_sweeper()
    await bus.wait_for(lambda b: req.id in b.tombstones(), 5, "expiry tombstone")
    assert "expired" in bus.results()[-1].message and "escalated" in bus.results()[-1].message
    assert not ex.pending
    await ex.on_decision(decision(req))  # too late
    assert f"approval request {req.id} is closed: it expired at" in bus.letters[-1]


class Gate:
    """Holds the first caller at ``wait`` until opened, and says when one got there."""

    def __init__(self) -> None:
        self.reached, self.opened = asyncio.Event(), asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()


class GatedVersion(FakeCluster):
    """Its target version read waits at the gate, once one is set (a slow API server)."""

    gate: Gate | None = None

    async def version(self, target: Target) -> str:
        if self.gate is not None:
            await self.gate.wait()
        return await super().version(target)


class GatedResults(MemoryBus):
    """Its action results wait at the gate, once one is set (a slow broker)."""

    gate: Gate | None = None

    async def publish(self, topic_name: str, event: Any, key: str | None = None) -> None:
        if self.gate is not None and isinstance(event, ActionResult):
            await self.gate.wait()
        await super().publish(topic_name, event, key)


async def test_a_decision_just_before_the_expiry_is_the_one_outcome() -> None:
    # Approved in the last moment: while the decision reads the target, the request's
    # expiry passes and the sweeper runs. The approval was in time, so it is the outcome.
    bus, c = MemoryBus(), GatedVersion()
    c.create_config_map("shop", "flags", {"mode": "fast"})
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    c.gate = Gate()
    deciding = asyncio.create_task(ex.on_decision(decision(req)))
    await c.gate.reached.wait()
    assert await ex.sweep(req.expires_at + timedelta(seconds=1)) == []
    c.gate.opened.set()
    await deciding
    assert [r.status for r in bus.results("u1")] == ["pending_approval", "succeeded"]
    assert bus.tombstones() == [req.id]
    assert "approval_expired" not in [e.reason for e, _ in bus.on("escalations")]
    await ex.stop()


async def test_a_decision_while_the_request_expires_is_refused_not_a_second_outcome() -> None:
    bus, c = GatedResults(), cluster()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    bus.gate = Gate()
    expiring = asyncio.create_task(ex.sweep(req.expires_at + timedelta(seconds=1)))
    await bus.gate.reached.wait()
    deciding = asyncio.create_task(ex.on_decision(decision(req)))
    await bus.wait_for(lambda b: bool(b.letters), 5, "the decision refused")
    bus.gate.opened.set()
    assert [r.id for r in await expiring] == [req.id]
    await deciding
    statuses = [r.status for r in bus.results("u1")]
    assert statuses == ["pending_approval", "rejected"], statuses
    assert f"approval request {req.id} is closed: it expired" in bus.letters[-1]
    assert c.config_map("shop", "flags").data == {"mode": "fast"}
    await ex.stop()


@pytest.mark.parametrize("since", ["nothing", "expired"])
async def test_an_approved_action_whose_executor_died_is_not_rejected_as_stale(
    rig: Any, since: str
) -> None:
    # Approved, carried out, and the executor died before the result and the tombstone:
    # the decision comes again, the request still pending. Judged again, the ConfigMap's
    # version its own write moved (or an expiry passed since) rejected it as stale and
    # paged "approved, not executed" for a change that was made.
    ex, bus, c = rig
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    applied: list[Any] = []

    def dies(_action: ActionRequest, effect: Any) -> None:
        applied.append(effect)
        raise Killed

    ex.after_apply = dies
    with pytest.raises(Killed):
        await ex.on_decision(decision(req))
    assert c.config_map("shop", "flags").data == {"mode": "safe"}
    fresh = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    t = bus.topic("approvals")
    pending = req if since == "nothing" else replace(req, expires_at=utcnow() - timedelta(1))
    try:
        await fresh.on_approvals([Envelope(t, 0, 0, req.id, pending)])
        await fresh.on_decision(decision(req))
        r = bus.results("u1")[-1]
        assert (r.status, r.prior_state) == ("succeeded", applied[0].prior_state), r.message
        assert "approval_stale" not in _escalated(bus)
        assert bus.tombstones() == [req.id]
        assert "u1" in fresh.history
    finally:
        await fresh.stop()


@pytest.mark.parametrize("since", ["nothing", "expired", "kill_switch"])
async def test_an_approved_drain_whose_executor_died_half_way_is_resumed_not_stale(
    rig: Any, since: str
) -> None:
    # Approved, begun (cordoned, one pod evicted), and the executor died: the decision
    # comes again, the request still pending. Judged again, the node's version its own
    # cordon moved rejected it as stale and paged "approved, not executed" for a drain that
    # partly ran, leaving the node half drained.
    ex, bus, c = rig
    ex.settings = cfg(require_approval=["drain_node"])
    c.add_pod("shop", "checkout-b", node="n1", workload="checkout")
    a = act("drain_node", NODE, action_id="d1")
    req = await requested(ex, bus, a)
    assert req.target_version == "unschedulable=False"
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            NODE, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    assert await c.partly_applied(NODE, action_id="d1", action_type="drain_node") == (
        "node cordoned, 1 pods left (1 to evict): shop/checkout-b"
    )
    fresh = Executor(cfg(require_approval=["drain_node"]), bus=bus, cluster=c, metrics=Metrics())
    if since == "kill_switch":
        fresh.switches = lambda: Switches(kill_switch=True)
    t = bus.topic("approvals")
    pending = req if since != "expired" else replace(req, expires_at=utcnow() - timedelta(1))
    try:
        await fresh.on_approvals([Envelope(t, 0, 0, req.id, pending)])
        await fresh.on_decision(decision(req))
        r = bus.results("d1")[-1]
        assert "approval_stale" not in _escalated(bus)
        assert "resumed, partly applied: node cordoned, 1 pods left (1 to evict)" in r.message
        assert bus.tombstones() == [req.id]
        if since == "kill_switch":  # the switches hold for what is left, as for any drain
            assert r.status == "denied" and r.message.startswith("kill_switch"), r.message
            assert c.pod("shop", "checkout-b") is not None
            return
        assert (r.status, r.prior_state) == ("succeeded", {"unschedulable": False}), r.message
        assert "resumed, evicted 1 pods (shop/checkout-b)" in r.message
        assert "[approved; resumed" in r.message
        assert c.pod("shop", "checkout-b") is None and c.node("n1").unschedulable
        assert await c.partly_applied(NODE, action_id="d1", action_type="drain_node") is None
        assert "d1" in fresh.history
    finally:
        await fresh.stop()


async def _half_drained_then_requested(rig: Any) -> tuple[ActionRequest, ApprovalRequest]:
    """A drain cut half way (its executor died: cordoned, one pod left), whose redelivery
    asks for approval (drain_node requires it since)."""
    ex, bus, c = rig
    c.add_pod("shop", "checkout-b", node="n1", workload="checkout")
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            NODE, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    ex.settings = cfg(require_approval=["drain_node"])
    a = act("drain_node", NODE, action_id="d1")
    return a, await requested(ex, bus, a)


async def test_an_approval_asked_for_a_half_drained_node_says_so(rig: Any) -> None:
    # The page asking for the decision said only "drain_node requires approval": whoever
    # decided did not know the node was already cordoned with pods left on it.
    _ex, bus, _c = rig
    _a, req = await _half_drained_then_requested(rig)
    left = "partly applied: node cordoned, 1 pods left (1 to evict): shop/checkout-b"
    (page,) = [e for e, _ in bus.on("escalations") if e.reason == "approval_requested"]
    assert left in page.details[0], page.details
    assert left in req.evidence[0], req.evidence
    assert left in bus.results("d1")[-1].message


async def test_a_drain_half_done_before_its_request_is_not_resumed_by_a_late_approval(
    rig: Any,
) -> None:
    # Half drained before the request (which pinned the cordoned node), and approved after
    # the request expired: the decision was taken for the one that began the drain, and
    # resumed it, evicting pods on an expired approval. It is rejected as expired, and the
    # node left half done is paged.
    ex, bus, c = rig
    _a, req = await _half_drained_then_requested(rig)
    assert req.target_version == "unschedulable=True"
    ex.pending[req.id] = replace(req, expires_at=utcnow() - timedelta(seconds=1))
    await ex.on_decision(decision(req))
    r = bus.results("d1")[-1]
    assert r.status == "rejected" and "expired" in r.message, r.message
    assert "partly applied: node cordoned, 1 pods left" in r.message, r.message
    assert c.pod("shop", "checkout-b") is not None and c.node("n1").unschedulable
    pages = [e for e, _ in bus.on("escalations") if e.reason == "action_failed"]
    assert len(pages) == 1 and "left half done" in pages[0].details[0], pages
    assert bus.tombstones() == [req.id]


@pytest.mark.parametrize(
    ("ending", "then"),
    [
        ("expired", "approval_expired"),
        ("withdrawn", "approval_withdrawn"),
        ("rejected by alice", None),
    ],
)
async def test_an_approval_for_a_half_drained_node_that_ends_unapproved_pages_the_node(
    rig: Any, ending: str, then: str | None
) -> None:
    # Nobody approved: the request expired, was withdrawn (its incident resolved) or was
    # rejected, and its result and pages said only that. The node stays cordoned with pods
    # on it, and nothing will finish or undo that drain now.
    ex, bus, c = rig
    _a, req = await _half_drained_then_requested(rig)
    if ending == "expired":
        assert await ex.sweep(req.expires_at + timedelta(seconds=1)) == [req]
    elif ending == "withdrawn":
        ex.on_incident(_incident("resolved"))
        await ex.sweep(utcnow())
    else:
        await ex.on_decision(decision(req, "reject", reason="not now"))
    r = bus.results("d1")[-1]
    assert r.status == "rejected" and ending in r.message, r.message
    assert "partly applied: node cordoned, 1 pods left" in r.message, r.message
    reasons = [e.reason for e, _ in bus.on("escalations")]
    assert reasons == ["approval_requested", "action_failed", *([then] if then else [])], reasons
    (page,) = [e for e, _ in bus.on("escalations") if e.reason == "action_failed"]
    assert "Node n1 left half done by drain_node d1" in page.details[0], page.details
    assert c.node("n1").unschedulable and c.pod("shop", "checkout-b") is not None


@pytest.mark.parametrize("approved", [True, False], ids=["approved", "plain"])
@pytest.mark.parametrize("rule", ["kill_switch", "incident_closed"])
async def test_a_drain_left_half_done_and_stopped_by_a_rule_pages_once(
    rig: Any, approved: bool, rule: str
) -> None:
    # Cut half way (its executor died: cordoned, one of two pods evicted), then a rule stops
    # the resume, approved or a plain redelivery: the node stays cordoned with pods on it,
    # and nothing else will finish or undo that. A person must be told, once.
    from agent.notifier import payload

    ex, bus, c = rig
    ex.settings = cfg(require_approval=["drain_node"] if approved else [])
    c.add_pod("shop", "checkout-b", node="n1", workload="checkout")
    a = act("drain_node", NODE, action_id="d1")
    req = await requested(ex, bus, a) if approved else None
    with pytest.raises(PartialFailure, match="stopped by a dead executor"):
        await c.drain(
            NODE, action_id="d1", grace_period=None, drain_timeout=60, stop=_stop_after(1)
        )
    fresh = Executor(ex.settings, bus=bus, cluster=c, metrics=Metrics())
    if rule == "kill_switch":
        fresh.switches = lambda: Switches(kill_switch=True)
    else:
        fresh.on_incident(_incident("resolved"))
    try:
        if req is not None:
            await fresh.on_approvals([Envelope(bus.topic("approvals"), 0, 0, req.id, req)])
        for _ in range(2):  # the decision, or the action, comes again: one page
            await (fresh.on_decision(decision(req)) if req is not None else fresh.on_action(a))
        pages = [e for e, _ in bus.on("escalations") if e.reason != "approval_requested"]
        assert [e.reason for e in pages] == ["action_failed"], pages
        (page,) = pages
        assert page.action_id == "d1" and page.target == NODE.key
        text = orjson.loads(payload(page))["text"]
        assert "Node n1 left half done by drain_node d1" in text, text
        assert "node cordoned, 1 pods left (1 to evict): shop/checkout-b" in text, text
        assert rule in text, text
        r = bus.results("d1")[-1]
        assert r.status == "denied" and r.message.startswith(rule), r.message
        assert "partly applied: node cordoned, 1 pods left (1 to evict): shop/checkout-b" in (
            r.message
        )
        assert c.node("n1").unschedulable and c.pod("shop", "checkout-b") is not None
        if req is None:  # a restart's repeat is the same page, under the same id
            again = Executor(ex.settings, bus=bus, cluster=c, metrics=Metrics())
            again.switches, again.incidents = fresh.switches, fresh.incidents
            try:
                await again.on_action(a)
            finally:
                await again.stop()
            repeat = [e.id for e, _ in bus.on("escalations") if e.reason == "action_failed"]
            assert repeat == [page.id, page.id], repeat
    finally:
        await fresh.stop()


def test_a_drains_partial_state_names_its_pods_up_to_a_bound() -> None:
    pods = [f"shop/p{i:02}" for i in range(12)]
    assert drain_left(evictable=pods, unmanaged=[], terminating=["shop/t"]) == (
        "node cordoned, 13 pods left (12 to evict, 1 terminating): "
        + ", ".join(pods[:10])
        + " and 3 more"
    )


async def test_an_approval_whose_target_changed_otherwise_is_still_stale(rig: Any) -> None:
    # Not begun (no id on the node): someone else cordoned it since the request.
    ex, bus, c = rig
    ex.settings = cfg(require_approval=["drain_node"])
    req = await requested(ex, bus, act("drain_node", NODE, action_id="d1"))
    await c.cordon(NODE, action_id="someone")
    assert await c.partly_applied(NODE, action_id="d1", action_type="drain_node") is None
    await ex.on_decision(decision(req))
    assert bus.results("d1")[-1].status == "rejected"
    assert "approval_stale" in _escalated(bus)


async def test_only_the_replica_a_decision_would_reach_expires_the_request(rig: Any) -> None:
    """Every replica knows every pending request (the executor watch); the one owning its
    decisions partition expires it, once; the others leave it to that one."""
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    other = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics())
    await other.on_approvals(approval_records(bus))
    other.owns = lambda request_id: False
    ex.owns = lambda request_id: request_id == req.id
    later = req.expires_at + timedelta(seconds=1)
    try:
        assert await other.sweep(later) == [] and bus.tombstones() == []
        assert await ex.sweep(later) == [req]
    finally:
        await other.stop()
    assert bus.tombstones() == [req.id]
    assert [e.reason for e, _ in bus.on("escalations")].count("approval_expired") == 1
    await other.on_approvals(approval_records(bus))  # the owner's tombstone reaches it
    assert req.id not in other.pending


async def test_a_request_decided_during_the_replay_at_start_stays_decided(rig: Any) -> None:
    """The watch starts before the snapshot of the approvals topic and they overlap: a
    tombstone the watch hands over while the snapshot is read must not be undone by the
    older request in the snapshot (the replica would later expire, and page for, an action
    already decided)."""
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    t = bus.topic("approvals")

    async def replay() -> list[Envelope]:
        # Decided elsewhere while the snapshot was being read; the watch saw it first.
        await fresh.on_approvals([Envelope(t, 1, 5, req.id, req), Envelope(t, 1, 6, req.id, None)])
        return [Envelope(t, 1, 5, req.id, req)]

    fresh = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), approvals=replay)
    await fresh.start()
    try:
        assert req.id not in fresh.pending
        assert await fresh.sweep(req.expires_at + timedelta(seconds=1)) == []
    finally:
        await fresh.stop()
    assert bus.results()[-1].status == "pending_approval"


async def test_a_bug_in_one_sweep_does_not_end_the_sweeper(rig: Any) -> None:
    ex, bus, _c = rig
    ex.settings = cfg(approval_ttl=0.1)
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    sweep, calls = ex.sweep, []

    async def buggy_once(now: Any) -> Any:
        calls.append(now)
        if len(calls) == 1:
            raise TypeError("a bug")
        return await sweep(now)

    ex.sweep = buggy_once
    ex._ensure_sweeper()
    await bus.wait_for(lambda b: req.id in b.tombstones(), 5, "expiry despite the bug")
    assert len(calls) >= 2


async def test_the_same_action_again_while_its_approval_is_pending_asks_once(rig: Any) -> None:
    ex, bus, _c = rig
    a = act("update_config", CM, action_id="u1", params={"key": "mode", "value": "safe"})
    req = await requested(ex, bus, a)
    again = await ex.on_action(a)  # a redelivery, or the incident analysed once more
    assert (again.status, again.outcome) == ("duplicate", "not_applicable")
    assert still_pending(again)  # `approvals approve` waiting for the decision skips it
    assert f"approval {req.id} already pending since" in again.message
    assert bus.approvals() == [req]  # one page, and its expiry where it was
    (page,) = [e for e, _ in bus.on("escalations")]
    assert (page.reason, page.action_id) == ("approval_requested", a.id)
    assert page.summary == f"update_config on {CM.key}: approval requested"
    assert f"approve: sre-agent approvals approve {req.id} --by NAME" in page.details
    assert f"expires {req.expires_at.isoformat()}" in page.details
    changed = replace(a, params={"key": "mode", "value": "slow"})  # another action: asks
    assert (await ex.on_action(changed)).status == "pending_approval"
    assert bus.approvals()[-1].action_hash == changed.digest()
    pages = [e for e, _ in bus.on("escalations")]
    assert [e.reason for e in pages] == ["approval_requested"] * 2
    assert pages[0].id != pages[1].id  # a new request: a new page


async def test_pending_approvals_survive_a_restart(rig: Any) -> None:
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    gone = await requested(
        ex, bus, act("update_config", CM, action_id="x", params={"key": "a", "value": "b"})
    )
    topic = bus.topic("approvals")
    records = [
        Envelope(topic, 0, 0, req.id, req),
        Envelope(topic, 0, 1, gone.id, gone),
        Envelope(topic, 0, 2, gone.id, None),  # decided before the restart
    ]

    async def replay() -> list[Envelope]:
        return records

    fresh = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), approvals=replay)
    await fresh.start()
    try:
        assert set(fresh.pending) == {req.id}
        await fresh.handle([Envelope(bus.topic("decisions"), 0, 0, req.id, decision(req))])
        assert c.config_map("shop", "flags").data["k"] == "v"
    finally:
        await fresh.stop()


async def test_a_restarted_executor_keeps_its_cooldowns_and_budgets(rig: Any) -> None:
    _ex, bus, c = rig
    done = replace(_result(), started_at=utcnow() - timedelta(seconds=60))
    verified = replace(done, id="res-2", outcome="healed")  # the same action, verified
    topic = bus.topic("action-results")
    asked: list[float] = []

    async def recent(seconds: float) -> list[Envelope]:
        asked.append(seconds)
        return [Envelope(topic, 0, 0, "k", done), Envelope(topic, 0, 1, "k", verified)]

    fresh = Executor(
        cfg(cooldown="5m", max_actions_per_hour=2),
        bus=bus,
        cluster=c,
        metrics=Metrics(),
        results=recent,
    )
    await fresh.start()
    try:
        assert asked == [6 * 3600.0] and len(fresh.history) == 1  # counted once, not twice
        result = await fresh.on_action(act("scale_up", action_id="after-restart"))
        assert result.status == "denied" and "cooldown" in result.message
        assert (await c.workload(CHECKOUT)).replicas == 4  # untouched
        # The last run's action asked for again: its own repeat, not a remedy held back.
        assert (await fresh.on_action(act("scale_up", action_id="s1"))).status == "denied"
        assert [e.action_id for e, _ in bus.on("escalations")] == ["after-restart"]
    finally:
        await fresh.stop()


async def test_a_restarted_executor_verifies_what_the_last_run_left_unverified(
    rig: Any,
) -> None:
    _ex, bus, c = rig
    left = replace(_result(), action_id="left", finished_at=utcnow() - timedelta(seconds=30))
    done = replace(_result(), id="r-done", action_id="done")
    done_verified = replace(done, id="r-done-2", outcome="healed")
    results_topic, actions_topic = bus.topic("action-results"), bus.topic("actions")

    async def results(seconds: float) -> list[Envelope]:
        return [
            Envelope(results_topic, 0, i, "k", r) for i, r in enumerate([left, done, done_verified])
        ]

    async def actions(seconds: float) -> list[Envelope]:
        return [
            Envelope(actions_topic, 0, 0, "k", act("scale_up", action_id="left")),
            Envelope(actions_topic, 0, 1, "k", act("scale_up", action_id="done")),
        ]

    assert [r.action_id for r in unverified([left, done, done_verified])] == ["left"]
    fresh = Executor(
        cfg(verify_after="10s"),
        bus=bus,
        cluster=c,
        metrics=Metrics(),
        results=results,
        actions=actions,
    )
    await fresh.start()
    try:
        # 30 s passed since it finished, beyond verify_after: verified at once.
        await bus.wait_for(lambda b: bool(b.results("left")), 5, "the verification")
    finally:
        await fresh.stop()
    (verified,) = bus.results("left")
    assert verified.id != left.id and verified.outcome in ("healed", "not_healed")
    assert bus.results("done") == []  # already verified: left alone


def approval_records(bus: MemoryBus) -> list[Envelope]:
    """What the executor watch reads of the approvals topic (one partition, in order)."""
    t = bus.topic("approvals")
    return [Envelope(t, 0, i, k, e) for i, (e, k) in enumerate(bus.on("approvals"))]


async def test_a_decision_reaching_another_replica_executes_once_its_watch_read_the_request(
    rig: Any,
) -> None:
    """Replica A asked; the group hands the decision to replica B, which has not read the
    request yet: B waits for its executor watch (every approval, outside the group), then
    executes, instead of dead-lettering it as unknown."""
    a_ex, bus, c = rig
    req = await requested(a_ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    waits: list[float] = []

    async def watch_read(within: float) -> bool:
        waits.append(within)
        await b_ex.on_approvals(approval_records(bus))  # what the watch had yet to hand over
        return True

    b_ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), watch_read=watch_read)
    try:
        await b_ex.handle([Envelope(bus.topic("decisions"), 2, 0, req.id, decision(req))])
    finally:
        await b_ex.stop()
    assert bus.letters == [] and waits
    assert c.config_map("shop", "flags").data["k"] == "v"
    assert bus.tombstones() == [req.id] and req.id not in b_ex.pending


async def test_a_decision_is_not_refused_as_unknown_while_the_watch_lags(rig: Any) -> None:
    """Retried (a transient error), not dead-lettered: the request may be on its way."""
    _ex, bus, c = rig

    async def lagging(within: float) -> bool:
        return False

    b_ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), watch_read=lagging)
    req = await requested(_ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    with pytest.raises(TransientError, match=f"cannot look up approval request {req.id}"):
        await b_ex.on_decision(decision(req))
    assert bus.letters == []


async def test_transient_errors_are_retried(rig: Any) -> None:
    from agent.errors import TransientError

    ex, _bus, c = rig
    calls = 0
    real = c.restart

    async def flaky(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientError("API server answered 503", retry_after=0.0)
        return await real(*args, **kw)

    c.restart = flaky
    assert (await ex.on_action(act("restart_workload", action_id="r1"))).status == "succeeded"
    assert calls == 2
    await asyncio.sleep(0)


async def test_an_action_a_limit_holds_back_is_escalated_once(rig: Any) -> None:
    ex, bus, _c = rig
    ex.settings = cfg(cooldown="10m")
    first = await ex.on_action(act("restart_workload", action_id="r1"))
    assert first.status == "succeeded"
    # Its repeat (a re-analysis asks for the same id) finds its id on the target and its
    # result recorded: the remedy ran, nobody is told.
    assert (await ex.on_action(act("restart_workload", action_id="r1"))).status == "duplicate"
    assert bus.on("escalations") == []
    # Another incident's remedy for the same target is held back: told once, however often
    # it is asked for.
    for _ in range(2):
        held = await ex.on_action(act("scale_up", action_id="s1"))
        assert held.status == "denied" and held.message.startswith("cooldown: ")
    (escalation,) = [e for e, _ in bus.on("escalations")]
    assert (escalation.reason, escalation.action_id) == ("denied", "s1")
    assert escalation.severity is None  # the request did not say (an earlier version's)
    assert escalation.summary == "scale_up on Deployment/shop/checkout: denied"
    assert escalation.details[0] == held.message
    assert ex.metrics.escalations.labels(reason="denied")._value.get() == 1
    # The operator's own switch is not news to the operator.
    ex.switches = lambda: Switches(kill_switch=True)
    assert (await ex.on_action(act("rollback", action_id="b1"))).status == "denied"
    assert len(bus.on("escalations")) == 1


async def test_a_namespace_in_shadow_mode_is_decided_but_untouched(rig: Any) -> None:
    ex, _bus, c = rig
    ex.settings = cfg(overrides=[{"namespaces": ["sh*"], "dry_run": True}])
    r = await ex.on_action(act("scale_up", action_id="s1"))
    assert r.status == "dry_run" and "(remediation.overrides[0])" in r.message
    assert (await c.workload(CHECKOUT)).replicas == 4
    # Another namespace, the global policy: it acts.
    ex.settings = cfg(overrides=[{"namespaces": ["prod-*"], "dry_run": True}])
    assert (await ex.on_action(act("scale_up", action_id="s2"))).status == "succeeded"


async def test_an_action_for_an_incident_that_closed_meanwhile_is_not_taken(rig: Any) -> None:
    ex, bus, c = rig
    inc = Incident(
        id="inc-1",
        key="c1/shop/checkout",
        status="resolved",
        severity="critical",
        labels={"cluster": "c1", "namespace": "shop", "service": "checkout"},
        members=(),
        opened_at=at(0),
        updated_at=at(60),
        resolved_at=at(60),
    )
    ex.on_incident(inc)
    closed = await ex.on_action(act("scale_up", action_id="s1"))  # the factory's inc-1
    assert (closed.status, closed.message) == (
        "denied",
        "incident_closed: incident inc-1 is resolved or silenced",
    )
    rollback = await ex.on_action(act("rollback", action_id="b1"))  # would need approval
    assert rollback.status == "denied" and bus.approvals() == [] and bus.on("escalations") == []
    assert (await c.workload(CHECKOUT)).replicas == 4
    # It reopens: its remedies are taken again.
    ex.on_incident(replace(inc, status="reopened", revision=2, resolved_at=None))
    assert (await ex.on_action(act("scale_up", action_id="s2"))).status == "succeeded"


async def test_an_older_revision_of_an_incident_changes_nothing(rig: Any) -> None:
    """The replay at start and the live reader overlap: a revision older than the one
    held (the replay's "resolved", after the reader saw it reopen) must not close it."""
    ex, _bus, _c = rig
    reopened = replace(_incident("reopened"), revision=3)
    ex.on_incident(reopened)
    ex.on_incident(replace(_incident("resolved"), revision=2))
    assert not await ex.closed("inc-1")
    ex.on_incident(replace(_incident("silenced"), revision=4))
    assert await ex.closed("inc-1")


async def test_a_restarted_executor_replays_which_incidents_closed(rig: Any) -> None:
    _ex, bus, c = rig
    asked: list[float] = []

    async def recent(seconds: float) -> list[Envelope]:
        asked.append(seconds)
        return [
            Envelope(bus.topic("incidents"), 0, i, "c1/shop/checkout", inc)
            for i, inc in enumerate([_incident("open"), replace(_incident("resolved"), revision=2)])
        ]

    fresh = Executor(
        cfg(cooldown="5m", approval_ttl="2h"),
        bus=bus,
        cluster=c,
        metrics=Metrics(),
        incidents=recent,
    )
    await fresh.start()
    try:
        assert asked == [7200.0]  # long enough for any approval still pending
        denied = await fresh.on_action(act("scale_up", action_id="s1"))
        assert denied.message.startswith("incident_closed")
    finally:
        await fresh.stop()


async def test_an_action_waits_for_the_incident_reader_and_is_retried_if_it_lags(
    rig: Any,
) -> None:
    """What was published before the action is read first: the reader's catch-up brings
    the resolution in. A reader that cannot catch up makes the action a retriable error,
    never a decision on stale knowledge."""
    _ex, bus, c = rig
    waits: list[float] = []
    ex: Executor | None = None

    async def caught_up(within: float) -> bool:
        waits.append(within)
        if len(waits) == 1:
            assert ex is not None
            ex.on_incident(_incident("resolved"))  # arrives while the action waits
            return True
        return False

    ex = Executor(cfg(), bus=bus, cluster=c, metrics=Metrics(), watch_read=caught_up)
    try:
        first = await ex.on_action(act("scale_up", action_id="s1"))
        assert first.message.startswith("incident_closed")
        with pytest.raises(TransientError, match="executor watch is more than 5s behind"):
            await ex.on_action(replace(act("scale_up", action_id="s2"), incident_id="inc-2"))
        assert waits == [5.0, 5.0] and bus.results("s2") == []
        # An undo skips the incident's state, not the wait: a kill switch or another
        # replica's action published just before it must be known.
        undo = act("scale_down", action_id="u1", params={"undo_of": "s0", "replicas": "3"})
        with pytest.raises(TransientError, match="cannot decide undo u1: the executor watch"):
            await ex.on_action(undo)
        assert (await c.workload(CHECKOUT)).replicas == 4
    finally:
        await ex.stop()


async def test_a_healed_action_and_a_dry_run_are_reported_not_escalated(rig: Any) -> None:
    """What the agent did goes on the escalations topic as an informational report (for
    the channels that ask for it), not counted as an escalation; a dry run once per
    action, however often a re-analysis asks for it."""
    ex, bus, _c = rig
    done = await ex.on_action(act("rollback", action_id="a1"))
    assert done.status == "succeeded"
    await bus.wait_for(lambda b: b.on("escalations"), 5, "the report of the healing")
    (healed,) = [e for e, _ in bus.on("escalations")]
    assert (healed.reason, healed.action_id) == ("healed", "a1")
    assert healed.summary == "rollback on Deployment/shop/checkout: healed"
    assert healed.details[0] == bus.results("a1")[-1].message
    ex.switches = lambda: Switches(dry_run=True)
    for _ in range(2):
        assert (await ex.on_action(act("scale_up", action_id="s1"))).status == "dry_run"
    reports = [e for e, _ in bus.on("escalations")]
    assert [(e.reason, e.action_id) for e in reports] == [("healed", "a1"), ("dry_run", "s1")]
    assert reports[1].details[0].startswith("would have executed scale_up on")
    for reason in ("healed", "dry_run"):
        assert ex.metrics.escalations.labels(reason=reason)._value.get() == 0


async def test_an_approval_whose_incident_closed_is_withdrawn_not_left_to_expire(
    rig: Any,
) -> None:
    """Left pending, it would expire an hour later and page someone for a problem gone;
    withdrawn, it leaves `approvals list`, whoever was asked is told there is nothing to
    decide (routed as the request was, not counted as an escalation), and a late decision
    is told."""
    ex, bus, c = rig
    req = await requested(ex, bus, act("update_config", CM, params={"key": "k", "value": "v"}))
    other = await requested(
        ex,
        bus,
        replace(
            act("update_config", CM, action_id="u2", params={"key": "k", "value": "w"}),
            incident_id="inc-2",
        ),
    )
    paged = len(bus.on("escalations"))  # the two approval requests
    ex.on_incident(_incident("resolved"))  # inc-1
    await ex.sweep(req.expires_at + timedelta(seconds=1))  # past its expiry, too
    assert bus.tombstones() == [req.id, other.id]  # the other one expired: inc-2 is open
    withdrawn = bus.results(req.action.id)[-1]
    assert (withdrawn.status, withdrawn.message) == (
        "rejected",
        f"approval {req.id} withdrawn: incident inc-1 is resolved or silenced",
    )
    told = [e for e, _ in bus.on("escalations")][paged:]
    assert [(e.reason, e.action_id) for e in told] == [
        ("approval_withdrawn", req.action.id),
        ("approval_expired", "u2"),
    ]
    assert told[0].details[0] == withdrawn.message
    assert ex.metrics.escalations.labels(reason="approval_withdrawn")._value.get() == 0
    assert not ex.pending
    await ex.on_decision(decision(req))  # too late
    assert f"approval request {req.id} is closed: withdrawn: incident inc-1" in bus.letters[-1]
    assert c.config_map("shop", "flags").data == {"mode": "fast"}


class StillFiring:
    """Alertmanager, where the alert that triggered the restarts never clears."""

    async def firing(self, name: str) -> list[dict[str, str]]:
        return [{"alertname": name, "namespace": "shop", "service": "checkout"}]


async def test_a_restart_that_keeps_failing_to_heal_goes_to_a_person(rig: Any) -> None:
    _ex, bus, c = rig
    ex = Executor(
        cfg(require_approval=[]), bus=bus, cluster=c, metrics=Metrics(), alertmanager=StillFiring()
    )
    where = Firing("CheckoutErrors", {"namespace": "shop", "service": "checkout"}, "alertmanager")
    try:
        # Each incident that opens asks for a restart of its own (a new action id).
        for i in (1, 2):
            restart = replace(act("restart_workload", action_id=f"r{i}"), firing=(where,))
            assert (await ex.on_action(restart)).status == "succeeded"
            await bus.wait_for(lambda b, i=i: len(b.results(f"r{i}")) == 2, 5, "its verification")
            assert bus.results(f"r{i}")[-1].outcome == "not_healed"
        third = replace(act("restart_workload", action_id="r3"), firing=(where,))
        result = await ex.on_action(third)
        assert result.status == "pending_approval"
        assert "verified ineffective 2 times in the last 6h" in result.message
        (req,) = bus.approvals()
        assert req.action.id == "r3"
        # Another action on the target is not held back by the restarts' record.
        scale = replace(act("scale_up", action_id="s1", params={"replicas": "+1"}))
        assert (await ex.on_action(scale)).status == "succeeded"
    finally:
        await ex.stop()


async def test_other_replicas_results_count_in_cooldowns_budgets_and_repeats(rig: Any) -> None:
    _ex, bus, c = rig
    ex = Executor(cfg(cooldown="5m", max_actions_per_hour=2), bus=bus, cluster=c, metrics=Metrics())
    topic = bus.topic("action-results")
    now = utcnow()
    elsewhere = replace(
        _result(), action_id="other-1", target=Target("Deployment", "shop", "cart"), started_at=now
    )
    try:
        await ex.on_results([Envelope(topic, 0, 0, "k", elsewhere)])
        # The same record again (the replay at start overlaps the watch): counted once.
        await ex.on_results([Envelope(topic, 0, 0, "k", elsewhere)])
        assert list(ex.history) == ["other-1"]
        denied = await ex.on_action(act("scale_up", Target("Deployment", "shop", "cart")))
        assert denied.message.startswith("cooldown")
        assert (await ex.on_action(act("scale_up", action_id="mine"))).status == "succeeded"
        # Two actions in the last hour, one of them another replica's: the budget is spent.
        budget = await ex.on_action(
            act("scale_up", Target("Deployment", "shop", "search"), action_id="third")
        )
        assert budget.message.startswith("max_actions_per_hour"), budget.message
        # Its verification, read back, gives the outcome; records too old are forgotten.
        verified = replace(elsewhere, id="res-2", outcome="not_healed")
        old = replace(_result(), action_id="old", started_at=now - timedelta(hours=7))
        await ex.on_results([Envelope(topic, 0, 1, "k", r) for r in (verified, old)])
        assert ex.history["other-1"].outcome == "not_healed" and "old" not in ex.history
    finally:
        await ex.stop()


def _switch(name: Any, on: bool, by: str = "alice") -> Any:
    from agent.models import SwitchChange

    return SwitchChange(id=f"sw-{by}", name=name, on=on, by=by, reason="why not", at=at(5))


async def test_switches_from_the_topic_merge_with_the_file_and_keep_the_newest(
    rig: Any, tmp_path: Any
) -> None:
    from handlers.executor import kill_switch_file

    _ex, bus, c = rig
    path = tmp_path / "kill"
    metrics = Metrics()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=metrics, switches=kill_switch_file(str(path)))
    topic = bus.topic("switches")

    def gauge(name: str, namespace: str = "") -> float | None:
        labels = {"switch": name, "namespace": namespace}
        return metrics.registry.get_sample_value("sre_agent_switch_on", labels)

    try:
        await ex.on_switches([Envelope(topic, 0, 7, "kill_switch", _switch("kill_switch", True))])
        assert gauge("kill_switch") == 1.0 and gauge("dry_run") == 0.0
        denied = await ex.on_action(act("scale_up", action_id="k1"))
        assert denied.message.startswith("kill_switch: the kill switch is on (turned on by alice")
        # An older record (the replay at start overlapping the watch) does not undo it.
        await ex.on_switches([Envelope(topic, 0, 3, "kill_switch", _switch("kill_switch", False))])
        assert ex.current_switches().kill_switch
        await ex.on_switches([Envelope(topic, 0, 8, "kill_switch", _switch("kill_switch", False))])
        assert not ex.current_switches().kill_switch and gauge("kill_switch") == 0.0
        # The topic cannot turn off what the file turned on.
        path.touch()
        v = ex.current_switches()
        assert v.kill_switch and v.why == f"file {path} exists"
        path.unlink()
        await ex.on_switches([Envelope(topic, 0, 9, "dry_run", _switch("dry_run", True, "bob"))])
        assert (await ex.on_action(act("scale_up", action_id="d1"))).status == "dry_run"
        assert (await c.workload(CHECKOUT)).replicas == 4
    finally:
        await ex.stop()


async def test_a_namespace_freeze_holds_that_namespace_only(rig: Any) -> None:
    from agent.models import SwitchChange

    _ex, bus, c = rig
    metrics = Metrics()
    ex = Executor(cfg(), bus=bus, cluster=c, metrics=metrics)
    freeze = SwitchChange(
        id="f1",
        name="kill_switch",
        on=True,
        by="carol",
        reason="db migration",
        at=at(5),
        namespace="shop",
    )
    try:
        await ex.on_switches([Envelope(bus.topic("switches"), 0, 1, freeze.key, freeze)])
        denied = await ex.on_action(act("scale_up", action_id="in-shop"))
        assert denied.message == (
            "kill_switch: the kill switch is on (turned on for namespace shop by carol at "
            f"{at(5).isoformat(timespec='seconds')}: db migration): no action executes"
        )
        # A node has no namespace: only a cluster-wide switch holds it.
        assert (await ex.on_action(act("cordon_node", NODE, action_id="node"))).status == (
            "succeeded"
        )
        assert not ex.current_switches("web").kill_switch
        labels = {"switch": "kill_switch", "namespace": "shop"}
        assert metrics.registry.get_sample_value("sre_agent_switch_on", labels) == 1.0
        thaw = replace(freeze, id="f2", on=False)
        await ex.on_switches([Envelope(bus.topic("switches"), 0, 2, thaw.key, thaw)])
        assert (await ex.on_action(act("scale_up", action_id="after"))).status == "succeeded"
        assert metrics.registry.get_sample_value("sre_agent_switch_on", labels) == 0.0
    finally:
        await ex.stop()


class OneUnit:
    """A budget arbiter as the claims topic settles it, in memory: one unit for all
    replicas; or, ``failing``, a claims topic that cannot be read back."""

    def __init__(self) -> None:
        self.granted: list[str] = []
        self.failing = False
        self.stopped = False

    async def claim(
        self, action: ActionRequest, now: Any, cordoned: tuple[str, ...] = ()
    ) -> Verdict | None:
        if self.failing:
            raise TransientError("budget claim: offset 3 not read back in time")
        if self.granted and action.id not in self.granted:
            return Verdict("deny", "max_actions_per_hour", "1 actions in the last hour")
        self.granted.append(action.id)
        return None

    async def release(self, action: ActionRequest, now: Any) -> None:
        self.granted.remove(action.id)

    async def done(self, action: ActionRequest, now: Any) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True


async def test_budget_claims_are_counted_and_timed_and_the_arbiter_stops_with_the_executor() -> (
    None
):
    metrics, arbiter = Metrics(), OneUnit()
    ex = Executor(cfg(), bus=MemoryBus(), cluster=cluster(), metrics=metrics, budget=arbiter)

    def claims(result: str) -> float:
        return (
            metrics.registry.get_sample_value("sre_agent_budget_claims_total", {"result": result})
            or 0.0
        )

    try:
        assert (await ex.on_action(act(action_id="b1"))).status == "succeeded"
        denied = await ex.on_action(act(action_id="b2", params={"replicas": "+1"}))
        assert denied.status == "denied" and denied.message.startswith("max_actions_per_hour")
        arbiter.failing = True
        with pytest.raises(TransientError, match="not read back"):
            await ex.on_action(act(action_id="b3"))  # retried by the consumer, never blind
        assert (claims("granted"), claims("denied"), claims("unavailable")) == (1, 1, 1)
        timed = metrics.registry.get_sample_value("sre_agent_budget_claim_seconds_count")
        assert timed == 3
    finally:
        await ex.stop()
    assert arbiter.stopped


async def test_a_kill_switch_turned_on_while_deciding_holds(tmp_path: Any) -> None:
    """The second policy check, after the cluster reads, and the last look, after the
    budget claim, read the switches again: the operator may act during either."""
    from handlers.executor import kill_switch_file

    path = tmp_path / "kill"
    c = cluster()
    read = c.footprint

    async def footprint(target: Target) -> Any:
        path.touch()  # the operator touches the kill switch file while the cluster is read
        return await read(target)

    c.footprint = footprint  # type: ignore[method-assign]
    ex = Executor(
        cfg(), bus=MemoryBus(), cluster=c, metrics=Metrics(), switches=kill_switch_file(str(path))
    )
    try:
        r = await ex.on_action(act("restart_workload", action_id="r1"))
        assert (r.status, r.message.split(":")[0]) == ("denied", "kill_switch")
        assert (await c.workload(CHECKOUT)).generation == 2  # create and rollout only
    finally:
        await ex.stop()

    path.unlink()
    c = cluster()

    class SwitchedDuringClaim(OneUnit):
        async def claim(
            self, action: ActionRequest, now: Any, cordoned: tuple[str, ...] = ()
        ) -> Verdict | None:
            granted = await super().claim(action, now, cordoned)
            path.touch()  # ... or while the claim is read back
            return granted

    arbiter = SwitchedDuringClaim()
    ex = Executor(
        cfg(),
        bus=MemoryBus(),
        cluster=c,
        metrics=Metrics(),
        switches=kill_switch_file(str(path)),
        budget=arbiter,
    )
    try:
        r = await ex.on_action(act("restart_workload", action_id="r2"))
        assert (r.status, r.message.split(":")[0]) == ("denied", "kill_switch")
        assert (await c.workload(CHECKOUT)).generation == 2
        assert arbiter.granted == []  # the unit went back: nothing was done with it
    finally:
        await ex.stop()


class _GraceSeen(FakeCluster):
    """Notes the grace period and timeout each drain was given."""

    seen: list[tuple[float | None, float]]

    async def drain(self, target: Target, **kw: Any) -> Any:
        self.seen = [*getattr(self, "seen", []), (kw["grace_period"], kw["drain_timeout"])]
        return await super().drain(target, **kw)


async def test_a_drain_with_a_shorter_timeout_gives_its_pods_no_more_grace_than_it() -> None:
    c = cluster(_GraceSeen)
    assert isinstance(c, _GraceSeen)
    bus = MemoryBus()
    ex = Executor(cfg(drain_grace_period="90s"), bus=bus, cluster=c, metrics=Metrics())
    try:
        r = await ex.on_action(act("drain_node", NODE, action_id="d1", params={"timeout": "30"}))
    finally:
        await ex.stop()
    assert r.status == "succeeded", r.message
    assert c.seen == [(30.0, 30.0)]  # the configured 90s would outlast the drain itself
