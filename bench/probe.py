"""The /health side probe of a run: one request every interval on a fresh connection (as a
load balancer's health check), started on schedule without waiting for the previous one, so
that a blocked event loop shows in proportion to how long it blocks. At most 64 probes are in
flight; each is bounded by a timeout and one that fails or times out is counted, not timed.

The probe runs in a process of its own (``python -m bench.probe``), as a balancer's checks
come from elsewhere: the load generator's one event loop sends hundreds of requests a second
(data-URL uploads, streamed replies), and a probe on that loop would time the generator's own
lag beside the server's. The parent sends the probe's settings as one JSON line on the
child's stdin when the window opens and closes stdin when it closes; the child then writes
its results as one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench.aio import run_async, within
from bench.http_client import Client, HttpError, request_bytes
from bench.target import Target

_TIMEOUT_S = 10.0
_MAX_IN_FLIGHT = 64
#: How long the child may take to start and, after the window, to report.
_CHILD_GRACE_S = 30.0


class _Reply:
    __slots__ = ("status", "server")

    def __init__(self) -> None:
        self.status = 0
        self.server = ""

    def on_head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.server = headers.get("x-fanin-server", "")

    def on_body(self, data: bytes, now: float) -> None:
        pass


class HealthProbe:
    """Latencies (s) of the answered probes, the failed count, answers per API server."""

    def __init__(self, target: Target, headers: Sequence[tuple[str, str]], interval_s: float):
        self._settings = {
            "target": asdict(target),
            "headers": list(headers),
            "interval_s": interval_s,
        }
        self.latencies: list[float] = []
        self.failed = 0
        self.servers: Counter[str] = Counter()

    async def run(self, opened: asyncio.Event, closed: asyncio.Event) -> None:
        """Start the probing process now (its start-up stays out of the window), probe from
        ``opened`` until ``closed``, then take its results. Cancelled, the process is killed."""
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.probe",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            await opened.wait()
            # The settings go on stdin, not argv: they hold the API key.
            child.stdin.write(json.dumps(self._settings).encode() + b"\n")
            await child.stdin.drain()
            await closed.wait()
            child.stdin.close()
            line = await within(child.stdout.readline(), _TIMEOUT_S + _CHILD_GRACE_S)
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
        if not line:
            raise RuntimeError(f"the /health probe process exited {child.returncode} silently")
        result = json.loads(line)
        self.latencies, self.failed = result["latencies"], result["failed"]
        self.servers = Counter(result["servers"])


class _Prober:
    """The probing itself, inside the child process."""

    def __init__(self, target: Target, headers: Sequence[tuple[str, str]], interval_s: float):
        self._client = Client(target, keep_alive=False)
        self._parts = request_bytes(target, "GET", "/health", (), headers, keep_alive=False)
        self._interval = interval_s
        self.latencies: list[float] = []
        self.failed = 0
        self.servers: Counter[str] = Counter()

    async def run(self, stop: asyncio.Event) -> None:
        """Probe until ``stop`` is set, then let the probes in flight finish."""
        pending: set[asyncio.Task[None]] = set()
        next_at = time.perf_counter()
        while not stop.is_set():
            if len(pending) < _MAX_IN_FLIGHT:
                task = asyncio.create_task(self._once())
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_at = max(next_at + self._interval, time.perf_counter())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stopped}, timeout=next_at - time.perf_counter())
            stopped.cancel()
        if pending:
            await asyncio.wait(set(pending), timeout=_TIMEOUT_S + 1)
        self._client.close()

    async def _once(self) -> None:
        reply = _Reply()
        start = time.perf_counter()
        try:
            await self._client.request(self._parts, reply, _TIMEOUT_S)
        except HttpError:
            self.failed += 1
            return
        if reply.status != 200:
            self.failed += 1
            return
        self.latencies.append(time.perf_counter() - start)
        self.servers[reply.server or "?"] += 1


async def _probe_until_eof(settings: dict[str, Any]) -> dict[str, Any]:
    prober = _Prober(
        Target(**settings["target"]),
        [tuple(h) for h in settings["headers"]],
        settings["interval_s"],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The parent closes stdin when the window closes (or dies): EOF is the stop signal.
    eof = loop.run_in_executor(None, sys.stdin.buffer.read)
    eof.add_done_callback(lambda _: stop.set())
    await prober.run(stop)
    return {"latencies": prober.latencies, "failed": prober.failed, "servers": prober.servers}


def main() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the run ended before its window opened
    result = run_async(_probe_until_eof(json.loads(line)))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
