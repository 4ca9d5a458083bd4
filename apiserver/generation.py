"""One generation request's life on this server: its engine outputs (from its request stream,
which owns the deadline, the error mapping and the abort) turned into text steps through the
detokenizer, and its latency metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from apiserver import metrics
from apiserver.detokenizer import IncrementalDetokenizer
from apiserver.engine_client import EngineClient
from apiserver.request_stream import Deadline
from ipc.messages import EngineRequest, TokenLogprobs


@dataclass(slots=True)
class Step:
    """What one engine output added: new text (safe to show) and, at the end, why it ended."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None


@dataclass(slots=True)
class Tally:
    """Token counts of a request, filled in as outputs arrive."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


async def generate(
    client: EngineClient,
    tokenizer: object,
    request: EngineRequest,
    stop: list[str],
    deadline: Deadline,
    tally: Tally,
) -> AsyncGenerator[Step, None]:
    """Yield the request's steps; the last one has a finish reason. Raises ApiError. Leaving
    early (a stop string, the client gone, any error) aborts the request in the engine: the
    request's stream does that on its way out."""
    start = time.perf_counter()
    detok = IncrementalDetokenizer(tokenizer, stop)
    first_token_at: float | None = None
    try:
        async with client.stream(request, deadline) as outputs:
            async for item in outputs:
                tally.prompt_tokens = item.num_prompt_tokens or tally.prompt_tokens
                tally.cached_tokens = item.num_cached_tokens or tally.cached_tokens
                if item.new_token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                    metrics.TTFT.observe(first_token_at - start)
                    if item.queue_time is not None and item.prefill_time is not None:
                        metrics.ENGINE_QUEUE.observe(item.queue_time)
                        metrics.ENGINE_PREFILL.observe(item.prefill_time)
                text = detok.push(item.new_token_ids)
                reason = "stop" if detok.stopped else item.finish_reason
                if reason is not None:
                    text += detok.flush()
                tally.completion_tokens = detok.num_tokens
                yield Step(text, item.new_token_ids, item.logprobs, reason)
                if reason is not None:
                    return
    finally:
        end = time.perf_counter()
        metrics.E2E.observe(end - start)
        metrics.PROMPT_TOKENS.inc(tally.prompt_tokens)
        metrics.GENERATION_TOKENS.inc(tally.completion_tokens)
        if first_token_at is not None and tally.completion_tokens > 1:
            metrics.TPOT.observe((end - first_token_at) / (tally.completion_tokens - 1))
