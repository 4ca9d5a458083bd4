"""``/v1/embeddings``: each input becomes one pooling request to the engine."""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from apiserver.context import ServerContext
from apiserver.errors import ApiError, engine_unavailable
from apiserver.protocol import EmbeddingData, EmbeddingList, EmbeddingRequest, Usage
from apiserver.renderer import Prompt
from apiserver.request_stream import Deadline
from apiserver.routes_common import (
    check_model,
    json_response,
    new_id,
    parse,
    unless_disconnected,
)
from ipc.messages import EngineRequest, PoolingParams

#: Embedding inputs rendered per pool job: a long input list takes one render slot per batch,
#: batch after batch, instead of one per input at once (which filled the queue: 429).
RENDER_BATCH = 64


class EmbeddingRoutes:
    """The embeddings endpoint of one API server."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        """OpenAI embeddings: a string, strings, token ids or lists of token ids. Inputs are
        rendered in batches and sent to the engine a window at a time (the engine's running
        capacity), so that one request of 2,048 inputs neither fills the render queue nor the
        engine's queue for every other client."""
        ctx = self._ctx
        deadline = Deadline.after(ctx.config.request_timeout)
        req = await parse(request, ctx, EmbeddingRequest)
        check_model(ctx, req.model)
        if not ctx.ready.supports_embeddings:
            raise ApiError(400, "this model does not serve embeddings", param="model")
        if not ctx.client.is_alive:
            raise engine_unavailable(ctx.client.dead_reason or "not connected")
        items = _inputs(req.input)
        if len(items) > ctx.config.max_embedding_inputs:
            raise ApiError(
                400,
                f"{len(items)} inputs in one request; the limit is "
                f"{ctx.config.max_embedding_inputs}",
                param="input",
            )
        given = 0
        for item in items:  # token lists: checked before any work
            if not isinstance(item, str):
                self._check_length(len(item))
                given += len(item)
        self._check_total(given)
        prompts = await self._render(items)
        base_id = new_id("embd")
        vectors = await unless_disconnected(request, self._embed_all(prompts, base_id, deadline))
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise ApiError(
                400,
                f"this model's embeddings have {len(vectors[0])} dimensions",
                param="dimensions",
            )
        data = [
            EmbeddingData(index=i, embedding=_encode(v, req.encoding_format))
            for i, v in enumerate(vectors)
        ]
        n = sum(len(p.token_ids) for p in prompts)
        usage = Usage(prompt_tokens=n, total_tokens=n)
        return json_response(EmbeddingList(data=data, model=ctx.model_name, usage=usage))

    async def _render(self, items: list[str | list[int]]) -> list[Prompt]:
        renderer = self._ctx.renderer
        prompts: list[Prompt] = []
        total = 0
        for start in range(0, len(items), RENDER_BATCH):
            batch = items[start : start + RENDER_BATCH]
            rendered = await renderer.run(renderer.prompts_blocking, batch, "input")
            for p in rendered:
                self._check_length(len(p.token_ids))
                total += len(p.token_ids)
            self._check_total(total)  # before rendering any more of a request that is over
            prompts.extend(rendered)
        return prompts

    def _check_length(self, n: int) -> None:
        max_len = self._ctx.ready.max_model_len
        if n > max_len:
            raise ApiError(
                400,
                f"input has {n} tokens, more than this model's maximum context length of {max_len}",
                param="input",
                code="context_length_exceeded",
            )

    def _check_total(self, n: int) -> None:
        limit = self._ctx.config.max_embedding_tokens
        if n > limit:
            raise ApiError(
                400,
                f"the inputs have {n} tokens or more in all; the limit is {limit} per request",
                param="input",
            )

    async def _embed_all(
        self, prompts: list[Prompt], base_id: str, deadline: Deadline
    ) -> list[np.ndarray]:
        """Every prompt's embedding, with at most the engine's ``max_num_seqs`` of them in the
        engine at a time; the first failure cancels the rest (their streams abort them)."""
        window = asyncio.Semaphore(max(1, self._ctx.ready.max_num_seqs))

        async def one(i: int, prompt: Prompt) -> np.ndarray:
            async with window:
                return await self._embed(f"{base_id}-{i}", prompt, deadline)

        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _embed(self, request_id: str, prompt: Prompt, deadline: Deadline) -> np.ndarray:
        request = EngineRequest(
            request_id=request_id,
            prompt_token_ids=prompt.token_ids,
            pooling=PoolingParams(),
            arrival_time=time.time(),
            deadline=deadline.wall_clock,
        )
        async with self._ctx.client.stream(request, deadline) as outputs:
            async for out in outputs:
                if out.embedding is not None:
                    return np.asarray(out.embedding, dtype=np.float32)
        raise ApiError(503, "the engine finished without an embedding")


def _inputs(value: str | list[str | int | list[int]]) -> list[str | list[int]]:
    """The input as a list of prompts (each a string or a token-id list)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise ApiError(400, "input must not be empty", param="input")
    if all(isinstance(v, int) for v in value):
        return [value]  # type: ignore[list-item]
    if any(isinstance(v, int) for v in value):
        raise ApiError(400, "input mixes token ids and strings", param="input")
    return value  # type: ignore[return-value]


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    values: list[float] = vector.tolist()
    return values
