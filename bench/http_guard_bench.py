"""Event-loop cost of apiserver.http_guard: what one ``data_received`` call costs with the
guarded protocol and with uvicorn's plain httptools protocol, for ordinary requests and for
the attacks the guard bounds.

Both protocols are driven in-process, without sockets: a stand-in transport records what is
written, and the app's tasks are cancelled before they run, so each figure is the parsing and
guarding work alone, the part that runs on the loop (timers are armed but never fire). Rows:
a small GET; a 256 KiB read holding a POST's head and body; a 64 KiB body read of a chunked
upload; a 16 KiB head in one read; the same head trickled one byte per read; an 8 MB header
sent in 64 KiB reads (the guard stops at its cap with a 431, uvicorn parses it all).

Usage: python bench/http_guard_bench.py [--iters N] [--out bench/results/http_guard.md]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from apiserver.http_guard import HttpLimits, guarded_protocol

LIMITS = HttpLimits(
    max_header_bytes=64 << 10, header_timeout_s=10.0, body_timeout_s=60.0, max_connections=64
)


class StandInTransport(asyncio.Transport):
    """Enough of a transport for the protocols: writes are counted, nothing is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def open_connection(
    kind: type[HttpToolsProtocol], loop: asyncio.AbstractEventLoop, app: Any = None
) -> Any:
    """A protocol of ``kind`` connected to a StandInTransport, serving ``app`` (default: one
    that does nothing) on ``loop``; its app tasks start when ``loop`` runs."""
    config = uvicorn.Config(
        app or _app, lifespan="off", log_config=None, access_log=False, ws="none"
    )
    config.load()
    protocol = kind(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    protocol.connection_made(StandInTransport())
    return protocol


def _time_reads(
    kind: type[HttpToolsProtocol], reads: list[bytes], iters: int
) -> tuple[float, float]:
    """(median seconds for all ``reads`` of one fresh connection, median of one read). Medians:
    on a shared machine the tail is other processes' scheduling, not this code."""
    loop = asyncio.new_event_loop()
    totals: list[float] = []
    calls: list[float] = []
    try:
        for _ in range(iters):
            protocol = open_connection(kind, loop)
            total = 0.0
            for data in reads:
                start = time.perf_counter()
                protocol.data_received(data)
                took = time.perf_counter() - start
                total += took
                calls.append(took)
                if protocol.transport.is_closing():
                    break
            totals.append(total)
            protocol.connection_lost(None)
            pending = asyncio.all_tasks(loop)  # the app's, started by complete heads: let go
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()
    return statistics.median(totals), statistics.median(calls)


def _cases() -> list[tuple[str, list[bytes], int]]:
    small = b"GET /health HTTP/1.1\r\nHost: fanin\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    body = b"x" * (256 << 10)
    post = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: fanin\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(body) + 100)
    )
    chunked_head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: fanin\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (65536 - 12, b"y" * (65536 - 12))
    head16k = b"GET /health HTTP/1.1\r\nHost: fanin\r\nX-Pad: " + b"p" * (16 << 10) + b"\r\n\r\n"
    huge = [b"GET /health HTTP/1.1\r\nX-Big: "] + [b"a" * (64 << 10)] * 128
    return [
        ("small GET, one read", [small], 2000),
        ("POST head + 256 KiB of body, one read", [(post + body)[: 256 << 10]], 500),
        ("chunked upload, one 64 KiB read", [chunked_head, chunk], 500),
        ("16 KiB head, one read", [head16k], 500),
        ("16 KiB head, one byte per read", [head16k[i : i + 1] for i in range(len(head16k))], 3),
        ("8 MB header in 64 KiB reads", huge, 3),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=float, default=1.0, help="scale the repetitions")
    p.add_argument("--out", help="write a markdown table here too")
    args = p.parse_args(argv)
    guarded = guarded_protocol(LIMITS)
    rows = []
    for name, reads, iters in _cases():
        n = max(1, int(iters * args.iters))
        cells: list[str] = []
        for kind in (guarded, HttpToolsProtocol):
            total, one = _time_reads(kind, reads, n)
            cells += [_us(total), _us(one)]
        rows.append(f"| {name} | {len(reads)} | " + " | ".join(cells) + " |")
    table = "\n".join(
        [
            "| case | reads | guarded: all reads | guarded: one read | uvicorn: all reads "
            "| uvicorn: one read |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        header = (
            "# http_guard: event-loop cost per connection\n\n"
            f"`python bench/http_guard_bench.py`, {platform.python_version()}, uvicorn "
            f"{uvicorn.__version__}, {platform.machine()}. Times in microseconds: the median "
            "over repetitions of all reads of one connection, and the median of one read.\n\n"
        )
        with open(args.out, "w") as f:
            f.write(header + table + "\n")
    return 0


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
