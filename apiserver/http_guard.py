"""Bounded reads on every HTTP connection: uvicorn's httptools protocol with the limits it lacks.

What uvicorn (0.45 to 0.55) offers with httptools, and where it falls short:

- ``timeout_keep_alive`` closes a connection idle *between* requests; nothing bounds the time
  before the first request, or the time a request's line, headers or body may take, so a
  client that sends nothing, or one byte a minute, holds a connection for ever.
- nothing bounds the size of the request line and headers: httptools hands headers over only
  when complete and builds each one by concatenating the pieces it was fed, so a trickled
  200 MB header costs quadratic time on the event loop (``h11_max_incomplete_event_size``
  exists for h11 only).
- ``limit_concurrency`` answers a plain-text 503 only after parsing the head, and counts
  running tasks together with connections.

So this protocol (a subclass; the parsing itself stays uvicorn's):

- holds back each request head until its blank line and feeds it to the parser in one piece
  (linear time however the client paces it), answering 414 once the request line passes
  ``MAX_REQUEST_LINE_BYTES`` and 431 once the head passes ``max_header_bytes``;
- gives a head ``header_timeout_s`` from the first byte (or from the connection's opening)
  and a body ``body_timeout_s`` from the end of its head, then answers 408 (a body that is
  late after its response was sent, or a connection that never sent a byte, is just closed);
- sheds connections past ``max_connections``: 503 with ``Retry-After`` at once, then closes;
- answers every error of its own, and uvicorn's "invalid HTTP request", with an OpenAI error
  object;
- starts each request's handler eagerly (``apiserver.eager``) once the head's limits are armed,
  inside the read that completed the head, instead of on the loop's next iteration; a
  pipelined request waits for the one before it as in uvicorn.

A refused connection is closed after a short linger that reads and drops what the client is
still sending, so the client reads the answer instead of a reset; so is a connection that
uvicorn closes after an answer sent while the request's body was still arriving. The work per
read is one ``bytes.find`` over the new bytes (C speed, tens of microseconds for 256 KiB).
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from apiserver import metrics
from apiserver.config import ServerConfig
from apiserver.eager import start_task
from apiserver.errors import ApiError

log = logging.getLogger(__name__)

#: Longest request line (method, target, version), as Apache's ``LimitRequestLine``.
MAX_REQUEST_LINE_BYTES = 8 << 10
#: A chunked body is fed in slices of at most this size (and a quarter of the head limit), so
#: that a request that begins inside one (pipelining) is charged at most that much for bytes
#: of its head the parser already took.
BODY_SLICE_BYTES = 16 << 10
#: How long a refused connection keeps reading (and dropping) before it is closed.
LINGER_S = 1.0
#: ``scope["state"]`` key set on a request whose body did not arrive in time.
BODY_TIMED_OUT = "fanin.body_timed_out"
_BLANK_LINE = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The connection-level limits of one API server."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, config: ServerConfig) -> HttpLimits:
        return cls(
            config.max_header_bytes,
            config.header_timeout,
            config.body_timeout,
            config.max_connections,
        )


class RefusalLog:
    """Logs refusals at most once a second: a flood of them must not cost the loop."""

    def __init__(self) -> None:
        self._last = -1.0
        self._skipped = 0

    def note(self, status: int, message: str) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._skipped += 1
            return
        more = f" (and {self._skipped} more since the last)" if self._skipped else ""
        log.info("refused a request: %d %s%s", status, message, more)
        self._last, self._skipped = now, 0


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: uvicorn makes the instances
    itself, so the limits (and the server's refusal log) are bound to a subclass made once
    here."""

    class BoundProtocol(GuardedHttpToolsProtocol):
        pass

    BoundProtocol.limits = limits
    BoundProtocol.refusals = RefusalLog()
    return BoundProtocol


def error_bytes(status: int, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A whole ``Connection: close`` response carrying an OpenAI error object."""
    body = msgspec.json.encode(ApiError(status, message, code=code).body())
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _LingeringTransport:
    """The transport a request with a body answers through: uvicorn closes it right after
    the response when the connection is not kept alive, and that close goes through the
    protocol's linger while the body is still arriving (an answer sent before reading the
    body: an admission 429, a 401, a 404)."""

    def __init__(self, protocol: GuardedHttpToolsProtocol) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)

    def close(self) -> None:
        self._protocol._close_answered()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring; ``limits`` is set on the subclass ``guarded_protocol`` makes."""

    limits: HttpLimits
    refusals: RefusalLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # not between the end of a head and the end of its body
        self._head = bytearray()  # head bytes held back from the parser
        self._skip = 0  # leading bytes of ``_head`` the parser already has
        self._tail = b""  # last bytes fed: a blank line may straddle two reads
        self._head_fed = 0  # bytes of the head in progress the parser already has
        self._line_ok = False  # the request line of the head in progress is within its limit
        self._num_begun = 0
        self._num_heads = 0
        self._body_left: int | None = None  # of a body with a Content-Length
        self._timer: asyncio.TimerHandle | None = None
        self._is_closing = False
        self._slice = min(BODY_SLICE_BYTES, self.limits.max_header_bytes // 4)
        self._in_headers_complete = False
        self._held: tuple[Any, Any] | None = None  # the request uvicorn would start now

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.connections.discard(self)
            self._refuse(
                503,
                f"this server has {self.limits.max_connections} connections open; retry later",
                "too_many_connections",
                retry_after=1,
            )
            return
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and not self._is_closing:
            if self._in_head:
                pos = self._read_head(data, pos)
                continue
            if self._body_left is None:
                end = min(len(data), pos + self._slice)
            else:
                end = min(len(data), pos + (self._body_left or len(data)))
            self._feed(memoryview(data)[pos:end])
            pos = end

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, f"invalid HTTP request: {msg}", "invalid_http")

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._num_begun += 1
        if self._timer is None:
            self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_headers_complete = True
        try:
            super().on_headers_complete()
        finally:
            self._in_headers_complete = False
        self._num_heads += 1
        self._in_head = False
        self._head_fed = 0
        self._body_left = None
        chunked = False
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit():
                self._body_left = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if self._body_left or chunked:  # else the parser ends the request right here
            self._arm(self.limits.body_timeout_s, self._body_timed_out)
            if self.cycle is not None:
                self.cycle.transport = _LingeringTransport(self)  # type: ignore[assignment]
        else:
            self._disarm()
        if self._held is not None:
            cycle, app = self._held
            self._held = None
            task = start_task(self.loop, cycle.run_asgi(app))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # (uvicorn's opt-in reset_contextvars, which fanin leaves off, applies to pipelined
        # requests only.)
        if self._in_headers_complete:  # started eagerly by on_headers_complete, once armed
            self._held = (cycle, app)
        else:  # a pipelined request, once the one before it is answered
            super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if self._body_left is not None:
            self._body_left -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._line_ok = False
        self._body_left = None
        self._disarm()

    # -- heads -----------------------------------------------------------------------------

    def _read_head(self, data: bytes, pos: int) -> int:
        """Take head bytes from ``data[pos:]``; return where the rest starts (past the head
        once it is complete and fed, else ``len(data)``: all of it is held back)."""
        if self._timer is None:
            self._arm(self.limits.header_timeout_s, self._head_timed_out)
        self._unset_keepalive_if_required()  # a request is arriving: the head's clock runs
        if not self._head and not self._tail:
            end = data.find(_BLANK_LINE, pos)
            if end >= 0:  # the whole head in one read: the usual case, no copy
                if self._head_ok(data, pos, pos, end + 4):
                    self._feed(memoryview(data)[pos : end + 4])
                return end + 4
        if not self._head:
            self._head += self._tail
            self._skip, self._tail = len(self._tail), b""
        searched = len(self._head)
        self._head += memoryview(data)[pos:]
        end = self._head.find(_BLANK_LINE, max(0, searched - 3))
        if end < 0:
            self._head_ok(self._head, self._skip, searched, len(self._head))
            return len(data)
        if self._head_ok(self._head, self._skip, searched, end + 4):
            head = bytes(memoryview(self._head)[self._skip : end + 4])
            self._head.clear()
            self._skip = 0
            self._feed(head)
        return pos + (end + 4 - searched)

    def _head_ok(self, buf: bytes | bytearray, start: int, new: int, end: int) -> bool:
        """Check the head held in ``buf[start:end]`` (bytes from ``new`` on are new); refuse
        it and return False when it is over a limit."""
        if not self._line_ok and not self._head_fed:
            line_end = buf.find(b"\r\n", max(start, new - 1), start + MAX_REQUEST_LINE_BYTES + 2)
            if line_end >= 0:
                self._line_ok = True
            if line_end - start > MAX_REQUEST_LINE_BYTES or (
                line_end < 0 and end - start > MAX_REQUEST_LINE_BYTES
            ):
                self._refuse(
                    414,
                    f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes",
                    "request_line_too_long",
                )
                return False
        if self._head_fed + end - start > self.limits.max_header_bytes:
            self._refuse_large_head()
            return False
        return True

    def _refuse_large_head(self) -> None:
        self._refuse(
            431,
            f"request headers larger than {self.limits.max_header_bytes} bytes",
            "headers_too_large",
        )

    def _feed(self, chunk: bytes | memoryview) -> None:
        heads_before = self._num_heads
        super().data_received(chunk)  # type: ignore[arg-type]  # httptools takes any buffer
        if self._is_closing or not self._in_head or self._num_begun == self._num_heads:
            return  # in a body, or between requests: the parser holds no head bytes
        # A head is in progress inside the parser: all of this chunk if the head was already
        # going, else an unknown share of it (a request that began after one that ended here);
        # the whole chunk is counted then, which the slice size bounds.
        if heads_before != self._num_heads:
            self._head_fed = len(chunk)
        else:
            self._head_fed += len(chunk)
        self._tail = bytes(chunk[-3:])
        if self._head_fed > self.limits.max_header_bytes:
            self._refuse_large_head()

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _is_answering(self) -> bool:
        """A request of this connection is being answered: nothing else may go on the wire."""
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and not cycle.disconnected

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._is_answering():  # a pipelined head behind a long response: wait for it
            self._arm(self.limits.header_timeout_s, self._head_timed_out)
            return
        if self._head or self._head_fed or self._num_begun != self._num_heads:
            self._refuse(
                408,
                f"request headers not received within {self.limits.header_timeout_s:g} s",
                "header_timeout",
            )
        else:  # never sent a byte: an idle connection, closed like uvicorn's keep-alive
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.pipeline:  # a queued request whose body nobody reads yet
            self._arm(self.limits.body_timeout_s, self._body_timed_out)
            return
        message = f"request body not received within {self.limits.body_timeout_s:g} s"
        if cycle is None or cycle.response_started:
            self.refusals.note(408, message)
            self.transport.close()  # answered already; only the body is still trickling
            return
        cycle.scope["state"][BODY_TIMED_OUT] = True
        cycle.disconnected = True  # the app's receive() now says so, and its sends are dropped
        cycle.message_event.set()
        self._refuse(408, message, "body_timeout", count=False)

    # -- refusing --------------------------------------------------------------------------

    def _refuse(
        self,
        status: int,
        message: str,
        code: str,
        retry_after: int | None = None,
        count: bool = True,
    ) -> None:
        """Answer ``status`` (unless a response is on the wire), then linger and close."""
        if self._is_closing:
            return
        self._is_closing = True
        self._disarm()
        self.refusals.note(status, message)
        if count:
            metrics.REQUESTS.labels("other", str(status)).inc()
        if not self._is_answering():
            self.transport.write(error_bytes(status, message, code, retry_after))
        self._linger()

    def _close_answered(self) -> None:
        """uvicorn closing the connection after its response (the client asked for that, or
        the response said so): at once, unless the request's body is still arriving."""
        if self._in_head or self._is_closing:
            self.transport.close()
            return
        self._is_closing = True
        self._disarm()
        self._linger()

    def _linger(self) -> None:
        """Half-close, read and drop what the client still sends (``data_received`` feeds
        nothing once closing), close on its EOF or after ``LINGER_S``. Closing with unread
        bytes would answer them with a reset, and a client still sending could lose the
        answer before it reads it."""
        self.flow.resume_reading()  # uvicorn may have paused reads on a full body buffer
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)
