"""The LLM analyzer: protected calls to a :class:`~agent.chat.ChatModel`, with the rules as
the fallback that always decides when the LLM cannot.

For one incident and its gathered context:

1. The rules analyse first (pure and instant): their analysis is the fallback.
2. Cool-down: the same incident fingerprint (its key and anomaly fingerprints) with the
   same evidence digest was answered within ``ai.reanalysis_cooldown`` -> the cached answer
   is re-vetted and reused; no call.
3. Circuit breaker open -> fallback ``circuit_open``. Per-minute budget of calls and
   tokens spent -> ``over_budget`` (also, saying so, when the prompt and its answer
   exceed a whole minute's tokens on their own).
4. The prompt is held to ``ai.max_prompt_tokens`` (see :func:`agent.ai_prompt.build_messages`).
   A call slot (``ai.max_concurrency``) free within ``ai.max_queue_wait``, else fallback
   ``queue_timeout``: a large batch must not hold the stage for all its calls.
   The call, with the model's own timeout; transient failures (timeout, 429, 5xx,
   unreachable) are retried with exponential backoff that honours Retry-After, up to
   ``ai.retries`` times; a Retry-After beyond ``ai.max_backoff`` ends the attempt.
   Failures -> fallback named after the last failure (``timeout``, ``rate_limited``,
   ``server_error``, ``unavailable``, ``rejected``, ``invalid_response``).
5. The answer: not JSON -> ``invalid_json``; not the schema -> ``schema_violation``;
   every action vetted against the allow-list and the incident's scope; if it proposed
   actions and all were rejected -> ``all_actions_rejected`` (the rules decide, the
   rejections are still recorded).
6. Otherwise an ``llm`` Analysis whose confidence combines the model's score and the agent's
   evidence checks.

Time comes from an injected clock and sleeps through an injected ``sleep``, so tests drive
both.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from agent.ai_answer import (
    Answer,
    Rejection,
    incident_scope,
    parse_answer,
    to_analysis,
    vet_actions,
)
from agent.ai_prompt import ANSWER_SCHEMA, SCHEMA_NAME, build_messages, estimate_tokens
from agent.analyzer import Context, analyze
from agent.breaker import BreakerRules, CircuitBreaker
from agent.budget import MinuteBudget, backoff_delay
from agent.chat import ChatModel, Completion, failure_reason
from agent.errors import AgentError, PromptTooLarge, TransientError
from agent.metrics import Metrics
from agent.models import Analysis, Incident, stable_id
from agent.settings import Settings

log = logging.getLogger(__name__)

CIRCUIT_STATE = {"closed": 0, "half_open": 1, "open": 2}


class Fallback(AgentError):
    """The LLM path gave up; ``reason`` is the short label recorded in the Analysis."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def incident_fingerprint(incident: Incident) -> str:
    return stable_id(
        "incident-fp", incident.key, *sorted({m.fingerprint for m in incident.members})
    )


def evidence_digest(incident: Incident, ctx: Context) -> str:
    """What the answer depends on, coarsely: statuses, changes and signals, not log text
    (which changes every second and would defeat the cool-down)."""

    def level(v: float) -> str:
        return f"{round(v, 1):.1f}"

    parts = [
        *sorted(f"m:{m.fingerprint}:{m.status}" for m in incident.members),
        *sorted(f"r:{r.namespace}/{r.workload}@{r.revision}" for r in ctx.rollouts),
        *sorted(f"c:{c.namespace}/{c.name}@{c.at.isoformat()}" for c in ctx.config_changes),
        *sorted(f"e:{e.kind}/{e.name}:{e.reason}" for e in ctx.events),
        *sorted(f"o:{w}" for w in ctx.oom_killed),
        *sorted(f"l:{w}" for w in ctx.crash_looping),
        *sorted(f"n:{n}:{','.join(c)}" for n, c in ctx.node_conditions.items()),
        # A remedy verified ineffective must not be served again from the cache.
        *sorted(f"t:{t}:{key}" for t, key in ctx.ineffective),
    ]
    for name, values in (
        ("cpu", ctx.cpu_saturation),
        ("mem", ctx.memory_saturation),
        ("conc", ctx.concurrency_saturation),
        ("node", ctx.node_cpu_saturation),
        ("dep", ctx.dependency_errors),
    ):
        parts += sorted(f"{name}:{k}={level(v)}" for k, v in values.items())
    return stable_id("evidence", *parts)


@dataclass(frozen=True, slots=True)
class _Cached:
    evidence: str
    at: float
    answer: Answer


class LLMAnalyzer:
    def __init__(
        self,
        settings: Settings,
        *,
        model: ChatModel,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        nonce: Callable[[], str] = lambda: secrets.token_hex(12),
    ) -> None:
        ai = settings.ai
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.nonce = nonce
        self.breaker = CircuitBreaker(
            BreakerRules(failure_threshold=ai.breaker_failures, reset_timeout=ai.breaker_reset),
            clock=clock,
        )
        self.budget = MinuteBudget(
            max_calls=ai.max_calls_per_minute, max_tokens=ai.max_tokens_per_minute, clock=clock
        )
        self._answers: OrderedDict[str, _Cached] = OrderedDict()
        self._slots = asyncio.Semaphore(ai.max_concurrency)
        self._gauge()

    async def close(self) -> None:
        await self.model.close()

    # --- the decision ---------------------------------------------------------------------
    async def analyze(self, incident: Incident, ctx: Context, now: datetime) -> Analysis:
        rules = analyze(incident, ctx, self.settings, now)
        fp, ev = incident_fingerprint(incident), evidence_digest(incident, ctx)
        notes: tuple[str, ...] = ()
        cached = self._answers.get(fp)
        if (
            cached is not None
            and cached.evidence == ev
            and self.clock() - cached.at < self.settings.ai.reanalysis_cooldown
        ):
            answer = cached.answer
            notes = (
                f"reused the LLM answer of {self.clock() - cached.at:.0f}s ago: "
                "same incident fingerprint and evidence, within the cool-down",
            )
        else:
            wait = self.settings.ai.max_queue_wait
            try:
                async with asyncio.timeout(wait):
                    await self._slots.acquire()
            except TimeoutError:
                return self._fallback(
                    rules,
                    "queue_timeout",
                    f"no LLM call slot free within ai.max_queue_wait ({wait:g}s): "
                    f"ai.max_concurrency ({self.settings.ai.max_concurrency}) calls in flight",
                )
            try:
                answer = await self._ask(incident, ctx)
            except Fallback as err:
                return self._fallback(rules, err.reason, str(err))
            except AgentError as err:
                return self._fallback(rules, failure_reason(err), str(err))
            finally:
                self._slots.release()
            self._answers[fp] = _Cached(evidence=ev, at=self.clock(), answer=answer)
            self._answers.move_to_end(fp)
            while len(self._answers) > 1000:
                self._answers.popitem(last=False)
        scope = incident_scope(incident, ctx, self.settings)
        accepted, rejected = vet_actions(answer.actions, scope)
        for r in rejected:
            self.metrics.rejected_actions.labels(reason=r.reason).inc()
            log.warning("rejected LLM action for %s: %s", incident.key, r)
        if answer.actions and not accepted:
            return self._fallback(
                rules,
                "all_actions_rejected",
                f"every action the LLM proposed was rejected ({len(rejected)})",
                rejected,
            )
        return to_analysis(
            answer,
            incident,
            ctx,
            self.settings,
            accepted=accepted,
            rejected=rejected,
            now=now,
            notes=notes,
        )

    def _fallback(
        self, rules: Analysis, reason: str, detail: str, rejected: list[Rejection] | None = None
    ) -> Analysis:
        self.metrics.analysis_fallbacks.labels(reason=reason).inc()
        log.warning("LLM analysis of %s fell back to the rules: %s", rules.incident_key, detail)
        text = detail if detail.startswith(reason) else f"{reason}: {detail}"
        return replace(
            rules,
            fallback_reason=text[:500],
            rejected_actions=tuple(str(r) for r in rejected or ()),
        )

    # --- the protected call ---------------------------------------------------------------
    async def _ask(self, incident: Incident, ctx: Context) -> Answer:
        ai = self.settings.ai
        scope = incident_scope(incident, ctx, self.settings)
        try:
            messages = build_messages(
                incident,
                ctx,
                scope_lines=scope.lines(),
                nonce=self.nonce(),
                max_tokens=ai.max_prompt_tokens,
            )
        except PromptTooLarge as err:
            raise Fallback("prompt_too_large", str(err)) from err
        estimate = estimate_tokens(messages) + ai.max_output_tokens
        if estimate > ai.max_tokens_per_minute:
            # No minute's budget takes it: "budget spent" would send the operator waiting.
            raise Fallback(
                "over_budget",
                f"the prompt and its answer ({estimate} tokens estimated) exceed "
                f"ai.max_tokens_per_minute ({ai.max_tokens_per_minute}) on their own: raise "
                "it, or lower ai.max_prompt_tokens",
            )
        attempt = 0
        while True:
            if not self.breaker.allow():
                self._gauge()
                raise Fallback("circuit_open", "the LLM circuit breaker is open")
            self._gauge()
            refused = self.budget.reserve(estimate)
            if refused is not None:
                raise Fallback(
                    "over_budget",
                    f"per-minute LLM budget of {refused} spent "
                    f"({self.budget.calls} calls, {self.budget.tokens} tokens)",
                )
            try:
                completion = await self.model.complete(
                    messages, schema=ANSWER_SCHEMA, schema_name=SCHEMA_NAME
                )
            except TransientError as err:
                self._failed(err)
                delay = backoff_delay(
                    attempt, base=ai.backoff, cap=ai.max_backoff, retry_after=err.retry_after
                )
                if attempt >= ai.retries or delay is None:
                    raise
                log.info("LLM call failed (%s); retry %d in %.1fs", err, attempt + 1, delay)
                await self.sleep(delay)
                attempt += 1
                continue
            except AgentError as err:
                self._failed(err)
                raise
            self.breaker.record_success()
            self._gauge()
            self._used(estimate, completion)
            return parse_answer(completion.content)

    def _failed(self, err: AgentError) -> None:
        self.breaker.record_failure()
        self._gauge()
        self.metrics.llm_calls.labels(result=failure_reason(err)).inc()

    def _used(self, reserved: int, c: Completion) -> None:
        self.metrics.llm_calls.labels(result="ok").inc()
        self.metrics.llm_tokens.labels(kind="prompt").inc(c.prompt_tokens)
        self.metrics.llm_tokens.labels(kind="completion").inc(c.completion_tokens)
        used = c.prompt_tokens + c.completion_tokens
        self.budget.settle(reserved, used if used else reserved)

    def _gauge(self) -> None:
        self.metrics.llm_circuit_state.set(CIRCUIT_STATE[self.breaker.state.mode])
