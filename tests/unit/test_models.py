"""The hot path's constructors build the same objects as the dataclasses' own."""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from agent.codec import encode
from agent.models import (
    EARLIEST,
    EMPTY_KEY,
    LATEST,
    Anomaly,
    Incident,
    Member,
    check_window,
    group_key,
    new_incident,
    new_member,
)


def distinct_values(cls: type[Any]) -> list[object]:
    # A different object per field: a field set from its neighbour's argument shows.
    return [f"{f.name}-value" for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("cls", "build"), [(Member, new_member), (Incident, new_incident)])
def test_fast_constructors_set_every_field_as_the_dataclass_does(
    cls: type[Any], build: Any
) -> None:
    values = distinct_values(cls)
    fast, slow = build(*values), cls(*values)
    assert type(fast) is cls
    assert fast == slow
    assert hash(fast) == hash(slow)
    for f, v in zip(dataclasses.fields(cls), values, strict=True):
        assert getattr(fast, f.name) == v
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.status = "resolved"
    # What the correlator does with them next: copies, state and the wire.
    assert dataclasses.replace(fast) == slow
    assert pickle.loads(pickle.dumps(fast)) == slow
    assert encode(fast) == encode(slow)
    assert not hasattr(fast, "__dict__")


@pytest.mark.parametrize(("cls", "build"), [(Member, new_member), (Incident, new_incident)])
def test_fast_constructors_take_every_field(cls: type[Any], build: Any) -> None:
    # No defaults: a field added to the dataclass must be added to its constructor too.
    values = distinct_values(cls)
    with pytest.raises(TypeError):
        build(*values[:-1])


# Values rich in what the escaping writes ("%", "/", "2", "F", "5") and in what it must
# leave alone.
_value = st.text(alphabet="/%25Fa0", max_size=6)
_BY = ("cluster", "namespace", "service", "pod")


@settings(max_examples=500, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(*[st.tuples(_value, _value)] * n)))
def test_distinct_label_values_never_share_a_group_key(pairs: tuple[tuple[str, str], ...]) -> None:
    by = _BY[: len(pairs)]
    one = dict(zip(by, (a for a, _ in pairs), strict=True))
    other = dict(zip(by, (b for _, b in pairs), strict=True))
    k1, k2 = group_key(one, by), group_key(other, by)
    assert k1 and k2  # Incident.key must be non-empty, or its state cannot be read back
    assert (k1 == k2) == (one == other)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab-._", max_size=4), min_size=1, max_size=4))
def test_a_key_of_values_without_slash_or_percent_is_their_plain_join(values: list[str]) -> None:
    plain = "/".join(values)
    assume(plain)  # a lone empty value had no valid key before: nothing to keep
    by = _BY[: len(values)]
    # Unchanged from before escaping existed: groups keep their state and partition.
    assert group_key(dict(zip(by, values, strict=True)), by) == plain


def _key_as_before(labels: Mapping[str, str], by: tuple[str, ...]) -> str:
    """group_key before its values were read with one itemgetter: the reference."""
    values = [labels.get(k, "") for k in by]
    key = "/".join(values)
    if key and "%" not in key and key.count("/") == len(by) - 1:
        return key
    escaped = "/".join([v.replace("%", "%25").replace("/", "%2F") for v in values])
    return escaped or EMPTY_KEY


_names = st.sampled_from(["cluster", "namespace", "service", "pod"])


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(_names, _value),
    st.lists(_names, max_size=4).map(tuple),  # missing, repeated and no names too
    st.booleans(),
)
def test_a_group_key_is_the_same_as_before_the_itemgetter(
    labels: dict[str, str], by: tuple[str, ...], defaulting: bool
) -> None:
    expected = _key_as_before(labels, by)
    if defaulting:  # a mapping whose __missing__ would answer for an absent label
        labels = collections.defaultdict(lambda: "x", labels)
    before = dict(labels)
    assert group_key(labels, by) == expected
    assert group_key(labels, by) == expected  # and again, from the remembered getter
    assert labels == before  # nothing absent was filled in


def test_the_review_case_gives_two_groups_and_a_missing_lone_label_a_valid_key() -> None:
    by = ("cluster", "namespace")
    assert group_key({"cluster": "eu/prod", "namespace": "shop"}, by) == "eu%2Fprod/shop"
    assert group_key({"cluster": "eu", "namespace": "prod/shop"}, by) == "eu/prod%2Fshop"
    assert group_key({}, by) == "/"
    assert group_key({}, ("service",)) != ""


def _checked_as_before(value: float | None, starts: datetime, observed: datetime) -> None:
    """Anomaly.__post_init__ before its fast path: the reference it must agree with."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"value: must be finite, got {value!r}")
    check_window("starts_at", starts)
    check_window("observed_at", observed)


# Aware times around both edges of the window and far outside it, and naive ones (which
# cannot be compared with the window's bounds).
_zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])
_when = st.one_of(
    st.datetimes(timezones=_zones),
    st.datetimes(),
    st.datetimes(datetime(1999, 12, 31), datetime(2000, 1, 2), timezones=_zones),
    st.datetimes(LATEST.replace(tzinfo=None) - timedelta(days=1), datetime(2100, 1, 2)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
)


@settings(max_examples=500, deadline=None)
@given(st.none() | st.floats(), _when, _when)
@example(None, EARLIEST, LATEST)  # the edges themselves: the first is in, the second out
@example(None, LATEST, EARLIEST)
@example(None, EARLIEST - timedelta(microseconds=1), EARLIEST)
@example(1.0, EARLIEST, LATEST - timedelta(microseconds=1))
def test_an_anomaly_is_checked_as_it_was_before_the_fast_path(
    value: float | None, starts: datetime, observed: datetime
) -> None:
    try:
        _checked_as_before(value, starts, observed)
        expected: str | None = None
    except (ValueError, TypeError) as err:
        expected = f"{type(err).__name__}: {err}"
    try:
        Anomaly(
            fingerprint="f",
            source="prometheus",
            name="n",
            severity="warning",
            status="firing",
            labels={},
            starts_at=starts,
            observed_at=observed,
            value=value,
        )
        got: str | None = None
    except (ValueError, TypeError) as err:
        got = f"{type(err).__name__}: {err}"
    assert got == expected
