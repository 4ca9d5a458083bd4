"""What the even spread costs the event loop per request: ``ShedMiddleware`` (and the
balancer's look at the shared load table behind it) around a trivial ASGI app, against the
app alone, for tables of several sizes.

    python -m bench.spread_overhead [OUT_DIR] [--requests 200000]

Each figure is the best of 5 runs of ``--requests`` calls, in microseconds per request, on
this machine's one core; the table's other rows hold live connection counts, and this
server stays balanced (no response is told to close), the common case.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apiserver.load_table import LoadTable
from apiserver.spread import Balancer, ShedMiddleware
from bench.outputs import write_results

SIZES = (1, 6, 14, 32)
_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
_BODY = {"type": "http.response.body", "body": b"ok"}
_SCOPE = {"type": "http", "path": "/health", "method": "GET"}


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send(dict(_START))
    await send(_BODY)


async def _send(message: Any) -> None:
    pass


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _per_request_us(app: Any, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            await app(_SCOPE, _receive, _send)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def measure(rows: int, n: int, work: Path) -> dict[str, float]:
    path = str(work / f"table-{rows}")
    LoadTable.create(path, rows).close()
    balancers = [Balancer(LoadTable.open(path, rows), i) for i in range(rows)]
    for i, b in enumerate(balancers):
        b.start_serving()
        for _ in range(8 + (i % 2)):  # 8 or 9 connections: within one of each other
            b.connection_opened()
    ours = balancers[0]  # 8 connections: never more than one above the least loaded
    bare = asyncio.run(_per_request_us(_app, n))
    shed = asyncio.run(_per_request_us(ShedMiddleware(_app, ours), n))
    t0 = time.perf_counter()
    for _ in range(n):
        ours.table.least_connections()
    lookup = (time.perf_counter() - t0) / n * 1e6
    for b in balancers:
        b.table.close()
    return {"rows": rows, "app_us": bare, "with_spread_us": shed, "added_us": shed - bare,
            "least_connections_us": lookup}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--requests", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [measure(rows, args.requests, Path(work)) for rows in SIZES]
    lines = [
        "| API servers | app alone µs | with the spread µs | added µs | table lookup µs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['app_us']:.2f} | {r['with_spread_us']:.2f} "
            f"| {r['added_us']:.2f} | {r['least_connections_us']:.2f} |"
        )
    write_results(args.out, "spread_overhead", results, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
