"""The faust correlator on the real broker: grouping, dedup, and state restored from the
changelog after a restart."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from agent.metrics import Metrics
from agent.models import Anomaly, Incident, fingerprint, group_key, utcnow
from streams.bus import Bus
from streams.correlator import Correlator
from tests.helpers import make_settings, readers

pytestmark = pytest.mark.integration


def anomaly(service: str, name: str, status: str = "firing", at_offset: float = 0.0) -> Anomaly:
    labels = {"cluster": "test", "namespace": "shop", "service": service}
    now = utcnow() + timedelta(seconds=at_offset)
    return Anomaly(
        fingerprint=fingerprint("prometheus", name, labels), source="prometheus", name=name,
        severity="critical", status=status,  # type: ignore[arg-type]
        labels=labels, starts_at=now, observed_at=now, value=1.0,
    )


async def test_groups_dedups_and_restores_state_from_changelog(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    metrics = Metrics()
    bus = Bus(settings.kafka, metrics=metrics)
    await bus.start()
    await bus.create_topics()
    t = bus.topic
    by = settings.correlation.group_by

    async def send(*anomalies: Anomaly) -> None:
        await bus.publish_many([(t("anomalies"), a, group_key(a.labels, by)) for a in anomalies])

    try:
        async with readers(kafka_bootstrap, {"inc": (t("incidents"), Incident)}) as r:
            first = Correlator(settings, metrics=metrics)
            async with first:
                err_cart = anomaly("cart", "high-error-rate")
                # Two detector replicas publishing the same observation: one incident.
                await send(err_cart, replace(err_cart, id="replica-2"))
                await send(anomaly("cart", "high-latency", at_offset=0.5))
                await send(anomaly("pay", "high-error-rate"))
                await r["inc"].wait_for(
                    lambda xs: {(i.labels["service"], i.revision) for i in xs}
                    >= {("cart", 2), ("pay", 1)}, 60, "cart updated and pay opened",
                )
            cart_id = next(i.id for i in r["inc"].items if i.labels["service"] == "cart")
            seen = len(r["inc"].items)

            # A new worker of the same group restores the table from the changelog.
            second = Correlator(settings, metrics=metrics)
            async with second:
                await send(anomaly("cart", "high-error-rate", at_offset=1))  # a repeat
                await send(anomaly("cart", "high-error-rate", "resolved", at_offset=2))
                await send(anomaly("cart", "high-latency", "resolved", at_offset=2))
                items = await r["inc"].wait_for(
                    lambda xs: any(i.status == "resolved" for i in xs), 60, "cart resolved"
                )
    finally:
        await bus.stop()

    cart = [i for i in items if i.labels["service"] == "cart"]
    pay = [i for i in items if i.labels["service"] == "pay"]
    assert {i.id for i in cart} == {cart_id}, "restart must not open a second incident"
    assert [i.status for i in cart] == ["open", "updated", "updated", "resolved"]
    assert [i.revision for i in cart] == [1, 2, 3, 4]
    assert len(cart[-1].members) == 2 and all(m.status == "resolved" for m in cart[-1].members)
    assert len(pay) == 1 and pay[0].status == "open"
    # The repeat after the restart was absorbed: nothing between the old events and updates.
    assert all(i.labels["service"] == "cart" for i in items[seen:])
