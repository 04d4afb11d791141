"""Calibration: predicted confidence against verified outcomes, per action type.

A small consumer of ``actions`` (the predicted confidence of each action id) and
``action-results`` (the verifier's outcome for that id). Each verified outcome (healed,
not_healed, worse) increments
``sre_agent_confidence_outcomes_total{action, confidence_bucket, outcome}``, so an operator
can check calibration: in the ``0.85-0.95`` bucket about 85-95% of outcomes should be
``healed``. Unverified results (``unknown``, ``not_applicable``) say nothing about the
prediction and are not counted.

The id -> confidence map lives in memory (bounded). At start it is seeded from the actions
requested within ``PRELOAD_SECONDS`` (by record timestamp), so a restart does not drop the
outcomes of actions in flight; older ones are skipped, so the tally is a sample, not a
ledger (Prometheus keeps the counts across restarts).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from agent.metrics import Metrics
from agent.models import ActionRequest, ActionResult
from streams.bus import Envelope
from streams.replay import RecentSource

log = logging.getLogger(__name__)

# Upper edges; the policy's default threshold (0.85) is an edge, so "would execute alone"
# and "needs approval" never share a bucket.
EDGES = (0.5, 0.7, 0.85, 0.95, 1.0)
VERIFIED = frozenset({"healed", "not_healed", "worse"})
MAX_REMEMBERED = 50_000
PRELOAD_SECONDS = 6 * 3600.0


def confidence_bucket(confidence: float) -> str:
    lo = 0.0
    for hi in EDGES:
        if confidence < hi or hi == 1.0:
            return f"{lo:.2f}-{hi:.2f}"
        lo = hi
    raise AssertionError("unreachable")


class CalibrationTracker:
    def __init__(
        self,
        *,
        metrics: Metrics,
        actions: RecentSource | None = None,
    ) -> None:
        self.metrics = metrics
        self._actions = actions
        self._predicted: OrderedDict[str, float] = OrderedDict()
        self._counted: OrderedDict[str, None] = OrderedDict()  # result ids, for redelivery

    async def start(self) -> None:
        """Seed the predictions of recently requested actions (see the module doc)."""
        if self._actions is not None:
            for env in await self._actions(PRELOAD_SECONDS):
                if isinstance(env.value, ActionRequest):
                    self._remember(env.value)
            log.info("calibration: %d recent predictions loaded", len(self._predicted))

    async def stop(self) -> None:
        return None

    def _remember(self, action: ActionRequest) -> None:
        self._predicted[action.id] = action.confidence
        self._predicted.move_to_end(action.id)
        while len(self._predicted) > MAX_REMEMBERED:
            self._predicted.popitem(last=False)

    def predicted(self, action_id: str) -> float | None:
        return self._predicted.get(action_id)

    async def handle(self, batch: Sequence[Envelope]) -> None:
        for env in batch:
            value = env.value
            if isinstance(value, ActionRequest):
                self._remember(value)
            elif isinstance(value, ActionResult):
                self.on_result(value)

    def on_result(self, result: ActionResult) -> None:
        if result.outcome not in VERIFIED or result.id in self._counted:
            return
        confidence = self._predicted.get(result.action_id)
        if confidence is None:
            log.debug("outcome of %s: its prediction is unknown here", result.action_id)
            return
        self._counted[result.id] = None
        while len(self._counted) > MAX_REMEMBERED:
            self._counted.popitem(last=False)
        self.metrics.confidence_outcomes.labels(
            action=result.type,
            confidence_bucket=confidence_bucket(confidence),
            outcome=result.outcome,
        ).inc()
