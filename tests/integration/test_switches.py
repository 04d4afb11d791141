"""`sre-agent switches`: the kill switch and shadow mode for every executor replica at
once, through the switches topic, on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent.cli import main
from agent.models import ActionRequest, ActionResult, Target, utcnow
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from streams.partitioning import partition_for
from tests.fakes.incidents import action_request, incident, member
from tests.helpers import TopicReader, eventually, make_settings, readers

pytestmark = pytest.mark.integration


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def scale_up(name: str, namespace: str = "shop") -> ActionRequest:
    labels = {"cluster": "c1", "namespace": namespace, "service": name}
    inc = incident(member(labels=labels), labels=labels, id=f"inc-{uuid.uuid4().hex[:8]}")
    target = Target(kind="Deployment", namespace=namespace, name=name)
    return replace(action_request(inc, "scale_up", target), id=f"act-{inc.id}")


async def test_switches_reach_every_replica_and_a_late_starter(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill switch on: actions on both replicas' partitions are denied, naming who and why;
    a replica started afterwards reads it at start. Dry-run on (kill off): decided, not
    applied. Both off: executed."""
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"kafka": {"partitions": 4}, "remediation": {"cooldown": 0, "verify_after": "1h"}},
    )
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix}}
        )
    )
    cfg = ("--config", str(config))
    # A workload on each partition, so each replica owns some.
    by_partition: dict[int, str] = {}
    for i in range(100):
        by_partition.setdefault(partition_for(f"Deployment/shop/svc-{i}", 4), f"svc-{i}")
    names = [by_partition[p] for p in range(4)]
    clusters = [FakeCluster(), FakeCluster()]
    for c in clusters:
        for n in names:
            c.create_deployment("shop", n, image="v1", replicas=2, at=utcnow())
        c.create_deployment("web", "front", image="v1", replicas=2, at=utcnow())

    assert (await cli(capsys, "topics", "create", *cfg))[0] == 0
    code, out = await cli(capsys, "switches", "status", *cfg)
    assert code == 0 and "kill_switch: off (never set" in out, out
    code, out = await cli(
        capsys, "switches", "kill", "on", "--by", "alice", "--reason", "bad deploy", *cfg
    )
    assert code == 0 and "kill_switch turned on by alice" in out, out

    async def run(agent: Agent, r: dict[str, TopicReader], actions: list[ActionRequest]) -> None:
        for a in actions:
            await agent.bus.publish(agent.bus.topic("actions"), a)
        ids = {a.id for a in actions}
        await r["results"].wait_for(
            lambda xs: ids <= {x.action_id for x in xs}, 30, "a result per action"
        )

    def outcome(r: dict[str, TopicReader], a: ActionRequest) -> ActionResult:
        found: ActionResult = next(x for x in r["results"].items if x.action_id == a.id)
        return found

    replicas = [Agent(settings, roles=["executor"], cluster=c, serve_http=False) for c in clusters]
    t = settings.kafka.topic_prefix
    async with (
        replicas[0],
        replicas[1],
        readers(kafka_bootstrap, {"results": (f"{t}action-results", ActionResult)}) as r,
    ):
        killed = [scale_up(n) for n in names]
        await run(replicas[0], r, killed)
        for a in killed:
            res = outcome(r, a)
            assert res.status == "denied", res
            assert res.message.startswith(
                "kill_switch: the kill switch is on (turned on by alice at "
            ), res.message
            assert "bad deploy" in res.message
        for c in clusters:
            assert all([(await c.workload(a.target)).replicas == 2 for a in killed])
        # Each replica holds the switch (not only the one that owned these partitions).
        for agent in replicas:
            registry = agent.metrics.registry

            def killed_here(reg: CollectorRegistry = registry) -> bool:
                on = reg.get_sample_value(
                    "sre_agent_switch_on", {"switch": "kill_switch", "namespace": ""}
                )
                return on == 1.0

            await eventually(killed_here, 10, what="the kill switch on every replica")

        # A replica that starts now learns the switch from the topic, not from a live record.
        late = Agent(settings, roles=["executor"], cluster=FakeCluster(), serve_http=False)
        async with late:
            assert late.executor is not None and late.executor.current_switches().kill_switch

        code, out = await cli(capsys, "switches", "dry-run", "on", "--by", "bob", *cfg)
        assert code == 0, out
        code, out = await cli(capsys, "switches", "kill", "off", "--by", "alice", *cfg)
        assert code == 0, out
        shadow = [scale_up(n) for n in names]
        await run(replicas[1], r, shadow)
        assert {outcome(r, a).status for a in shadow} == {"dry_run"}

        code, out = await cli(capsys, "switches", "dry-run", "off", "--by", "bob", *cfg)
        assert code == 0, out
        live = [scale_up(n) for n in names]
        await run(replicas[0], r, live)
        assert {outcome(r, a).status for a in live} == {"succeeded"}
        acted = [sum([(await c.workload(a.target)).replicas != 2 for a in live]) for c in clusters]
        assert sum(acted) == 4, acted

        # A change freeze of one namespace: the others go on.
        code, out = await cli(
            capsys,
            "switches",
            "kill",
            "on",
            "--namespace",
            "shop",
            "--by",
            "carol",
            "--reason",
            "db migration",
            *cfg,
        )
        assert code == 0, out
        frozen, web = [scale_up(n) for n in names], scale_up("front", namespace="web")
        await run(replicas[1], r, [*frozen, web])
        for a in frozen:
            assert "turned on for namespace shop by carol" in outcome(r, a).message
        assert outcome(r, web).status == "succeeded"
        code, out = await cli(capsys, "switches", "kill", "on", "--namespace", "Shop!", *cfg)
        assert code == 2 and "namespace: String should match pattern" in out, out

    code, out = await cli(capsys, "switches", "status", *cfg)
    assert code == 0
    assert "kill_switch: off, turned off by alice" in out, out
    assert "dry_run: off, turned off by bob" in out, out
    assert "kill_switch in shop: ON, turned on for namespace shop by carol" in out, out
