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


class EmbeddingRoutes:
    """The embeddings endpoint of one API server."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        """OpenAI embeddings: a string, strings, token ids or lists of token ids."""
        ctx = self._ctx
        deadline = Deadline.after(ctx.config.request_timeout)
        req = await parse(request, ctx, EmbeddingRequest)
        check_model(ctx, req.model)
        if not ctx.ready.supports_embeddings:
            raise ApiError(400, "this model does not serve embeddings", param="model")
        if not ctx.client.is_alive:
            raise engine_unavailable(ctx.client.dead_reason or "not connected")
        prompts = await asyncio.gather(*(self._prompt(x) for x in _inputs(req.input)))
        for p in prompts:
            if len(p.token_ids) > ctx.ready.max_model_len:
                raise ApiError(
                    400,
                    f"input has {len(p.token_ids)} tokens, more than this model's maximum "
                    f"context length of {ctx.ready.max_model_len}",
                    param="input",
                    code="context_length_exceeded",
                )
        base_id = new_id("embd")
        vectors = await unless_disconnected(
            request,
            asyncio.gather(
                *(self._embed(f"{base_id}-{i}", p, deadline) for i, p in enumerate(prompts))
            ),
        )
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

    async def _prompt(self, item: str | list[int]) -> Prompt:
        if isinstance(item, str):
            return await self._ctx.renderer.render_text(item)
        return self._ctx.renderer.token_prompt(item)

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
