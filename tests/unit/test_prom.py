"""The Prometheus boundary over real HTTP: replies, and the warnings of partial ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.detector import PromQLDetector
from agent.metrics import Metrics
from agent.models import Anomaly
from agent.prom import InvalidQuery, PromClient, Sample, Vector
from agent.settings import parse_settings
from tests.fakes.publisher import MemoryBus
from tests.helpers import prometheus_query_api
from tests.unit.factories import at


@pytest.fixture
async def prom() -> AsyncIterator[tuple[PromClient, dict[str, Any]]]:
    """A PromClient talking to a local server that answers /api/v1/query with ``reply``."""
    async with prometheus_query_api(lambda q: q == "errors > 1") as (url, reply):
        client = PromClient(url)
        try:
            yield client, reply
        finally:
            await client.close()


def _vector(*services: str, **extra: Any) -> dict[str, Any]:
    result = [{"metric": {"service": s}, "value": [1717239600, "2"]} for s in services]
    return {"status": "success", "data": {"resultType": "vector", "result": result}, **extra}


async def test_the_warnings_of_a_partial_reply_are_kept(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    # prometheus-api-client returns only data.result: Thanos' "partial response" warning
    # was dropped, and the series of the missing store looked resolved.
    client, reply = prom
    reply.update(_vector("cart", warnings=["partial response: store eu-1 unavailable"]))
    got = await client.query_vector("errors > 1")
    assert got == Vector(
        [Sample({"service": "cart"}, 2.0)], ("partial response: store eu-1 unavailable",)
    )
    # The next reply of the same client is whole again: no warning carried over.
    reply.clear()
    reply.update(_vector("cart", "checkout"))
    got = await client.query_vector("errors > 1")
    assert got.warnings == () and len(got.samples) == 2
    assert await client.query("errors > 1") == got.samples


_NOT_VECTORS = {
    "scalar": [1717239600, "1"],
    "string": [1717239600, "db down"],
    "matrix": [{"metric": {"service": "cart"}, "values": [[1717239600, "2"]]}],
}


@pytest.mark.parametrize("kind", sorted(_NOT_VECTORS))
async def test_a_reply_that_is_not_an_instant_vector_is_the_query_s_fault(
    prom: tuple[PromClient, dict[str, Any]], kind: str
) -> None:
    # It read as a malformed reply, DependencyUnavailable: Prometheus looked down.
    client, reply = prom
    reply.update(status="success", data={"resultType": kind, "result": _NOT_VECTORS[kind]})
    with pytest.raises(InvalidQuery, match=rf"^'errors > 1' evaluates to a {kind}, not an"):
        await client.query_vector("errors > 1")


async def test_a_scalar_result_without_its_type_is_the_query_s_fault_too(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    client, reply = prom
    reply.update(status="success", data={"result": [1717239600, "1"]})  # a proxy dropped it
    with pytest.raises(InvalidQuery, match="evaluates to a scalar or string, not an"):
        await client.query_vector("errors > 1")


async def test_a_scalar_pattern_fails_as_that_pattern_s_query_not_as_an_outage(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    # Every slot of a pattern whose condition is a scalar counted as a Prometheus failure:
    # the shared breaker opened and every other pattern went unevaluated.
    client, reply = prom
    reply.update(status="success", data={"resultType": "scalar", "result": [1717239600, "1"]})
    settings = parse_settings(
        {
            "detectors": {"prometheus": {"failure_threshold": 2}},
            "patterns": [{"name": "db-down", "condition": "errors > 1"}],
        },
        env={},
    )
    bus, metrics = MemoryBus(), Metrics()
    d = PromQLDetector(settings, prom=client, publish=bus, topic="t", metrics=metrics)
    [p] = settings.patterns
    for t in range(4):
        assert await d.evaluate_once(p, at(15 * t)) == []
    assert not d.breaker.is_open
    published = [a for _, a, _ in bus.sent if isinstance(a, Anomaly)]
    assert {a.name for a in published} == {"pattern-query-failed"}
    failed = published[0]
    assert failed.labels["pattern"] == "db-down" and failed.status == "firing"
    assert failed.annotations["error"].startswith(
        "pattern db-down: 'errors > 1' evaluates to a scalar, not an instant vector"
    )
    value = metrics.registry.get_sample_value
    errors = {"pattern": "db-down", "reason": "invalid_query"}
    assert value("sre_agent_detector_errors_total", errors) == 4
    assert value("sre_agent_detector_errors_total", {**errors, "reason": "unavailable"}) is None


async def test_a_warning_is_cut_and_forges_no_log_line(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    # Any proxy in front of Prometheus writes the warnings: untrusted text, logged and
    # carried in the pattern's pattern-query-failed anomaly.
    client, reply = prom
    forged = "store down\n2026-12-07 ERROR agent: all clear\x1b[2J" + "x" * 1000
    reply.update(_vector("cart", warnings=[forged]))
    [warning] = (await client.query_vector("errors > 1")).warnings
    assert "\n" not in warning and "\x1b" not in warning
    assert warning.startswith("store down\\n2026-12-07 ERROR") and len(warning) < 520


async def test_prometheus_own_annotations_say_nothing_is_missing(
    prom: tuple[PromClient, dict[str, Any]],
) -> None:
    # Prometheus >= 2.46 annotates the expression ("PromQL warning: ..."): every series is
    # there. A store that did not answer is what makes a reply partial.
    client, reply = prom
    note = "PromQL warning: quantile value should be between 0 and 1"
    reply.update(_vector("cart", warnings=[note, "PromQL info: metric might not be a counter"]))
    assert not (await client.query_vector("errors > 1")).partial
    reply.update(_vector("cart", warnings=[note, "No StoreAPIs matched for this query"]))
    assert (await client.query_vector("errors > 1")).partial
