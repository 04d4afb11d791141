"""The one error hierarchy of sre-agent.

    AgentError
    ├── ConfigError            bad configuration; ``problems`` lists "path: message" lines
    ├── InvalidEvent           a message that failed validation; names the field
    ├── TransientError         worth retrying; ``retry_after``: seconds the dependency
    │                          asked to wait (Retry-After), None when it did not say
    │   └── DependencyUnavailable   Kafka, Prometheus, the cluster or the LLM is not answering
    ├── PermanentError         retrying cannot help
    │   ├── PolicyDenied       the policy refused an action; ``rule`` names the rule
    │   ├── ActionFailed       the cluster refused or failed an action
    │   └── RecordTooLarge     Kafka refuses a record's size; names the topic and size
    ├── InfraError             a local infrastructure script failed
    ├── ComponentFailed        a component's processing loop died; the agent exits so its
    │                          supervisor restarts it (a live process that consumes nothing
    │                          would hold its partitions forever)
    └── PartialBatch           a batch handler failed after its first ``done`` events took
                               effect; ``cause`` is the failure

Vendor exceptions (aiokafka, kubernetes, azure) are translated into these in the adapter
that talks to the vendor, always with ``raise ... from err`` so the cause is kept. What the
far side wrote (an HTTP error body, a reason phrase, a warning) goes into their text only
through :func:`plain`: a hostile or broken upstream must not forge a log line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


def plain(text: str, limit: int = 500) -> str:
    """Untrusted text (an upstream's error body or reason, a store's warning; any proxy in
    front of a dependency may write it) for logs and error messages: cut to ``limit``
    characters, its control characters (newlines too) escaped so it forges no log line."""
    cut = text[:limit]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return out + ("..." if len(text) > limit else "")


class AgentError(Exception):
    """Root of every error sre-agent raises on purpose."""

    retriable: bool = False


class ConfigError(AgentError):
    """Configuration failed validation; every problem names the path of its field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems) or "invalid configuration")


class InvalidEvent(AgentError):
    """A message failed validation at the boundary."""

    def __init__(self, kind: str, problems: Sequence[str]) -> None:
        self.kind = kind
        self.problems = tuple(problems)
        super().__init__(f"invalid {kind}: " + "; ".join(self.problems))


class TransientError(AgentError):
    retriable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        # None, not a default number: a retrier backs off on its own schedule unless the
        # dependency really named a wait (a default here overrode every backoff).
        self.retry_after = retry_after
        super().__init__(message)


class DependencyUnavailable(TransientError):
    """A dependency (Kafka, Prometheus, Kubernetes, the LLM) did not answer in time."""


class PermanentError(AgentError):
    retriable = False


class PromptTooLarge(PermanentError):
    """Even the smallest form of an LLM prompt exceeds ai.max_prompt_tokens."""


class PolicyDenied(PermanentError):
    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {message}")


class ActionFailed(PermanentError):
    """The cluster refused or failed an action (forbidden, not found, conflict exhausted)."""


class RecordTooLarge(PermanentError):
    """Kafka refuses a record of ``size`` bytes for ``topic``: over ``limit``, the
    producer's, or (None) the broker's for that topic (its max.message.bytes). The same
    record fails the same way at every retry."""

    def __init__(self, topic: str, size: int, limit: int | None) -> None:
        self.topic = topic
        self.size = size
        self.limit = limit
        over = (
            f"over the limit of {limit}"
            if limit is not None
            else "refused by the broker as over the topic's max.message.bytes"
        )
        super().__init__(f"a record for {topic} is {size} bytes, {over}: not written")


class InfraError(AgentError):
    """A local infrastructure script (Kafka, Prometheus, Kubernetes) failed."""


class ComponentFailed(AgentError):
    """A component's processing loop ended with an error; ``cause`` is it."""

    def __init__(self, component: str, cause: BaseException) -> None:
        self.component = component
        self.cause = cause
        super().__init__(f"{component} failed: {type(cause).__name__}: {cause}")


def task_failure(*tasks: asyncio.Future[Any] | None) -> BaseException | None:
    """The error the first of these background tasks that died of one died of: None while
    they run, or once they were cancelled or ended cleanly."""
    for task in tasks:
        if task is None or not task.done() or task.cancelled():
            continue
        if (err := task.exception()) is not None:
            return err
    return None


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel these background tasks and wait until each has ended. One that had died is not
    raised again: it was reported through :func:`task_failure`, and a stop that re-raised
    it left the tasks after it running and their owner's resources open."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    await asyncio.gather(*live, return_exceptions=True)


class PartialBatch(AgentError):
    """A batch handler failed on event ``done`` after the events before it took effect:
    only the rest is retried, so those are not handled (and their results published)
    twice."""

    def __init__(self, done: int, cause: BaseException) -> None:
        self.done = done
        self.cause = cause
        super().__init__(f"failed after {done} events: {type(cause).__name__}: {cause}")
