"""An in-process ChatModel with real behaviour for unit tests: it answers from a script of
completions and errors, and records what it was asked."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from agent.chat import ChatMessage, Completion
from agent.errors import AgentError

Step = Completion | AgentError | Callable[[Sequence[ChatMessage]], Completion]


class ScriptedChatModel:
    def __init__(self, *steps: Step) -> None:
        self.script: deque[Step] = deque(steps)
        self.default: Step | None = None
        self.calls: list[Sequence[ChatMessage]] = []
        self.closed = False

    async def complete(
        self, messages: Sequence[ChatMessage], *, schema: Mapping[str, Any], schema_name: str
    ) -> Completion:
        assert not self.closed, "complete() after close()"
        assert schema["type"] == "object" and schema_name
        self.calls.append(messages)
        step = self.script.popleft() if self.script else self.default
        if step is None:
            raise AssertionError("no reply scripted")
        if isinstance(step, AgentError):
            raise step
        return step(messages) if callable(step) else step

    async def close(self) -> None:
        self.closed = True


def answer(
    *,
    root_cause: str = "checkout v7 broke the price calculation",
    cls: str = "bad_rollout",
    confidence: float = 0.9,
    actions: Sequence[Mapping[str, Any]] = (),
    evidence: Sequence[str] = ("errors began right after the rollout",),
) -> str:
    return orjson.dumps(
        {
            "root_cause": root_cause,
            "root_cause_class": cls,
            "confidence": confidence,
            "evidence": list(evidence),
            "actions": list(actions),
        }
    ).decode()


def action(
    type: str = "rollback",
    name: str = "checkout",
    *,
    kind: str = "Deployment",
    namespace: str = "shop",
    replicas: str | None = None,
    revision: int | None = None,
    key: str | None = None,
    value: str | None = None,
    rollback_plan: str = "roll forward to the current revision",
) -> dict[str, Any]:
    return {
        "type": type,
        "target": {"kind": kind, "name": name, "namespace": namespace},
        "params": {"replicas": replicas, "revision": revision, "key": key, "value": value},
        "expected_impact": "errors stop",
        "rollback_plan": rollback_plan,
    }


def completion(content: str, *, prompt: int = 300, out: int = 60) -> Completion:
    return Completion(content=content, prompt_tokens=prompt, completion_tokens=out, model="m")
