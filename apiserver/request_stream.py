"""One request's outputs on this API server, from the ADD to its end.

``async with client.stream(request, deadline) as outputs: async for out in outputs: ...``

The stream is the only owner of the request's state here: its output buffer, its deadline
(408), the mapping of engine results to client errors (an error output, an abort by the
engine, the engine lost), and the abort that tells the engine to stop whenever the request
ends before the engine finished it (client gone, stop string, timeout, any exception): that
abort runs in ``__aexit__``, on every way out.

Why not ``asyncio.Queue`` with ``asyncio.wait_for``: on Python 3.10 and 3.11, ``wait_for``
returns a result that arrived in the same loop turn as a cancellation and drops the
cancellation, so a request whose client had left went on to ``max_tokens`` in the engine. Here
the consumer awaits a bare future that only wakes it; outputs stay in the buffer until they are
taken, so a cancellation always propagates and nothing is lost either way. The deadline is a
loop timer that marks the stream expired, not a timeout around each wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from apiserver.errors import ApiError
from ipc.messages import EngineRequest, RequestOutput


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be done (``time.monotonic()``) and the timeout it came from."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s)

    @property
    def wall_clock(self) -> float:
        """The same moment as ``time.time()`` (what ``EngineRequest.deadline`` carries)."""
        return time.time() + (self.at - time.monotonic())

    def error(self) -> ApiError:
        return ApiError(408, f"request timed out after {self.timeout_s:g} s", code="timeout")


class StreamHost(Protocol):
    """What a stream needs of the engine client that made it."""

    async def open_stream(self, stream: RequestStream) -> None:
        """Register ``stream`` for its outputs and send its request (ApiError 503 if no
        engine can take it)."""

    def close_stream(self, stream: RequestStream) -> None:
        """Forget ``stream``; abort its request in the engine unless the engine is done."""


class RequestStream:
    """See the module docstring. The engine client calls :meth:`deliver` and :meth:`fail`;
    the request's handler iterates the outputs."""

    def __init__(self, host: StreamHost, request: EngineRequest, deadline: Deadline) -> None:
        self.request = request
        self._host = host
        self._deadline = deadline
        self._items: deque[RequestOutput] = deque()
        self._error: ApiError | None = None
        self._expired = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: The engine holds nothing of this request any more (it finished it, failed it, or
        #: is gone): leaving the stream then sends no abort.
        self.is_engine_done = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def __aenter__(self) -> RequestStream:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, self._deadline.at - time.monotonic()), self._expire)
        try:
            await self._host.open_stream(self)
        except BaseException:
            # Not encoded, or cancelled mid-send: the frames may have left anyway.
            self._timer.cancel()
            self._host.close_stream(self)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._host.close_stream(self)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next output; StopAsyncIteration after the one with a finish reason. Raises
        ApiError: 408 past the deadline, the engine's error, 503 when the engine aborted the
        request or is gone."""
        while True:
            if self._expired:
                raise self._deadline.error()
            if self._items:
                break
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = self._items.popleft()
        if out.error is not None:
            raise ApiError(out.error.status, out.error.message)
        if out.finish_reason == "abort":
            raise ApiError(503, "the engine aborted the request")
        if out.finish_reason is not None:
            self._ended = True
        return out

    def deliver(self, out: RequestOutput) -> None:
        """An output from the engine (called by the engine client's reader)."""
        self._items.append(out)
        if out.finish_reason is not None:
            self.is_engine_done = True
        self._wake()

    def fail(self, error: ApiError) -> None:
        """The engine is gone: end the stream with ``error`` once buffered outputs are taken."""
        self._error = error
        self.is_engine_done = True
        self._wake()

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
