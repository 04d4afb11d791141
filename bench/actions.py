"""What the executor's cross-replica safety costs per action, on the real broker, against
the same executor without it in the same run.

1. Budget claims: an executed action first claims its unit on the budget-claims topic and
   waits until the ledger's follower of the topic has read it back (streams.ledger).
   Baseline: the same actions, no claims.
2. Feed re-check: verifying an action triggered by an external feed reads what the feed
   reported since the action from the incident's partition of the anomalies topic, here
   holding a busy minute of other services' reports. Baselines: the same verification
   with the feed part left unchecked, and a raw read of the same records (the floor).

The cluster is the in-process fake, so the numbers are the agent's own cost, not the API
server's. Usage: python bench/actions.py [--bootstrap H:P] [--actions N] [--reports N]
Prints numbers and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from agent.metrics import Metrics
from agent.models import ActionRequest, Anomaly, Firing, Target, fingerprint, utcnow
from agent.settings import Settings, parse_settings
from handlers.executor import Executor
from handlers.fake_cluster import FakeCluster
from streams.bus import Bus
from streams.ledger import BudgetLedger
from streams.partitioning import partition_for
from streams.replay import CLOCK_SKEW, reports_since, snapshot


def settings_for(bootstrap: str) -> Settings:
    return parse_settings(
        {
            "agent": {"cluster": "c1"},
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic_prefix": f"bench-{uuid.uuid4().hex[:6]}.",
                "partitions": 2,
            },
            "remediation": {
                "max_actions_per_hour": 100_000,
                "max_actions_per_namespace_per_hour": 100_000,
                "cooldown": 0,
                "verify_after": "1h",
                "require_approval": [],
                "confidence_threshold": 0.5,
            },
        },
        env={},
    )


def scale_up(name: str, firing: tuple[Firing, ...] = ()) -> ActionRequest:
    """A scale-up of shop/``name``, as the analysis stage would request it."""
    return ActionRequest(
        id=f"act-{uuid.uuid4().hex[:12]}",
        incident_id=f"inc-{uuid.uuid4().hex[:8]}",
        incident_key=f"c1/shop/{name}",
        analysis_id="bench",
        type="scale_up",
        target=Target(kind="Deployment", namespace="shop", name=name),
        confidence=0.9,
        reason="bench",
        requested_at=utcnow(),
        labels={"cluster": "c1", "namespace": "shop", "service": name},
        trigger=tuple(f.name for f in firing),
        firing=firing,
    )


def executors(
    settings: Settings, bus: Bus, cluster: FakeCluster, **check: Any
) -> tuple[Executor, Executor]:
    """The baseline executor, and the same with the ``check`` measured."""
    return (
        Executor(settings, bus=bus, cluster=cluster, metrics=Metrics()),
        Executor(settings, bus=bus, cluster=cluster, metrics=Metrics(), **check),
    )


async def timed(n: int, step: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await step(i)
        out.append(time.perf_counter() - t0)
    return out


def line(label: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10)
    return f"  {label:28s} p50 {statistics.median(xs) * 1000:7.1f} ms   p90 {q[8] * 1000:7.1f} ms"


async def claims(settings: Settings, bus: Bus, n: int) -> None:
    cluster = FakeCluster()
    for i in range(2 * n):
        cluster.create_deployment("shop", f"svc-{i}", image="v1", replicas=2, at=utcnow())
    plain, claiming = executors(
        settings, bus, cluster, budget=BudgetLedger(bus, settings.remediation)
    )

    async def run(ex: Executor, i: int) -> None:
        result = await ex.on_action(scale_up(f"svc-{i}"))
        assert result.status == "succeeded", result.message

    base = await timed(n, lambda i: run(plain, i))
    with_claims = await timed(n, lambda i: run(claiming, n + i))
    await plain.stop()
    await claiming.stop()
    print(f"budget claims ({n} actions executed one after another):")
    print(line("executor alone", base))
    print(line("with claims", with_claims))
    ratio = statistics.median(with_claims) / statistics.median(base)
    print(f"  ratio {ratio:.1f}x at p50")


def report(labels: dict[str, str], status: str, seconds: float) -> Anomaly:
    at = utcnow() + timedelta(seconds=seconds)
    return Anomaly(
        fingerprint=fingerprint("feed", "CheckoutLatencyHigh", labels),
        source="feed",
        name="CheckoutLatencyHigh",
        severity="critical",
        status=status,  # type: ignore[arg-type]
        labels=labels,
        starts_at=at,
        observed_at=at,
    )


async def feed_recheck(settings: Settings, bus: Bus, n: int, reports: int) -> None:
    cluster = FakeCluster()
    cluster.create_deployment("shop", "checkout", image="v1", replicas=2, at=utcnow())
    labels = {"cluster": "c1", "namespace": "shop", "service": "checkout"}
    where = {"namespace": "shop", "service": "checkout"}
    req = scale_up("checkout", (Firing("CheckoutLatencyHigh", where, "feed"),))
    since = utcnow()
    # A busy minute of the group's partition: other services' reports beside this one's
    # (services whose group shares the partition), then the feed's word on this one.
    topic = bus.topic("anomalies")
    mine = partition_for(req.incident_key, settings.kafka.partitions)
    others = (f"svc-{i}" for i in range(10**6))
    neighbours = [s for s in others if partition_for(f"c1/shop/{s}", 2) == mine][:50]
    noise = [
        report({**labels, "service": neighbours[i % 50], "pod": f"p{i}"}, "firing", 1)
        for i in range(reports)
    ]
    for i in range(0, len(noise), 500):
        await bus.publish_many([(topic, a, None) for a in noise[i : i + 500]])
    await bus.publish_many([(topic, report(labels, "resolved", 2), None)])
    plain, reading = executors(
        settings,
        bus,
        cluster,
        reports=lambda key, at: reports_since(settings.kafka, topic, key, at),
    )
    since_ms = int((since.timestamp() - CLOCK_SKEW) * 1000)
    raw = await timed(
        n,
        lambda _: snapshot(settings.kafka, topic, None, since_ms=since_ms, key=req.incident_key),
    )
    base = await timed(n, lambda _: plain.verify_now(req, since=since))
    read = await timed(n, lambda _: reading.verify_now(req, since=since))
    outcome, why = await reading.verify_now(req, since=since)
    await plain.stop()
    await reading.stop()
    print(f"feed re-check ({n} verifications, {reports + 1} reports since the action):")
    print(line("feed part unchecked", base))
    print(line("raw read of the partition", raw))
    print(line("reading the feed's reports", read))
    ratio = statistics.median(read) / statistics.median(raw)
    print(f"  ratio to the raw read {ratio:.2f}x at p50; verdict: {outcome} ({why.split(';')[0]})")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:19092")
    ap.add_argument("--actions", type=int, default=40)
    ap.add_argument("--reports", type=int, default=20_000)
    args = ap.parse_args()
    settings = settings_for(args.bootstrap)
    bus = Bus(settings.kafka, metrics=Metrics(), name="bench")
    await bus.start()
    try:
        await bus.create_topics()
        await claims(settings, bus, args.actions)
        await feed_recheck(settings, bus, args.actions, args.reports)
    finally:
        await bus.stop()


if __name__ == "__main__":
    asyncio.run(main())
