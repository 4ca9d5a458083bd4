"""The /health side probe of a run: one request every interval on a fresh connection (as a
load balancer's health check), started on schedule without waiting for the previous one, so
that a blocked event loop shows in proportion to how long it blocks. At most 64 probes are in
flight; each is bounded by a timeout and one that fails or times out is counted, not timed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

from bench.http_client import Client, HttpError, request_bytes
from bench.target import Target

_TIMEOUT_S = 10.0
_MAX_IN_FLIGHT = 64


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
