"""The infrastructure scripts (scripts/*.sh) against a throwaway state dir and fake daemons:
what they stop, what they refuse, what they cache. Fakes are copies of bash (so
/proc/<pid>/exe names the component, as the scripts check) looping until signalled."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
LOOP = "while :; do sleep 0.1; done"


class Daemons:
    """Fake daemons started by one test, all killed at its end."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def exe(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            shutil.copy("/bin/bash", path)
        return path

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """A process whose exe is named ``name`` and whose command line holds ``args``."""
        proc = subprocess.Popen(
            [str(self.exe(name)), "-c", LOOP, name, *args],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        # reap it as soon as it dies: the scripts wait until `kill -0` fails
        threading.Thread(target=proc.wait, daemon=True).start()
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    fakes = Daemons(bin_dir)
    try:
        yield fakes
    finally:
        fakes.kill_all()


def run(
    cmd: list[str], env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def gone(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return True


def fake_service(
    daemons: Daemons, state: Path, service: str, marker: str
) -> subprocess.Popen[bytes]:
    """A fake lib.sh service (kafka, prometheus, alertmanager) with its pid file written."""
    svc_dir = state / service
    svc_dir.mkdir(parents=True, exist_ok=True)
    proc = daemons.start("java", str(svc_dir / marker))
    (svc_dir / f"{service}.pid").write_text(f"{proc.pid}\n")
    return proc


def fake_k8s(daemons: Daemons, state: Path) -> subprocess.Popen[bytes]:
    """A fake etcd of the control plane whose state dir is ``state``/k8s."""
    pids = state / "k8s" / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    proc = daemons.start("etcd", "--data-dir", str(state / "k8s" / "etcd"))
    (pids / "etcd.pid").write_text(f"{proc.pid}\n")
    return proc


def test_make_clean_stops_every_instance_under_the_state_dir(
    tmp_path: Path, daemons: Daemons
) -> None:
    state = tmp_path / "state"
    kafka = fake_service(daemons, state, "kafka", "server.properties")
    test_kafka = fake_service(daemons, state / "test", "kafka", "server.properties")
    test_prometheus = fake_service(daemons, state / "test", "prometheus", "prometheus.yml")
    etcd = fake_k8s(daemons, state)
    test_etcd = fake_k8s(daemons, state / "test")

    run(["make", "-s", "-C", str(REPO), "clean"], {"SRE_STATE_DIR": str(state)})

    assert not state.exists()
    assert all(gone(p) for p in (kafka, test_kafka, test_prometheus, etcd, test_etcd))


def test_k8s_ignores_a_stale_pid_that_names_another_clusters_component(
    tmp_path: Path, daemons: Daemons
) -> None:
    ours, theirs = tmp_path / "a", tmp_path / "b"
    other = daemons.start(
        "kube-apiserver", f"--tls-cert-file={theirs}/k8s/pki/apiserver.crt", "--v=1"
    )
    # our stale pid file: the number now belongs to the other cluster's apiserver
    (ours / "k8s" / "pids").mkdir(parents=True)
    (ours / "k8s" / "pids" / "kube-apiserver.pid").write_text(f"{other.pid}\n")
    env = {"SRE_STATE_DIR": str(ours), "SRE_CACHE_DIR": str(tmp_path / "cache")}

    status = run(["bash", str(SCRIPTS / "k8s.sh"), "status"], env, check=False)
    run(["bash", str(SCRIPTS / "k8s.sh"), "down"], env)

    assert "kube-apiserver           stopped" in status.stdout
    assert other.poll() is None
    assert not (ours / "k8s" / "pids" / "kube-apiserver.pid").exists()


def test_k8s_stops_its_own_component_by_pid(tmp_path: Path, daemons: Daemons) -> None:
    state = tmp_path / "a"
    etcd = fake_k8s(daemons, state)
    env = {"SRE_STATE_DIR": str(state), "SRE_CACHE_DIR": str(tmp_path / "cache")}

    status = run(["bash", str(SCRIPTS / "k8s.sh"), "status"], env, check=False)
    run(["bash", str(SCRIPTS / "k8s.sh"), "down"], env)

    assert f"etcd                     running (pid {etcd.pid})" in status.stdout
    assert gone(etcd)


FAKE_MVN = """#!/usr/bin/env bash
# Fake Maven: records its arguments, "resolves" a kafka jar with the content given.
printf '%s\\n' "$*" >>"$FAKE_MVN_LOG"
for arg in "$@"; do
    case $arg in -DoutputDirectory=*) out=${arg#-DoutputDirectory=} ;; esac
done
mkdir -p "$out"
cp "$FAKE_KAFKA_JAR" "$out/kafka_2.13-4.1.1.jar"
: >"$out/slf4j-api-2.0.17.jar"
"""


def fetch_with_fake_mvn(tmp_path: Path, jar: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "mvnbin"
    bin_dir.mkdir()
    (bin_dir / "mvn").write_text(FAKE_MVN)
    (bin_dir / "mvn").chmod(0o755)
    log = tmp_path / "mvn.log"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "SRE_CACHE_DIR": str(tmp_path / "cache"),
        "SRE_KAFKA_VERSION": "4.1.1",
        "FAKE_MVN_LOG": str(log),
        "FAKE_KAFKA_JAR": str(jar),
    }
    proc = run(["bash", str(SCRIPTS / "kafka.sh"), "fetch"], env, check=False)
    return proc, log.read_text() if log.exists() else ""


def test_kafka_fetch_rejects_a_corrupt_jar_and_caches_nothing(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jar"
    corrupt.write_bytes(b"PK\x03\x04 not the published kafka jar")
    m2 = tmp_path / "home" / ".m2" / "repository" / "org" / "apache" / "kafka" / "kafka_2.13"
    (m2 / "4.1.1").mkdir(parents=True)

    proc, mvn_calls = fetch_with_fake_mvn(tmp_path, corrupt)

    home = tmp_path / "cache" / "kafka-4.1.1"
    assert proc.returncode != 0
    assert "failed verification" in proc.stderr
    assert not (home / ".complete").exists()
    assert not (home / "libs").exists() and not (home / "libs.tmp").exists()
    assert not (m2 / "4.1.1").exists()
    assert all(" -C " in f" {call} " for call in mvn_calls.splitlines()) and mvn_calls


def test_kafka_fetch_accepts_the_published_jar(tmp_path: Path) -> None:
    published = (
        Path.home() / ".m2/repository/org/apache/kafka/kafka_2.13/4.1.1/kafka_2.13-4.1.1.jar"
    )
    if not published.exists():
        pytest.skip("no cached kafka_2.13-4.1.1.jar to play the published one")

    proc, _ = fetch_with_fake_mvn(tmp_path, published)

    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cache" / "kafka-4.1.1" / ".complete").exists()
    assert (tmp_path / "cache" / "kafka-4.1.1" / "libs" / "kafka_2.13-4.1.1.jar").exists()
