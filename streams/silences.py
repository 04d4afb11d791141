"""Silences: a compacted topic every correlator worker reads in full and keeps following.

Silences are global (any anomaly on any partition may match), so they are not partitioned
state: each worker holds all of them. Creating or expiring one is a record on the topic
(`sre-agent silence add|expire`, or any Kafka client), keyed by the silence id; the latest
record per id wins, a tombstone deletes it.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial

from agent.codec import decode
from agent.models import Silence
from agent.settings import KafkaSection
from streams.replay import snapshot
from streams.view import CompactedView, apply_record


def apply(store: dict[str, Silence], key: str | None, raw: bytes | None) -> None:
    """Fold one record of the silences topic into ``store`` (pure apart from the dict)."""
    apply_record(store, key, raw, partial(decode, Silence))


class SilenceStore(CompactedView[Silence]):
    def __init__(self, kafka: KafkaSection, topic: str) -> None:
        super().__init__(kafka, topic, partial(decode, Silence), name="silences")

    @property
    def silences(self) -> dict[str, Silence]:
        return self.items

    def active(self, at: datetime) -> list[Silence]:
        return [s for s in self.silences.values() if s.active(at)]

    def all(self) -> list[Silence]:
        return list(self.silences.values())


async def current(kafka: KafkaSection, topic: str) -> list[Silence]:
    """The silences on the topic now, read once (for what needs them at start only, not a
    view to follow): the latest record of each id, tombstones deleting theirs."""
    store: dict[str, Silence] = {}
    for env in await snapshot(kafka, topic, None):  # raw, folded as the view folds them
        apply(store, env.key, env.value)
    return list(store.values())
