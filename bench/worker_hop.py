"""The render-worker hop beside a busy event loop: how fast a photo's patches come back from a
render worker while the API server's loop thread keeps the GIL busy, and how late the loop
runs meanwhile.

A forked child plays the worker: for each request it answers with a 1024x768 photo's uint8
patches, through ``apiserver.render_workers``' own framing: (3996, 588), 2.35 MB, the one frame
that travels where the engine repeats it (``Ready.uint8_one_frame``), or with
``--patch-width 1176`` the processor's two-frame rows (4.7 MB).
In the parent, a thread does the exchanges (``_exchange``, as the server's render-io threads
do) while the main thread runs Python in short slices, as a loop thread busy with requests
does, under the server's GIL switch interval. Both readers in one run: the server's
(``recv_into`` with ``MSG_WAITALL``: one GIL round trip a message) and plain reads (one per
socket-buffer's worth, each waiting for the busy thread to let go of the GIL).

Usage: python -m bench.worker_hop [--rounds 60] [--patch-width 588] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import threading
import time
from typing import Any

import torch

from apiserver import render_workers as rw
from apiserver.config import ServerConfig

#: Patch rows of a 1024x768 photo for the Qwen2-VL processor.
_ROWS = 3996


class _PlainReads:
    """The socket with MSG_WAITALL taken off its reads: each returns what the kernel holds."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv_into(self, view: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self._sock.recv_into(view, nbytes, flags & ~socket.MSG_WAITALL)

    def sendmsg(self, buffers: Any) -> int:
        return self._sock.sendmsg(buffers)


def _worker(sock: socket.socket, width: int) -> None:
    patches = torch.randint(0, 256, (_ROWS, width), dtype=torch.uint8)
    while True:
        try:
            rw._recv(sock)
        except rw.WorkerLost:
            return
        rw._send(sock, ("ok", patches, 0.0))


def _run(sock: Any, rounds: int, width: int) -> dict[str, float]:
    took: list[float] = []
    done = threading.Event()

    def exchanges() -> None:
        for _ in range(rounds):
            start = time.perf_counter()
            status, patches, _ = rw._exchange(sock, ("chat", ()))
            assert status == "ok" and patches.shape == (_ROWS, width)
            took.append(time.perf_counter() - start)
        done.set()

    slices: list[float] = []
    io = threading.Thread(target=exchanges)
    io.start()
    while not done.is_set():  # the busy loop thread
        start = time.perf_counter()
        x = 0
        for i in range(3000):
            x += i
        slices.append(time.perf_counter() - start)
    io.join()
    slices.sort()
    mb = _ROWS * width / 1e6
    return {
        "ms": statistics.median(took) * 1e3,
        "gbps": mb / statistics.median(took) / 1e3,
        "slice_p50": statistics.median(slices) * 1e3,
        "slice_p99": slices[int(len(slices) * 0.99)] * 1e3,
        "slice_max": slices[-1] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--patch-width", type=int, default=588, help="values per patch row")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args()
    switch_ms = ServerConfig().gil_switch_interval
    sys.setswitchinterval(switch_ms / 1000)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _worker(theirs, args.patch_width)
        os._exit(0)
    theirs.close()
    rows = []
    for name, sock in (("MSG_WAITALL (the server's)", ours), ("plain reads", _PlainReads(ours))):
        _run(sock, 3, args.patch_width)  # warm-up
        rows.append((name, _run(sock, args.rounds, args.patch_width)))
    ours.close()
    os.waitpid(pid, 0)
    base = rows[1][1]["ms"]
    lines = [
        "# Render-worker hop beside a busy event loop",
        "",
        f"- Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; GIL switch interval "
        f"{switch_ms} ms (the server's default)",
        f"- Command: `python -m bench.worker_hop --rounds {args.rounds} "
        f"--patch-width {args.patch_width}`",
        f"- One photo's uint8 patches ({_ROWS} x {args.patch_width}, "
        f"{_ROWS * args.patch_width / 1e6:.2f} MB) per exchange, median of the rounds; a "
        "slice of the busy thread is 3,000 additions in Python.",
        "",
        "| reader | ms per photo | GB/s | vs plain | busy thread's slice p50 / p99 / max (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['ms']:.2f} | {r['gbps']:.2f} | {base / r['ms']:.1f}x | "
            f"{r['slice_p50']:.3f} / {r['slice_p99']:.3f} / {r['slice_max']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
