"""The sre-agent command line, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.topics import CATALOG

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_config_validate_accepts_the_shipped_configs() -> None:
    for name in ("config/agent.yaml", "config/lab.yaml"):
        proc = cli("config", "validate", name)
        assert proc.returncode == 0, proc.stderr
        assert "ok" in proc.stdout


def test_config_validate_names_every_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "agent:\n  mode: yolo\n"
        "remediation:\n  confidence_threshold: 1.5\n  require_approval: [rollback, nuke]\n"
        "patterns:\n"
        "  - name: ok\n    condition: up == 0\n"
        "  - name: typo\n    condition: rate(http_requests_total[5x])\n"
        "  - name: steps\n    condition: up\n    actions: [delete_namespace]\n"
        "surprise: true\n"
    )
    proc = cli("config", "validate", str(bad), "--no-env")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    prefixes = sorted(line.split(":")[0] for line in lines)
    assert prefixes == sorted(
        [
            "agent.mode",
            "remediation.confidence_threshold",
            "remediation.require_approval[1]",
            "patterns[2].actions[0]",
            "surprise",
        ]
    ), lines
    # Once the structure is valid, promtool (Prometheus' own parser) checks the PromQL.
    bad.write_text(
        "patterns:\n  - name: ok\n    condition: up == 0\n"
        "  - name: typo\n    condition: rate(http_requests_total[5x])\n"
    )
    proc = cli("config", "validate", str(bad), "--no-env")
    assert proc.returncode == 1
    assert proc.stderr.startswith("patterns[1].condition: invalid PromQL"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_config_validate_reports_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    proc = cli("config", "validate", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1 and "cannot read" in proc.stderr
    junk = tmp_path / "junk.yaml"
    junk.write_text("agent: [unclosed\n")
    proc = cli("config", "validate", str(junk))
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr


def test_topics_create_is_idempotent(kafka_bootstrap: str, topic_prefix: str) -> None:
    env = {
        "SRE_AGENT__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SRE_AGENT__KAFKA__TOPIC_PREFIX": topic_prefix,
    }
    first = cli("topics", "create", env=env)
    assert first.returncode == 0, first.stderr
    assert f"{len(CATALOG)} created, 0 already present" in first.stdout
    second = cli("topics", "create", env=env)
    assert second.returncode == 0, second.stderr
    assert f"0 created, {len(CATALOG)} already present" in second.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def test_run_serves_health_and_metrics_and_stops_on_sigterm(
    kafka_bootstrap: str, prometheus: Any, topic_prefix: str
) -> None:
    port = _free_port()
    env = {
        "SRE_AGENT__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SRE_AGENT__KAFKA__TOPIC_PREFIX": topic_prefix,
        "SRE_AGENT__MONITORING__PROMETHEUS__URL": prometheus.url,
        "SRE_AGENT__SERVER__PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--role", "all"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _get(f"{base}/health/ready")[0] != 200:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, _get(f"{base}/health/ready")
            time.sleep(0.3)
        assert _get(f"{base}/health/live")[0] == 200
        assert _get(f"{base}/health/started")[0] == 200
        status, body = _get(f"{base}/metrics")
        assert status == 200
        assert "sre_agent_remediation_total" in body
        assert "sre_agent_incident_resolution_duration_seconds" in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=45)
        assert proc.returncode == 0, out
        assert "agent stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
