"""The hourly action budgets, arbitrated by Kafka between executor replicas.

Each replica knows every replica's executed actions (the executor watch), but two of them
deciding at the same instant each saw the other's action not yet done, and both spent the
last unit. Before it executes, an executor now appends a :class:`BudgetClaim` to the
single-partition ``budget-claims`` topic and reads the topic back up to its own claim:
the topic's order decides, the same for every replica (:func:`agent.policy.budget_grants`).
An action that then changes nothing (the cluster refused it) releases its unit. A node
action claims its node too, so that ``max_nodes_cordoned`` holds between replicas: from
its claim until it is done, it counts as cordoned for every later claim.

A claim costs a write and a read of the last hour's claims, once per action executed:
actions are few, and a decision that cannot be arbitrated is retried, never taken blind.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from aiokafka.errors import KafkaError

from agent.codec import encode
from agent.errors import DependencyUnavailable, TransientError
from agent.models import ActionRequest, BudgetClaim
from agent.policy import BUDGET_WINDOW, NODE_ACTIONS, Verdict, budget_grants
from agent.settings import KafkaSection, RemediationSection
from streams.bus import Bus, Envelope
from streams.replay import CLOCK_SKEW, recent


async def recent_claims(kafka: KafkaSection, topic: str) -> list[Envelope]:
    """The claims of the last budget window (and a margin for clocks), in the topic's
    order."""
    return await recent(kafka, topic, BudgetClaim, BUDGET_WINDOW + CLOCK_SKEW, wait_s=10.0)


class BudgetLedger:
    def __init__(self, bus: Bus, remediation: RemediationSection) -> None:
        self.bus = bus
        self.remediation = remediation
        self.topic = bus.topic("budget-claims")
        self.by = f"{bus.kafka.client_id}-{bus.name}"

    async def claim(
        self, action: ActionRequest, now: datetime, cordoned: tuple[str, ...] = ()
    ) -> Verdict | None:
        """None when the budgets grant ``action`` a unit (and, for a node action, its node,
        given the nodes its replica saw ``cordoned``), else their denial."""
        node = action.target.name if action.type in NODE_ACTIONS else ""
        offset = await self._append(
            BudgetClaim(
                action.id,
                action.target.namespace,
                now,
                by=self.by,
                node=node,
                cordoned=cordoned if node else (),
            )
        )
        for _ in range(3):
            records = await recent_claims(self.bus.kafka, self.topic)
            upto = [e for e in records if e.offset <= offset and isinstance(e.value, BudgetClaim)]
            if upto and upto[-1].offset == offset:
                verdict = budget_grants([e.value for e in upto], self.remediation)[-1]
                if verdict is None:
                    return None
                return Verdict(
                    verdict.kind, verdict.rule, f"{verdict.reason}, as claimed by every replica"
                )
            await asyncio.sleep(0.2)  # acknowledged, not yet readable: rare
        raise TransientError(f"budget claim of action {action.id} not read back in time")

    async def release(self, action: ActionRequest, now: datetime) -> None:
        """Give back the unit of an action that changed nothing."""
        await self._append(
            BudgetClaim(action.id, action.target.namespace, now, by=self.by, released=True)
        )

    async def done(self, action: ActionRequest, now: datetime) -> None:
        """A node action ended, having changed the cluster: its node no longer counts as in
        flight (the cluster shows its cordon now); its budget unit stays spent."""
        if action.type in NODE_ACTIONS:
            await self._append(
                BudgetClaim(action.id, action.target.namespace, now, by=self.by, done=True)
            )

    async def _append(self, claim: BudgetClaim) -> int:
        try:
            sent = await self.bus.producer.send_and_wait(
                self.topic, encode(claim), key=claim.key.encode(), partition=0
            )
        except KafkaError as err:
            raise DependencyUnavailable(f"kafka: claiming the action budget: {err}") from err
        return int(sent.offset)
