"""A small HTTP server on 127.0.0.1 that serves the run's photos as ``/img/<index>.jpg``, so
that the server under test fetches them over HTTP the way it would fetch a client's image
URLs. It runs on the load generator's event loop; each answer is one ``writelines`` of pieces
built ahead (bench/images.py). Reads are bounded: a request head of 16 KiB at most, within
the idle timeout; only GET (and HEAD) of known paths are answered."""

from __future__ import annotations

import asyncio
import contextlib
import re

from bench.aio import within
from bench.images import DistinctImages

_PATH = re.compile(rb"^/img/(\d{1,12})\.jpg$")
_HEAD_LIMIT = 16 << 10


class ImageServer:
    """``async with ImageServer(images) as server``: ``server.base_url`` serves them."""

    def __init__(self, images: DistinctImages, idle_timeout: float = 30.0) -> None:
        self._images = images
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.base_url = ""
        self.num_served = 0

    async def __aenter__(self) -> ImageServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a closed or misbehaving peer: drop the connection
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        head = await within(reader.readuntil(b"\r\n\r\n"), self._idle_timeout)
        request_line, *header_lines = head.split(b"\r\n")
        method, _, rest = request_line.partition(b" ")
        path = rest.rpartition(b" ")[0].split(b"?", 1)[0]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
            raise ValueError("a request body")  # none is expected: close, do not guess
        keep = headers.get(b"connection") != b"close" and request_line.endswith(b"HTTP/1.1")
        match = _PATH.match(path)
        index = int(match.group(1)) if match else -1
        if method not in (b"GET", b"HEAD") or not 0 <= index < self._images.capacity:
            body, status, ctype = [b"not found\n"], b"404 Not Found", b"text/plain"
        else:
            body, status, ctype = self._images.jpeg(index), b"200 OK", b"image/jpeg"
            self.num_served += 1
        length = sum(len(p) for p in body)
        writer.writelines(
            [
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype,
                b"\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
                % (length, b"keep-alive" if keep else b"close"),
                *(body if method != b"HEAD" else []),
            ]
        )
        await within(writer.drain(), self._idle_timeout)
        return keep
