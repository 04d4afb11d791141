"""docker-compose.yml is a coherent stack, checked without a Docker engine: every file it
mounts is in the repo, the agent's roles are configured with names the agent reads, and
Prometheus and Alertmanager get configs their own tools accept, wired to those roles."""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.settings import Settings, load_settings, load_yaml, parse_duration
from tests.helpers import PROMTOOL

REPO = Path(__file__).resolve().parents[2]
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"  # Debian's prometheus-alertmanager
ROLES = ("detector", "correlator", "analyzer", "executor")
# Where the images read their configs (their default --config.file) and listen.
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
ALERTMANAGER_CONFIG = "/etc/alertmanager/alertmanager.yml"
ALERTMANAGER_PORT = 9093
# A mount from outside the repo must be a required variable: compose refuses to start
# without it rather than mount an empty directory in its place.
REQUIRED_VAR = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")


def compose() -> dict[str, Any]:
    doc = load_yaml((REPO / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, Any]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def mounts(service: str) -> dict[str, Path | str]:
    """Container path -> the repo file mounted there, or the required variable naming it."""
    out: dict[str, Path | str] = {}
    for volume in services()[service].get("volumes", []):
        source, target = volume.rsplit(":ro", 1)[0].rsplit(":", 1)
        if source.startswith("./"):
            out[target] = REPO / source
        else:
            m = REQUIRED_VAR.match(source)
            assert m, f"{service}: {source} is neither in the repo nor a required variable"
            out[target] = m.group(1)
    return out


def host_path(service: str, container_path: str) -> Path:
    """The repo file a container path of ``service`` shows, through its mounts."""
    for target, source in mounts(service).items():
        if isinstance(source, Path) and (
            container_path == target or container_path.startswith(target + "/")
        ):
            return source / posixpath.relpath(container_path, target)
    raise AssertionError(f"{service}: nothing of the repo is mounted at {container_path}")


def role_env(role: str) -> dict[str, str]:
    return {k: str(v) for k, v in services()[role].get("environment", {}).items()}


def role_settings(role: str) -> Settings:
    """What `sre-agent run` in the role's container loads: the config file it names (the
    image's SRE_AGENT_CONFIG unless overridden), with the container's environment."""
    env = role_env(role)
    image_default = re.search(
        r"^ENV SRE_AGENT_CONFIG=(\S+)", (REPO / "Dockerfile").read_text(), re.M
    )
    assert image_default
    config = env.get("SRE_AGENT_CONFIG", image_default.group(1))
    return load_settings(host_path(role, config), env=env)


def read_names(settings: Settings, config: Path) -> set[str]:
    """Environment variables besides SRE_AGENT__* that the agent reads with this config."""
    placeholders = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", config.read_text()))
    return placeholders | {
        "SRE_AGENT_CONFIG",
        settings.detectors.alertmanager.token_env,
        settings.ai.azure_openai.api_key_env,
        *(w.token_env for w in settings.escalation.webhooks),
    }


def hostport(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    assert parts.hostname and parts.port, f"not a host:port: {address!r}"
    return parts.hostname, parts.port


def test_every_mounted_file_is_in_the_repo() -> None:
    external: set[str] = set()
    for name in services():
        for target, source in mounts(name).items():
            if isinstance(source, Path):
                assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
            else:
                external.add(source)
    # only the cluster to heal comes from outside
    assert external == {"SRE_KUBECONFIG"}


@pytest.mark.parametrize("role", ROLES)
def test_agent_roles_set_only_what_the_agent_reads(role: str) -> None:
    spec = services()[role]
    env = role_env(role)

    settings = role_settings(role)  # a ConfigError names an unknown SRE_AGENT__ key

    config = host_path(role, env.get("SRE_AGENT_CONFIG", "/app/config/agent.yaml"))
    unread = {k for k in env if not k.startswith("SRE_AGENT__")} - read_names(settings, config)
    assert not unread, f"{role}: the agent never reads {sorted(unread)}"
    assert spec["command"] == ["sre-agent", "run", "--role", role]
    assert spec["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert settings.server.host == "0.0.0.0"  # reachable by Prometheus and Alertmanager
    for address in (
        settings.kafka.bootstrap_servers,
        settings.monitoring.prometheus.url,
        settings.monitoring.alertmanager.url,
    ):
        assert hostport(address)[0] in services(), f"{role}: {address} is no service"
    # the analyzer reads and the executor acts on a real cluster, never the in-process one
    if role in ("analyzer", "executor"):
        assert settings.kubernetes.backend == "kubernetes"
        assert mounts(role)[settings.kubernetes.kubeconfig] == "SRE_KUBECONFIG"


def test_kafka_runs_in_kraft_mode_where_the_roles_look_for_it() -> None:
    env = {k: str(v) for k, v in services()["kafka"]["environment"].items()}

    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not [k for k in env if "ZOOKEEPER" in k]
    node, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"] and hostport(voter)[0] == "kafka"
    for role in ROLES:
        bootstrap = role_settings(role).kafka.bootstrap_servers
        assert f"PLAINTEXT://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_prometheus_scrapes_every_role_and_loads_the_shipped_rules() -> None:
    config = host_path("prometheus", PROMETHEUS_CONFIG)
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    doc = load_yaml(config.read_text())

    # rule files resolve beside the config, in the container as promtool found them here
    loaded = set()
    for rule_file in doc["rule_files"]:
        in_container = posixpath.join(posixpath.dirname(PROMETHEUS_CONFIG), rule_file)
        assert host_path("prometheus", in_container) == config.parent / rule_file
        loaded |= set(config.parent.glob(rule_file))
    assert REPO / "deploy" / "monitoring" / "self-healing-rules.yml" in loaded
    targets = {
        t
        for job in doc["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", [])
        for t in static["targets"]
    }
    for role in ROLES:
        assert f"{role}:{role_settings(role).server.port}" in targets
    [alerting] = doc["alerting"]["alertmanagers"]
    assert alerting["static_configs"][0]["targets"] == [f"alertmanager:{ALERTMANAGER_PORT}"]
    assert "alertmanager" in services()


def test_alertmanager_routes_to_the_agents_webhook_with_its_token() -> None:
    config = host_path("alertmanager", ALERTMANAGER_CONFIG)
    check = subprocess.run(
        [AMTOOL, "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    doc = load_yaml(config.read_text())
    [receiver] = [r for r in doc["receivers"] if r["name"] == doc["route"]["receiver"]]
    [hook] = receiver["webhook_configs"]

    host, port = hostport(hook["url"])
    settings = role_settings(host)
    am = settings.detectors.alertmanager
    assert host in ROLES and am.enabled
    assert (port, urlsplit(hook["url"]).path) == (settings.server.port, am.path)
    assert hook["http_config"]["authorization"]["credentials"] == role_env(host)[am.token_env]
    assert receiver["name"] in am.receivers
    for role in ROLES:
        assert hostport(role_settings(role).monitoring.alertmanager.url) == (
            "alertmanager",
            ALERTMANAGER_PORT,
        )


def routed(config: Path, labels: dict[str, str]) -> list[str]:
    """The receivers Alertmanager's own routing gives an alert of ``labels``, in order."""
    check = subprocess.run(
        [AMTOOL, "config", "routes", "test", f"--config.file={config}"]
        + [f"{k}={v}" for k, v in sorted(labels.items())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    return check.stdout.split()


def test_the_agents_own_alerts_page_a_human_not_the_agent() -> None:
    """The alerts about the agent itself used to go to its webhook like any other: an
    agent failure became an anomaly the agent might try to heal, and was lost while the
    agent was down. Each goes to the human receiver now, and only there."""
    config = host_path("alertmanager", ALERTMANAGER_CONFIG)
    doc = load_yaml(config.read_text())
    webhook = doc["route"]["receiver"]
    rules = load_yaml(host_path("prometheus", "/etc/prometheus/self-healing-rules.yml").read_text())
    beat = role_settings("detector").detectors.alertmanager.heartbeat
    assert beat is not None
    # The heartbeat goes to the agent (see the next test), which publishes it not.
    own = [
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r.get("alert") not in (None, beat.alertname)
    ]
    assert len(own) >= 10
    humans = set()
    for rule in own:
        labels = {**rule.get("labels", {}), "alertname": rule["alert"]}
        receivers = routed(config, labels)
        assert webhook not in receivers, f"{rule['alert']} goes to the agent: {receivers}"
        humans.update(receivers)
    (human,) = humans
    (receiver,) = [r for r in doc["receivers"] if r["name"] == human]
    for hook in receiver.get("webhook_configs", []):  # a pager's, never the agent's
        assert hostport(hook["url"])[0] not in ROLES, hook["url"]
    # Everything else still reaches the agent, whatever its labels.
    for labels in (
        {"alertname": "HighErrorRate", "severity": "critical", "service": "cart"},
        {"alertname": "KubePodCrashLooping", "namespace": "sre-agent"},  # the agent's namespace
    ):
        assert routed(config, labels) == [webhook], labels


def test_the_roles_reading_the_kubeconfig_can_run_as_its_owner() -> None:
    """A kubeconfig is usually its owner's alone (mode 600), and the containers ran as
    the image's uid: the analyzer and the executor could not read it. They run as
    SRE_UID:SRE_GID now, the image's own user when those are unset."""
    dockerfile = (REPO / "Dockerfile").read_text()
    image_user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert image_user, "the image names its user as uid:gid"
    uid, gid = image_user.groups()
    assert re.search(
        rf"groupadd --gid {gid}\b.*useradd --uid {uid} --gid {gid}\b", dockerfile, re.S
    )
    readers = [n for n in services() if "SRE_KUBECONFIG" in mounts(n).values()]
    assert sorted(readers) == ["analyzer", "executor"]
    for name in readers:
        assert services()[name].get("user") == f"${{SRE_UID:-{uid}}}:${{SRE_GID:-{gid}}}", name
    # How to set them, where people look for it.
    howto = "SRE_UID=$(id -u) SRE_GID=$(id -g) SRE_KUBECONFIG="
    assert howto in (REPO / "docker-compose.yml").read_text()
    assert howto in (REPO / "README.md").read_text()


def test_alertmanagers_heartbeat_reaches_the_agent_within_its_bound() -> None:
    """Without it the webhook cannot tell an Alertmanager that is down, or a broken way to
    the detector, from one with nothing to say. Prometheus fires it always, Alertmanager
    sends it to the detector's webhook more often than the detector expects it, and the
    detector expects it sooner than its incidents would resolve as quiet."""
    settings = role_settings("detector")
    beat = settings.detectors.alertmanager.heartbeat
    assert beat is not None
    rules = load_yaml(host_path("prometheus", "/etc/prometheus/self-healing-rules.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == beat.alertname]
    assert rule["expr"] == "vector(1)" and "for" not in rule
    config = host_path("alertmanager", ALERTMANAGER_CONFIG)
    doc = load_yaml(config.read_text())
    assert routed(config, {**rule["labels"], "alertname": beat.alertname}) == [
        doc["route"]["receiver"]
    ]
    [route] = [
        r for r in doc["route"]["routes"] if f'alertname="{beat.alertname}"' in r["matchers"]
    ]
    # Alertmanager resends at a group_interval flush once repeat_interval has passed.
    every = max(parse_duration(route["group_interval"]), parse_duration(route["repeat_interval"]))
    assert 2 * every < beat.within < settings.correlation.resolve_timeout
