"""`sre-agent approvals` and `sre-agent actions` against a real broker and a running
executor (on the in-process cluster): list, approve, reject, list results, undo."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.models import ActionRequest, ActionResult, ApprovalRequest, Target, utcnow
from agent.runtime import Agent
from handlers.fake_cluster import FakeCluster
from streams.ledger import BudgetLedger
from tests.fakes.incidents import incident, member
from tests.helpers import make_settings, readers, started_bus

pytestmark = pytest.mark.integration

CART = Target(kind="Deployment", namespace="shop", name="cart")
FLAGS = Target(kind="ConfigMap", namespace="shop", name="flags")
CART_LABELS = {"cluster": "test", "namespace": "shop", "service": "cart"}


def request(action_id: str, type_: str, target: Target, **params: str) -> ActionRequest:
    return ActionRequest(
        id=action_id,
        incident_id="inc-1",
        incident_key="test/shop/cart",
        analysis_id="an-1",
        type=type_,  # type: ignore[arg-type]
        target=target,
        confidence=0.95,
        reason="test",
        requested_at=utcnow(),
        params=params,
        labels={"namespace": "shop", "service": "cart"},
    )


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


async def test_approvals_and_undo_from_the_command_line(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        kafka_bootstrap,
        topic_prefix,
        doc={"remediation": {"cooldown": 0, "verify_after": "1h"}},
    )
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix}}
        )
    )
    cfg = ("--config", str(config))
    cluster = FakeCluster()
    cluster.create_deployment("shop", "cart", image="cart:v1", replicas=2, at=utcnow())
    cluster.create_config_map("shop", "flags", {"mode": "fast"})
    agent = Agent(settings, roles=["executor"], cluster=cluster, serve_http=False)
    t = settings.kafka.topic_prefix
    async with agent:
        async with readers(
            kafka_bootstrap,
            {
                "approvals": (f"{t}approvals", ApprovalRequest),
                "results": (f"{t}action-results", ActionResult),
            },
        ) as r:
            for a in (
                request("cfg-1", "update_config", FLAGS, key="mode", value="safe"),
                request("cfg-2", "update_config", FLAGS, key="extra", value="1"),
                request("up-1", "scale_up", CART, replicas="+3"),
            ):
                await agent.bus.publish(agent.bus.topic("actions"), a)
            await r["approvals"].wait_for(lambda xs: len(xs) == 2, 30, "two approval requests")
            await r["results"].wait_for(
                lambda xs: any(x.action_id == "up-1" and x.status == "succeeded" for x in xs),
                30,
                "the scale",
            )
        first, second = sorted(r["approvals"].items, key=lambda x: x.action.id)

        code, out = await cli(capsys, "approvals", "list", *cfg)
        assert code == 0
        assert f"{first.id}  update_config ConfigMap/shop/flags key=mode value=safe" in out
        assert f"hash {first.action_hash}" in out and second.id in out

        code, out = await cli(capsys, "approvals", "approve", first.id, "--by", "carol", *cfg)
        assert code == 0, out
        assert (
            f"approved {first.id}" in out and "succeeded: set mode in ConfigMap/shop/flags" in out
        )
        assert cluster.config_map("shop", "flags").data == {"mode": "safe"}

        code, out = await cli(
            capsys, "approvals", "reject", second.id, "--by", "dave", "--reason", "no", *cfg
        )
        assert code == 0 and f"rejected {second.id}" in out
        code, out = await cli(capsys, "approvals", "approve", second.id, *cfg)
        assert code == 2 and f"no pending approval request {second.id}" in out

        code, out = await cli(capsys, "actions", "list", *cfg)
        assert code == 0
        assert "up-1" in out and "scale_up" in out and "[undoable]" in out

        assert (await cluster.workload(CART)).replicas == 5
        code, out = await cli(capsys, "actions", "undo", "up-1", "--by", "erin", *cfg)
        assert code == 0, out
        assert "succeeded: scaled Deployment/shop/cart back to 2" in out
        assert (await cluster.workload(CART)).replicas == 2
        code, out = await cli(capsys, "actions", "undo", "nothing-like-it", *cfg)
        assert code == 2 and "records a prior state" in out

        code, out = await cli(capsys, "approvals", "list", *cfg)
        assert "no pending approvals" in out

        # The whole story of the incident, from the topics.
        inc = incident(member(labels=CART_LABELS), id="inc-1", labels=CART_LABELS)
        await agent.bus.publish(agent.bus.topic("incidents"), replace(inc, opened_at=utcnow()))
        code, out = await cli(capsys, "incidents", "list", *cfg)
        assert code == 0 and "inc-1" in out and "test/shop/cart" in out, out
        code, out = await cli(capsys, "incidents", "show", "inc", *cfg)
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0] == "incident inc-1 test/shop/cart"
        kinds = [line.split()[2] for line in lines[1:]]
        assert kinds.count("action") == 4 and kinds.count("approval") == 2, out  # undo: 4th
        assert kinds.count("escalation") >= 2 and kinds.count("incident") == 1, out
        assert "update_config ConfigMap/shop/flags rejected/not_applicable" in out
        assert "[approval_requested] update_config on ConfigMap/shop/flags" in out
        code, out = await cli(capsys, "incidents", "show", "inc-9", *cfg)
        assert code == 2 and "no incident inc-9" in out
    assert cluster.config_map("shop", "flags").data == {"mode": "safe"}  # cfg-2 rejected


async def test_the_budget_command_shows_what_every_replica_claimed(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(kafka_bootstrap, topic_prefix)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix}}
        )
    )
    bus, _ = await started_bus(settings)
    ledger = BudgetLedger(bus, settings.remediation)
    now = utcnow()
    node = Target(kind="Node", namespace="", name="n1")
    try:
        assert await ledger.claim(request("up-1", "scale_up", CART), now) is None
        assert await ledger.claim(request("up-2", "scale_up", CART), now) is None
        await ledger.release(request("up-2", "scale_up", CART), now)  # changed nothing
        assert await ledger.claim(request("drain-1", "drain_node", node), now) is None
    finally:
        await ledger.stop()
        await bus.stop()
    code, out = await cli(capsys, "actions", "budget", "--config", str(config))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "all namespaces: 2 of 20 actions in the last hour", out
    assert "namespace shop: 1 of 10" in lines
    assert any(line.startswith("node n1: action drain-1 in flight since") for line in lines), out
