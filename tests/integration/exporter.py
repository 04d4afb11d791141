"""A test exporter: an HTTP /metrics endpoint serving whatever series a test sets."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web


def _series(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


class Exporter:
    """``set(name, labels, value)`` / ``drop(name, labels)``; scraped as text format 0.0.4.

    A value may be a function, called at each scrape (e.g. a counter growing with time).
    """

    def __init__(self) -> None:
        self.values: dict[str, float | Callable[[], float]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    def set(self, name: str, labels: Mapping[str, str], value: float | Callable[[], float]) -> None:
        self.values[_series(name, labels)] = value

    def drop(self, name: str, labels: Mapping[str, str]) -> None:
        self.values.pop(_series(name, labels), None)

    def render(self) -> str:
        lines = []
        for series, value in sorted(self.values.items()):
            v = value() if callable(value) else value
            lines.append(f"{series} {v!r}\n")
        return "".join(lines)

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Exporter:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.render())

        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
