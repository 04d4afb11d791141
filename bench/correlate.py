"""Correlator benchmark on the real broker, against baselines measured in the same run.

Phases (each on its own topics):
1. passthrough: raw aiokafka consume -> orjson decode -> produce of the same messages,
   batched: the ceiling any Kafka consumer in Python reaches here. Beside it, the same
   with the correlator's own decode (validated Anomaly objects): what the decoding the
   correlator must do leaves of that ceiling, before any correlation. And the floor: a
   minimal correlator on plain aiokafka that dedups, groups and writes each changed group
   whole to an event and a state topic, and nothing else: what that output costs any
   Python correlator, before its semantics. And faust alone: a faust-streaming agent that
   consumes and decodes validated anomalies and outputs nothing: what faust's per-record
   path leaves of the ceiling for a correlator that runs in faust at all.
2. correlator throughput: the faust correlator (one worker) folding the same anomalies;
   events/s measured from first to last processed anomaly.
3. correlator latency: anomalies produced at a fixed rate; each one changes its incident,
   so anomaly-to-incident latency is measured per anomaly (p50/p99).
4. peer: Alertmanager ingesting the same alerts through its v2 API (if reachable).
5. pure work: the correlator's own decode, placement, fold and encode of the same batches,
   in process with no Kafka at all, per anomaly: what its semantics cost before any I/O,
   beside the per-anomaly budget that half the passthrough's rate leaves for everything.

Usage: python bench/correlate.py [--count N] [--rate R] [--bootstrap H:P] [--alertmanager URL]
Prints numbers and ratios; asserts nothing (timing belongs here, not in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agent.codec import encode
from agent.metrics import Metrics
from agent.models import Anomaly, AnomalyBatch, fingerprint, group_key
from agent.runtime import freeze_heap
from agent.settings import parse_settings
from streams.bus import create_topics
from streams.correlation import correlate_batch
from streams.correlator import Correlator, rules_from
from streams.faust_kafka import App
from streams.incident_json import IncidentEncoder
from streams.partitioning import decode_anomalies
from streams.topology import EMPTY, placements

SERVICES, NAMESPACES, NODES = 1000, 50, 200
GROUP_BY = ("cluster", "namespace", "service")  # correlation.group_by's default
# The topic-name prefixes this run used: its topics are deleted at the end, or the bench
# broker's log grows by gigabytes every run.
PREFIXES: list[str] = []


def new_prefix(stem: str) -> str:
    prefix = f"{stem}{uuid.uuid4().hex[:6]}"
    PREFIXES.append(prefix)
    return prefix


async def delete_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if t.startswith(tuple(PREFIXES))]
        if ours:
            await admin.delete_topics(ours)
    finally:
        await admin.close()


PATTERNS = ("high-error-rate", "high-latency", "pod-restart-loop", "oom-killed", "cpu-throttling")


def batched(records: list[tuple[bytes, bytes]], size: int) -> list[tuple[bytes, bytes]]:
    """The same anomalies as per-evaluation batches (one partition in the bench)."""
    out = []
    for i in range(0, len(records), size):
        chunk = b",".join(v for _, v in records[i : i + size])
        out.append((b"batch", b'{"anomalies":[' + chunk + b"]}"))
    return out


def make_anomalies(count: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs with realistic cardinality: 1k services in 50 namespaces on 200
    nodes; most anomalies repeat a known fingerprint, some resolve."""
    rng = random.Random(seed)
    # Recent: with a fixed date in the past, the correlator's timer resolved every incident
    # (quiet for resolve_timeout) a second in, and later anomalies, older than those
    # resolutions, were dropped as late copies: the run measured that no-op path.
    base = datetime.now(UTC) - timedelta(milliseconds=count)
    out = []
    for i in range(count):
        svc, replica = rng.randrange(SERVICES), rng.randrange(5)
        labels = {
            "cluster": "bench",
            "namespace": f"ns-{svc % NAMESPACES}",
            "service": f"svc-{svc}",
            "pod": f"svc-{svc}-{replica}",
            # A pod runs on one node: a random node per anomaly made nearly every anomaly a
            # new fingerprint (the node is a label) instead of a repeat.
            "node": f"node-{(svc * 5 + replica) % NODES}",
        }
        name = PATTERNS[rng.randrange(len(PATTERNS))]
        status = "resolved" if rng.random() < 0.1 else "firing"
        at = base + timedelta(milliseconds=i)
        a = Anomaly(
            fingerprint=fingerprint("prometheus", name, labels),
            source="prometheus",
            name=name,
            # A pattern has one severity, as a detector's does: a severity that changed at
            # random with every repeat would make most repeats a change of the incident.
            severity="critical" if name in ("high-error-rate", "oom-killed") else "warning",
            status=status,  # type: ignore[arg-type]
            labels=labels,
            starts_at=at,
            observed_at=at,
            value=rng.random(),
        )
        key = group_key(labels, GROUP_BY).encode()
        out.append((key, encode(a)))
    return out


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20)
    await p.start()
    try:
        futures = [await p.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await p.stop()


async def ensure(bootstrap: str, *topics: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def consumer_producer(
    bootstrap: str, src: str, *, fetch_bytes: int
) -> AsyncIterator[tuple[AIOKafkaConsumer, AIOKafkaProducer]]:
    """A consumer of ``src`` from its start in a group of its own, committing by hand, and
    a producer batching up to 1 MiB: the plain aiokafka pair the baselines run on."""
    c = AIOKafkaConsumer(
        src,
        bootstrap_servers=bootstrap,
        group_id=f"base-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=fetch_bytes,
    )
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20)
    await c.start()
    try:
        await p.start()
        try:
            yield c, p
        finally:
            await p.stop()
    finally:
        await c.stop()


async def passthrough(
    bootstrap: str, src: str, dst: str, count: int, decode: Callable[[bytes], object]
) -> float:
    """Records/s of consume -> decode -> produce of the same bytes."""
    done, t0 = 0, 0.0
    async with consumer_producer(bootstrap, src, fetch_bytes=8 << 20) as (c, p):
        while done < count:
            batches = await c.getmany(timeout_ms=100, max_records=5000)
            if batches and not t0:
                t0 = time.perf_counter()
            futures = []
            for records in batches.values():
                for r in records:
                    decode(r.value)  # the decode cost a consumer must pay
                    futures.append(await p.send(dst, value=r.value, key=r.key))
            await asyncio.gather(*futures)
            await c.commit()
            done += len(futures)
    return done / (time.perf_counter() - t0)


async def floor(bootstrap: str, src: str, out: str, state: str, anomalies: int) -> float:
    """Anomalies/s of the least a Python correlator with the correlator's outputs does: the
    floor under any design that publishes whole incidents. orjson dicts, unvalidated; dedup
    by fingerprint within groups keyed by cluster/namespace/service; per batch, each changed
    group written whole to an event topic and to a state topic (its changelog). No event
    time, lifecycle, topology, inhibition or silences; batches as large as the correlator's
    (2000 records, 16 MiB)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    done, t0 = 0, 0.0
    async with consumer_producer(bootstrap, src, fetch_bytes=16 << 20) as (c, p):
        while done < anomalies:
            batches = await c.getmany(timeout_ms=100, max_records=2000)
            if batches and not t0:
                t0 = time.perf_counter()
            changed: set[str] = set()
            for records in batches.values():
                for r in records:
                    doc = orjson.loads(r.value)
                    for a in doc.get("anomalies", (doc,)):
                        done += 1
                        key = group_key(a["labels"], GROUP_BY)
                        group = groups.setdefault(key, {})
                        member = group.get(a["fingerprint"])
                        if member is None:
                            group[a["fingerprint"]] = {**a, "first_seen": a["observed_at"]}
                            changed.add(key)
                            continue
                        if member["status"] != a["status"]:
                            member["status"] = a["status"]
                            changed.add(key)
                        member["observed_at"], member["value"] = a["observed_at"], a["value"]
            futures = []
            for key in changed:
                value = orjson.dumps({"key": key, "members": list(groups[key].values())})
                for topic in (out, state):
                    futures.append(await p.send(topic, value=value, key=key.encode()))
            await asyncio.gather(*futures)
            await c.commit()
    return done / (time.perf_counter() - t0)


async def faust_floor(bootstrap: str, src: str, anomalies: int) -> float:
    """Anomalies/s of a faust-streaming agent (the correlator's App, one partition) that
    consumes each record, decodes its validated anomalies and acks it: no state, no output.
    What faust's per-record path and the decode alone leave of the passthrough, before any
    correlation, for a correlator that runs in faust at all."""
    app = App(
        f"bench-faust-{uuid.uuid4().hex[:6]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=tempfile.mkdtemp(prefix="bench-faust-"),
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.2,
    )
    app.fetch_max_wait_ms = 10
    topic = app.topic(src, partitions=1, key_type=bytes, value_type=bytes)
    done, t0, t1 = 0, 0.0, 0.0

    async def agent(stream: Any) -> None:
        nonlocal done, t0, t1
        async for event in stream.noack().events():
            if not t0:
                t0 = time.perf_counter()
            done += len(decode_anomalies(event.value)[0])
            event.ack()
            if done >= anomalies and not t1:
                t1 = time.perf_counter()

    app.agent(topic, name="floor")(agent)
    await app.start()
    try:
        while not t1:
            await asyncio.sleep(0.01)
    finally:
        await app.stop()
    return done / (t1 - t0)


def pure_work(records: list[tuple[bytes, bytes]], per_batch: int) -> dict[str, float]:
    """Seconds per anomaly of each stage the correlator runs on a batch of ``per_batch``
    records, with no Kafka: validated decode, placement (topology and inhibition, with no
    facts), the pure fold, and the encoding of each changed incident once. Sizes as the
    correlator's (a batch of up to 2000 records and 16 MiB)."""
    rules = rules_from(settings_for("127.0.0.1:1", "pure."))
    states: dict[str, Any] = {}
    positions: dict[str, Any] = {}
    encoder = IncidentEncoder()
    spent = dict.fromkeys(("decode", "placement", "fold", "encode"), 0.0)
    count = 0
    for i in range(0, len(records), per_batch):
        t0 = time.perf_counter()
        anomalies = []
        for _, value in records[i : i + per_batch]:
            decoded, _ = decode_anomalies(value)
            anomalies.extend(decoded)
        t1 = time.perf_counter()
        keyed = [(k, a, m) for a in anomalies for k, m in placements(a, None, EMPTY, rules)]
        t2 = time.perf_counter()
        before = {k: states.get(k) for k, _, _ in keyed}
        changed, _ = correlate_batch(before, keyed, datetime.now(UTC), rules, (), positions, [])
        t3 = time.perf_counter()
        for k, inc in changed.items():
            states[k] = inc
            if inc is not None:
                encoder.encode(inc)
        t4 = time.perf_counter()
        for stage, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[stage] += took
        count += len(anomalies)
    return {stage: took / count for stage, took in spent.items()}


def settings_for(bootstrap: str, prefix: str) -> Any:
    return parse_settings(
        {"kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 1}},
        env={},
    )


async def correlator_throughput(
    bootstrap: str, records: list[tuple[bytes, bytes]], anomalies: int
) -> float:
    """Anomalies/s folded by one correlator worker, from the end of its recovery (its
    partitions assigned, its state restored) to the last anomaly folded. (Timed from the
    end of the first batch, as before, a run folded in one batch measured nothing.)"""
    prefix = new_prefix("bench") + "."
    settings = settings_for(bootstrap, prefix)
    await create_topics(settings.kafka)
    await produce(bootstrap, f"{prefix}anomalies", records)
    metrics = Metrics()
    corr = Correlator(settings, metrics=metrics)
    await corr.start()
    freeze_heap()  # as `sre-agent run` does once started
    try:
        while not corr.recoveries:
            await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        while corr.processed < anomalies:
            await asyncio.sleep(0.01)
        return corr.processed / (time.perf_counter() - t0)
    finally:
        await corr.stop()


class CorrelatorProcess:
    """`sre-agent run --role correlator` in a child process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, bootstrap: str, prefix: str) -> CorrelatorProcess:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {
            **os.environ,
            "SRE_AGENT__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "SRE_AGENT__KAFKA__TOPIC_PREFIX": prefix,
            "SRE_AGENT__KAFKA__PARTITIONS": "1",
            "SRE_AGENT__SERVER__PORT": str(port),
        }
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting a child is not a blocking wait
            [
                sys.executable,
                # SRE_BENCH_PROFILE=FILE profiles the correlator process (cProfile).
                *(
                    ["-m", "cProfile", "-o", os.environ["SRE_BENCH_PROFILE"]]
                    if os.environ.get("SRE_BENCH_PROFILE")
                    else []
                ),
                "-m",
                "agent.cli",
                "run",
                "--role",
                "correlator",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.perf_counter() + 60
        async with aiohttp.ClientSession() as http:
            while time.perf_counter() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/health/ready") as r:
                        if r.status == 200:
                            return cls(proc)
                await asyncio.sleep(0.2)
        proc.kill()
        raise RuntimeError("correlator process did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_schedule(
    rng: random.Random,
    start: datetime,
    rate: int,
    seconds: float,
    tick: float,
    *,
    stress: bool,
) -> list[tuple[bytes, list[str]]]:
    """The latency phase's records, one per tick, and the observed_at stamps (unique, as on
    the wire) of the anomalies in each; every anomaly is stamped with its tick's send time."""
    total = int(rate * seconds)
    per_tick = max(1, int(rate * tick))
    schedule = []
    for n, i in enumerate(range(0, total, per_tick)):
        items = []
        for j in range(i, min(total, i + per_tick)):
            svc = rng.randrange(SERVICES)
            pod = f"p-{j}" if stress else f"svc-{svc}-{rng.randrange(5)}"
            name = "lat" if stress else PATTERNS[rng.randrange(len(PATTERNS))]
            status = "resolved" if not stress and rng.random() < 0.1 else "firing"
            labels = {
                "cluster": "bench",
                "namespace": f"ns-{svc % NAMESPACES}",
                "service": f"svc-{svc}",
                "pod": pod,
            }
            # Microseconds past the tick's start: unique within the tick and across ticks.
            at = start + timedelta(seconds=n * tick, microseconds=j - i)
            items.append(
                Anomaly(
                    fingerprint=fingerprint("prometheus", name, labels),
                    source="prometheus",
                    name=name,
                    severity="warning",
                    status=status,  # type: ignore[arg-type]
                    labels=labels,
                    starts_at=at,
                    observed_at=at,
                )
            )
        stamps = [
            orjson.dumps(a.observed_at, option=orjson.OPT_UTC_Z).decode()[1:-1] for a in items
        ]
        schedule.append((encode(AnomalyBatch(anomalies=tuple(items))), stamps))
    return schedule


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc; None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, field 3 on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def correlator_latency(
    bootstrap: str, rate: int, seconds: float, *, stress: bool
) -> tuple[list[float], dict[str, float]]:
    """Anomaly-to-incident latency of the anomalies that change an incident, and the share
    of a core the correlator process and this one (load generator, reader) used while
    the load ran: on 2 shared cores, what the latency is measured against.

    ``stress``: every anomaly is a new member, so every one changes (and re-emits) its
    incident. Otherwise the realistic mix of the throughput run: 1k services x 5 patterns
    x 5 pods, mostly repeats that dedup silently, 10% resolutions.
    """
    prefix = new_prefix("benchlat") + "."
    settings = settings_for(bootstrap, prefix)
    await create_topics(settings.kafka)
    # The correlator runs in its own process, as deployed: the load generator and the
    # reader below must not steal its event loop.
    corr = await CorrelatorProcess.start(bootstrap, prefix)
    latencies: list[float] = []
    # observed_at (unique per anomaly) as it is on the wire -> send time
    sent: dict[str, float] = {}
    c = AIOKafkaConsumer(
        f"{prefix}incidents",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
    )
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await c.start()
    await p.start()
    rng = random.Random(2)

    async def reader() -> None:
        while True:
            batches = await c.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batches.values():
                for r in records:
                    # An incident's updated_at is the observation time of the anomaly that
                    # changed it last. Only that field is read, without parsing the rest:
                    # this process shares the 2 cores with the correlator it measures.
                    # (The last occurrence: updated_at comes after labels and members.)
                    at = r.value.rfind(b'"updated_at":"') + 14
                    stamp = r.value[at : r.value.index(b'"', at)].decode()
                    if stamp in sent:
                        latencies.append(now - sent.pop(stamp))

    task = asyncio.create_task(reader())
    try:
        await asyncio.sleep(2)  # let the correlator settle into its assignment
        tick = 0.01  # a batch every 10 ms, as a busy detector would publish
        # Built before the clock starts, each stamped with the time it is due: built on the
        # fly, the load generator took a third of a core from the 2 it shares with the
        # correlator it measures. (~40k anomalies/s are built; the lead is twice that time.)
        start = datetime.now(UTC) + timedelta(seconds=1 + rate * seconds / 20_000)
        schedule = load_schedule(rng, start, rate, seconds, tick, stress=stress)
        t0 = time.perf_counter() + (start - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        pids = {"correlator process": corr.proc.pid, "load generator and reader": os.getpid()}
        used = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for n, (value, stamps) in enumerate(schedule):
            lag = t0 + n * tick - time.perf_counter()
            if lag > 0:
                await asyncio.sleep(lag)
            stamp = time.perf_counter()
            for s in stamps:
                sent[s] = stamp
            await p.send(f"{prefix}anomalies", value=value)
        await p.flush()
        elapsed = time.perf_counter() - t0
        cores = {}
        for name, pid in pids.items():
            before, after = used[name], cpu_seconds(pid)
            if before is not None and after is not None:
                cores[name] = (after - before) / elapsed
        deadline = time.perf_counter() + 10
        while stress and sent and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        if not stress:
            await asyncio.sleep(2)  # the last changes' events; repeats never produce one
        return latencies, cores
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await p.stop()
        await c.stop()
        corr.stop()


async def alertmanager_peer(url: str, records: list[tuple[bytes, bytes]]) -> float | None:
    alerts = []
    for _, v in records:
        a = orjson.loads(v)
        alerts.append(
            {
                "labels": {"alertname": a["name"], **a["labels"]},
                "annotations": {},
                "startsAt": a["starts_at"],
            }
        )
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.get(f"{url}/-/ready") as r:
                if r.status != 200:
                    return None
        except aiohttp.ClientError:
            return None
        t0 = time.perf_counter()
        batch = 1000
        for i in range(0, len(alerts), batch):
            async with http.post(f"{url}/api/v2/alerts", json=alerts[i : i + batch]) as r:
                r.raise_for_status()
        return len(alerts) / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=100, help="anomalies per record")
    ap.add_argument("--singles", type=int, default=20_000, help="anomalies sent one per record")
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=20.0, help="unmeasured latency run first")
    ap.add_argument("--rounds", type=int, default=3, help="throughput runs of each, interleaved")
    ap.add_argument("--bootstrap", default="127.0.0.1:19092")
    ap.add_argument("--alertmanager", default="http://127.0.0.1:19094")
    args = ap.parse_args()

    try:
        print(
            f"generating {args.count} anomalies "
            f"({SERVICES} services, {NAMESPACES} namespaces, {NODES} nodes)"
        )
        records = make_anomalies(args.count)
        batches = batched(records, args.batch)
        singles = records[: args.singles]
        for label, recs, per_record in (
            (f"batches of {args.batch}", batches, args.batch),
            ("one anomaly per record", singles, 1),
        ):
            # Rounds interleave the three, so a slow spell of the machine (its speed here
            # moves by half from minute to minute) lands on all of them, not on one.
            pts, typeds, fausts, floors, corrs = [], [], [], [], []
            for _ in range(args.rounds):
                rates = []
                for decode in (orjson.loads, decode_anomalies):
                    run = new_prefix("bench-pt-")
                    src, dst = f"{run}-in", f"{run}-out"
                    await ensure(args.bootstrap, src, dst)
                    await produce(args.bootstrap, src, recs)
                    rates.append(await passthrough(args.bootstrap, src, dst, len(recs), decode))
                pts.append(rates[0] * per_record)
                typeds.append(rates[1] * per_record)
                run = new_prefix("bench-faust-")
                await ensure(args.bootstrap, run)
                await produce(args.bootstrap, run, recs)
                fausts.append(await faust_floor(args.bootstrap, run, len(recs) * per_record))
                run = new_prefix("bench-floor-")
                await ensure(args.bootstrap, f"{run}-in", f"{run}-out", f"{run}-state")
                await produce(args.bootstrap, f"{run}-in", recs)
                floors.append(
                    await floor(
                        args.bootstrap,
                        f"{run}-in",
                        f"{run}-out",
                        f"{run}-state",
                        len(recs) * per_record,
                    )
                )
                corrs.append(
                    await correlator_throughput(args.bootstrap, recs, len(recs) * per_record)
                )
                # Gone before the next run: the broker's log cleaner compacting hundreds of
                # MB of changelog competed with the latency phase for the CPU.
                await delete_topics(args.bootstrap)
            pt, typed, bare, least, corr = (
                statistics.median(r) for r in (pts, typeds, fausts, floors, corrs)
            )
            # Records per batch as the correlator takes a backlog: 2000, or 16 MiB.
            size = max(1, min(2000, (16 << 20) // max(1, len(recs[0][1]))))
            cost = pure_work(recs, size)
            spread = [c / p for c, p in zip(corrs, pts, strict=True)]
            print(f"[{label}] {len(recs) * per_record} anomalies, median of {args.rounds} rounds")
            print(f"  passthrough (aiokafka consume+decode+produce): {pt:10.0f} anomalies/s")
            print(
                f"  the same, decoding validated anomalies:       {typed:10.0f} anomalies/s"
                f"   ratio to passthrough {typed / pt:.2f}"
            )
            print(
                f"  faust, consume + validated decode, no output: {bare:10.0f} anomalies/s"
                f"   ratio to passthrough {bare / pt:.2f}; leaves"
                f" {max(0.0, 2e6 / pt - 1e6 / bare):.2f} us/anomaly of half the passthrough's"
            )
            print(
                f"  floor (minimal Python correlator, no checks): {least:10.0f} anomalies/s"
                f"   ratio to passthrough {least / pt:.2f}"
            )
            print(
                f"  correlator (faust, 1 worker):                 {corr:10.0f} anomalies/s"
                f"   ratio to passthrough {corr / pt:.2f}"
                f" (rounds {min(spread):.2f}-{max(spread):.2f}), to the floor {corr / least:.2f}"
            )
            print(
                f"  pure work, no Kafka ({size} records a batch): "
                + ", ".join(f"{stage} {took * 1e6:.2f}" for stage, took in cost.items())
                + f" = {sum(cost.values()) * 1e6:.2f} us/anomaly"
                f" ({1 / sum(cost.values()):.0f}/s); half the passthrough leaves"
                f" {2e6 / pt:.2f} us/anomaly for everything"
            )
        # The same load first, unmeasured: on a broker started minutes ago the first runs
        # of this load measured its JIT warm-up (p99 0.9-1.1 s, falling to ~0.2 s by the
        # third), not the correlator.
        warm, _ = await correlator_latency(args.bootstrap, args.rate, args.warmup, stress=False)
        await delete_topics(args.bootstrap)
        if len(warm) >= 2:
            q = statistics.quantiles(warm, n=100)
            print(
                f"latency warm-up ({args.warmup:.0f} s, not counted): "
                f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"
            )
        for stress in (False, True):
            lat, cores = await correlator_latency(
                args.bootstrap, args.rate, args.seconds, stress=stress
            )
            await delete_topics(args.bootstrap)
            shape = "every anomaly a new member" if stress else "realistic mix"
            if len(lat) >= 2:
                q = statistics.quantiles(lat, n=100)
                print(
                    f"latency at {args.rate}/s, {shape} ({len(lat)} incident changes): "
                    f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"
                )
            if cores:
                print(
                    "  CPU while loaded (share of one core): "
                    + ", ".join(f"{name} {share:.2f}" for name, share in cores.items())
                )
        am = await alertmanager_peer(args.alertmanager, records[:50_000])
        if am is None:
            print("alertmanager: not reachable, peer skipped")
        else:
            print(f"alertmanager v2 API ingest (peer, 50k alerts): {am:10.0f} alerts/s")

    finally:
        await delete_topics(args.bootstrap)


if __name__ == "__main__":
    asyncio.run(main())
