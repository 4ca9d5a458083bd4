"""Helpers every OpenAI route shares: body parsing, model check, the checks for parameters we
cannot honour, sampling parameters from request fields, SSE framing and disconnect races."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from apiserver.context import ServerContext
from apiserver.errors import ApiError, from_validation
from apiserver.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from ipc.messages import Ready, SamplingParams

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Bodies above this are JSON-decoded on a render thread: msgspec decodes ~1 GB/s, so a
#: 64 KiB body costs the loop well under a millisecond and a 20 MB image body would not.
INLINE_DECODE_BYTES = 64 << 10

#: One decoder per request body type, built at import, before the server forks or starts a
#: thread: msgspec builds a struct's type information on its first decode, and two render
#: threads doing that at once crashed the process (msgspec 0.22 segfaults there; seen on the
#: GPU host in the first burst after start-up). A built ``Decoder`` is safe to share.
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        TokenizeRequest,
        DetokenizeRequest,
    )
}


async def parse(request: Request, ctx: ServerContext, type_: type[T]) -> T:
    """The request body as ``type_``; 400 for invalid JSON or wrong field types, 499 when the
    client leaves before its body is in."""
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ApiError(499, "client disconnected") from None
    decode: Callable[[bytes], T] = _DECODERS[type_].decode
    try:
        if len(body) <= INLINE_DECODE_BYTES:
            return decode(body)
        return await ctx.renderer.run(decode, body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None


def check_model(ctx: ServerContext, name: str | None) -> None:
    if name is not None and name != ctx.model_name:
        raise ApiError(
            404, f"the model `{name}` does not exist", param="model", code="model_not_found"
        )


def reject_unsupported(req: ChatCompletionRequest | CompletionRequest, ready: Ready) -> None:
    """400 for parameters whose silent omission would change the answer, and for the ones the
    engine would refuse (checked here so that a streamed request gets its 400 before the
    response starts; the engine checks them again as a backstop)."""
    if req.stream_options is not None and not req.stream:
        raise ApiError(
            400, "stream_options is only allowed with stream=true", param="stream_options"
        )
    if req.priority != 0 and ready.scheduling_policy != "priority":
        raise ApiError(
            400,
            f"priority {req.priority} needs a server started with --scheduling-policy priority",
            param="priority",
        )
    bad_stop = [t for t in req.stop_token_ids or [] if not 0 <= t < ready.vocab_size]
    if bad_stop:
        raise ApiError(
            400,
            f"stop token ids {bad_stop[:8]} are outside the vocabulary [0, {ready.vocab_size})",
            param="stop_token_ids",
        )
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.tools and req.tool_choice != "none":
            raise ApiError(400, "tools are not supported", param="tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice is not supported", param="tool_choice")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise ApiError(
                400, "only response_format type 'text' is supported", param="response_format"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    else:
        if req.best_of is not None and req.best_of != 1:
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.echo:
            raise ApiError(400, "echo=true is not supported", param="echo")


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    logprobs: int | None,
) -> SamplingParams:
    """Engine sampling parameters; 400 when prompt plus output cannot fit the model, or when
    min_tokens exceeds the tokens the request may generate."""
    room = max_model_len - prompt_len
    field = _max_tokens_field(req)
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        raise context_exceeded(req, max_model_len, prompt_len, max_tokens)
    if req.min_tokens > (max_tokens or room):
        limit = f"{field} ({max_tokens})" if max_tokens else f"the context left ({room} tokens)"
        raise ApiError(
            400, f"min_tokens ({req.min_tokens}) is larger than {limit}", param="min_tokens"
        )
    return SamplingParams(
        max_tokens=max_tokens or room,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
    )


def context_exceeded(
    req: ChatCompletionRequest | CompletionRequest,
    max_model_len: int,
    prompt_len: int,
    max_tokens: int | None,
) -> ApiError:
    """The 400 for a prompt (plus max_tokens) that does not fit the model's context."""
    field = _max_tokens_field(req)
    asked = "" if max_tokens is None else f" plus {field} {max_tokens}"
    return ApiError(
        400,
        f"this model's maximum context length is {max_model_len} tokens; the prompt has "
        f"{prompt_len} tokens{asked}, which does not fit",
        param=field if prompt_len < max_model_len else _prompt_field(req),
        code="context_length_exceeded",
    )


def _prompt_field(req: ChatCompletionRequest | CompletionRequest) -> str:
    return "messages" if isinstance(req, ChatCompletionRequest) else "prompt"


def _max_tokens_field(req: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


_ENCODER = msgspec.json.Encoder()


async def sse(events: AsyncGenerator[Any, None]) -> AsyncGenerator[bytes, None]:
    """Frame structs as server-sent events, end with ``[DONE]``; an ApiError mid-stream
    becomes an error event and closes the stream (the openai client raises it)."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield b"data: " + _ENCODER.encode(event) + b"\n\n"
    except ApiError as err:
        yield b"data: " + _ENCODER.encode(err.body()) + b"\n\n"
        return
    except Exception:  # the status line is gone already: the error event is all we can say
        log.exception("unhandled error in an event stream")
        yield b"data: " + _ENCODER.encode(ApiError(500, "internal server error").body()) + b"\n\n"
        return
    yield b"data: [DONE]\n\n"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (its ``finally`` aborts the
    engine request) and raise ApiError(499, never seen by the gone client)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected_from(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # let its finally run
    raise ApiError(499, "client disconnected")


class EventStream(Response):
    """``text/event-stream`` response that stops the event source as soon as the client goes
    away (whatever ASGI spec version the server speaks), so the request's ``finally`` aborts
    it in the engine right then, not at the next token."""

    media_type = "text/event-stream"

    def __init__(
        self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None
    ) -> None:
        # Not Response.__init__: it would announce a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", **(headers or {})})
        self._chunks = chunks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_disconnected_from(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump  # re-raises what the event source raised (logged outside)

    async def _pump(self, send: Any) -> None:
        try:
            async with contextlib.aclosing(self._chunks):
                async for chunk in self._chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the server reports the client gone
            pass


async def _disconnected_from(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
