"""Variables in a runbook file's PromQL (``spec.context.gather[].queries``), replaced by
the incident's labels when the query is gathered.

A variable is ``$name`` inside a quoted string literal, as in
``rate(http_requests_total{namespace="$namespace"}[5m])``. Label values come from alerts
and anomalies: untrusted. A value is written into the literal escaped for it (backslash,
the quote, newline and other control characters), so whatever it holds it stays inside
that one literal and the query's structure is the one the runbook's author wrote. In a
regex matcher (``=~``/``!~``) it is also escaped as a regex: it matches itself, not a
pattern of its own.

Variables are only read inside ``"..."`` and ``'...'`` literals: outside one a value could
only be spliced in as PromQL, and a raw ```...``` literal has no escape to keep one in.
Both are refused when the runbook loads, as is a variable the agent does not know. A ``$``
not followed by a name (the ``$`` of a regex's end anchor) is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# $variable -> the incident label it is replaced by. The reference's runbooks name none;
# the namespace is what a runbook shared by several namespaces needs.
VARIABLES: Mapping[str, str] = {"namespace": "namespace"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGEX_META = frozenset("\\.+*?()|[]{}^$")


@dataclass(frozen=True, slots=True)
class Slot:
    """One ``$name`` of a query: where it is, and the literal it is in."""

    name: str
    start: int  # of the "$"
    end: int
    quote: str  # '"' or "'"
    regex: bool  # the literal is a regex matcher's (=~, !~)


def _regex_literal(query: str, quote_at: int) -> bool:
    before = query[:quote_at].rstrip()
    return before.endswith(("=~", "!~"))


def slots(query: str) -> tuple[list[Slot], str | None]:
    """The variables of ``query``, or the problem found (a variable outside a quoted
    literal or in a raw one, an unknown variable, an unterminated literal)."""
    found: list[Slot] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == "#":  # a comment, to the end of the line
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c == "$" and (m := _NAME.match(query, i + 1)):
            return [], f'${m.group()} is outside a string literal: write it inside "..."'
        if c not in "\"'`":
            i += 1
            continue
        quote, regex, i = c, _regex_literal(query, i), i + 1
        while i < n and query[i] != quote:
            if query[i] == "\\" and quote != "`":
                i += 2
                continue
            if query[i] == "$" and (m := _NAME.match(query, i + 1)):
                name = m.group()
                if quote == "`":
                    return [], f'${name} is in a `raw` string, which has no escapes: use "..."'
                if name not in VARIABLES:
                    known = ", ".join(f"${v}" for v in sorted(VARIABLES))
                    return [], f"unknown variable ${name} (known: {known})"
                found.append(Slot(name, i, m.end(), quote, regex))
                i = m.end()
                continue
            i += 1
        if i >= n:
            return [], "a string literal is not terminated"
        i += 1
    return found, None


def escape(value: str, quote: str, *, regex: bool = False) -> str:
    """``value`` written inside a ``quote``-quoted PromQL string literal (Go's escapes)."""
    if regex:
        value = "".join(f"\\{c}" if c in _REGEX_META else c for c in value)
    out: list[str] = []
    for c in value:
        if c in ("\\", quote):
            out.append(f"\\{c}")
        elif c == "\n":
            out.append("\\n")
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def substitute(query: str, labels: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(``query`` with its variables replaced by the incident's ``labels``, the problem):
    a label the incident lacks (or has empty) is a problem, not an empty value that would
    widen the query."""
    found, problem = slots(query)
    if problem is not None:
        return None, problem
    out: list[str] = []
    pos = 0
    for s in found:
        label = VARIABLES[s.name]
        value = labels.get(label, "")
        if not value:
            return None, f"the incident has no {label} label for ${s.name}"
        out += [query[pos : s.start], escape(value, s.quote, regex=s.regex)]
        pos = s.end
    out.append(query[pos:])
    return "".join(out), None
