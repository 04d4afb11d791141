"""The hourly budgets as every executor replica grants them from the one order of the
budget-claims topic: the last unit goes to the first claim, a released unit comes back,
a redelivered action does not spend twice, and no window ever holds more than the
budget."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.models import ActionRequest, BudgetClaim, Target
from agent.policy import (
    BUDGET_WINDOW,
    budget_claim,
    budget_grants,
    budget_usage,
)
from agent.settings import NODE_CLAIM_MARGIN
from tests.unit.factories import T0, action
from tests.unit.factories import settings as make_settings

REM = make_settings(
    {"remediation": {"max_actions_per_hour": 2, "max_actions_per_namespace_per_hour": 1}}
).remediation


def claim(action: str, seconds: float = 0, ns: str = "", released: bool = False) -> BudgetClaim:
    return BudgetClaim(action, ns, T0 + timedelta(seconds=seconds), released=released)


def granted(claims: list[BudgetClaim]) -> list[bool]:
    return [v is None for v in budget_grants(claims, REM)]


def test_the_first_claim_in_the_topic_gets_the_last_unit() -> None:
    # Three replicas claim at the same instant: the topic's order decides, for all of them.
    verdicts = budget_grants([claim("a"), claim("b"), claim("c")], REM)
    assert [v is None for v in verdicts] == [True, True, False]
    denied = verdicts[2]
    assert denied is not None and denied.rule == "max_actions_per_hour"


def test_a_released_unit_comes_back_and_a_redelivery_spends_nothing() -> None:
    claims = [
        claim("a"),
        claim("b", 1),
        claim("a", 2),  # a redelivery of a: still granted, nothing more spent
        claim("c", 3),  # denied: a and b hold the two units
        claim("b", 4, released=True),  # b changed nothing
        claim("c", 5),  # granted now
    ]
    assert granted(claims) == [True, True, True, False, True, True]


def test_units_expire_after_the_window() -> None:
    claims = [claim("a"), claim("b"), claim("c", BUDGET_WINDOW + 1)]
    assert granted(claims) == [True, True, True]


def test_the_namespace_budget_is_claimed_too() -> None:
    claims = [claim("a", ns="shop"), claim("b", ns="shop"), claim("c", ns="cart")]
    verdicts = budget_grants(claims, REM)
    assert [v is None for v in verdicts] == [True, False, True]
    assert verdicts[1] is not None and verdicts[1].rule == "max_actions_per_namespace_per_hour"


claims_st = st.lists(
    st.builds(
        claim,
        st.sampled_from("abcdefg"),
        st.integers(0, int(BUDGET_WINDOW * 3)),
        st.sampled_from(["", "shop", "cart"]),
        st.booleans(),
    ),
    max_size=30,
).map(lambda cs: sorted(cs, key=lambda c: c.at))  # the topic's order, roughly by time


@given(claims_st)
def test_no_window_ever_holds_more_units_than_the_budget(claims: list[BudgetClaim]) -> None:
    verdicts = budget_grants(claims, REM)
    held: dict[str, BudgetClaim] = {}
    for c, v in zip(claims, verdicts, strict=True):
        if c.released:
            held.pop(c.action_id, None)
        elif v is None:
            held.setdefault(c.action_id, c)
        window = [h for h in held.values() if h.at > c.at - timedelta(seconds=BUDGET_WINDOW)]
        assert len(window) <= REM.max_actions_per_hour
        for ns in ("shop", "cart"):
            assert sum(h.namespace == ns for h in window) <= REM.max_actions_per_namespace_per_hour


@given(claims_st, st.data())
def test_a_redelivered_claim_changes_no_other_answer(
    claims: list[BudgetClaim], data: st.DataObject
) -> None:
    live = [i for i, c in enumerate(claims) if not c.released]
    if not live:
        return
    i = data.draw(st.sampled_from(live))
    again = [*claims[: i + 1], claims[i], *claims[i + 1 :]]
    before, after = budget_grants(claims, REM), budget_grants(again, REM)
    assert after[: i + 1] + after[i + 2 :] == before
    assert (after[i + 1] is None) == (before[i] is None)


NODES = make_settings(
    {"remediation": {"max_actions_per_hour": 100, "max_nodes_cordoned": 1, "drain_timeout": "2m"}}
).remediation


def node_claim(
    action: str, node: str, seconds: float = 0, cordoned: tuple[str, ...] = (), **kw: bool
) -> BudgetClaim:
    return BudgetClaim(
        action, "", T0 + timedelta(seconds=seconds), node=node, cordoned=cordoned, **kw
    )


def test_two_replicas_cannot_each_cordon_the_last_node_allowed() -> None:
    # Both saw nothing cordoned; the first claim's node counts for the second.
    verdicts = budget_grants([node_claim("a", "n1"), node_claim("b", "n2", 1)], NODES)
    assert verdicts[0] is None
    second = verdicts[1]
    assert second is not None and second.rule == "max_nodes_cordoned"
    assert "(n1)" in second.reason
    # The same node again (another action on it) is not another node.
    assert budget_grants([node_claim("a", "n1"), node_claim("b", "n1", 1)], NODES) == [None, None]


def test_a_node_action_done_counts_by_what_the_cluster_shows() -> None:
    done = [node_claim("a", "n1"), node_claim("a", "n1", 5, done=True)]
    # Still cordoned, as the next replica sees it: denied; uncordoned since: granted.
    assert budget_grants([*done, node_claim("b", "n2", 9, ("n1",))], NODES)[-1] is not None
    assert budget_grants([*done, node_claim("b", "n2", 9)], NODES)[-1] is None
    # Released (it changed nothing): the node was never cordoned.
    gone = [node_claim("a", "n1"), node_claim("a", "n1", 5, released=True)]
    assert budget_grants([*gone, node_claim("b", "n2", 9)], NODES)[-1] is None


def test_a_node_claim_never_done_stops_counting_after_the_drain_timeout_and_margin() -> None:
    late = 120 + NODE_CLAIM_MARGIN + 1
    assert budget_grants([node_claim("a", "n1"), node_claim("b", "n2", late)], NODES)[-1] is None


node_claims_st = st.lists(
    st.builds(
        node_claim,
        st.sampled_from("abcdef"),
        st.sampled_from(["n1", "n2", "n3"]),
        st.integers(0, 1000),
        st.just(()),
        done=st.booleans(),
        released=st.booleans(),
    ),
    max_size=25,
).map(lambda cs: sorted(cs, key=lambda c: c.at))


@given(node_claims_st)
def test_no_more_nodes_are_in_flight_than_the_limit(claims: list[BudgetClaim]) -> None:
    verdicts = budget_grants(claims, NODES)
    held: set[str] = set()  # actions holding a unit: a claim of theirs spends nothing new
    busy: dict[str, BudgetClaim] = {}  # granted node claims not yet done or released
    for c, v in zip(claims, verdicts, strict=True):
        if c.done or c.released:
            busy.pop(c.action_id, None)
            if c.released:
                held.discard(c.action_id)
        elif v is None and c.action_id not in held:
            held.add(c.action_id)
            busy[c.action_id] = c
        horizon = c.at - timedelta(seconds=NODES.drain_timeout + NODE_CLAIM_MARGIN)
        assert len({b.node for b in busy.values() if b.at > horizon}) <= NODES.max_nodes_cordoned


def test_the_usage_counts_the_units_of_the_last_hour_and_the_nodes_in_flight() -> None:
    claims = [
        claim("old", 0, ns="shop"),
        claim("a", 3000, ns="shop"),
        claim("b", 3100, ns="cart"),
        claim("b", 3200, ns="cart", released=True),
        node_claim("d", "n1", 3300),
        node_claim("e", "n2", 3400),  # denied: n1 is in flight
    ]
    usage = budget_usage(claims, NODES, T0 + timedelta(seconds=3700))
    assert (usage.spent, dict(usage.by_namespace)) == (2, {"shop": 1})
    assert list(usage.nodes_in_flight) == ["n1"]
    later = budget_usage(claims, NODES, T0 + timedelta(seconds=3300 + 120 + NODE_CLAIM_MARGIN))
    assert later.nodes_in_flight == {}


def _node_action(node: str, **params: Any) -> ActionRequest:
    return replace(action("drain_node", params=params), target=Target(kind="Node", name=node))


def test_an_uncordon_claims_its_unit_but_no_node() -> None:
    # n1 and n2 are being cordoned by other replicas (max_nodes_cordoned: 1): the undo of a
    # drain of n3 uncordons it, which adds no cordoned node, so nothing holds it back.
    busy = [node_claim("a", "n1"), node_claim("b", "n2", 1, ("n1",))]
    undo = budget_claim(
        _node_action("n3", undo_of="d0", unschedulable=False),
        T0 + timedelta(seconds=2),
        cordoned=("n1",),
    )
    assert (undo.node, undo.cordoned) == ("", ())
    assert budget_grants([*busy, undo], NODES)[-1] is None
    # It still spends a unit of the hourly budget: an action within the hour.
    one = replace(NODES, max_actions_per_hour=1)
    spent = budget_grants([node_claim("a", "n1"), undo], one)[-1]
    assert spent is not None and spent.rule == "max_actions_per_hour"
    # A drain of n3 then, or an undo restoring a cordon, may cordon n3: its node is claimed.
    for cordoning in (_node_action("n3"), _node_action("n3", undo_of="d0", unschedulable=True)):
        c = budget_claim(cordoning, T0 + timedelta(seconds=2))
        assert c.node == "n3"
        denied = budget_grants([*busy, c], NODES)[-1]
        assert denied is not None and denied.rule == "max_nodes_cordoned"


@given(drain_timeout=st.floats(min_value=0, max_value=86_400 - NODE_CLAIM_MARGIN))
def test_claims_are_read_back_as_long_as_a_node_claim_holds_its_node(drain_timeout: float) -> None:
    """The ledger keeps (and a restarted replica reads back) every claim that can still
    count: a budget unit's hour, and a node's whole drain and margin, however long."""
    from streams.ledger import held_for

    rem = make_settings(
        {"agent": {"stuck_after": 0}, "remediation": {"drain_timeout": drain_timeout}}
    ).remediation
    assert rem.node_claim_lifetime == drain_timeout + NODE_CLAIM_MARGIN
    assert held_for(rem) > max(BUDGET_WINDOW, rem.node_claim_lifetime)


def test_a_drain_timeout_no_claim_could_outlast_on_the_topic_is_refused_at_load() -> None:
    import pytest

    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"remediation: .*drain_timeout: 86101s is too long"):
        make_settings({"agent": {"stuck_after": 0}, "remediation": {"drain_timeout": 86101}})
    longest = make_settings(
        {"agent": {"stuck_after": 0}, "remediation": {"drain_timeout": 86100}}
    ).remediation
    assert longest.node_claim_lifetime == 86_400
