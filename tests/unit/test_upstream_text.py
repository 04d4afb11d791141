"""What an upstream writes (an HTTP error body, a reason phrase) reaches the agent's errors
and logs only through agent.errors.plain: cut, control characters escaped. Put in as it
came, a hostile or broken upstream (or any proxy in front of it) could forge log lines
(``\\n2026-... CRITICAL ...``) and fill them with megabytes. Each adapter that quotes its
upstream, against a local server answering with such a body where a server can send it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from azure.core.exceptions import HttpResponseError
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from agent.alertmanager_api import AlertmanagerAPI
from agent.errors import AgentError, plain
from agent.kube_watch import ResourceWatch
from agent.llm import _http_error
from agent.metrics import Metrics
from agent.models import Escalation
from agent.notifier import Notifier
from agent.prom import PromClient
from agent.settings import parse_settings
from handlers.kube import KubeCluster

FORGED = "2026-12-07 23:59:59,000 CRITICAL agent.executor: forged: kill switch off"
HOSTILE = "upstream broke\n" + FORGED + "\r\n\x1b[2K" + "x" * 20_000
MOST = 2_000  # what one quoted reply may add to a line, at the most

log = logging.getLogger("tests.upstream")


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """Answers every request 503 with the hostile body."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=503, text=HOSTILE, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def alertmanager_api(url: str) -> None:
    api = AlertmanagerAPI(url, timeout=5)
    try:
        await api.notified("agent")
    finally:
        await api.close()


async def prometheus(url: str) -> None:
    prom = PromClient(url, timeout=5)
    try:
        await prom.query("up")
    finally:
        await prom.close()


async def notifier(url: str) -> None:
    settings = parse_settings(
        {"escalation": {"webhooks": [{"name": "chat", "url": f"{url}/hook"}]}}, env={}
    )
    n = Notifier(settings, metrics=Metrics(), env={})
    e = Escalation(
        id="esc-1",
        incident_id="inc-1",
        incident_key="c1/shop/checkout",
        reason="action_failed",
        summary="rollback failed",
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    try:
        await n._post(settings.escalation.webhooks[0], e)
    finally:
        await n.close()


async def kubernetes_api(url: str) -> None:
    """The API server (or a proxy before it) answers with a body that is not JSON."""
    cfg = kube_client.Configuration(host=url)
    async with KubeCluster(api=kube_client.ApiClient(cfg), request_timeout=5) as kube:
        await kube.call("GET", "/api/v1/namespaces/shop/pods/p", what="Pod/shop/p")


class _Transport:
    """A client whose transport fails (status 0) with a reason it was handed."""

    def param_serialize(self, **kwargs: Any) -> tuple[Any, ...]:
        return ()

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        raise ApiException(status=0, reason=HOSTILE)

    def close(self) -> None:
        pass


async def kubernetes_transport(url: str) -> None:
    async with KubeCluster(api=_Transport(), request_timeout=5) as kube:
        await kube.call("GET", "/api/v1/nodes/n1", what="Node/n1")


async def llm(url: str) -> None:
    # A reason phrase comes from the status line, which an HTTP server cannot end early
    # with a newline; another transport (or a proxy's library) may hand one on.
    err = HttpResponseError(message="Service Unavailable")
    err.status_code, err.reason = 503, HOSTILE
    raise _http_error(err, url)


SITES: dict[str, Callable[[str], Awaitable[None]]] = {
    "alertmanager_api": alertmanager_api,
    "prometheus": prometheus,
    "notifier": notifier,
    "kubernetes_api": kubernetes_api,
    "kubernetes_transport": kubernetes_transport,
    "llm": llm,
}


def assert_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    lines = [r.getMessage() for r in caplog.records]
    assert lines
    for line in lines:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line[:300]
        assert len(line) < MOST, len(line)
    # The forged text is there, quoted in the one line, never a record of its own.
    assert any("CRITICAL agent.executor: forged" in line for line in lines)
    formatted = [
        logging.Formatter("%(asctime)s %(levelname)s %(message)s").format(r) for r in caplog.records
    ]
    assert all(len(f.splitlines()) == 1 for f in formatted)


@pytest.mark.parametrize("site", sorted(SITES))
async def test_an_upstreams_reply_is_one_plain_line_in_the_agents_errors_and_logs(
    site: str, upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(AgentError) as err:
        await SITES[site](upstream)
    with caplog.at_level(logging.WARNING, logger="tests.upstream"):
        log.warning("%s failed: %s", site, err.value)  # as each caller logs it
    assert_one_line_each(caplog)


def test_a_kubernetes_watch_that_fails_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """An ApiException's text is lines, the API server's reply among them; the watch logged
    it as it was."""
    stopping, failed = threading.Event(), threading.Event()

    def list_fn(**kwargs: Any) -> Any:
        failed.set()
        err = ApiException(status=500, reason="Internal Server Error")
        err.body = HOSTILE
        raise err

    watch = ResourceWatch("pods", list_fn, timeout=1, emit=lambda item: None, stopping=stopping)
    with caplog.at_level(logging.WARNING, logger="agent.kube_watch"):
        thread = threading.Thread(target=watch.run)
        thread.start()
        assert failed.wait(5)
        for _ in range(100):  # the loop logs, then waits out its backoff on ``stopping``
            if caplog.records:
                break
            time.sleep(0.05)
        stopping.set()
        thread.join(5)
    assert watch.stats["errors"] == 1
    assert_one_line_each(caplog)


def test_plain_cuts_and_escapes() -> None:
    assert plain("a\nb\r\x1b\u2028c", 500) == "a\\nb\\r\\x1b\\u2028c"
    assert plain("x" * 600) == "x" * 500 + "..."
