"""A dead letter always fits in a Kafka record (streams.bus.dead_letter_record): a record
too big keeps its first bytes, says how many were dropped and the whole one's sha256; and
a letter is counted only once written."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from agent.codec import encode
from agent.metrics import Metrics
from agent.settings import KafkaSection
from streams.bus import DEAD_LETTER_BYTES, Bus, dead_letter_record


def letter_of(raw: bytes, error: str = "invalid Anomaly: <body>: not valid JSON") -> object:
    return dead_letter_record(
        source_topic="ext.alerts", raw=raw, error=error, consumer="feeds", partition=3, offset=41
    )


def test_a_small_record_is_kept_whole() -> None:
    raw = b'{"severity": "apocalyptic"}'
    letter = letter_of(raw)
    assert letter.raw == raw.decode() and letter.raw_encoding == "utf-8"
    assert letter.raw_dropped == 0 and letter.raw_sha256 == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    "raw",
    [
        os.urandom(800_000),  # binary: base64 makes it 1.07 MB
        b"\x01" * 300_000,  # UTF-8 that JSON escapes six times over: 1.8 MB
        "é€😀".encode() * 120_000,  # multi-byte characters: a cut must not split one
    ],
    ids=["binary", "escaped", "multibyte"],
)
def test_a_record_too_big_keeps_a_prefix_that_fits(raw: bytes) -> None:
    letter = letter_of(raw)
    assert len(encode(letter)) <= DEAD_LETTER_BYTES
    kept = base64.b64decode(letter.raw) if letter.raw_encoding == "base64" else letter.raw.encode()
    assert kept and raw.startswith(kept)
    assert letter.raw_dropped == len(raw) - len(kept) > 0
    assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert (letter.partition, letter.offset) == (3, 41)  # where the whole one is


def test_a_huge_error_is_cut_too() -> None:
    letter = letter_of(b"x", error="members: " + "bad; " * 500_000)
    assert len(encode(letter)) <= DEAD_LETTER_BYTES
    assert letter.error.startswith("members: bad; ") and letter.error.endswith("more characters)")


async def test_a_letter_not_written_is_not_counted() -> None:
    metrics = Metrics()
    bus = Bus(KafkaSection(), metrics=metrics)  # not started: the publish fails
    with pytest.raises(RuntimeError):
        await bus.dead_letter(source_topic="t", raw=b"x", error="e", consumer="c")
    counted = metrics.registry.get_sample_value(
        "sre_agent_dead_letters_total", {"topic": "t", "consumer": "c"}
    )
    assert not counted
