"""The event model and its wire format: round trips, validation errors naming fields, ids."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.codec import FastDecoder, decode, encode, format_loc, from_obj, to_dict
from agent.errors import InvalidEvent
from agent.models import (
    SCHEMA_VERSION,
    ActionRequest,
    ActionResult,
    Analysis,
    Anomaly,
    ApprovalDecision,
    ApprovalRequest,
    DeadLetter,
    Incident,
    Member,
    RecommendedAction,
    Target,
    fingerprint,
    stable_id,
)
from tests.unit.factories import SHOP, T0, action, anomaly, at


def _member(name: str, status: Any = "firing", severity: Any = "critical") -> Member:
    return Member(
        fingerprint=fingerprint("prometheus", name, SHOP),
        name=name,
        source="prometheus",
        severity=severity,
        status=status,
        labels=dict(SHOP),
        first_seen=at(0),
        last_seen=at(30),
        value=0.25,
    )


def _incident() -> Incident:
    return Incident(
        id="inc-1",
        key="c1/shop/checkout",
        status="updated",
        severity="critical",
        labels=dict(SHOP),
        members=(_member("high-error-rate"), _member("high-latency", "resolved", "warning")),
        opened_at=at(0),
        updated_at=at(30),
        revision=3,
    )


def _analysis() -> Analysis:
    return Analysis(
        id="an-1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        incident_revision=3,
        analyzer="rules",
        root_cause="bad rollout",
        root_cause_class="bad_rollout",
        confidence=0.92,
        evidence=("pattern firing", "rollout at 12:00"),
        actions=(
            RecommendedAction(
                type="rollback",
                target=Target(kind="Deployment", namespace="shop", name="checkout"),
                params={"revision": 3, "force": True, "ratio": 0.5, "note": "x"},
                expected_impact="errors stop",
                rollback_plan="roll forward",
            ),
            RecommendedAction(type="cordon_node", target=Target(kind="Node", name="n1")),
        ),
        created_at=at(40),
        model_confidence=0.9,
        evidence_confidence=0.8,
        fallback_reason="llm timed out",
        rejected_actions=("drain_node",),
    )


def _approval_request() -> ApprovalRequest:
    act = action("rollback", params={"revision": 2})
    return ApprovalRequest(
        id="apr-1",
        action=act,
        action_hash=act.digest(),
        root_cause="bad rollout",
        evidence=("e1",),
        created_at=at(50),
        expires_at=at(3650),
    )


EVENTS: list[Any] = [
    anomaly(value=None),
    anomaly(status="resolved", value=0.5),
    _incident(),
    replace(_incident(), status="resolved", resolved_at=at(60)),
    _analysis(),
    action("scale_up", params={"replicas": "+2"}, approved_by="alice"),
    _approval_request(),
    ApprovalDecision(
        id="dec-1",
        request_id="apr-1",
        action_hash="abc",
        decision="approve",
        decided_by="alice",
        decided_at=at(70),
        reason="looks right",
    ),
    ActionResult(
        id="res-1",
        action_id="act-1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        type="rollback",
        target=Target(kind="Deployment", namespace="shop", name="checkout"),
        status="succeeded",
        outcome="unknown",
        message="rolled back",
        started_at=at(80),
        finished_at=at(81),
        prior_state={"revision": 3, "image": "shop:v2", "nested": {"a": [1, 2]}},
        service="checkout",
    ),
    DeadLetter(
        id="dl-1",
        source_topic="sre.anomalies",
        error="invalid Anomaly",
        raw="eyJ4Ijp9",
        raw_encoding="base64",
        failed_at=at(90),
        consumer="correlator",
        partition=2,
        offset=1234,
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_type_round_trips(event: Any) -> None:
    decoded = decode(type(event), encode(event))
    assert decoded == event
    assert type(decoded) is type(event)


def test_incident_members_and_analysis_actions_decode_to_their_dataclasses() -> None:
    inc = decode(Incident, encode(_incident()))
    assert all(isinstance(m, Member) for m in inc.members)
    assert [m.status for m in inc.members] == ["firing", "resolved"]
    assert inc.firing == (inc.members[0],)
    an = decode(Analysis, encode(_analysis()))
    assert all(isinstance(a, RecommendedAction) for a in an.actions)
    assert an.actions[0].params == {"revision": 3, "force": True, "ratio": 0.5, "note": "x"}
    assert an.actions[1].target == Target(kind="Node", name="n1", namespace="")


def test_approval_request_keeps_a_nested_action_whose_digest_still_matches() -> None:
    req = decode(ApprovalRequest, encode(_approval_request()))
    assert isinstance(req.action, ActionRequest)
    assert req.action.digest() == req.action_hash


def test_timestamps_are_utc_with_z_on_the_wire() -> None:
    wire = to_dict(anomaly(t=90))
    assert wire["observed_at"] == "2024-05-01T12:01:30Z"
    assert wire["schema_version"] == SCHEMA_VERSION


def test_unknown_fields_are_ignored_for_schema_evolution() -> None:
    wire = to_dict(anomaly())
    wire["added_by_a_newer_producer"] = {"x": 1}
    assert decode(Anomaly, orjson.dumps(wire)) == anomaly()


def test_decode_accepts_str_as_well_as_bytes() -> None:
    assert decode(Anomaly, encode(anomaly()).decode()) == anomaly()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_value_is_refused_not_silently_nulled(bad: float) -> None:
    # histogram_quantile() returns +Inf when the quantile falls in the +Inf bucket; JSON
    # cannot carry it, and orjson would write null. The model refuses it outright (the
    # detector keeps it as text in annotations instead, see test_detector).
    with pytest.raises(ValueError, match="value: must be finite"):
        anomaly(value=bad)


# --- hypothesis: any valid Anomaly survives the wire ----------------------------------------

_text = st.text(min_size=1, max_size=20)
_labels = st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=5)
_tz = st.integers(min_value=-23 * 60, max_value=23 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)
# Inside the window agent.models allows (a day in, for the time zones).
_when = st.datetimes(
    min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30), timezones=_tz | st.just(UTC)
)
anomalies = st.builds(
    Anomaly,
    fingerprint=_text,
    source=st.sampled_from(["prometheus", "kubernetes", "alertmanager", "feed", "agent"]),
    name=_text,
    severity=st.sampled_from(["info", "warning", "critical"]),
    status=st.sampled_from(["firing", "resolved"]),
    labels=_labels,
    starts_at=_when,
    observed_at=_when,
    annotations=_labels,
    value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    id=_text,
)


@settings(max_examples=200, deadline=None)
@given(anomalies)
def test_any_anomaly_round_trips(a: Anomaly) -> None:
    decoded = decode(Anomaly, encode(a))
    assert decoded == a
    assert decoded.observed_at.utcoffset() is not None
    assert decoded.key == a.key


# --- decode failures name the field ------------------------------------------------------------


def _problems(cls: type[Any], raw: bytes | str) -> tuple[str, ...]:
    with pytest.raises(InvalidEvent) as info:
        decode(cls, raw)
    assert info.value.kind == cls.__name__
    assert info.value.problems
    return info.value.problems


def _mutated(event: Any, **changes: Any) -> bytes:
    wire = to_dict(event)
    for path, value in changes.items():
        node: Any = wire
        *parents, last = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return orjson.dumps(wire)


_DELETE = object()


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00garbage", b"{not json", b"", b"{'a': 1}"])
def test_garbage_bytes_are_invalid_json(raw: bytes) -> None:
    (problem,) = _problems(Anomaly, raw)
    assert problem.startswith("<body>: not valid JSON")


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1, 2]", "list"), (b"null", "NoneType"), (b'"x"', "str"), (b"3", "int")]
)
def test_non_object_json_is_refused_naming_its_type(raw: bytes, kind: str) -> None:
    assert _problems(Anomaly, raw) == (f"<body>: expected a JSON object, got {kind}",)


def test_missing_field_is_named() -> None:
    problems = _problems(Anomaly, _mutated(anomaly(), name=_DELETE))
    assert problems == ("name: Field required",)


def test_every_missing_field_is_named_at_once() -> None:
    problems = _problems(Anomaly, b"{}")
    fields = {p.split(":")[0] for p in problems}
    assert fields == {
        "fingerprint",
        "source",
        "name",
        "severity",
        "status",
        "labels",
        "starts_at",
        "observed_at",
    }


def test_label_value_of_wrong_type_names_the_label() -> None:
    problems = _problems(Anomaly, _mutated(anomaly(), labels={"a": 1, "b": "ok"}))
    assert len(problems) == 1
    assert problems[0].startswith("labels.a: ")


def test_wrong_literal_is_named() -> None:
    problems = _problems(Anomaly, _mutated(anomaly(), severity="disaster"))
    assert len(problems) == 1
    assert problems[0].startswith("severity: ")
    assert "critical" in problems[0]


def test_naive_datetime_is_refused() -> None:
    problems = _problems(Anomaly, _mutated(anomaly(), starts_at="2024-05-01T12:00:00"))
    assert len(problems) == 1
    assert problems[0].startswith("starts_at: ")
    assert "timezone" in problems[0]


def test_empty_name_is_refused() -> None:
    assert _problems(Anomaly, _mutated(anomaly(), name=""))[0].startswith("name: ")


def test_member_status_is_named_by_index() -> None:
    problems = _problems(Incident, _mutated(_incident(), members__1__status="exploded"))
    assert len(problems) == 1
    assert problems[0].startswith("members[1].status: ")


def test_member_labels_not_a_mapping_is_named() -> None:
    problems = _problems(Incident, _mutated(_incident(), members__0__labels=["a"]))
    assert problems == ("members[0].labels: Input should be a valid dictionary",)


@pytest.mark.parametrize("confidence", [1.01, -0.1, 7])
def test_confidence_out_of_range_is_named(confidence: float) -> None:
    problems = _problems(Analysis, _mutated(_analysis(), confidence=confidence))
    assert len(problems) == 1
    assert problems[0].startswith("confidence: ")


def test_confidence_of_nested_action_is_named_by_path() -> None:
    problems = _problems(ApprovalRequest, _mutated(_approval_request(), action__confidence=1.5))
    assert len(problems) == 1
    assert problems[0].startswith("action.confidence: ")


def test_action_type_inside_analysis_is_named_by_path() -> None:
    problems = _problems(Analysis, _mutated(_analysis(), actions__1__type="reboot_planet"))
    assert len(problems) == 1
    assert problems[0].startswith("actions[1].type: ")


def test_several_problems_are_all_reported() -> None:
    raw = _mutated(anomaly(), severity="x", status="y", observed_at="yesterday")
    fields = {p.split(":")[0] for p in _problems(Anomaly, raw)}
    assert fields == {"severity", "status", "observed_at"}


def test_invalid_event_message_carries_kind_and_problems() -> None:
    with pytest.raises(InvalidEvent, match=r"^invalid Anomaly: name: Field required$"):
        decode(Anomaly, _mutated(anomaly(), name=_DELETE))


def test_from_obj_validates_python_objects_the_same_way() -> None:
    with pytest.raises(InvalidEvent) as info:
        from_obj(ActionRequest, {**to_dict(action()), "confidence": 2})
    assert info.value.problems[0].startswith("confidence: ")
    assert from_obj(ActionRequest, to_dict(action())) == action()


@pytest.mark.parametrize(
    ("loc", "text"),
    [
        (("members", 0, "labels"), "members[0].labels"),
        (("labels", "a"), "labels.a"),
        ((0, "x"), "[0].x"),
        ((), "<root>"),
    ],
)
def test_format_loc(loc: tuple[int | str, ...], text: str) -> None:
    assert format_loc(loc) == text


# --- ids and digests ---------------------------------------------------------------------------


_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(
    items=st.dictionaries(_keys, st.text(max_size=15), min_size=1, max_size=6),
    data=st.data(),
)
def test_fingerprint_is_independent_of_label_order(items: dict[str, str], data: Any) -> None:
    shuffled = dict(data.draw(st.permutations(list(items.items()))))
    assert fingerprint("prometheus", "p", shuffled) == fingerprint("prometheus", "p", items)


@settings(max_examples=100, deadline=None)
@given(items=st.dictionaries(_keys, st.text(max_size=15), min_size=1, max_size=6), data=st.data())
def test_fingerprint_changes_with_any_label_value(items: dict[str, str], data: Any) -> None:
    key = data.draw(st.sampled_from(sorted(items)))
    other = data.draw(st.text(max_size=15).filter(lambda v: v != items[key]))
    assert fingerprint("prometheus", "p", {**items, key: other}) != fingerprint(
        "prometheus", "p", items
    )


def test_fingerprint_is_stable_across_processes() -> None:
    # A pinned value: replicas and restarts must agree on it, so it may never drift.
    fp = fingerprint("prometheus", "high-error-rate", {"service": "a", "namespace": "b"})
    assert fp == stable_id("prometheus", "high-error-rate", "namespace=b\x1eservice=a")
    assert len(fp) == 32
    assert fp == fingerprint("prometheus", "high-error-rate", {"namespace": "b", "service": "a"})


def test_fingerprint_depends_on_source_name_and_label_keys() -> None:
    base = fingerprint("prometheus", "p", {"a": "1"})
    assert fingerprint("kubernetes", "p", {"a": "1"}) != base
    assert fingerprint("prometheus", "q", {"a": "1"}) != base
    assert fingerprint("prometheus", "p", {"b": "1"}) != base
    assert fingerprint("prometheus", "p", {"a": "1", "b": ""}) != base


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=10), max_size=5))
def test_stable_id_is_deterministic(parts: list[str]) -> None:
    assert stable_id(*parts) == stable_id(*parts)
    assert len(stable_id(*parts)) == 32
    assert int(stable_id(*parts), 16) >= 0


def test_stable_id_separates_parts() -> None:
    assert stable_id("ab", "c") != stable_id("a", "bc")
    assert stable_id("a") != stable_id("a", "")


def test_action_digest_depends_on_what_would_execute() -> None:
    base = action("scale_up", params={"replicas": "+1"})
    d = base.digest()
    assert replace(base).digest() == d
    assert replace(base, params={"replicas": "+2"}).digest() != d
    assert replace(base, params={"replicas": 1}).digest() != d  # "1" vs 1 differ
    assert replace(base, params={}).digest() != d
    assert replace(base, type="scale_down").digest() != d
    assert replace(base, target=replace(base.target, name="cart")).digest() != d
    assert replace(base, target=replace(base.target, namespace="other")).digest() != d
    assert replace(base, target=replace(base.target, kind="StatefulSet")).digest() != d
    assert replace(base, id="act-2").digest() != d


def test_action_digest_ignores_param_order_and_non_executed_fields() -> None:
    a = action(params={"a": 1, "b": "x"})
    b = action(params={"b": "x", "a": 1})
    assert a.digest() == b.digest()
    assert replace(a, reason="other", confidence=0.1, approved_by="bob").digest() == a.digest()


def test_keys_partition_by_service_and_target() -> None:
    assert anomaly().key == "c1/shop/checkout"
    assert anomaly(labels={"service": "s"}).key == "//s"
    act = action()
    assert act.key == "Deployment/shop/checkout" == act.target.key
    assert _approval_request().key == "apr-1"
    assert _analysis().key == "c1/shop/checkout"


def test_events_are_immutable() -> None:
    a = anomaly()
    with pytest.raises(AttributeError):
        a.name = "other"  # type: ignore[misc]


def test_aware_non_utc_timestamps_keep_their_instant() -> None:
    plus2 = timezone(timedelta(hours=2))
    a = replace(anomaly(), observed_at=T0.astimezone(plus2))
    decoded = decode(Anomaly, encode(a))
    assert decoded.observed_at == T0


# --- the msgspec fast path agrees with pydantic ---------------------------------------------

_TEXT = st.text(max_size=6)
_TIMES = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.datetimes(timezones=st.just(timezone(timedelta(hours=2)))).map(lambda d: d.isoformat()),
    st.just("2026-01-01T00:00:00Z"),
    st.just("2026-01-01T00:00:00"),  # naive: both must refuse
    st.just("yesterday"),
    st.integers(0, 2**31),
)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT)


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes anything else."""
    return st.one_of(valid, valid, valid, _SCALARS, st.lists(_SCALARS, max_size=2))


_LABELS = st.dictionaries(
    st.one_of(st.sampled_from(["service", "pod"]), st.text(max_size=300)),
    st.one_of(st.text(max_size=8), st.integers(), st.just("x" * 4097)),
    max_size=3,
)
_FIELDS = {
    "fingerprint": _maybe(st.one_of(st.text(min_size=1, max_size=8), st.just("f" * 1025))),
    "source": _maybe(st.sampled_from(["prometheus", "kubernetes", "feed", "Prometheus"])),
    "name": _maybe(st.text(max_size=8)),
    "severity": _maybe(st.sampled_from(["info", "warning", "critical", "fatal"])),
    "status": _maybe(st.sampled_from(["firing", "resolved"])),
    "labels": _maybe(_LABELS),
    "starts_at": _maybe(_TIMES),
    "observed_at": _maybe(_TIMES),
    "annotations": _maybe(_LABELS),
    "value": _maybe(st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False))),
    "id": _maybe(st.text(max_size=4)),
    "schema_version": _maybe(st.integers(-5, 2**70)),
    "extra": _SCALARS,  # unknown fields are ignored
}
_VALID = st.builds(
    lambda name, status, t: orjson.loads(encode(anomaly(name, status=status, t=t))),
    st.text(min_size=1, max_size=4),
    st.sampled_from(["firing", "resolved"]),
    st.floats(0, 1e6),
)


@st.composite
def _docs(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed anomaly with up to two fields replaced (by valid or invalid values)
    and maybe one removed."""
    doc: dict[str, Any] = draw(_VALID)
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=2, unique=True)):
        doc[name] = draw(_FIELDS[name])
    if draw(st.booleans()):
        doc.pop(draw(st.sampled_from(sorted(doc))))
    return doc


_DOCS = _docs()


@settings(max_examples=600, deadline=None)
@given(_DOCS)
def test_fast_decoder_accepts_nothing_pydantic_refuses_and_decodes_the_same(
    doc: dict[str, Any],
) -> None:
    raw = json.dumps(doc).encode()  # orjson refuses integers beyond 64 bits; a producer may not
    fast = FastDecoder(Anomaly)(raw)
    try:
        # The validators compared, not the parsers: msgspec reads numbers beyond 64 bits,
        # which orjson refuses as invalid JSON.
        slow: Anomaly | None = from_obj(Anomaly, json.loads(raw))
    except InvalidEvent:
        slow = None
    if fast is not None:
        assert slow is not None, f"msgspec accepted what pydantic refuses: {doc}"
        if "id" not in doc:  # a fresh id each time
            fast = replace(fast, id=slow.id)
        assert fast == slow
        assert encode(fast) == encode(slow)  # same types too (float value, UTC offsets)


@given(st.builds(anomaly, st.text(min_size=1), status=st.sampled_from(["firing", "resolved"])))
def test_fast_decoder_takes_every_well_formed_anomaly(a: Anomaly) -> None:
    assert FastDecoder(Anomaly)(encode(a)) == a
