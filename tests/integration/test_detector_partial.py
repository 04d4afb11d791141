"""A real Prometheus answering in part: success, with the series of a store that did not
answer missing and a warning saying so.

Prometheus does that itself for a remote read that fails (the fan-out turns a secondary
store's error into a warning), as Thanos and Mimir do for a store or ingester: this one
reads remotely from a port nobody listens on, so every reply it gives is partial.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from aiohttp import web

from agent.detector import QUERY_FAILED, PromQLDetector
from agent.metrics import Metrics
from agent.prom import PromClient
from streams.correlation import CorrelationRules, correlate_batch, expire
from streams.topology import build_index, facts_of
from tests.helpers import eventually, make_settings
from tests.integration.test_detector_prometheus import Recorder

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def exporter() -> AsyncIterator[tuple[set[str], int]]:
    """queue_depth 10 for each service in the set, which the test changes."""
    services = {"cart", "co"}

    async def metrics(_: web.Request) -> web.Response:
        lines = [f'queue_depth{{service="{s}",namespace="shop"}} 10' for s in sorted(services)]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield services, port
    finally:
        await runner.cleanup()


@pytest.fixture
def partial_prometheus(tmp_path: Path, exporter: tuple[set[str], int]) -> Iterator[str]:
    # Installed by scripts/system-deps.sh (make deps): missing is a broken setup, not a skip.
    assert Path(PROMETHEUS).exists(), f"no prometheus binary at {PROMETHEUS}: run make deps"
    port, dead = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: shop\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter[1]}']}}]\n"
        "remote_read:\n"
        f"  - url: http://127.0.0.1:{dead}/read\n"
        "    read_recent: true\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.1)
        else:
            pytest.fail("prometheus never ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_a_partial_reply_blinds_its_pattern_so_what_it_misses_stays_open(
    partial_prometheus: str, exporter: tuple[set[str], int]
) -> None:
    """cart and co fire; co's series goes missing from a partial reply. Its incident,
    quiet past resolve_timeout, stays open: pattern-query-failed fires for the pattern,
    naming the store's warning, and the correlator's view holds the pattern blind. (The
    detector kept co pending, unresolved, but nothing repeated it: it resolved as quiet.)"""
    services, _ = exporter
    settings = make_settings(
        "127.0.0.1:1",
        "unused.",
        prometheus_url=partial_prometheus,
        doc={
            "detectors": {"prometheus": {"failure_threshold": 2}},
            "patterns": [{"name": "backlog", "condition": "queue_depth > 5"}],
        },
    )
    pattern = settings.patterns[0]
    rec, metrics = Recorder(), Metrics()
    prom = PromClient(partial_prometheus, timeout=3)
    detector = PromQLDetector(settings, prom=prom, publish=rec, topic="t", metrics=metrics)
    try:
        reply = await eventually(
            lambda: _both(prom), timeout=30, interval=0.3, what="both series, partially"
        )
        assert "remote_read" in reply.warnings[0]
        first = await detector.evaluate_once(pattern)
        assert sorted(a.labels["service"] for a in first) == ["cart", "co"]
        services.discard("co")  # the next scrape marks co stale: it is missing from replies
        await eventually(
            lambda: _only_cart(prom), timeout=30, interval=0.3, what="co missing from replies"
        )
        for _ in range(3):
            out = await detector.evaluate_once(pattern)
            assert [(a.labels["service"], a.status) for a in out] == [("cart", "firing")]
            await asyncio.sleep(0.5)
    finally:
        await prom.close()
    failed = [a for a in rec.items if a.name == QUERY_FAILED]
    assert failed and failed[-1].status == "firing"
    assert failed[-1].labels["pattern"] == "backlog"
    assert "partial reply" in failed[-1].annotations["error"]
    assert "remote_read" in failed[-1].annotations["error"]
    labels = {"pattern": "backlog", "reason": "partial_response"}
    assert metrics.registry.get_sample_value("sre_agent_detector_errors_total", labels) == 4

    # Folded as the correlator does, at resolve_timeout past co's last sighting.
    rules = CorrelationRules(resolve_timeout=30)
    co_last = max(a.observed_at for a in rec.items if a.labels.get("service") == "co")
    now = co_last + timedelta(seconds=31)
    assert now - failed[-1].observed_at < timedelta(seconds=30)  # the pattern still blind
    states, _ = correlate_batch({}, rec.items, now, rules)
    incidents = [i for i in states.values() if i is not None]
    facts = [f for i in incidents for f in facts_of(i, True, ())]
    blind = build_index(facts, now, rules.resolve_timeout).blind
    [co] = [i for i in incidents if i.labels.get("service") == "co"]
    assert expire(co, now, rules)[0].status == "resolved"  # what the view prevents
    assert expire(co, now, rules, blind) == (co, None)


async def _both(prom: PromClient) -> object:
    reply = await prom.query_vector("queue_depth > 5")
    return reply if len(reply.samples) == 2 else None


async def _only_cart(prom: PromClient) -> bool:
    reply = await prom.query_vector("queue_depth > 5")
    return [s.labels["service"] for s in reply.samples] == ["cart"]
