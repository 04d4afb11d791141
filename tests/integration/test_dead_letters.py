"""Garbage and schema-violating messages to every consumer land in the dead-letter topic
with an error naming the field, while good messages keep flowing."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from agent.codec import encode
from agent.models import (
    ActionRequest,
    ActionResult,
    Anomaly,
    DeadLetter,
    Incident,
    Target,
    fingerprint,
    utcnow,
)
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from tests.helpers import make_settings, readers

pytestmark = pytest.mark.integration

GARBAGE = b"\x00\xffnot json at all"


def anomaly(service: str) -> Anomaly:
    labels = {"cluster": "test", "namespace": "shop", "service": service}
    now = utcnow()
    return Anomaly(
        fingerprint=fingerprint("prometheus", "high-error-rate", labels),
        source="prometheus",
        name="high-error-rate",
        severity="critical",
        status="firing",
        labels=labels,
        starts_at=now,
        observed_at=now,
        value=0.2,
    )


async def test_every_consumer_dead_letters_bad_input_and_keeps_going(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"remediation": {"require_approval": [], "verify_after": "1h"}},
    )
    cluster = FakeCluster()
    cluster.create_deployment(
        "shop", "cart", image="cart:v1", replicas=2, at=utcnow() - timedelta(hours=1)
    )
    agent = Agent(
        settings,
        roles=["correlator", "analyzer", "executor"],
        cluster=cluster,
        serve_http=False,
    )
    t = agent.bus.topic
    bad_anomaly = orjson.dumps({**orjson.loads(encode(anomaly("cart"))), "severity": "apocalyptic"})
    bad_incident = orjson.dumps({"id": "x", "key": "k", "status": "open"})
    bad_action = orjson.dumps({**orjson.loads(encode(_action())), "confidence": 7})
    bad_decision = orjson.dumps({"id": "d1", "request_id": "r1", "decision": "maybe"})
    bad = [
        (t("anomalies"), GARBAGE, "<body>: not valid JSON"),
        (t("anomalies"), bad_anomaly, "severity:"),
        (t("incidents"), bad_incident, "members: Field required"),
        (t("actions"), bad_action, "confidence: Input should be less than or equal to 1"),
        (t("decisions"), bad_decision, "decision: Input should be 'approve' or 'reject'"),
        (t("approvals"), b"[1, 2, 3]", "<body>: expected a JSON object"),
    ]
    async with (
        agent,
        readers(
            kafka_bootstrap,
            {
                "dlq": (t("dead-letter"), DeadLetter),
                "incidents": (t("incidents"), Incident),
                "results": (t("action-results"), ActionResult),
            },
        ) as r,
    ):
        for topic, raw, _ in bad:
            await agent.bus.publish(topic, raw, key="bad")
        # Good messages after the bad ones still flow through each consumer.
        await agent.bus.publish(t("anomalies"), anomaly("cart"), key="test/shop/cart")
        await agent.bus.publish(t("actions"), _action())

        def all_dead(xs: list[DeadLetter]) -> bool:
            return all(
                any(d.source_topic == topic and expected in d.error for d in xs)
                for topic, _, expected in bad
            )

        letters = await r["dlq"].wait_for(all_dead, 60, "a dead letter for each bad record")
        await r["incidents"].wait_for(lambda xs: len(xs) >= 1, 60, "incident")
        await r["results"].wait_for(
            lambda xs: any(x.action_id == "good-action" for x in xs), 60, "action result"
        )
    # Each bad record is dead-lettered once per consumer group that reads its topic.
    per_consumer = {(d.source_topic, d.offset, d.consumer) for d in letters}
    assert len(per_consumer) == len(letters), "no consumer dead-letters a record twice"
    for topic, _raw, expected in bad:
        match = [d for d in letters if d.source_topic == topic and expected in d.error]
        assert match, f"no dead letter for {topic} containing {expected!r}: {letters}"
    garbage = next(d for d in letters if "not valid JSON" in d.error)
    assert garbage.raw_encoding == "base64"  # not UTF-8: kept byte-exact
    text = next(d for d in letters if d.source_topic == t("anomalies") and "severity" in d.error)
    assert text.raw_encoding == "utf-8" and orjson.loads(text.raw)["severity"] == "apocalyptic"
    assert all(d.offset is not None and d.partition is not None for d in letters)
    assert (
        agent.metrics.registry.get_sample_value(
            "sre_agent_dead_letters_total", {"topic": t("anomalies"), "consumer": "correlator"}
        )
        == 2
    )
    w = await cluster.workload(Target(kind="Deployment", namespace="shop", name="cart"))
    assert w.replicas == 3  # the good scale_up went through after the bad action


def _action() -> ActionRequest:
    return ActionRequest(
        id="good-action",
        incident_id="i1",
        incident_key="test/shop/cart",
        analysis_id="a1",
        type="scale_up",
        target=Target(kind="Deployment", namespace="shop", name="cart"),
        confidence=0.95,
        reason="test",
        requested_at=utcnow(),
        params={"replicas": "+1"},
        labels={"namespace": "shop", "service": "cart"},
    )
