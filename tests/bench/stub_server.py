"""A scripted OpenAI-style streaming server on 127.0.0.1 for the load generator's own tests:
known delays, 429s on schedule, connections it closes, and a record of every request body.
It speaks chunked HTTP/1.1 like uvicorn; the real server is tested in test_bench_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

TOKENS = ("Hel", "lo", " there")


@dataclass
class Stub:
    """``async with Stub(...) as stub``; ``stub.url`` serves until the block ends."""

    token_gap_s: float = 0.02
    reject_every: int = 0  # every n-th chat request gets 429 (0: never)
    close_every: int = 0  # every n-th response says Connection: close (0: never)
    hang_path: str = ""  # requests to this path are read and never answered
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    health_hits: int = 0
    metrics_hits: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _responses: int = 0

    async def __aenter__(self) -> Stub:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        index = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode().split("\r\n")
                _, path, _ = request_line.split(" ")
                headers = dict(line.split(": ", 1) for line in lines if line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                if path == self.hang_path:
                    await asyncio.sleep(3600)
                keep = await self._answer(writer, path, body, str(index % 2))
                if not keep or headers.get("Connection") == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(
        self, writer: asyncio.StreamWriter, path: str, body: bytes, server: str
    ) -> bool:
        self._responses += 1
        keep = not (self.close_every and self._responses % self.close_every == 0)
        common = f"x-fanin-server: {server}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n"
        if path == "/health":
            self.health_hits += 1
            await _json(writer, "200 OK", common, b'{"status":"ok"}')
            return keep
        if path == "/metrics":  # one render histogram whose every observation took 10 ms
            self.metrics_hits += 1
            n = self.metrics_hits
            text = f"fanin_render_seconds_sum {0.01 * n}\nfanin_render_seconds_count {n}\n"
            await _json(writer, "200 OK", common, text.encode())
            return keep
        self.bodies.append(body)
        if self.reject_every and len(self.bodies) % self.reject_every == 0:
            error = b'{"error": {"message": "too busy", "type": "rate_limit", "code": 429}}'
            await _json(writer, "429 Too Many Requests", common + "Retry-After: 1\r\n", error)
            return keep
        writer.write(
            f"HTTP/1.1 200 OK\r\n{common}Content-Type: text/event-stream; charset=utf-8\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
        await self._event(writer, role)
        for i, token in enumerate(TOKENS):
            await asyncio.sleep(self.token_gap_s)
            reason = "length" if i == len(TOKENS) - 1 else None
            await self._event(
                writer, {"choices": [{"delta": {"content": token}, "finish_reason": reason}]}
            )
        usage = {"prompt_tokens": len(body) // 100, "completion_tokens": len(TOKENS)}
        await self._event(writer, {"choices": [], "usage": usage})
        await self._chunk(writer, b"data: [DONE]\n\n")
        await self._chunk(writer, b"")
        return keep

    async def _event(self, writer: asyncio.StreamWriter, event: object) -> None:
        await self._chunk(writer, b"data: " + json.dumps(event).encode() + b"\n\n")

    async def _chunk(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: str, headers: str, payload: bytes) -> None:
    head = f"HTTP/1.1 {status}\r\n{headers}Content-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
