"""The ``condition`` of a runbook file's step: a small expression language, parsed once at
load time and evaluated against facts the analyzer reads from the gathered context.

Grammar (keywords are upper case, as the reference writes them)::

    expr    := or
    or      := and ("OR" and)*
    and     := not ("AND" not)*
    not     := "NOT" not | "(" expr ")" | compare
    compare := FACT OP LITERAL          OP: > >= < <= == !=
    FACT    := one of FACTS, ``deployments[N].age`` with N a small index
    LITERAL := a number (percent, count) or, for a duration fact, a duration (30s, 5m, 1h)

Nothing is ever handed to ``eval``: the parser builds frozen nodes and the evaluator walks
them. Evaluation is three-valued (Kleene): a fact the context lacks is unknown, ``unknown
OR true`` is true, ``NOT unknown`` unknown; a step applies only when its condition is true.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from agent.errors import ConfigError

Op = Literal[">", ">=", "<", "<=", "==", "!="]
OPS: tuple[Op, ...] = (">=", "<=", "==", "!=", ">", "<")

# name -> (unit, meaning). Percentages are 0..100, ages seconds before the incident opened.
FACTS: Mapping[str, tuple[str, str]] = {
    "deployments.count": (
        "count",
        "rollouts of the incident's workload that replaced an earlier template, before the "
        "incident opened",
    ),
    "deployments[N].age": (
        "duration",
        "how long before the incident opened the N-th newest such rollout happened",
    ),
    "cpu_utilization": ("percent", "the workload's CPU use of its limit"),
    "memory_utilization": ("percent", "the workload's memory working set of its limit"),
    "concurrency_utilization": ("percent", "the workload's in-flight requests of its limit"),
    "dependency_error_rate": ("percent", "the highest error rate of calls to a dependency"),
    "crash_looping": ("flag", "1 when the workload's pods are crash looping, else 0"),
    "oom_killed": ("flag", "1 when the workload's containers were OOM-killed, else 0"),
}
# deployments[N]: the gatherer keeps this many rollouts per workload (agent.context), so
# a higher N, or a deployments.count above it, could never be known.
MAX_INDEX = 4
MAX_COUNT = MAX_INDEX + 1
# The ai.context.queries whose series a fact is read from: without the query configured,
# the fact is never known (agent.analyzer.runbook_facts).
FACT_QUERIES: Mapping[str, str] = {
    "cpu_utilization": "cpu_saturation",
    "memory_utilization": "memory_saturation",
    "concurrency_utilization": "concurrency_saturation",
    "dependency_error_rate": "dependency_error_ratio",
}

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]+)?(?:s|m|h|d)?(?![A-Za-z0-9_]))"
    r"|(?P<op>>=|<=|==|!=|>|<)"
    r"|(?P<paren>[()])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\[[0-9]+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*)*))"
)
_INDEXED = re.compile(r"deployments\[([0-9]+)\]\.age")


class ExprError(ConfigError):
    """A condition that does not parse; ``position`` is the 1-based character it names.
    A configuration error: conditions are parsed when runbook files load."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__([f"at position {position}: {message}"])
        self.position = position


@dataclass(frozen=True, slots=True)
class Compare:
    fact: str  # as written: deployments[0].age, cpu_utilization
    op: Op
    value: float  # durations in seconds


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr


@dataclass(frozen=True, slots=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Or:
    left: Expr
    right: Expr


Expr = Compare | Not | And | Or


def fact_kind(fact: str) -> str | None:
    """The unit of a known fact (``deployments[3].age`` included), None for an unknown one."""
    m = _INDEXED.fullmatch(fact)
    if m is not None:
        return "duration" if int(m.group(1)) <= MAX_INDEX else None
    known = FACTS.get(fact)
    return None if known is None or "[N]" in fact else known[0]


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # num, op, paren, word, end
    text: str
    pos: int  # 1-based


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.lastgroup is None:
            raise ExprError(f"unexpected {text[i]!r}", i + 1)
        out.append(_Tok(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup) + 1))
        i = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expr(self) -> Expr:
        left = self.conj()
        while self.peek().kind == "word" and self.peek().text == "OR":
            self.take()
            left = Or(left, self.conj())
        return left

    def conj(self) -> Expr:
        left = self.neg()
        while self.peek().kind == "word" and self.peek().text == "AND":
            self.take()
            left = And(left, self.neg())
        return left

    def neg(self) -> Expr:
        tok = self.take()
        if tok.kind == "word" and tok.text == "NOT":
            return Not(self.neg())
        if tok.kind == "paren" and tok.text == "(":
            inner = self.expr()
            close = self.take()
            if close.text != ")":
                raise ExprError(f"expected ')' to close the '(' at {tok.pos}", close.pos)
            return inner
        if tok.kind != "word" or tok.text in ("AND", "OR"):
            raise ExprError(f"expected a fact, NOT or '(', got {tok.text or 'the end'!r}", tok.pos)
        kind = fact_kind(tok.text)
        if kind is None:
            raise ExprError(
                f"unknown fact {tok.text!r}; known: {', '.join(FACTS)} (N at most {MAX_INDEX})",
                tok.pos,
            )
        op = self.take()
        if op.kind != "op":
            raise ExprError(f"expected a comparison after {tok.text}, got {op.text!r}", op.pos)
        lit = self.take()
        if lit.kind != "num":
            raise ExprError(f"expected a number after {op.text}, got {lit.text!r}", lit.pos)
        return Compare(_canonical(tok.text), op.text, _literal(lit, kind))  # type: ignore[arg-type]


def _canonical(fact: str) -> str:
    """The fact as the analyzer names it: deployments[01].age is deployments[1].age (as
    written, it was never among the facts, and its step silently never applied)."""
    m = _INDEXED.fullmatch(fact)
    return fact if m is None else f"deployments[{int(m.group(1))}].age"


def _literal(tok: _Tok, kind: str) -> float:
    m = _DURATION.fullmatch(tok.text)
    if kind == "duration":
        if m is None:
            raise ExprError(f"expected a duration such as 30m, got {tok.text!r}", tok.pos)
        return float(m.group(1)) * _UNITS[m.group(2)]
    if m is not None:
        raise ExprError(f"a {kind} is a plain number, got the duration {tok.text!r}", tok.pos)
    return float(tok.text)


def parse(text: str) -> Expr:
    """The condition's tree; ExprError names the position of the first problem."""
    if len(text) > 1000:
        raise ExprError("a condition is at most 1000 characters", 1001)
    p = _Parser(text)
    tree = p.expr()
    rest = p.peek()
    if rest.kind != "end":
        raise ExprError(f"unexpected {rest.text!r} (join comparisons with AND/OR)", rest.pos)
    return tree


def facts_in(expr: Expr) -> tuple[str, ...]:
    match expr:
        case Compare(fact=fact):
            return (fact,)
        case Not(operand=x):
            return facts_in(x)
        case And(left=a, right=b) | Or(left=a, right=b):
            return tuple(dict.fromkeys(facts_in(a) + facts_in(b)))
    raise AssertionError(expr)  # pragma: no cover - Expr is closed


def never_true(cmp: Compare) -> bool:
    """Whether no value the fact can take satisfies the comparison: a count is 0 to
    MAX_COUNT, a flag 0 or 1, the rest are never negative."""
    kind = fact_kind(cmp.fact)
    if kind == "count":
        return not any(_compare(float(v), cmp.op, cmp.value) for v in range(MAX_COUNT + 1))
    if kind == "flag":
        return not any(_compare(float(v), cmp.op, cmp.value) for v in (0, 1))
    return cmp.op == "<" and cmp.value <= 0


def compares_in(expr: Expr) -> tuple[Compare, ...]:
    match expr:
        case Compare():
            return (expr,)
        case Not(operand=x):
            return compares_in(x)
        case And(left=a, right=b) | Or(left=a, right=b):
            return compares_in(a) + compares_in(b)
    raise AssertionError(expr)  # pragma: no cover - Expr is closed


def _compare(a: float, op: str, b: float) -> bool:
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == "==":
        return a == b
    return a != b


def evaluate(expr: Expr, facts: Mapping[str, float]) -> bool | None:
    """True, False, or None when a fact it needs is missing from ``facts`` (and the rest
    does not decide it)."""
    match expr:
        case Compare(fact=fact, op=op, value=value):
            have = facts.get(fact)
            return None if have is None else _compare(have, op, value)
        case Not(operand=x):
            v = evaluate(x, facts)
            return None if v is None else not v
        case And(left=a, right=b):
            left, right = evaluate(a, facts), evaluate(b, facts)
            if left is False or right is False:
                return False
            return None if left is None or right is None else True
        case Or(left=a, right=b):
            left, right = evaluate(a, facts), evaluate(b, facts)
            if left is True or right is True:
                return True
            return None if left is None or right is None else False
    raise AssertionError(expr)  # pragma: no cover - Expr is closed


def render(expr: Expr) -> str:
    """The condition as text (fully parenthesised); parse(render(e)) == e."""
    match expr:
        case Compare(fact=fact, op=op, value=value):
            lit = format(Decimal(repr(value)), "f")  # never 1e+20: the grammar has no exponent
            return f"{fact} {op} {lit}{'s' if fact_kind(fact) == 'duration' else ''}"
        case Not(operand=x):
            return f"NOT ({render(x)})"
        case And(left=a, right=b):
            return f"({render(a)}) AND ({render(b)})"
        case Or(left=a, right=b):
            return f"({render(a)}) OR ({render(b)})"
    raise AssertionError(expr)  # pragma: no cover - Expr is closed
