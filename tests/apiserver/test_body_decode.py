"""Request bodies are decoded by decoders built at import, never by a call that builds a
struct's type information on first use: with msgspec 0.22, render threads doing that first
decode at once segfaulted API servers in the GPU host's first burst after start-up."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest
from starlette.requests import Request

from apiserver import routes_common
from apiserver.errors import ApiError
from apiserver.protocol import ChatCompletionRequest


class _Renderer:
    """The part of ``Renderer`` that ``parse`` uses: ``run`` on a pool thread."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self.threads: set[str] = set()

    async def run(self, fn: Any, *args: Any) -> Any:
        def on_thread() -> Any:
            self.threads.add(threading.current_thread().name)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._pool, on_thread)


class _Ctx:
    def __init__(self, renderer: _Renderer) -> None:
        self.renderer = renderer


def _request(body: bytes) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def _chat_body(text_bytes: int) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x" * text_bytes}]}
    ).encode()


async def _parse_many(bodies: list[bytes], renderer: _Renderer) -> list[Any]:
    ctx: Any = _Ctx(renderer)
    return await asyncio.gather(
        *(routes_common.parse(_request(b), ctx, ChatCompletionRequest) for b in bodies)
    )


def test_bodies_are_decoded_without_building_type_information(monkeypatch):
    def lazy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("msgspec.json.decode(type=...) at request time")

    monkeypatch.setattr(msgspec.json, "decode", lazy)
    long = routes_common.INLINE_DECODE_BYTES + 1  # its body goes to a render thread
    small, large = _chat_body(100), _chat_body(long)
    with ThreadPoolExecutor(4, thread_name_prefix="render") as pool:
        renderer = _Renderer(pool)
        parsed = asyncio.run(_parse_many([small] + [large] * 16, renderer))
    assert [len(p.messages[0].content) for p in parsed] == [100] + [long] * 16
    assert renderer.threads, "the large bodies were decoded on the pool"


def test_an_invalid_body_is_a_400():
    with ThreadPoolExecutor(1) as pool, pytest.raises(ApiError) as err:
        asyncio.run(_parse_many([b'{"model": "m", "messages": 3}'], _Renderer(pool)))
    assert err.value.status == 400
