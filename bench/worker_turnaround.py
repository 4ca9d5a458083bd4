"""Chats through an API server's render workers beside a busy event loop: how many a second
the workers turn around, and how long each takes, when the loop that queues them is busy.

``apiserver.render_workers.RenderWorkers`` forks the workers as the server does, with the
worker's render replaced by a sleep of ``--render-ms`` (so the figure is the machinery's,
not the image processor's) answered with a photo's one-frame uint8 patches (3996 x 588,
2.35 MB). Closed-loop clients on the event loop ask for chats while callbacks of
``--busy-ms`` of Python keep the loop busy, as requests do on a loaded server, under the
server's GIL switch interval. The workers' ideal is workers / render time.

An A/B against another checkout: run this file as a script with that checkout first on the
path (``PYTHONPATH=OTHER python bench/worker_turnaround.py``); it needs nothing of the
checkout but ``apiserver.render_workers`` and ``apiserver.config``.

Usage: python -m bench.worker_turnaround [--workers 2] [--clients 4] [--render-ms 10]
    [--busy-ms 2] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import torch

from apiserver import render_workers as rw
from apiserver.config import ServerConfig


def _fake_serve(render_s: float) -> Any:
    def serve(sock: socket.socket, config: ServerConfig) -> None:
        patches = torch.randint(0, 256, (3996, 588), dtype=torch.uint8)
        while True:
            try:
                op, _ = rw._recv(sock)
            except rw.WorkerLost:
                return
            start = time.perf_counter()
            if op == "chat":
                time.sleep(render_s)
            result = patches if op == "chat" else None
            rw._send(sock, ("ok", result, time.perf_counter() - start))

    return serve


async def _drive(workers: Any, clients: int, busy_ms: float, seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    await workers.start(None, lambda reason: print("lost:", reason, file=sys.stderr))
    stop = time.monotonic() + seconds

    def busy() -> None:  # a request's worth of Python on the loop, then a short gap
        end = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < end:
            pass
        if time.monotonic() < stop:
            loop.call_later(0.0005, busy)

    if busy_ms > 0:
        for _ in range(2):
            loop.call_soon(busy)
    took: list[float] = []

    async def client() -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            await workers.chat()
            took.append(time.perf_counter() - start)

    await asyncio.gather(*(client() for _ in range(clients)))
    workers.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--render-ms", type=float, default=10.0)
    ap.add_argument("--busy-ms", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    sys.setswitchinterval(ServerConfig().gil_switch_interval / 1000)
    rw._serve = _fake_serve(args.render_ms / 1000)  # what the forked workers run
    workers = rw.RenderWorkers.fork(args.workers, ServerConfig(), "turnaround", [])
    took = sorted(asyncio.run(_drive(workers, args.clients, args.busy_ms, args.seconds)))
    ideal = args.workers / (args.render_ms / 1000)
    print(
        f"{os.cpu_count()} CPUs {platform.machine()}, Python {platform.python_version()}: "
        f"{args.workers} workers, {args.clients} clients, render {args.render_ms:g} ms, "
        f"busy {args.busy_ms:g} ms: {len(took) / args.seconds:.1f} chats/s "
        f"(ideal {ideal:.0f}), median {statistics.median(took) * 1e3:.2f} ms, "
        f"p90 {took[int(len(took) * 0.9)] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
