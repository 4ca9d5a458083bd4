"""``/v1/chat/completions`` and ``/v1/completions``: request -> rendered prompt -> engine ->
JSON or SSE. Rendering and every check happen before the response starts, so bad input always
gets a proper HTTP status; only engine failures mid-stream become SSE error events."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from apiserver.context import ServerContext
from apiserver.errors import ApiError, engine_unavailable
from apiserver.generation import Step, Tally, generate
from apiserver.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprob,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from apiserver.renderer import Prompt, Renderer
from apiserver.request_stream import Deadline
from apiserver.routes_common import (
    EventStream,
    check_model,
    context_exceeded,
    json_response,
    new_id,
    now,
    parse,
    reject_unsupported,
    sampling_params,
    sse,
    stop_strings,
    unless_disconnected,
)
from ipc.messages import EngineRequest, TokenLogprobs


class GenerationRoutes:
    """The two text-generation endpoints of one API server."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

    async def chat(self, request: Request) -> Response:
        """OpenAI chat completions (text and image parts)."""
        ctx = self._ctx
        deadline = Deadline.after(ctx.config.request_timeout)
        req = await parse(request, ctx, ChatCompletionRequest)
        check_model(ctx, req.model)
        reject_unsupported(req, ctx.ready)
        self._check_engine()
        max_tokens = req.max_completion_tokens or req.max_tokens
        prompt = await ctx.renderer.render_chat(
            req.messages, ctx.fetcher, reserved_tokens=max_tokens or 1
        )
        top = (req.top_logprobs or 0) if req.logprobs else None
        engine_req = self._engine_request(req, prompt, max_tokens, top, deadline)
        rid, model, created = engine_req.request_id, ctx.model_name, now()
        steps, tally = self._start(req, engine_req, deadline)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            chunks = self._chat_chunks(steps, rid, created, tally, usage, top is not None)
            return EventStream(sse(chunks))

        async def collect() -> ChatCompletion:
            text, logprobs, reason = [], [], None
            async with aclosing(steps):
                async for step in steps:
                    text.append(step.text)
                    logprobs.extend(self._chat_logprobs(step))
                    reason = step.finish_reason
            return ChatCompletion(
                id=rid,
                created=created,
                model=model,
                choices=[
                    ChatChoice(
                        index=0,
                        message=AssistantMessage(content="".join(text)),
                        finish_reason=reason,
                        logprobs=ChatLogprobs(content=logprobs) if top is not None else None,
                    )
                ],
                usage=_usage(tally),
            )

        return json_response(await unless_disconnected(request, collect()))

    async def completions(self, request: Request) -> Response:
        """OpenAI (legacy) text completions: one prompt, text or token ids."""
        ctx = self._ctx
        deadline = Deadline.after(ctx.config.request_timeout)
        req = await parse(request, ctx, CompletionRequest)
        check_model(ctx, req.model)
        reject_unsupported(req, ctx.ready)
        self._check_engine()
        prompt = await self._completion_prompt(req)
        engine_req = self._engine_request(req, prompt, req.max_tokens, req.logprobs, deadline)
        rid, created = engine_req.request_id, now()
        steps, tally = self._start(req, engine_req, deadline)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            chunks = self._completion_chunks(steps, rid, created, tally, usage, req.logprobs)
            return EventStream(sse(chunks))

        async def collect() -> Completion:
            text, reason = [], None
            logprobs = CompletionLogprobs() if req.logprobs is not None else None
            async with aclosing(steps):
                async for step in steps:
                    text.append(step.text)
                    self._add_completion_logprobs(logprobs, step)
                    reason = step.finish_reason
            choice = CompletionChoice(
                index=0, text="".join(text), finish_reason=reason, logprobs=logprobs
            )
            return Completion(
                id=rid,
                created=created,
                model=ctx.model_name,
                choices=[choice],
                usage=_usage(tally),
            )

        return json_response(await unless_disconnected(request, collect()))

    def _start(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        engine_req: EngineRequest,
        deadline: Deadline,
    ) -> tuple[AsyncGenerator[Step, None], Tally]:
        """The request's steps (nothing is sent before the first is awaited) and its tally."""
        ctx = self._ctx
        tally = Tally(prompt_tokens=len(engine_req.prompt_token_ids))
        steps = generate(
            ctx.client,
            ctx.renderer.tokenizer,
            engine_req,
            stop_strings(req.stop),
            deadline,
            tally,
        )
        return steps, tally

    async def _completion_prompt(self, req: CompletionRequest) -> Prompt:
        p: str | list[Any] = req.prompt
        if isinstance(p, list) and len(p) == 1 and not isinstance(p[0], int):
            p = p[0]  # a list of one string or of one token list
        renderer = self._ctx.renderer
        if isinstance(p, str):
            return await renderer.render_text(p)
        max_len = self._ctx.ready.max_model_len
        if len(p) > max_len:  # before any work on a list of any length
            raise context_exceeded(req, max_len, len(p), req.max_tokens)
        return await renderer.run(_token_list_prompt, renderer, p)

    def _engine_request(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt: Prompt,
        max_tokens: int | None,
        logprobs: int | None,
        deadline: Deadline,
    ) -> EngineRequest:
        ready = self._ctx.ready
        self._check_engine()  # again: it may have gone while the prompt rendered
        sampling = sampling_params(
            req, max_tokens, len(prompt.token_ids), ready.max_model_len, logprobs
        )
        return EngineRequest(
            # Our own id, not the client's x-request-id: ids must be unique in the engine.
            request_id=new_id("chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl"),
            prompt_token_ids=prompt.token_ids,
            mm_items=prompt.mm_items,
            sampling=sampling,
            arrival_time=time.time(),
            priority=req.priority,
            deadline=deadline.wall_clock,
        )

    def _check_engine(self) -> None:
        """503 at once while the engine is unavailable (before any rendering work)."""
        client = self._ctx.client
        if not client.is_alive:
            raise engine_unavailable(client.dead_reason or "not connected")

    async def _chat_chunks(
        self,
        steps: AsyncGenerator[Step, None],
        rid: str,
        created: int,
        tally: Tally,
        include_usage: bool,
        want_logprobs: bool,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        model = self._ctx.model_name

        def chunk(delta: Delta, reason: str | None = None, lp: Any = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=reason, logprobs=lp)],
            )

        yield chunk(Delta(role="assistant", content=""))
        async with aclosing(steps):
            async for step in steps:
                if not step.text and step.finish_reason is None and not want_logprobs:
                    continue  # held-back text (partial character or stop prefix): nothing new
                lp = ChatLogprobs(content=self._chat_logprobs(step)) if want_logprobs else None
                yield chunk(Delta(content=step.text), step.finish_reason, lp)
        if include_usage:
            yield ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=_usage(tally)
            )

    async def _completion_chunks(
        self,
        steps: AsyncGenerator[Step, None],
        rid: str,
        created: int,
        tally: Tally,
        include_usage: bool,
        logprobs: int | None,
    ) -> AsyncGenerator[Completion, None]:
        model = self._ctx.model_name
        async with aclosing(steps):
            async for step in steps:
                if not step.text and step.finish_reason is None and logprobs is None:
                    continue
                lp = CompletionLogprobs() if logprobs is not None else None
                self._add_completion_logprobs(lp, step)
                choice = CompletionChoice(
                    index=0, text=step.text, finish_reason=step.finish_reason, logprobs=lp
                )
                yield Completion(id=rid, created=created, model=model, choices=[choice])
        if include_usage:
            yield Completion(id=rid, created=created, model=model, choices=[], usage=_usage(tally))

    def _token_text(self, token_id: int) -> str:
        return str(self._ctx.renderer.tokenizer.decode([token_id]))

    def _chat_logprobs(self, step: Step) -> list[ChatLogprob]:
        out = []
        for tid, lp in _paired(step):
            top = [
                TopLogprob(token=self._token_text(i), logprob=v)
                for i, v in zip(lp.top_ids, lp.top_logprobs, strict=False)
            ]
            out.append(
                ChatLogprob(token=self._token_text(tid), logprob=lp.logprob, top_logprobs=top)
            )
        return out

    def _add_completion_logprobs(self, acc: CompletionLogprobs | None, step: Step) -> None:
        if acc is None:
            return
        for tid, lp in _paired(step):
            offset = acc.text_offset[-1] + len(acc.tokens[-1]) if acc.tokens else 0
            acc.text_offset.append(offset)
            acc.tokens.append(self._token_text(tid))
            acc.token_logprobs.append(lp.logprob)
            acc.top_logprobs.append(
                {self._token_text(i): v for i, v in zip(lp.top_ids, lp.top_logprobs, strict=False)}
            )


def _token_list_prompt(renderer: Renderer, p: list[Any]) -> Prompt:
    """A completion prompt given as token ids (blocking: O(length) Python work)."""
    if p and all(isinstance(t, int) for t in p):
        return renderer.token_prompt(p)
    raise ApiError(400, "prompt must be one string or one list of token ids", param="prompt")


def _paired(step: Step) -> list[tuple[int, TokenLogprobs]]:
    return list(zip(step.token_ids, step.logprobs or [], strict=False))


def _usage(tally: Tally) -> Usage:
    return Usage(
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        total_tokens=tally.prompt_tokens + tally.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=tally.cached_tokens),
    )
