"""The agent's HTTP surface: /metrics, health probes, and routes other components add.

``/health/live``    the process is serving and no component reports itself stuck
                    (liveness: a stuck one is restarted).
``/health/started`` every component of this role finished starting (startup probe).
``/health/ready``   started, and the dependencies answer now: Kafka, and for the executor
                    Prometheus (a detector's is its webhook's: it can take alerts and
                    publish them while Prometheus is down; see
                    :func:`agent.runtime.prometheus_gates_readiness`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.metrics import Metrics

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[str | None]]  # None when healthy, else the reason
LiveCheck = Callable[[], str | None]  # answered from memory: a probe must not wait on I/O


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port``; its runner (to clean up) and the port it bound, which
    is any free one for port 0."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)  # aiohttp keeps the asyncio server private
    sockets = server.sockets if server is not None else ()
    return runner, int(sockets[0].getsockname()[1]) if sockets else port


class HealthServer:
    def __init__(self, *, host: str, port: int, metrics: Metrics) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.checks: dict[str, Check] = {}
        self.live_checks: dict[str, LiveCheck] = {}
        self.started = False
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/health/live", self._live)
        self.app.router.add_get("/health/started", self._started)
        self.app.router.add_get("/health/ready", self._ready)
        self._runner: web.AppRunner | None = None
        self._bound = port

    @property
    def bound_port(self) -> int:
        """The real port (useful when configured with port 0)."""
        assert self._runner is not None
        return self._bound

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._runner, self._bound = await serve(self.app, self.host, self.port)
        log.info("http server on http://%s:%d", self.host, self.bound_port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _live(self, request: web.Request) -> web.Response:
        failures = {}
        for name, check in self.live_checks.items():
            try:
                reason = check()
            except Exception as err:  # noqa: BLE001 - a probe reports, it never raises
                reason = f"{type(err).__name__}: {err}"
            if reason is not None:
                failures[name] = reason
        if failures:
            return web.json_response({"status": "stuck", "failures": failures}, status=503)
        return web.json_response({"status": "ok"})

    async def _started(self, request: web.Request) -> web.Response:
        status = 200 if self.started else 503
        return web.json_response({"started": self.started}, status=status)

    async def _ready(self, request: web.Request) -> web.Response:
        if not self.started:
            return web.json_response({"ready": False, "reason": "starting"}, status=503)
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        failures = {n: r for n, r in zip(names, results, strict=True) if r is not None}
        status = 503 if failures else 200
        return web.json_response({"ready": not failures, "failures": failures}, status=status)

    @staticmethod
    async def _run(check: Check) -> str | None:
        try:
            return await asyncio.wait_for(check(), timeout=3.0)
        except TimeoutError:
            return "timed out"
        except Exception as err:  # noqa: BLE001 - a probe reports, it never raises
            return f"{type(err).__name__}: {err}"
