"""The Azure AI Inference adapter: the only module that imports ``azure.ai.inference`` and
``azure.core``.

It implements :class:`agent.chat.ChatModel` with the async ``ChatCompletionsClient``
(``POST {endpoint}/chat/completions?api-version=...``, key sent both as ``api-key`` and as
``Authorization: Bearer``) and translates every vendor exception, once, into the errors of
:mod:`agent.chat` with ``raise ... from err``. The client's own retry policy is off
(``retry_total=0``): retries, backoff, the circuit breaker and the budget belong to
:class:`agent.llm_analyzer.LLMAnalyzer`, where they are pure and tested.

Credentials: the key comes from the environment variable named by
``ai.azure_openai.api_key_env``; without a key, Entra ID through azure-identity's
``DefaultAzureCredential`` when that package is installed (it is optional, not a
dependency: key auth needs nothing more).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from azure.ai.inference.aio import ChatCompletionsClient
from azure.ai.inference.models import (
    ChatRequestMessage,
    JsonSchemaFormat,
    SystemMessage,
    UserMessage,
)
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    DecodeError,
    DeserializationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from agent.chat import (
    ChatMessage,
    Completion,
    LLMInvalidResponse,
    LLMRateLimited,
    LLMRejected,
    LLMServerError,
    LLMTimeout,
    LLMUnreachable,
    parse_retry_after,
)
from agent.errors import AgentError, ConfigError, plain
from agent.models import utcnow
from agent.settings import AISection

TOKEN_SCOPES = ("https://cognitiveservices.azure.com/.default",)


class AzureChatModel:
    def __init__(
        self,
        *,
        endpoint: str,
        deployment: str,
        credential: Any,
        timeout: float,
        temperature: float,
        max_tokens: int,
        api_version: str = "",
    ) -> None:
        extra: dict[str, Any] = {"api_version": api_version} if api_version else {}
        if not isinstance(credential, AzureKeyCredential):
            extra["credential_scopes"] = list(TOKEN_SCOPES)
        self.endpoint = endpoint
        self.deployment = deployment
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._credential = credential
        self._client = ChatCompletionsClient(
            endpoint=endpoint,
            credential=credential,
            retry_total=0,  # our own retry/backoff/breaker decide
            connection_timeout=timeout,
            read_timeout=timeout,
            **extra,
        )
        self._closed = False

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any],
        schema_name: str,
    ) -> Completion:
        wire: list[ChatRequestMessage] = [
            SystemMessage(m.content) if m.role == "system" else UserMessage(m.content)
            for m in messages
        ]
        fmt = JsonSchemaFormat(name=schema_name, schema=dict(schema), strict=True)
        try:
            async with asyncio.timeout(self.timeout):
                result = await self._client.complete(
                    messages=wire,
                    model=self.deployment,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    response_format=fmt,
                )
        except TimeoutError as err:
            raise LLMTimeout(
                f"llm {self.endpoint}: no answer within {self.timeout:g}s", retry_after=0.0
            ) from err
        except (ServiceRequestTimeoutError, ServiceResponseTimeoutError) as err:
            raise LLMTimeout(f"llm {self.endpoint}: {err.message}", retry_after=0.0) from err
        except DecodeError as err:  # a 200 whose body is not JSON
            raise LLMInvalidResponse(f"llm {self.endpoint}: reply is not JSON") from err
        except HttpResponseError as err:
            raise _http_error(err, self.endpoint) from err
        except (ServiceRequestError, ServiceResponseError) as err:
            raise LLMUnreachable(f"llm {self.endpoint}: {err.message}") from err
        except (DeserializationError, ValueError, KeyError, TypeError) as err:
            # ValueError covers a body that is not JSON at all.
            raise LLMInvalidResponse(f"llm {self.endpoint}: unreadable reply ({err!r})") from err
        try:
            choice = result.choices[0]
            content = choice.message.content or ""
            usage = result.usage
            return Completion(
                content=content,
                prompt_tokens=int(usage.prompt_tokens) if usage else 0,
                completion_tokens=int(usage.completion_tokens) if usage else 0,
                model=str(result.model or ""),
                finish_reason=str(getattr(choice.finish_reason, "value", "") or ""),
            )
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
            raise LLMInvalidResponse(
                f"llm {self.endpoint}: not a chat completion ({err!r})"
            ) from err

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()
        close = getattr(self._credential, "close", None)
        if close is not None and not isinstance(self._credential, AzureKeyCredential):
            await close()

    async def __aenter__(self) -> AzureChatModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _http_error(err: HttpResponseError, endpoint: str) -> AgentError:
    status = err.status_code or 0
    # Both transports' responses have ``headers``; the protocol azure-core types omits it.
    headers: Mapping[str, str] = getattr(err.response, "headers", None) or {}
    retry_after = parse_retry_after(headers, utcnow())
    detail = f"llm {endpoint}: HTTP {status}: {plain(err.reason or '', 200)}"
    if status == 429:
        return LLMRateLimited(detail, retry_after=retry_after if retry_after is not None else 1.0)
    if status == 408 or status >= 500:  # without Retry-After, plain exponential backoff
        return LLMServerError(detail, retry_after=retry_after if retry_after is not None else 0.0)
    if isinstance(err, ClientAuthenticationError) or status in (401, 403):
        return LLMRejected(f"{detail} (check the key or the identity's role)")
    return LLMRejected(detail)


def credential_from(ai: AISection, env: Mapping[str, str]) -> Any:
    """The key credential, or Entra ID if azure-identity is installed, or a ConfigError."""
    key = env.get(ai.azure_openai.api_key_env, "")
    if key:
        return AzureKeyCredential(key)
    try:
        identity = importlib.import_module("azure.identity.aio")
    except ImportError as err:
        raise ConfigError(
            [
                f"ai.azure_openai.api_key_env: ${ai.azure_openai.api_key_env} is empty and "
                "azure-identity is not installed for Entra ID authentication"
            ]
        ) from err
    return identity.DefaultAzureCredential()


def chat_model_from(ai: AISection, env: Mapping[str, str]) -> AzureChatModel:
    """Build the model client from settings (composition root only)."""
    if not ai.azure_openai.endpoint:
        raise ConfigError(["ai.azure_openai.endpoint: required when ai.enabled is true"])
    return AzureChatModel(
        endpoint=ai.azure_openai.endpoint,
        deployment=ai.azure_openai.deployment,
        credential=credential_from(ai, env),
        timeout=ai.timeout,
        temperature=ai.temperature,
        max_tokens=ai.max_output_tokens,
        api_version=ai.azure_openai.api_version,
    )
