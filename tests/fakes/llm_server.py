"""A local chat-completions server with the REST shape azure-ai-inference speaks.

``POST /chat/completions?api-version=...`` with the key in ``api-key`` (and ``Authorization:
Bearer``), a JSON body with ``messages``, ``temperature``, ``response_format`` (``json_schema``
accepted) and ``model``; the reply carries ``choices[0].message.content`` and ``usage``.
Errors come back as the service sends them (429 with ``Retry-After``, 5xx, 401).

Each test scripts the replies: a queue of :class:`Reply` (or functions of the request body
returning one), then ``default``. Every request is recorded with its arrival time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_VERSION = "2024-05-01-preview"


@dataclass
class Reply:
    content: str | None = None  # the assistant's message content (status 200)
    status: int = 200
    body: bytes | None = None  # a raw body instead of a chat completion
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    prompt_tokens: int = 420
    completion_tokens: int = 80


Script = Reply | Callable[[Mapping[str, Any]], Reply]


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def system(self) -> str:
        return str(self.body["messages"][0]["content"])

    @property
    def user(self) -> str:
        return str(self.body["messages"][-1]["content"])


def completion(content: str, *, prompt_tokens: int = 420, completion_tokens: int = 80) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class FakeChatServer:
    def __init__(self, *, key: str = "test-key") -> None:
        self.key = key
        self.script: deque[Script] = deque()
        self.default: Script | None = None
        self.requests: list[Request] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def then(self, *replies: Script) -> FakeChatServer:
        self.script.extend(replies)
        return self

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/chat/completions", self._complete)
        # Cancel handlers whose client left (a timed-out call), so stop() does not wait.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _complete(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.Response(status=400, body=error_body("BadRequest", "body is not JSON"))
        self.requests.append(
            Request(
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                at=time.monotonic(),
            )
        )
        if "api-version" not in request.query:
            return web.Response(status=400, body=error_body("BadRequest", "api-version missing"))
        if (
            request.headers.get("api-key") != self.key
            or request.headers.get("Authorization") != f"Bearer {self.key}"
        ):
            return web.Response(
                status=401,
                body=error_body("Unauthorized", "invalid key"),
                content_type="application/json",
            )
        problem = _check_body(body)
        if problem:
            return web.Response(status=400, body=error_body("BadRequest", problem))
        step = self.script.popleft() if self.script else self.default
        if step is None:
            return web.Response(status=500, body=error_body("NoScript", "no reply scripted"))
        reply = step(body) if callable(step) else step
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.body is not None:
            data = reply.body
        elif reply.status == 200:
            data = completion(
                reply.content or "",
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
            )
        else:
            data = error_body(str(reply.status), "scripted failure")
        return web.Response(
            status=reply.status, body=data, headers=reply.headers, content_type="application/json"
        )


def _check_body(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return "messages missing"
    for m in body["messages"]:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(
            m.get("content"), str
        ):
            return f"bad message {m!r:.80}"
    fmt = body.get("response_format")
    if fmt is not None:
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            return f"unknown response_format {fmt!r:.80}"
        if fmt["type"] == "json_schema" and "schema" not in fmt.get("json_schema", {}):
            return "json_schema without a schema"
    return None
