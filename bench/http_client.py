"""A lean HTTP/1.1 client for the load generator: asyncio protocols and the llhttp parser
(``httptools``, the one uvicorn uses), one exchange at a time per connection, keep-alive pool.

Why not httpx or aiohttp: at hundreds of streamed requests a second their per-request and
per-chunk machinery costs a good part of a core; here a request is one ``writelines`` of bytes
built ahead, and each read is stamped once and handed to the caller's handler as it arrives.
Everything read is bounded: headers by count and size, bodies by ``max_body_bytes``, and each
exchange by its timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from typing import Protocol, cast

import httptools

from bench.aio import within
from bench.target import Target

_MAX_HEADERS = 100
_MAX_HEADER_BYTES = 64 << 10


class HttpError(Exception):
    """The exchange failed below HTTP: connection refused or lost, bad response, timeout."""


class HttpTimeout(HttpError):
    """No complete response within the exchange's timeout."""


class Handler(Protocol):
    """What receives one response, piece by piece."""

    def on_head(self, status: int, headers: dict[str, str]) -> None: ...

    def on_body(self, data: bytes, now: float) -> None: ...


def request_bytes(
    target: Target,
    method: str,
    path: str,
    body: Sequence[bytes] = (),
    headers: Sequence[tuple[str, str]] = (),
    keep_alive: bool = True,
) -> list[bytes]:
    """The request as a list of byte strings (head first, then the body's parts unjoined)."""
    lines = [f"{method} {target.base_path}{path} HTTP/1.1", f"Host: {target.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {sum(len(part) for part in body)}")
    lines.append("Connection: " + ("keep-alive" if keep_alive else "close"))
    return [("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), *body]


class _Exchange:
    __slots__ = ("handler", "done", "headers", "header_bytes", "body_bytes")

    def __init__(self, handler: Handler, done: asyncio.Future[None]) -> None:
        self.handler = handler
        self.done = done
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body_bytes = 0


class _Connection(asyncio.Protocol):
    """One socket; the llhttp parser calls the ``on_*`` methods below from ``data_received``."""

    def __init__(self, max_body_bytes: int) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max_body = max_body_bytes
        self._transport: asyncio.Transport | None = None
        self._exchange: _Exchange | None = None
        self._now = 0.0
        self.is_closed = False
        self.can_reuse = False
        self.got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self._fail(HttpError(f"connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        if self._exchange is None:
            self.close()  # bytes nobody asked for: the connection can no longer be trusted
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            # A handler's own error (or a bound below) ends this exchange, not the loop.
            cause = e.__context__
            self._fail(cause if isinstance(cause, Exception) else HttpError(str(e)))
            self.close()
        except httptools.HttpParserError as e:
            self._fail(HttpError(f"bad HTTP response: {e}"))
            self.close()

    def send(self, parts: Sequence[bytes], handler: Handler) -> asyncio.Future[None]:
        assert self._transport is not None and self._exchange is None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._exchange = _Exchange(handler, done)
        self.can_reuse = self.got_bytes = False
        self._transport.writelines(parts)
        return done

    def expire(self, timeout: float) -> None:
        self._fail(HttpTimeout(f"no complete response in {timeout:g} s"))
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.is_closed = True

    def _fail(self, exc: Exception) -> None:
        ex, self._exchange = self._exchange, None
        if ex is not None and not ex.done.done():
            ex.done.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._exchange
        assert ex is not None
        ex.header_bytes += len(name) + len(value)
        if len(ex.headers) >= _MAX_HEADERS or ex.header_bytes > _MAX_HEADER_BYTES:
            raise HttpError("response headers too large")
        ex.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        ex = self._exchange
        assert ex is not None
        ex.handler.on_head(self._parser.get_status_code(), ex.headers)

    def on_body(self, body: bytes) -> None:
        ex = self._exchange
        assert ex is not None
        ex.body_bytes += len(body)
        if ex.body_bytes > self._max_body:
            raise HttpError(f"response body over {self._max_body} bytes")
        ex.handler.on_body(body, self._now)

    def on_message_complete(self) -> None:
        ex, self._exchange = self._exchange, None
        self.can_reuse = self._parser.should_keep_alive()
        if ex is not None and not ex.done.done():
            ex.done.set_result(None)


class Client:
    """Connections to one target; ``keep_alive`` reuses them like a browser or SDK would."""

    def __init__(
        self, target: Target, keep_alive: bool = True, max_body_bytes: int = 64 << 20
    ) -> None:
        self.target = target
        self.keep_alive = keep_alive
        self._max_body = max_body_bytes
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if target.scheme == "https" else None
        self.num_connects = 0

    async def request(
        self, parts: Sequence[bytes], handler: Handler, timeout: float, connect_timeout: float = 10
    ) -> None:
        """Send ``parts`` and feed the response to ``handler``; raises ``HttpError``. When a
        reused connection turns out closed by the server while idle (not a byte of response
        came back), the request goes again on another connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            conn, reused = self._take()
            if conn is None:
                conn = await self._connect(min(connect_timeout, deadline - loop.time()))
            done = conn.send(parts, handler)
            timer = loop.call_at(deadline, conn.expire, timeout)
            try:
                await done
            except HttpTimeout:
                raise
            except HttpError:
                conn.close()
                if reused and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            finally:
                timer.cancel()
            if self.keep_alive and conn.can_reuse and not conn.is_closed:
                self._idle.append(conn)
            else:
                conn.close()
            return

    def close(self) -> None:
        """Close the idle connections (those in use close when their exchange ends)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def _take(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed:
                return conn, True
        return None, False

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        self.num_connects += 1
        try:
            _, conn = await within(
                loop.create_connection(
                    lambda: _Connection(self._max_body),
                    self.target.connect_host,
                    self.target.port,
                    ssl=self._ssl,
                    server_hostname=self.target.host if self._ssl else None,
                ),
                timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise HttpError(f"cannot connect to {self.target.origin}: {e or 'timeout'}") from None
        return conn


class _Collect:
    """Keeps a whole (small) response."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    def on_body(self, data: bytes, now: float) -> None:
        self.body += data


async def fetch(
    client: Client, path: str, headers: Sequence[tuple[str, str]] = (), timeout: float = 10
) -> tuple[int, bytes]:
    """GET ``path``: (status, body). Raises ``HttpError``."""
    collect = _Collect()
    parts = request_bytes(client.target, "GET", path, (), headers, client.keep_alive)
    await client.request(parts, collect, timeout)
    return collect.status, bytes(collect.body)
