"""The lab's patterns (config/lab.yaml) on series written out second by second, evaluated by
Prometheus' own engine (`promtool test rules`): deterministic, unlike a live scrape, so the
edge a live run meets only now and then (a pod's first seconds) is met every time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.settings import load_settings
from tests.helpers import promtool_test

pytestmark = pytest.mark.integration

LABELS = 'namespace="shop",service="checkout"'


def pattern(name: str) -> str:
    p = load_settings("config/lab.yaml", env={}).pattern(name)
    assert p is not None
    return p.condition


def counter(per_second: Sequence[int | None]) -> str:
    """promtool's value notation for a counter from the requests of each second (None: the
    series is not scraped that second)."""
    total, out = 0, []
    for n in per_second:
        if n is None:
            out.append("_")
        else:
            total += n
            out.append(str(total))
    return " ".join(out)


def pod(
    name: str, node: str, ok: Sequence[int | None], failed: Sequence[int | None]
) -> list[dict[str, str]]:
    base = f'http_requests_total{{{LABELS},pod="{name}",node="{node}"'
    return [
        {"series": base + ',status="200"}', "values": counter(ok)},
        {"series": base + ',status="500"}', "values": counter(failed)},
    ]


def firing_at(tmp_path: Path, expr: str, series: list[dict[str, str]], seconds: range) -> list[int]:
    """The seconds at which ``expr`` returns anything (one promtool test per second: it
    reports each failed expectation of "nothing")."""
    doc = {
        "rule_files": [],
        "evaluation_interval": "1s",
        "tests": [
            {
                "interval": "1s",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": f"count({expr})", "eval_time": f"{s}s", "exp_samples": []}
                    for s in seconds
                ],
            }
        ],
    }
    out = promtool_test(doc, tmp_path)
    if out is None:
        return []
    fired = [s for s in seconds if f"time: {s}s," in out]
    assert fired, f"promtool failed for another reason:\n{out}"
    return fired


def test_a_young_pods_first_seconds_do_not_read_as_a_failing_pod(tmp_path: Path) -> None:
    # The bad-rollout experiment: from second 20 every pod fails 30% of its requests, and a
    # pod the rollout starts serves its first handful with more failures than that, by
    # chance (15 of 25 in its first 1.5 s). Its ratio over 3 s of samples is over half and,
    # extrapolated by rate(), it had "served" over 50 requests: the old threshold fired.
    quiet: list[int | None] = [None] * 20
    series = [
        *pod("checkout-a", "n1", [17] * 20 + [12] * 40, [0] * 20 + [5] * 40),
        *pod(
            "checkout-new", "n2", [*quiet, 3, 7, 7, 7, *[12] * 36], [*quiet, 5, 9, 10, 9, *[5] * 36]
        ),
    ]
    assert firing_at(tmp_path, pattern("pod-failing"), series, range(21, 60)) == []


def test_a_pod_whose_node_is_down_is_failing(tmp_path: Path) -> None:
    # The node-failure experiment: from second 20 one pod's node answers nothing.
    series = [
        *pod("checkout-a", "n1", [17] * 60, [0] * 60),
        *pod("checkout-b", "down", [17] * 20 + [0] * 40, [0] * 20 + [17] * 40),
    ]
    fired = firing_at(tmp_path, pattern("pod-failing"), series, range(15, 60))
    # Once over half the window failed (10 s), and until the end.
    assert fired and fired[0] <= 32 and fired == list(range(fired[0], 60))
