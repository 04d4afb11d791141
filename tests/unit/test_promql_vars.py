"""Variables in a runbook's PromQL: whatever an incident's label holds, the query keeps
the structure its author wrote."""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.promql_vars import escape, slots, substitute

# PromQL's string literals, lexed independently of agent.promql_vars (Go's rules: no raw
# newline in a quoted literal, a backslash escapes the next character).
LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|`[^`]*`', re.S)
TEMPLATE = (
    'sum by (namespace) (rate(http_requests_total{namespace="$namespace", code=~"5..$"}[5m]))'
    " / on (namespace) group_left"
    " count by (namespace) (kube_pod_info{namespace=~'$namespace|kube-system'}) # $namespace\n"
)


def structure(query: str) -> tuple[str, list[str]]:
    """(the query with each literal replaced by "S", the literals decoded)."""
    literals = [m.group() for m in LITERAL.finditer(query)]
    return LITERAL.sub("S", query), [ast.literal_eval(x) for x in literals]


@given(st.text())
def test_any_label_value_stays_inside_its_literal(value: str) -> None:
    if not value:
        return
    got, problem = substitute(TEMPLATE, {"namespace": value})
    assert problem is None and got is not None
    skeleton, literals = structure(got)
    want_skeleton, want_literals = structure(TEMPLATE)
    assert skeleton == want_skeleton  # nothing outside the literals moved
    assert len(literals) == len(want_literals)
    # The equality matcher's literal is the value; the regex one matches it, and only it.
    assert literals[0] == value
    assert literals[1] == "5..$"
    assert re.fullmatch(literals[2].removesuffix("|kube-system"), value)
    assert not re.fullmatch(literals[2].removesuffix("|kube-system"), value + "x")


@given(st.text(), st.sampled_from(['"', "'"]))
def test_an_escaped_value_round_trips(value: str, quote: str) -> None:
    written = f"{quote}{escape(value, quote)}{quote}"
    assert LITERAL.fullmatch(written) and ast.literal_eval(written) == value


def test_a_value_that_would_break_out_is_escaped() -> None:
    got, _ = substitute('up{namespace="$namespace"}', {"namespace": 'x"} or vector(1) #\n'})
    assert got == 'up{namespace="x\\"} or vector(1) #\\n"}'


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ('up{a="$nope"}', "unknown variable $nope (known: $namespace)"),
        ('up{a="$namespaces"}', "unknown variable $namespaces"),
        ("up{a=$namespace}", "$namespace is outside a string literal"),
        ("up{a=`$namespace`}", "$namespace is in a `raw` string"),
        ('up{a="$namespace}', "a string literal is not terminated"),
    ],
)
def test_what_cannot_be_substituted_safely_is_refused(query: str, problem: str) -> None:
    found, said = slots(query)
    assert found == [] and said is not None and said.startswith(problem)
    assert substitute(query, {"namespace": "shop"}) == (None, said)


def test_what_is_not_a_variable_is_left_as_written() -> None:
    query = 'up{a=~"x$", b="\\"$"} # $nope\n'
    assert slots(query) == ([], None)
    assert substitute(query, {}) == (query, None)


def test_a_label_the_incident_lacks_is_a_problem_not_an_empty_value() -> None:
    for labels in ({}, {"namespace": ""}):
        got = substitute('up{namespace="$namespace"}', labels)
        assert got == (None, "the incident has no namespace label for $namespace")
