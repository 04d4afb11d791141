"""The infrastructure scripts (scripts/*.sh) against a throwaway state dir and fake daemons:
what they stop, what they refuse, what they cache. Fakes are copies of bash (so
/proc/<pid>/exe names the component, as the scripts check) looping until signalled."""

from __future__ import annotations

import fcntl
import http.server
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import infra

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
        argv = [str(self.exe(name)), "-c", LOOP, name, *args]
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_exec(proc, argv)
        # reap it as soon as it dies: the scripts wait until `kill -0` fails
        threading.Thread(target=proc.wait, daemon=True).start()
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_exec(proc: subprocess.Popen[bytes], argv: list[str]) -> None:
    """Returns once /proc/PID/cmdline shows ``argv``. Popen returns when the
    child's close-on-exec pipe closes, which the kernel does before it sets up
    the new image's arguments: until then the command line reads empty, and a
    script asked about the pid then rightly says it is not ours. On a loaded
    machine that window outlasted the test's next step, failing it."""
    want = b"".join(os.fsencode(arg) + b"\0" for arg in argv)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != want:
        assert proc.poll() is None, f"fake daemon {argv[0]} exited: {proc.returncode}"
        assert time.monotonic() < deadline, f"fake daemon {argv[0]} did not exec in 10s"
        time.sleep(0.001)


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
    cmd: list[str], env: dict[str, str], check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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


def test_a_started_fake_daemon_already_shows_its_command_line(daemons: Daemons) -> None:
    # What the by-pid tests below rely on. Right after Popen the new image's
    # command line is often still empty (a kernel window, not ours to close),
    # so a couple of hundred starts without the wait all but surely catch one.
    for i in range(200):
        proc = daemons.start("java", f"/x/{i}/server.properties")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        proc.kill()
        assert cmdline.endswith(f"\0/x/{i}/server.properties\0".encode()), (i, cmdline)


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


def test_k8s_reset_keeps_the_lock_a_waiting_caller_holds_open(
    tmp_path: Path, daemons: Daemons
) -> None:
    # A caller (an up) already waiting on the lock holds the old file open. Deleted,
    # the next up would make and take a fresh lock and run beside that caller.
    state = tmp_path / "a"
    etcd = fake_k8s(daemons, state)
    k8s = state / "k8s"
    (k8s / "pki").mkdir()
    (k8s / "pki" / "ca.crt").write_text("")
    (k8s / "admin.kubeconfig").write_text("")
    env = {"SRE_STATE_DIR": str(state), "SRE_CACHE_DIR": str(tmp_path / "cache")}
    with (k8s / "lock").open("a") as waiter:
        run(["bash", str(SCRIPTS / "k8s.sh"), "reset"], env)

        assert gone(etcd)
        assert sorted(p.name for p in k8s.iterdir()) == ["lock"]
        # the waiter takes the lock it waited on; a new caller must find it busy
        fcntl.flock(waiter, fcntl.LOCK_EX)
        busy = run(["flock", "-n", str(k8s / "lock"), "true"], env, check=False)
    assert busy.returncode == 1


def test_k8s_reset_under_an_up_that_keeps_the_lock_fails_and_touches_nothing(
    tmp_path: Path, daemons: Daemons
) -> None:
    # An up still holding the lock (a cold build, a slow start) must keep its
    # certs, etcd data and components; reset used to wait, then wipe anyway.
    state = tmp_path / "a"
    etcd = fake_k8s(daemons, state)
    k8s = state / "k8s"
    (k8s / "pki").mkdir()
    (k8s / "pki" / "ca.crt").write_text("ca\n")
    env = {
        "SRE_STATE_DIR": str(state),
        "SRE_CACHE_DIR": str(tmp_path / "cache"),
        "SRE_LOCK_TIMEOUT": "1",
    }
    with (k8s / "lock").open("a") as up:
        fcntl.flock(up, fcntl.LOCK_EX)
        reset = run(["bash", str(SCRIPTS / "k8s.sh"), "reset"], env, check=False)

    assert reset.returncode == 1
    assert "stopped and deleted nothing" in reset.stderr
    assert (k8s / "pki" / "ca.crt").read_text() == "ca\n"
    assert (k8s / "pids" / "etcd.pid").exists()
    assert etcd.poll() is None


def test_k8s_down_under_an_up_that_keeps_the_lock_fails_naming_it_and_stops_nothing(
    tmp_path: Path, daemons: Daemons
) -> None:
    # The up may be between spawning a component and its exec, when its pid
    # cannot be told ours: a down going ahead anyway dropped its pid file.
    state = tmp_path / "a"
    etcd = fake_k8s(daemons, state)
    k8s = state / "k8s"
    env = {
        "SRE_STATE_DIR": str(state),
        "SRE_CACHE_DIR": str(tmp_path / "cache"),
        "SRE_LOCK_TIMEOUT": "1",
    }
    with (k8s / "lock").open("a") as up:
        fcntl.flock(up, fcntl.LOCK_EX)
        up.write("pid 4242: up\n")
        up.flush()
        down = run(["bash", str(SCRIPTS / "k8s.sh"), "down"], env, check=False)

    assert down.returncode == 1
    assert "pid 4242: up" in down.stderr
    assert (k8s / "pids" / "etcd.pid").exists()
    assert etcd.poll() is None


FAKE_SETSID = """#!/usr/bin/env bash
# Fake setsid: logs its pid, execs late (as on a loaded machine), and runs the
# component (a bash copy) as a loop with the component's arguments kept.
echo $$ >>"$FAKE_PIDS"
sleep 0.5
exe=$1
shift
exec "$exe" -c 'while :; do sleep 0.1; done' "${exe##*/}" "$@"
"""


class EtcdHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"health":"true"}')

    def log_message(self, *args: object) -> None:
        pass


def serve_etcd_health(port: int, pidfile: Path, stop: threading.Event) -> None:
    """Answers etcd's health check on ``port`` once up has started etcd (bound
    sooner, up's own check would find the port taken)."""
    while not pidfile.exists():
        if stop.wait(0.01):
            return
    with http.server.HTTPServer(("127.0.0.1", port), EtcdHealth) as server:
        server.timeout = 0.1
        while not stop.is_set():
            server.handle_request()


def test_k8s_up_waits_for_a_component_that_execs_late(tmp_path: Path) -> None:
    # etcd and the apiserver take 0.5 s to exec; the apiserver never gets ready.
    # Up must fail on the apiserver's timeout, not call etcd dead meanwhile, and
    # stop both: the pid it wrote names them once they have exec'd.
    bin_dir, state = tmp_path / "fakebin", tmp_path / "state"
    bin_dir.mkdir()
    (bin_dir / "setsid").write_text(FAKE_SETSID)
    (bin_dir / "setsid").chmod(0o755)
    env = {"SRE_STATE_DIR": str(state), "SRE_CACHE_DIR": str(tmp_path / "cache")}
    status = run(["bash", str(SCRIPTS / "k8s.sh"), "status"], env, check=False)
    k8s_bin = Path(status.stdout.split("not built (", 1)[1].split(")", 1)[0])
    k8s_bin.mkdir(parents=True)
    (k8s_bin / ".complete").write_text("fake\n")
    shutil.copy("/bin/bash", k8s_bin / "kube-apiserver")
    shutil.copy("/bin/bash", bin_dir / "etcd")
    pki = state / "k8s" / "pki"
    pki.mkdir(parents=True)
    # generated already: up only reads these into kubeconfigs
    (pki / ".complete").write_text("")
    (pki / "ca.crt").write_text("")
    for user in ("admin", "kube-controller-manager", "kube-scheduler", "kwok"):
        (pki / f"{user}.crt").write_text("")
        (pki / f"{user}.key").write_text("")
    # one port for all: only etcd's health is served there, the rest fail TLS
    port = free_port()
    fake_pids = tmp_path / "fake.pids"
    env |= {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_PIDS": str(fake_pids),
        "SRE_ETCD_BIN": str(bin_dir / "etcd"),
        "SRE_K8S_UP_TIMEOUT": "1",
        **dict.fromkeys(
            (
                "SRE_ETCD_PORT",
                "SRE_ETCD_PEER_PORT",
                "SRE_K8S_APISERVER_PORT",
                "SRE_K8S_CONTROLLER_MANAGER_PORT",
                "SRE_K8S_SCHEDULER_PORT",
            ),
            str(port),
        ),
    }
    stop = threading.Event()
    health = threading.Thread(
        target=serve_etcd_health, args=(port, state / "k8s" / "pids" / "etcd.pid", stop)
    )
    health.start()
    try:
        up = run(["bash", str(SCRIPTS / "k8s.sh"), "up"], env, check=False)
        started = [int(pid) for pid in fake_pids.read_text().split()]
        left = [pid for pid in started if running_under(pid, tmp_path)]
    finally:
        stop.set()
        health.join()
        for pid in map(int, fake_pids.read_text().split() if fake_pids.exists() else ()):
            if running_under(pid, tmp_path):
                os.kill(pid, signal.SIGKILL)

    assert up.returncode != 0
    assert "timed out after 1s waiting for kube-apiserver" in up.stderr, up.stderr
    assert "failed to start" not in up.stderr
    assert len(started) == 2 and left == []


def running_under(pid: int, under: Path) -> bool:
    """Whether ``pid`` is a live process whose command line names a path under ``under``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return os.fsencode(under) in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


# service, its config file, how the config file appears on its command line
LIB_SERVICES = [
    ("kafka", "server.properties", "{}"),
    ("prometheus", "prometheus.yml", "--config.file={}"),
    ("alertmanager", "alertmanager.yml", "--config.file={}"),
]


@pytest.mark.parametrize(("service", "config", "arg"), LIB_SERVICES)
@pytest.mark.parametrize("layout", ["nested", "relative"])
def test_service_ignores_a_stale_pid_that_names_another_instances_process(
    tmp_path: Path, daemons: Daemons, service: str, config: str, arg: str, layout: str
) -> None:
    # Our state dir's path is a substring of the other instance's: theirs is
    # nested below a dir spelled like ours, or ours is given relative.
    if layout == "nested":
        cwd, ours = tmp_path, tmp_path / "a"
        theirs = tmp_path / "b" / str(ours).lstrip("/")
        state = str(ours)
    else:
        cwd, ours = tmp_path / "wt", tmp_path / "wt" / ".state"
        theirs = tmp_path / "main" / ".state"
        state = ".state"
    other = daemons.start("java", arg.format(theirs / service / config))
    # our stale pid file: the number now belongs to the other instance
    (ours / service).mkdir(parents=True)
    pidfile = ours / service / f"{service}.pid"
    pidfile.write_text(f"{other.pid}\n")
    env = {"SRE_STATE_DIR": state}

    status = run(["bash", str(SCRIPTS / f"{service}.sh"), "status"], env, False, cwd)
    run(["bash", str(SCRIPTS / f"{service}.sh"), "stop"], env, cwd=cwd)

    assert status.returncode == 3 and f"{service} not running" in status.stdout
    assert other.poll() is None
    assert not pidfile.exists()


@pytest.mark.parametrize(("service", "config", "arg"), LIB_SERVICES)
def test_service_stops_its_own_process_by_pid(
    tmp_path: Path, daemons: Daemons, service: str, config: str, arg: str
) -> None:
    ours = tmp_path / "wt" / ".state"
    own = daemons.start("java", arg.format(ours / service / config))
    (ours / service).mkdir(parents=True)
    (ours / service / f"{service}.pid").write_text(f"{own.pid}\n")
    env = {"SRE_STATE_DIR": ".state"}

    status = run(["bash", str(SCRIPTS / f"{service}.sh"), "status"], env, cwd=tmp_path / "wt")
    run(["bash", str(SCRIPTS / f"{service}.sh"), "stop"], env, cwd=tmp_path / "wt")

    assert f"{service} running (pid {own.pid})" in status.stdout
    assert gone(own)


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


FAKE_PROMETHEUS = """#!/usr/bin/env python3
# Fake Prometheus: serves /-/ready with the status code held in $FAKE_READY_FILE.
import http.server, os, sys
addr = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--web.listen-address="))
host, port = addr.rsplit(":", 1)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(os.environ["FAKE_READY_FILE"]) as f:
            self.send_response(int(f.read()))
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((host, int(port)), Ready).serve_forever()
"""


def free_port() -> int:
    """A free loopback port in 58000-58999 (the range these tests may use)."""
    import socket

    for port in range(58000 + os.getpid() % 500, 59000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 58000-58999")


@pytest.fixture
def fake_prometheus(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    fake = tmp_path / "prometheus"
    fake.write_text(FAKE_PROMETHEUS)
    fake.chmod(0o755)
    ready = tmp_path / "ready"
    ready.write_text("200")
    env = {
        "SRE_STATE_DIR": str(tmp_path / "state"),
        "SRE_PROMETHEUS_PORT": str(free_port()),
        "SRE_PROMETHEUS_BIN": str(fake),
        "FAKE_READY_FILE": str(ready),
    }
    try:
        yield env, ready
    finally:
        run(["bash", str(SCRIPTS / "prometheus.sh"), "stop"], env, check=False)


def test_start_of_a_running_healthy_instance_is_a_no_op(
    fake_prometheus: tuple[dict[str, str], Path],
) -> None:
    env, _ = fake_prometheus
    run(["bash", str(SCRIPTS / "prometheus.sh"), "start"], env)
    pid = (Path(env["SRE_STATE_DIR"]) / "prometheus" / "prometheus.pid").read_text()

    again = run(["bash", str(SCRIPTS / "prometheus.sh"), "start"], env, check=False)

    assert again.returncode == 0, again.stderr
    assert "prometheus already running and healthy" in again.stderr
    assert (Path(env["SRE_STATE_DIR"]) / "prometheus" / "prometheus.pid").read_text() == pid


def test_start_of_a_running_unhealthy_instance_is_an_error_naming_it(
    fake_prometheus: tuple[dict[str, str], Path],
) -> None:
    env, ready = fake_prometheus
    run(["bash", str(SCRIPTS / "prometheus.sh"), "start"], env)
    ready.write_text("503")

    again = run(["bash", str(SCRIPTS / "prometheus.sh"), "start"], env, check=False)

    assert again.returncode != 0
    assert "prometheus is running (pid" in again.stderr
    assert "not healthy" in again.stderr


FAKE_LATE_SETSID = """#!/usr/bin/env bash
# Fake setsid: until $FAKE_GO exists it is what a fork is before its exec, a
# process whose command line does not show the service's config; then it runs
# the service in its place (same pid). It logs its pid once it waits.
printf -v FAKE_CMD '%q ' "$@"
export FAKE_CMD
exec bash -c 'echo $$ >>"$FAKE_PIDS"
for ((i = 0; i < 6000; i++)); do [[ -e $FAKE_GO ]] && break; sleep 0.01; done
eval "exec $FAKE_CMD"'
"""


@pytest.fixture
def late_prometheus(
    tmp_path: Path, fake_prometheus: tuple[dict[str, str], Path]
) -> Iterator[tuple[dict[str, str], Path]]:
    """The fake Prometheus behind a setsid that execs it only once the test
    creates the returned go file; every process it started is killed at the end."""
    env, _ = fake_prometheus
    bin_dir = tmp_path / "setsidbin"
    bin_dir.mkdir()
    (bin_dir / "setsid").write_text(FAKE_LATE_SETSID)
    (bin_dir / "setsid").chmod(0o755)
    fake_pids, go = tmp_path / "fake.pids", tmp_path / "go"
    late = env | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_PIDS": str(fake_pids),
        "FAKE_GO": str(go),
    }
    try:
        yield late, go
    finally:
        go.touch()
        for pid in map(int, fake_pids.read_text().split() if fake_pids.exists() else ()):
            if running_under(pid, tmp_path):
                os.kill(pid, signal.SIGKILL)


def script(service: str, action: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", str(SCRIPTS / f"{service}.sh"), action],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def spawning(env: dict[str, str]) -> int:
    """Waits until the fake setsid started by a start waits to exec; its pid."""
    fake_pids = Path(env["FAKE_PIDS"])
    deadline = time.monotonic() + 30
    while not fake_pids.exists() or not fake_pids.read_text().strip():
        assert time.monotonic() < deadline, "start did not spawn within 30 s"
        time.sleep(0.01)
    return int(fake_pids.read_text().split()[0])


def waits_on_lock(lock: Path) -> bool:
    """Whether some process is blocked in flock(2) on the file ``lock``."""
    if not lock.exists():
        return False
    inode = f":{lock.stat().st_ino} "
    return any(
        " -> FLOCK " in line and inode in line
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_a_stop_during_a_start_that_is_still_spawning_waits_and_stops_the_service(
    tmp_path: Path, late_prometheus: tuple[dict[str, str], Path]
) -> None:
    # The stop reads the pid while the start's child has not exec'd yet. Without
    # a shared lock it called that pid not ours, removed the pid file and left
    # the service running, untracked, once it had exec'd.
    env, go = late_prometheus
    env |= {"SRE_LOCK_TIMEOUT": "60"}
    lock = Path(env["SRE_STATE_DIR"]) / "prometheus" / "lock"
    start = script("prometheus", "start", env)
    pid = spawning(env)
    stop = script("prometheus", "stop", env)
    deadline = time.monotonic() + 30
    while stop.poll() is None and not waits_on_lock(lock):
        assert time.monotonic() < deadline, "stop neither waited nor ended within 30 s"
        time.sleep(0.01)
    go.touch()
    _, start_err = start.communicate(timeout=90)
    _, stop_err = stop.communicate(timeout=90)

    assert start.returncode == 0, start_err
    assert stop.returncode == 0, stop_err
    assert f"stopping prometheus (pid {pid})" in stop_err, stop_err
    assert not running_under(pid, tmp_path)


def test_a_stop_that_cannot_get_the_lock_in_time_names_its_holder(
    tmp_path: Path, late_prometheus: tuple[dict[str, str], Path]
) -> None:
    env, go = late_prometheus
    start = script("prometheus", "start", env)
    pid = spawning(env)
    lock = Path(env["SRE_STATE_DIR"]) / "prometheus" / "lock"

    stop = run(
        ["bash", str(SCRIPTS / "prometheus.sh"), "stop"], env | {"SRE_LOCK_TIMEOUT": "1"}, False
    )
    go.touch()
    _, start_err = start.communicate(timeout=90)
    held = [fd.readlink() for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.readlink() == lock]

    assert stop.returncode == 1
    assert (
        f"another scripts/prometheus.sh (pid {start.pid}: start) still holds {lock} after 1s"
        in stop.stderr
    ), stop.stderr
    assert start.returncode == 0, start_err
    assert running_under(pid, tmp_path)
    # the service is started without the lock: holding it, it would block every later stop
    assert held == []


@pytest.mark.parametrize("service", [svc for svc, _, _ in LIB_SERVICES])
def test_a_status_that_cannot_get_the_lock_in_time_is_unknown_not_failed(
    tmp_path: Path, service: str
) -> None:
    # LSB: 0 running, 3 not running, 4 unknown. It exited 1 ("dead, pid file left"),
    # and callers taking any non-zero for "not running" went on to start.
    lock = tmp_path / "state" / service / "lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        held.write("pid 4242: start\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        status = run(
            ["bash", str(SCRIPTS / f"{service}.sh"), "status"],
            {"SRE_STATE_DIR": str(tmp_path / "state"), "SRE_LOCK_TIMEOUT": "1"},
            check=False,
        )

    assert status.returncode == 4, status.stderr
    assert (
        f"{service} status unknown: another scripts/{service}.sh (pid 4242: start) "
        f"still holds {lock} after 1s"
    ) in status.stderr


FAKE_SERVICE = """#!/usr/bin/env bash
# Fake service script: logs each call and whether the caller held the fixtures' lock.
svc=$(basename "$0" .sh)
lock="$SRE_STATE_DIR/.fixtures/$svc.lock"
mkdir -p "${lock%/*}"
if flock -n "$lock" true; then held=unlocked; else held=locked; fi
echo "$svc $1 $held" >>"$FAKE_LOG"
case $1 in
    status) exit "${FAKE_STATUS:-3}" ;;
esac
"""


def lab(
    tmp_path: Path, status: int, runner: str = "run-lab.sh"
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Runs ``runner`` (run-lab.sh, bench.sh) over fake service scripts whose status
    exits ``status``; its result and the calls it made."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / runner, repo / "scripts" / runner)
    for svc in ("kafka", "prometheus", "alertmanager", "k8s"):
        (repo / "scripts" / f"{svc}.sh").write_text(FAKE_SERVICE)
        (repo / "scripts" / f"{svc}.sh").chmod(0o755)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "sre-agent").write_text("#!/bin/sh\nexit 0\n")
    (repo / ".venv" / "bin" / "sre-agent").chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "SRE_STATE_DIR": str(tmp_path / "state"),
        "SRE_LAB_CLUSTER": "kubernetes",
        "FAKE_LOG": str(log),
        "FAKE_STATUS": str(status),
    }
    proc = run(["bash", str(repo / "scripts" / runner)], env, check=False)
    return proc, log.read_text().splitlines() if log.exists() else []


def run_lab(tmp_path: Path, status: int) -> list[str]:
    proc, calls = lab(tmp_path, status)
    assert proc.returncode == 0, proc.stderr
    return calls


def test_run_lab_starts_under_the_fixtures_lock_and_stops_what_it_started(
    tmp_path: Path,
) -> None:
    calls = run_lab(tmp_path, status=3)

    assert "kafka start locked" in calls and "k8s up locked" in calls
    assert "kafka start unlocked" not in calls and "k8s up unlocked" not in calls
    assert [c.rsplit(" ", 1)[0] for c in calls if " stop " in c or " down " in c] == [
        "kafka stop",
        "prometheus stop",
        "k8s down",
    ]


def test_run_lab_leaves_an_unhealthy_control_plane_it_did_not_start_running(
    tmp_path: Path,
) -> None:
    calls = run_lab(tmp_path, status=1)

    assert not [c for c in calls if c.startswith("k8s down")]


@pytest.mark.parametrize(("runner", "says"), [("run-lab.sh", "run"), ("bench.sh", "bench")])
def test_a_status_unknown_stops_the_runner_before_it_starts_anything(
    tmp_path: Path, runner: str, says: str
) -> None:
    # 4: another call holds the service's lock; a start would only wait as long again.
    proc, calls = lab(tmp_path, status=4, runner=runner)

    assert proc.returncode == 1
    assert calls == ["kafka status locked"]
    assert (
        f"{says}: kafka status unknown: another scripts/kafka.sh call holds its lock; "
        "retry once it has finished"
    ) in proc.stderr


def test_the_test_fixtures_do_not_start_a_service_whose_status_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_script(script: str, *args: str, **_: object) -> subprocess.CompletedProcess[str]:
        calls.append((script, *args))
        code = 4 if args == ("status",) else 0
        return subprocess.CompletedProcess([script, *args], code, "", "lock busy\n")

    monkeypatch.setattr(infra, "TEST_STATE_DIR", tmp_path)
    monkeypatch.setattr(infra, "run_script", fake_script)
    with pytest.raises(infra.InfraError, match="status unknown"), infra._service("kafka"):
        pass

    assert calls == [("kafka.sh", "status")]


def test_system_deps_installs_what_a_fresh_debian_lacks_for_make_and_k8s(
    tmp_path: Path,
) -> None:
    # A minimal Debian 12 has neither the openssl command (k8s.sh makes its
    # certificates with it) nor python3's ensurepip (the Makefile's venv).
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "realpath", "tr", "cat", "flock", "curl"):
        found = shutil.which(tool)
        assert found is not None, tool
        (tools / tool).symlink_to(found)
    log = tmp_path / "apt.log"
    fakes = {
        "apt-get": f'#!/bin/bash\necho "$*" >>{log}\n',
        "python3": "#!/bin/bash\nexit 1\n",  # no ensurepip
        "java": "#!/bin/bash\n",
        "mvn": "#!/bin/bash\n",
        "kcat": "#!/bin/bash\n",
        # what writes and removes its temporary /usr/sbin/policy-rc.d: not the real one
        "tee": "#!/bin/bash\ncat >/dev/null\n",
        "chmod": "#!/bin/bash\n",
        "rm": "#!/bin/bash\n",
    }
    for name, body in fakes.items():
        (tools / name).write_text(body)
        (tools / name).chmod(0o755)

    run(
        [shutil.which("bash") or "/bin/bash", str(SCRIPTS / "system-deps.sh")], {"PATH": str(tools)}
    )

    calls = log.read_text().splitlines() if log.exists() else []
    install = [line.split() for line in calls if "install" in line]
    assert len(install) == 1
    assert {"openssl", "python3-venv"} <= set(install[0]), install
