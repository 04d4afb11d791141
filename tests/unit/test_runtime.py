import asyncio
import gc
from collections.abc import Iterator
from datetime import timedelta

import pytest

from agent.analyzer import KubeEvent
from agent.runtime import GC_THRESHOLDS, Agent, freeze_heap, prometheus_gates_readiness
from agent.settings import parse_settings
from handlers.fake_cluster import FakeCluster
from tests.fakes.incidents import OPENED, SHOP, incident, member


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_freeze_heap_exempts_start_up_objects_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    survivor = [object()]  # allocated before the freeze: the collector must skip it now
    freeze_heap()
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # the default young threshold, which this is about


RULES_ONLY_PATTERNS = [
    {
        "name": "pod-restarts",
        "condition": "increase(kube_pod_container_status_restarts_total[5m]) > 3",
        "actions": ["analyze_crash_logs", "restart_if_crash_looping"],
    },
    {
        "name": "node-not-ready",
        "condition": 'kube_node_status_condition{condition="Ready",status="true"} == 0',
        "actions": ["check_node_conditions", "drain_if_node_unhealthy"],
    },
]


async def test_the_rules_alone_see_the_gathered_context_and_act_on_it() -> None:
    """With ai.enabled false (the default) the rule analyzer decides alone. It used to see
    only rollouts, so a crash loop or a failing node was "unknown" and nothing acted; it
    now reads the same events and node conditions the LLM would get (never the logs)."""
    settings = parse_settings(
        {
            "monitoring": {"prometheus": {"url": "http://127.0.0.1:1"}},
            "patterns": RULES_ONLY_PATTERNS,
        },
        env={},
    )
    cluster = FakeCluster()
    cluster.create_deployment(
        "shop", "cart", image="cart:v3", replicas=2, at=OPENED - timedelta(days=2)
    )
    cluster.add_event(KubeEvent("shop", "Pod", "cart-5d8f-x2x", "BackOff", at=OPENED))
    cluster.set_node_conditions("node-7", ["NotReady"])
    cluster.set_logs("shop", "cart-5d8f-x2x", "the log is never read without the LLM")
    read: list[str] = []

    async def logs(namespace: str, pod: str, *, tail: int, since: object = None) -> str:
        read.append(pod)
        return ""

    cluster.logs = logs  # type: ignore[method-assign]
    agent = Agent(settings, roles=["analyzer"], cluster=cluster, serve_http=False)
    try:
        assert agent.analysis is not None and agent.llm is None
        labels = {**SHOP, "service": "cart"}
        crash = incident(member("pod-restarts", labels=labels), labels=labels)
        analysis = await agent.analysis.decide(crash)
        assert (analysis.analyzer, analysis.root_cause_class) == ("rules", "crash_loop")
        assert [(a.type, a.target.key) for a in analysis.actions] == [
            ("restart_workload", "Deployment/shop/cart")
        ]
        node = member("node-not-ready", labels={**labels, "node": "node-7"})
        analysis = await agent.analysis.decide(incident(node, labels=labels))
        assert analysis.root_cause_class == "node_failure"
        assert [(a.type, a.target.key) for a in analysis.actions] == [
            ("drain_node", "Node//node-7")
        ]
        assert read == []
    finally:
        await agent.prom.close()
        await agent.cluster.close()


class Stopping:
    def __init__(self, name: str, hangs: bool = False) -> None:
        self.name = name
        self.hangs = hangs
        self.stopped = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self.hangs:
            await asyncio.Event().wait()  # never set: a stop that never ends
        self.stopped = True


async def test_a_stop_that_hangs_is_abandoned_and_the_rest_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = Agent(parse_settings({}, env={}), roles=[], cluster=FakeCluster(), serve_http=False)
    first, stuck, last = Stopping("first"), Stopping("stuck", hangs=True), Stopping("last")
    agent.components = [first, stuck, last]  # stopped last to first
    agent.stop_timeout = 0.2
    await asyncio.wait_for(agent.stop(), 5)
    assert first.stopped and last.stopped and not stuck.stopped
    assert "stopping stuck took over 0s: abandoned" in caplog.text


@pytest.mark.parametrize(
    ("roles", "gated"),
    [
        (["detector"], False),  # its readiness is the Alertmanager webhook's
        (["detector", "executor"], False),
        (["executor"], True),
        (["correlator"], False),
        (["analyzer"], False),
    ],
)
def test_only_an_executor_without_the_webhook_is_unready_while_prometheus_is_down(
    roles: list[str], gated: bool
) -> None:
    assert prometheus_gates_readiness(roles) is gated
