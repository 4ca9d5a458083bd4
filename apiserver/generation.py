"""One generation request's life on this server: send it, turn engine outputs into text
steps through the detokenizer, record latency metrics, and make sure the engine hears an
abort whenever the request ends early (stop string, client gone, timeout, error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from apiserver import metrics
from apiserver.detokenizer import IncrementalDetokenizer
from apiserver.engine_client import EngineClient
from apiserver.errors import ApiError
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
    timeout_s: float,
    tally: Tally,
) -> AsyncIterator[Step]:
    """Yield the request's steps; the last one has a finish reason. Raises ApiError."""
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    detok = IncrementalDetokenizer(tokenizer, stop)
    first_token_at: float | None = None
    finished = False
    queue = await client.add(request)
    try:
        while not finished:
            try:
                item = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise ApiError(408, f"request timed out after {timeout_s:g} s") from None
            if isinstance(item, ApiError):
                finished = True  # the engine is gone: nothing to abort
                raise item
            if item.error is not None:
                finished = True
                raise ApiError(item.error.status, item.error.message)
            if item.finish_reason == "abort":
                finished = True
                raise ApiError(503, "the engine aborted the request")
            tally.prompt_tokens = item.num_prompt_tokens or tally.prompt_tokens
            tally.cached_tokens = item.num_cached_tokens or tally.cached_tokens
            if item.new_token_ids and first_token_at is None:
                first_token_at = time.perf_counter()
                metrics.TTFT.observe(first_token_at - start)
            text = detok.push(item.new_token_ids)
            reason = "stop" if detok.stopped else item.finish_reason
            if reason is not None:
                text += detok.flush()
                if item.finish_reason is None:  # stop string: the engine would go on
                    client.abort([request.request_id])
                finished = True
            tally.completion_tokens = detok.num_tokens
            yield Step(text, item.new_token_ids, item.logprobs, reason)
    finally:
        if not finished:  # client disconnect, timeout, cancellation: free the engine's KV
            client.abort([request.request_id])
        end = time.perf_counter()
        metrics.E2E.observe(end - start)
        metrics.PROMPT_TOKENS.inc(tally.prompt_tokens)
        metrics.GENERATION_TOKENS.inc(tally.completion_tokens)
        if first_token_at is not None and tally.completion_tokens > 1:
            metrics.TPOT.observe((end - first_token_at) / (tally.completion_tokens - 1))
