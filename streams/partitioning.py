"""Which partition a correlation key lives on, the way Kafka's Java client decides it, and
the anomaly records on those partitions: written in batches, read back by the correlator,
the lab and the tests.

Anomalies of one group must always reach the same correlator partition. Producers that key
records by the correlation key with the Java-compatible partitioner (aiokafka, the Java
client, kcat with ``-X partitioner=murmur2_random``) place them there; micro-batches name the
partition explicitly with :func:`partition_for`. librdkafka's default partitioner (CRC32)
does not agree, which is why the correlator checks and re-routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections import defaultdict
from collections.abc import Sequence

import msgspec
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from agent.codec import FastDecoder, encode, from_obj, from_objs
from agent.errors import DependencyUnavailable, InvalidEvent
from agent.models import SCHEMA_VERSION, Anomaly, Mitigation, stable_id

MAX_BATCH = 500  # anomalies per record: keeps records far below the 1 MiB default limit


@functools.lru_cache(maxsize=65536)
def _hash(key: bytes) -> int:
    # murmur2 is pure Python (~10-20 us) and is asked for every record's key, of which there
    # are far fewer than records (one per group).
    return int(murmur2(key) & 0x7FFFFFFF)


def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner: murmur2(key) masked positive, modulo partitions."""
    return _hash(key.encode()) % partitions


def partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's DefaultPartitioner, with the hash of each key cached (for producers that
    send many records per key, such as the correlator's incidents and changelog)."""
    if key is None:
        return random.choice(available or all_partitions)  # noqa: S311 - spreading load, not secrecy
    return all_partitions[_hash(key) % len(all_partitions)]


# A batch record stays under this too (Kafka's default limit is 1 MiB): anomalies carry
# free-text annotations, so 500 of them can be far larger than 500 typical ones.
MAX_BATCH_BYTES = 512 * 1024

# The largest record the agent sends, framing and key included (record_bytes): both
# producers (streams.bus.Bus and the correlator's faust one) are set to it, and every size
# check measures against it. One number: the correlator checked its values against
# 1_000_000 while faust's producer (default 1_000_000 with key and framing) refused some
# that passed. 1 MiB is aiokafka's default; the broker's message.max.bytes is 12 bytes more.
MAX_REQUEST_BYTES = 1024 * 1024

Encoded = tuple[bytes, str, str]  # an anomaly's JSON, its id, its key


def record_bytes(value: bytes, key: bytes | None) -> int:
    """A record's size as the producer checks it against MAX_REQUEST_BYTES."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, []))


def value_room(key: bytes | None) -> int:
    """The most bytes a record with this key may carry as its value."""
    # The framing grows with the value's length varints, by at most 2 x 2 bytes from an
    # empty value to one of a MiB.
    return MAX_REQUEST_BYTES - record_bytes(b"", key) - 4


def oversized(anomaly: Anomaly, key: str) -> str | None:
    """Why Kafka refuses every record that would carry this anomaly (None: it fits).

    Alone it is a plain record of its JSON and key; in a batch its companions total about
    MAX_BATCH_BYTES, half the limit (see :func:`chunks`): so checking it alone checks
    every record it can travel in. Refused by the producer, it fails the whole publish
    every time it is retried, taking the anomalies published with it along."""
    size = record_bytes(encode(anomaly), key.encode())
    if size <= MAX_REQUEST_BYTES:
        return None
    return f"the anomaly is {size} bytes as a Kafka record, over the limit of {MAX_REQUEST_BYTES}"


def chunks(encoded: list[Encoded]) -> list[list[Encoded]]:
    """Consecutive runs of at most MAX_BATCH anomalies and about MAX_BATCH_BYTES (a larger
    anomaly goes alone)."""
    out: list[list[Encoded]] = []
    run: list[Encoded] = []
    size = 0
    for item in encoded:
        if run and (len(run) >= MAX_BATCH or size + len(item[0]) > MAX_BATCH_BYTES):
            out.append(run)
            run, size = [], 0
        run.append(item)
        size += len(item[0]) + 1
    if run:
        out.append(run)
    return out


def batch_record(chunk: list[Encoded]) -> bytes:
    """The AnomalyBatch of these anomalies as agent.codec.encode writes it, from their JSON.
    Its id is derived from theirs: replicas batching the same anomalies send the same bytes."""
    batch_id = stable_id("batch", *(i for _, i, _ in chunk))
    body = b",".join(v for v, _, _ in chunk)
    return b'{"anomalies":[%s],"id":"%s","schema_version":%d}' % (
        body,
        batch_id.encode(),
        SCHEMA_VERSION,
    )


def anomaly_records(
    keyed: Sequence[tuple[Anomaly, str]], partitions: int
) -> list[tuple[int, bytes, bytes | None]]:
    """(partition, value, key) of the records carrying these (anomaly, correlation key)
    pairs: each partition's anomalies in order, as AnomalyBatch records (no key), a lone one
    as a plain record with its key."""
    per: dict[int, list[Encoded]] = defaultdict(list)
    for a, k in keyed:
        per[partition_for(k, partitions)].append((encode(a), a.id, k))
    out: list[tuple[int, bytes, bytes | None]] = []
    for p, encoded in per.items():
        for chunk in chunks(encoded):
            if len(chunk) == 1:
                ((value, _, k),) = chunk
                out.append((p, value, k.encode()))
            else:
                out.append((p, batch_record(chunk), None))
    return out


async def topic_partitions(
    bootstrap: str, topic: str, *, wait: float = 10.0, missing_ok: bool = False
) -> list[int]:
    """The topic's partitions, from fresh metadata (waiting up to ``wait`` s for it to exist).

    Asks the admin API: a consumer's cached metadata can lag a topic created moments ago.
    ``missing_ok``: a topic that does not exist has none, at once, and is not created.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        # Listing, not describing: a describe of a missing topic makes a broker with
        # auto.create.topics.enable create it with its defaults (not compacted, say).
        if missing_ok and topic not in await admin.list_topics():
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            described = await admin.describe_topics([topic])
            parts = [p["partition"] for d in described for p in d.get("partitions", [])]
            if parts and all(d.get("error_code", 0) == 0 for d in described):
                return sorted(parts)
            if loop.time() > deadline:
                raise DependencyUnavailable(f"kafka: topic {topic} not found")
            await asyncio.sleep(0.1)
    except KafkaError as err:
        raise DependencyUnavailable(f"kafka {bootstrap}: {err}") from err
    finally:
        await admin.close()


# --- reading them back ---------------------------------------------------------------


class _Anomalies(msgspec.Struct):
    """What the correlator reads of an AnomalyBatch."""

    anomalies: list[Anomaly]


_fast_batch = FastDecoder(_Anomalies)
_fast_one = FastDecoder(Anomaly)


def decode_anomalies(raw: bytes | None) -> tuple[list[Anomaly], list[tuple[str, bytes]]]:
    """One record -> its anomalies, plus (error, raw item) for each invalid batch item.

    Raises InvalidEvent when the record as a whole is unreadable. A Mitigation record
    decodes to no anomalies (see :func:`decode_mitigation`).
    """
    # Well-formed records (nearly all) in one msgspec pass; the rest, and anything that
    # might be a control record, the slow way, which names each problem.
    if raw and b'"mitigation"' not in raw:
        if b'"anomalies"' in raw:
            batch = _fast_batch(raw)
            if batch is not None:
                return batch.anomalies, []
        elif (one := _fast_one(raw)) is not None:
            return [one], []
    try:
        doc = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as err:
        raise InvalidEvent("Anomaly", [f"<body>: not valid JSON ({err})"]) from err
    if not isinstance(doc, dict):
        raise InvalidEvent("Anomaly", [f"<body>: expected a JSON object, got {type(doc).__name__}"])
    if "mitigation" in doc:
        return [], []
    if "anomalies" not in doc:
        return [from_obj(Anomaly, doc)], []
    items = doc["anomalies"]
    if not isinstance(items, list):
        raise InvalidEvent("AnomalyBatch", ["anomalies: expected a list"])
    with contextlib.suppress(InvalidEvent):
        return from_objs(Anomaly, items), []
    good: list[Anomaly] = []
    bad: list[tuple[str, bytes]] = []
    for i, item in enumerate(items):  # keep the good ones, name each bad one
        try:
            good.append(from_obj(Anomaly, item))
        except InvalidEvent as err:
            problems = "; ".join(f"anomalies[{i}].{p}" for p in err.problems)
            bad.append((f"invalid Anomaly in batch: {problems}", orjson.dumps(item)))
    return good, bad


def decode_mitigation(raw: bytes | None) -> Mitigation | None:
    """The Mitigation in a control record, or None for anomaly records."""
    if not raw or b'"mitigation"' not in raw:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # decode_anomalies reports it
    if not isinstance(doc, dict) or "mitigation" not in doc:
        return None
    return from_obj(Mitigation, doc["mitigation"])
