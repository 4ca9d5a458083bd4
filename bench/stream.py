"""Turning one streamed OpenAI response into a ``RequestRecord``, chunk by chunk as it
arrives (the HTTP client calls ``on_head`` and ``on_body``)."""

from __future__ import annotations

from typing import Any

import msgspec

from bench.metrics import RequestRecord
from bench.sse import SseParser

_DONE = b"[DONE]"
_MAX_ERROR_BODY = 64 << 10


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_DECODER = msgspec.json.Decoder(_Chunk)


def error_message(status: int, body: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        error = msgspec.json.decode(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"http {status}: {error['message']}"
    except (msgspec.DecodeError, AttributeError):
        pass
    return f"http {status}: {body[:200].decode(errors='replace')}"


class StreamHandler:
    """Fills ``record`` from a ``text/event-stream`` of chat or completion chunks."""

    __slots__ = ("record", "_parser", "_error_body", "_is_stream", "_last_token", "done")

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self._parser = SseParser()
        self._error_body = b""
        self._is_stream = False
        self._last_token = 0.0
        self.done = False

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.record.status = status
        self.record.server = headers.get("x-fanin-server", "")
        ctype = headers.get("content-type", "")
        self._is_stream = status == 200 and ctype.startswith("text/event-stream")

    def on_body(self, data: bytes, now: float) -> None:
        if not self._is_stream:
            self._error_body = (self._error_body + data)[:_MAX_ERROR_BODY]
            return
        for event in self._parser.feed(data):
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        record = self.record
        if event == _DONE:
            self.done = True
            return
        try:
            chunk = _DECODER.decode(event)
        except msgspec.DecodeError as e:
            raise ValueError(f"stream: not a JSON chunk ({e})") from None
        if chunk.error is not None:
            message = chunk.error.get("message") if isinstance(chunk.error, dict) else None
            raise ValueError(f"stream: error event: {message or chunk.error}")
        record.latency = now - record.start
        if chunk.usage is not None:
            record.prompt_tokens = chunk.usage.prompt_tokens
            record.output_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text = choice.delta.content if choice.delta is not None else choice.text
            if text:
                if record.ttft == 0.0:
                    record.ttft = now - record.start
                else:
                    record.itl.append(now - self._last_token)
                self._last_token = now
            elif choice.finish_reason and record.ttft == 0.0:
                record.ttft = now - record.start  # output that detokenized to no text at all

    def finish(self) -> None:
        """Called once the response is complete: decide success or the error."""
        record = self.record
        if record.status != 200:
            record.error = error_message(record.status, self._error_body)
        elif not self._is_stream:
            record.error = "stream: the response is not text/event-stream"
        elif not self.done:
            record.error = "stream: ended before [DONE]"
        elif record.ttft == 0.0:
            record.error = "stream: no output"
        else:
            record.success = True
            if record.output_tokens == 0:  # no usage chunk: count the chunks that had text
                record.output_tokens = 1 + len(record.itl)
