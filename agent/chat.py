"""The vendor-free face of the LLM: messages, completions, the protocol and failure kinds.

:mod:`agent.llm` implements :class:`ChatModel` with the azure-ai-inference client and
translates its exceptions into the errors below; everything else (the analyzer, the stage,
tests with a scripted model) depends on this module only.

Failure kinds, each with the ``reason`` recorded in fallbacks and metrics::

    TransientError
    ├── LLMRateLimited        429; retry_after from Retry-After      "rate_limited"
    └── DependencyUnavailable
        ├── LLMTimeout        no answer within the call timeout      "timeout"
        ├── LLMServerError    5xx (or 408)                           "server_error"
        └── LLMUnreachable    connection refused / reset             "unavailable"
    PermanentError
    ├── LLMRejected           4xx other than 408/429: auth, bad request, content filter
    │                                                                "rejected"
    └── LLMInvalidResponse    a reply that is not a chat completion  "invalid_response"
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal, Protocol

from agent.errors import AgentError, DependencyUnavailable, PermanentError, TransientError


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user"]
    content: str


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    finish_reason: str = ""


class ChatModel(Protocol):
    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any],
        schema_name: str,
    ) -> Completion:
        """One chat completion whose answer should follow ``schema`` (JSON schema), within
        the model's own per-call timeout (:class:`LLMTimeout` after it)."""
        ...

    async def close(self) -> None: ...


class LLMRateLimited(TransientError):
    reason: ClassVar[str] = "rate_limited"


class LLMTimeout(DependencyUnavailable):
    reason: ClassVar[str] = "timeout"


class LLMServerError(DependencyUnavailable):
    reason: ClassVar[str] = "server_error"


class LLMUnreachable(DependencyUnavailable):
    reason: ClassVar[str] = "unavailable"


class LLMRejected(PermanentError):
    reason: ClassVar[str] = "rejected"


class LLMInvalidResponse(PermanentError):
    reason: ClassVar[str] = "invalid_response"


def failure_reason(err: AgentError) -> str:
    """The short, bounded reason of a failure, for metric labels and fallbacks."""
    reason = getattr(err, "reason", None)
    if isinstance(reason, str):
        return reason
    return "unavailable" if err.retriable else "error"


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait from ``retry-after-ms``, ``x-ms-retry-after-ms`` or ``Retry-After``
    (delta-seconds or an HTTP date); None when absent or unreadable. ``headers`` must be
    case-insensitive or lower-case."""
    lower = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = lower.get(name)
        if value is not None:
            try:
                ms = float(value)
            except ValueError:
                continue
            if ms >= 0:
                return ms / 1000
    value = lower.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, (when - now).total_seconds())
    return seconds if seconds >= 0 else None
