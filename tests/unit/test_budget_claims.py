"""The hourly budgets as every executor replica grants them from the one order of the
budget-claims topic: the last unit goes to the first claim, a released unit comes back,
a redelivered action does not spend twice, and no window ever holds more than the
budget."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from agent.models import BudgetClaim
from agent.policy import BUDGET_WINDOW, budget_grants
from tests.unit.factories import T0
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
