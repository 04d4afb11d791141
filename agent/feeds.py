"""External Kafka feeds: topics any Kafka client writes, normalised into anomalies.

Each configured feed (``detectors.feeds``) is a topic carrying either Alertmanager-format
JSON (a webhook payload, a single alert or an array of alerts) or the project's own
Anomaly JSON. One :class:`streams.bus.BatchConsumer` reads them all in the detector
group, so replicas share the partitions; records are decoded once and republished to the
anomalies topic keyed by the correlation key. A record that does not decode goes to the
dead-letter topic with the reason naming the field, and offsets are committed only after
the anomalies are durable.

A record's alerts that are no anomaly (the agent's own ``SREAgent*`` alerts and the
configured heartbeat, :func:`agent.alerts.ignored_reason`, as the webhook decides), in
either format, are decoded as :class:`~agent.alerts.Ignored` and counted and logged by the
handler, never republished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from functools import partial

from agent.alerts import (
    AlertFilter,
    Ignored,
    IgnoredAlerts,
    alert_filter,
    ignored_reason,
    parse_alertmanager_record,
    to_anomaly,
)
from agent.codec import decode
from agent.detector import Publisher, publish_anomalies, refusals
from agent.errors import InvalidEvent
from agent.labels import normalise
from agent.metrics import Metrics
from agent.models import Anomaly, utcnow
from agent.settings import FeedSpec, Settings
from streams.bus import BatchConsumer, Bus, Decoder, Envelope


def decode_alertmanager(
    raw: bytes,
    *,
    cluster: str,
    group_by: tuple[str, ...],
    clock: Callable[[], datetime],
    ignore: AlertFilter | None = None,
) -> list[Anomaly | Ignored]:
    """The record's alerts as anomalies, each one :func:`ignored_reason` leaves out (the
    agent's own, the heartbeat) as :class:`Ignored` in its place."""
    now = clock()
    rules = ignore or AlertFilter()
    alerts = parse_alertmanager_record(raw)
    why = [ignored_reason(a.labels, rules) for a in alerts]
    anomalies = _checked(
        [
            to_anomaly(a, cluster=cluster, now=now, source="feed")
            for a, reason in zip(alerts, why, strict=True)
            if reason is None
        ],
        group_by,
    )
    left = iter(anomalies)
    return [
        next(left) if reason is None else Ignored(a.labels["alertname"], reason)
        for a, reason in zip(alerts, why, strict=True)
    ]


def _checked(anomalies: list[Anomaly], group_by: tuple[str, ...]) -> list[Anomaly]:
    """The anomalies, or InvalidEvent naming the field of the first that the correlator
    would refuse (e.g. a derived label too long) or Kafka would (a feed topic may take
    larger records than the producer sends): the feed's record is dead-lettered as it
    came, not the anomaly, and the rest of the batch goes on."""
    for i, a in enumerate(anomalies):
        if problems := refusals(a, group_by):
            raise InvalidEvent("Anomaly", [f"[{i}].{p} (name {a.name})" for p in problems])
    return anomalies


def decode_anomaly(
    raw: bytes,
    *,
    cluster: str,
    group_by: tuple[str, ...],
    ignore: AlertFilter | None = None,
) -> list[Anomaly | Ignored]:
    """The project's own format; labels get the same defaults as every other source (the
    producer's fingerprint is kept: it is the producer's statement of identity). An
    anomaly that is the agent's own alert or the heartbeat, by its ``alertname`` label or
    else its name (a forwarder of alerts names the anomaly after it), is :class:`Ignored`,
    as in an Alertmanager-format record."""
    a = decode(Anomaly, raw)
    if ignoring := _ignored_anomaly(a, ignore or AlertFilter()):
        return [ignoring]
    labels = normalise(a.labels, cluster)
    if labels != dict(a.labels):
        a = replace(a, labels=labels)
    return list(_checked([a], group_by))


def _ignored_anomaly(a: Anomaly, rules: AlertFilter) -> Ignored | None:
    """Pure: the anomaly as :class:`Ignored` when :func:`ignored_reason` leaves out its
    ``alertname`` label or its name, else None."""
    for name in (a.labels.get("alertname"), a.name):
        if name and (reason := ignored_reason({"alertname": name}, rules)) is not None:
            return Ignored(name, reason)
    return None


def decoder_for(
    feed: FeedSpec,
    *,
    cluster: str,
    group_by: tuple[str, ...],
    clock: Callable[[], datetime] = utcnow,
    ignore: AlertFilter | None = None,
) -> Decoder:
    if feed.format == "alertmanager":
        return partial(
            decode_alertmanager, cluster=cluster, group_by=group_by, clock=clock, ignore=ignore
        )
    return partial(decode_anomaly, cluster=cluster, group_by=group_by, ignore=ignore)


class FeedNormaliser:
    """The handler: republish a batch's anomalies to the anomalies topic, keyed; count and
    log the alerts its records' decoding ignored."""

    def __init__(
        self, settings: Settings, *, publish: Publisher, topic: str, metrics: Metrics
    ) -> None:
        self.group_by = settings.correlation.group_by
        self.publisher = publish
        self.topic = topic
        self.metrics = metrics
        self.ignored = IgnoredAlerts(metrics, source="feed")

    async def handle(self, batch: list[Envelope]) -> None:
        items = [a for env in batch if env.value is not None for a in env.value]
        anomalies = [a for a in items if isinstance(a, Anomaly)]
        await publish_anomalies(
            self.publisher, self.topic, anomalies, group_by=self.group_by, metrics=self.metrics
        )
        # Once the batch is done: a batch retried after a failed publish counts them once.
        for i in items:
            if isinstance(i, Ignored):
                self.ignored.record(i.name, i.reason)


def feed_consumer(
    settings: Settings,
    *,
    bus: Bus,
    metrics: Metrics,
    clock: Callable[[], datetime] = utcnow,
    from_beginning: bool = False,
) -> BatchConsumer | None:
    """The consumer of every configured feed, or None when there are none.

    A new group starts at the end of the feeds (``from_beginning=False``): alerts that
    were stale before the agent first ran must not open incidents now.
    """
    feeds = settings.detectors.feeds
    if not feeds:
        return None
    cluster = settings.agent.cluster
    normaliser = FeedNormaliser(
        settings, publish=bus, topic=bus.topic("anomalies"), metrics=metrics
    )
    return BatchConsumer(
        bus,
        name="feeds",
        group_id=f"{settings.kafka.topic_prefix}detector-feeds",
        topics={
            f.topic: decoder_for(
                f,
                cluster=cluster,
                group_by=settings.correlation.group_by,
                clock=clock,
                ignore=alert_filter(settings),
            )
            for f in feeds
        },
        handler=normaliser.handle,
        from_beginning=from_beginning,
        stuck_after=settings.agent.stuck_after,
    )
