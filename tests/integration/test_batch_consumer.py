"""BatchConsumer retries on the real broker: after a failure mid-batch, only the events
from the failing one on are retried, so earlier ones are not handled (and their results
published) twice; a permanent failure is dead-lettered and the rest go on."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.errors import DependencyUnavailable, PermanentError
from agent.models import DeadLetter, Matcher, Silence, utcnow
from streams.bus import BatchConsumer, Envelope, handle_each
from tests.helpers import eventually, make_settings, readers, started_bus

pytestmark = pytest.mark.integration


def silence(i: int) -> Silence:
    now = utcnow()
    return Silence(
        id=f"s{i}",
        matchers=(Matcher("service", f"svc-{i}"),),
        starts_at=now,
        ends_at=now + timedelta(hours=1),
        created_by="test",
        comment="",
        created_at=now,
    )


async def test_a_failure_mid_batch_retries_only_the_rest(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    bus, _ = await started_bus(settings)
    topic = bus.topic("silences")  # one partition: the batch keeps its order
    handled: list[str] = []
    failed_once: set[str] = set()

    async def one(env: Envelope) -> None:
        sid = env.value.id
        if sid == "s2" and sid not in failed_once:
            failed_once.add(sid)
            raise DependencyUnavailable("the cluster did not answer", retry_after=0.05)
        if sid == "s4":
            raise PermanentError("no such target")
        handled.append(sid)

    async def handler(batch: list[Envelope]) -> None:
        await handle_each(batch, one)

    for i in range(6):
        await bus.publish(topic, silence(i), key=f"s{i}")
    consumer = BatchConsumer(
        bus, name="test", group_id=f"{topic_prefix}batch", topics={topic: Silence}, handler=handler
    )
    try:
        async with (
            readers(kafka_bootstrap, {"dlq": (bus.topic("dead-letter"), DeadLetter)}) as r,
            consumer,
        ):
            await eventually(lambda: len(handled) >= 5, 60, what="the batch handled")
            letters = await r["dlq"].wait_for(lambda xs: len(xs) >= 1, 30, "a dead letter")
    finally:
        await bus.stop()
    # Each event took effect once: s0, s1 were not repeated after s2 failed; s2 was
    # retried and succeeded; s4 was dead-lettered; s5 went on.
    assert handled == ["s0", "s1", "s2", "s3", "s5"]
    assert len(letters) == 1 and "PermanentError: no such target" in letters[0].error
