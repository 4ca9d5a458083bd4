"""Small endpoints: models, tokenize/detokenize, health, readiness, metrics, version."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from apiserver import metrics
from apiserver.context import ServerContext
from apiserver.errors import ApiError
from apiserver.protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from apiserver.renderer import Renderer
from apiserver.routes_common import check_model, json_response, now, parse
from apiserver.version import fanin_version


class MiscRoutes:
    """Endpoints that never run a generation."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._created = now()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
        ]

    async def models(self, request: Request) -> Response:
        ctx = self._ctx
        card = ModelCard(
            id=ctx.model_name,
            created=self._created,
            root=ctx.ready.model,
            max_model_len=ctx.ready.max_model_len,
        )
        return json_response(ModelList(data=[card]))

    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt, or of a chat rendered with its template."""
        ctx = self._ctx
        req = await parse(request, ctx, TokenizeRequest)
        check_model(ctx, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            prompt = await ctx.renderer.render_chat(
                req.messages, ctx.fetcher, req.add_generation_prompt
            )
        else:
            prompt = await ctx.renderer.render_text(req.prompt or "", req.add_special_tokens)
        tokens = prompt.token_ids.tolist()
        return json_response(
            {"count": len(tokens), "max_model_len": ctx.ready.max_model_len, "tokens": tokens}
        )

    async def detokenize(self, request: Request) -> Response:
        ctx = self._ctx
        req = await parse(request, ctx, DetokenizeRequest)
        check_model(ctx, req.model)
        if len(req.tokens) > ctx.ready.max_model_len:
            raise ApiError(
                400,
                f"{len(req.tokens)} tokens; at most the model's context length "
                f"({ctx.ready.max_model_len}) can be detokenized",
                param="tokens",
            )
        text = await ctx.renderer.run(_detokenize, ctx.renderer, req.tokens)
        return json_response({"prompt": text})

    async def health(self, request: Request) -> Response:
        """Liveness: answered by the event loop alone; the engine state is information."""
        client = self._ctx.client
        engine = "alive" if client.is_alive else f"dead: {client.dead_reason}"
        return json_response({"status": "ok", "engine": engine})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 only while the engine is reachable (the model is loaded by then) and
        this server is not draining."""
        client = self._ctx.client
        if self._ctx.draining:
            return json_response({"status": "draining"}, 503)
        if client.is_alive:
            return json_response({"status": "ready"})
        return json_response({"status": "unavailable", "reason": client.dead_reason}, 503)

    async def metrics(self, request: Request) -> Response:
        body = await asyncio.to_thread(metrics.render_latest)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def version(self, request: Request) -> Response:
        return json_response({"version": fanin_version()})


def _detokenize(renderer: Renderer, tokens: list[int]) -> str:
    renderer.token_prompt(tokens or [0], "tokens")  # vocabulary check
    return str(renderer.tokenizer.decode(tokens))
