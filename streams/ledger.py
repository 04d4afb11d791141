"""The hourly action budgets, arbitrated by Kafka between executor replicas.

Each replica knows every replica's executed actions (the executor watch), but two of them
deciding at the same instant each saw the other's action not yet done, and both spent the
last unit. Before it executes, an executor now appends a :class:`BudgetClaim` to the
single-partition ``budget-claims`` topic and reads the topic back up to its own claim:
the topic's order decides, the same for every replica (:func:`agent.policy.budget_grants`).
An action that then changes nothing (the cluster refused it) releases its unit. A node
action claims its node too, so that ``max_nodes_cordoned`` holds between replicas: from
its claim until it is done, it counts as cordoned for every later claim.

A claim costs a write and the wait for it to come back through :class:`ClaimLog`, one
group-less consumer that follows the topic from the first claim on (a fetch, not a new
consumer and a read of the hour each time). A decision that cannot be arbitrated is
retried, never taken blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from agent.codec import decode, encode
from agent.errors import (
    DependencyUnavailable,
    InvalidEvent,
    TransientError,
    cancel_and_wait,
    task_failure,
)
from agent.models import ActionRequest, BudgetClaim
from agent.policy import Verdict, budget_claim, budget_grants, claims_held, cordons
from agent.settings import KafkaSection, RemediationSection
from streams.bus import Bus, Envelope
from streams.replay import CLOCK_SKEW, groupless_consumer, recent

log = logging.getLogger(__name__)

# How long a claim waits for its own record to be read back before the action is retried.
READ_BACK_WAIT = 10.0


def held_for(remediation: RemediationSection) -> float:
    """Seconds of claims that can still count: the budget window, or a node claim's
    lifetime (the drain timeout and a margin) when longer, and a margin for clocks. Less
    would forget a node still being drained, and let another replica cordon past
    ``max_nodes_cordoned``."""
    return claims_held(remediation) + CLOCK_SKEW


async def recent_claims(
    kafka: KafkaSection, topic: str, remediation: RemediationSection
) -> list[Envelope]:
    """The claims that can still count, in the topic's order."""
    return await recent(kafka, topic, BudgetClaim, held_for(remediation), wait_s=10.0)


class ClaimLog:
    """The budget-claims topic as read so far: the claims that can still count (``held``
    seconds, see :func:`held_for`) when first asked, and every claim written since, in the
    topic's order. Started on first use and restarted on the next use after its consumer
    failed."""

    def __init__(self, kafka: KafkaSection, topic: str, held: float) -> None:
        self.kafka = kafka
        self.topic = topic
        self.held = held
        self._claims: list[Envelope] = []
        self._next = 0  # the offset after the last one read
        self._changed = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def upto(
        self, offset: int, now: datetime, *, wait_s: float = READ_BACK_WAIT
    ) -> list[BudgetClaim]:
        """The claims up to and including the one at ``offset``, once it has been read."""
        await self._ensure_following()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self._next <= offset:
            changed = self._changed
            if (failed := task_failure(self._task)) is not None:
                raise DependencyUnavailable(f"kafka: following {self.topic}: {failed!r}")
            left = deadline - loop.time()
            if left <= 0:
                raise TransientError(f"{self.topic}: offset {offset} not read back in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        horizon = now - timedelta(seconds=self.held)
        # Claims past the window count for nothing (budget_grants): let them go.
        self._claims = [e for e in self._claims if e.offset > offset or e.value.at > horizon]
        return [e.value for e in self._claims if e.offset <= offset]

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _ensure_following(self) -> None:
        async with self._lock:
            if self._task is not None and not self._task.done():
                return
            await self.stop()
            # A claim is answered as soon as it is written (the broker completes a waiting
            # fetch on new data): the long wait only spares an idle topic's polls.
            consumer = groupless_consumer(self.kafka, "budget", fetch_max_wait_ms=500)
            tp = TopicPartition(self.topic, 0)
            try:
                await consumer.start()
                consumer.assign([tp])
                since_ms = int((time.time() - self.held) * 1000)
                found = (await consumer.offsets_for_times({tp: since_ms}))[tp]
                if found is None:  # no claim that recent: from the end
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, found.offset)
                self._next = await consumer.position(tp)
            except KafkaError as err:
                await consumer.stop()
                raise DependencyUnavailable(f"kafka: following {self.topic}: {err}") from err
            except BaseException:
                await consumer.stop()
                raise
            self._claims = []
            self._consumer = consumer
            self._task = asyncio.create_task(self._follow(consumer, tp), name="budget-claims")

    async def _follow(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        while True:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for r in batch.get(tp, []):
                try:
                    claim = decode(BudgetClaim, r.value or b"")
                except InvalidEvent as err:
                    log.warning("%s: skipping a claim that does not decode: %s", self.topic, err)
                    continue
                self._claims.append(Envelope(self.topic, 0, r.offset, None, claim))
            # Past transaction markers and skipped records too.
            self._next = await consumer.position(tp)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()


class BudgetLedger:
    def __init__(self, bus: Bus, remediation: RemediationSection) -> None:
        self.bus = bus
        self.remediation = remediation
        self.topic = bus.topic("budget-claims")
        self.by = f"{bus.kafka.client_id}-{bus.name}"
        self.log = ClaimLog(bus.kafka, self.topic, held_for(remediation))

    async def claim(
        self, action: ActionRequest, now: datetime, cordoned: tuple[str, ...] = ()
    ) -> Verdict | None:
        """None when the budgets grant ``action`` a unit (and, for a node action that may
        cordon its node, that node, given the nodes its replica saw ``cordoned``; an
        uncordon claims none), else their denial."""
        offset = await self._append(budget_claim(action, now, by=self.by, cordoned=cordoned))
        try:
            upto = await self.log.upto(offset, now)
        except TransientError as err:
            raise TransientError(f"budget claim of action {action.id}: {err}") from err
        verdict = budget_grants(upto, self.remediation)[-1]
        if verdict is None:
            return None
        return Verdict(verdict.kind, verdict.rule, f"{verdict.reason}, as claimed by every replica")

    async def release(self, action: ActionRequest, now: datetime) -> None:
        """Give back the unit of an action that changed nothing."""
        await self._append(
            BudgetClaim(action.id, action.target.namespace, now, by=self.by, released=True)
        )

    async def done(self, action: ActionRequest, now: datetime) -> None:
        """A node action ended, having changed the cluster: its node no longer counts as in
        flight (the cluster shows its cordon now); its budget unit stays spent."""
        if cordons(action):  # only those claimed their node
            await self._append(
                BudgetClaim(action.id, action.target.namespace, now, by=self.by, done=True)
            )

    async def stop(self) -> None:
        await self.log.stop()

    async def _append(self, claim: BudgetClaim) -> int:
        try:
            sent = await self.bus.producer.send_and_wait(
                self.topic, encode(claim), key=claim.key.encode(), partition=0
            )
        except KafkaError as err:
            raise DependencyUnavailable(f"kafka: claiming the action budget: {err}") from err
        return int(sent.offset)
