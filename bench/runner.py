"""One run of the load generator: send the workload's requests on schedule, record every
chunk's arrival, probe /health, and sample CPU time around the measured window.

Arrivals are vLLM's: gaps drawn from a gamma distribution of shape ``burstiness`` and mean
``1 / request_rate`` (Poisson at 1), or none at an infinite rate; ``max_concurrency`` caps the
requests in flight (arrivals that find no free slot wait for one, in order). With an infinite
rate and a cap this is a closed loop of that many clients.

Phases: requests sent in the first ``warmup_seconds`` are warm-up and left out of every
number. The measured window opens then and the run stops sending at ``warmup_seconds +
duration`` or after ``num_prompts`` requests in all, whichever is first; the window closes
when the last measured request has finished (as vLLM's duration runs to the last response),
and each request is bounded by ``request_timeout``. Because that tail, with fewer requests in
flight, is part of vLLM's duration, the completions between the window's opening and the end
of sending are also counted (bench/metrics.py ``served_in_window``): the steady rate a closed
loop sees. CPU time of the server's process tree and of this process is sampled when the
window opens and closes, and so is the server's /metrics (bench/server_stages.py); the /health
probe (bench/probe.py) runs while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from bench import proc, server_stages
from bench.aio import within
from bench.config import BenchConfig
from bench.http_client import Client, HttpError, HttpTimeout, fetch, request_bytes
from bench.metrics import RequestRecord
from bench.probe import HealthProbe
from bench.progress import Progress
from bench.stream import StreamHandler
from bench.target import Target
from bench.workload import Workload

_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class RunResult:
    """Everything a run observed; the numbers are made from it in bench/report.py."""

    records: list[RequestRecord]
    window_start: float
    window_end: float  # the last measured request's end (vLLM's end of the benchmark)
    sending_end: float  # when the run stopped sending: the measured window's end
    health_s: list[float] = field(default_factory=list)
    health_failed: int = 0
    health_servers: dict[str, int] = field(default_factory=dict)
    server_cpu: tuple[proc.CpuSample, proc.CpuSample] | None = None
    generator_cpu: tuple[proc.CpuSample, proc.CpuSample] | None = None
    num_connects: int = 0
    #: Server-side mean milliseconds per stage over the window (empty: no fanin /metrics).
    server_stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def measured(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.is_warmup]

    @property
    def duration(self) -> float:
        return max(0.0, self.window_end - self.window_start)


def auth_headers(api_key: str | None) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {api_key}")] if api_key else []


class Run:
    """``await Run(...).execute()`` sends the workload once."""

    def __init__(
        self,
        config: BenchConfig,
        target: Target,
        workload: Workload,
        server_root: int | None = None,
        api_key: str | None = None,
        give_up_at: float = math.inf,
    ) -> None:
        self.config = config
        self.target = target
        self.workload = workload
        # perf_counter time past which requests still in flight are cancelled (a sweep's
        # --time-budget); each counts as failed.
        self.give_up_at = give_up_at
        self.server_root = server_root
        self._client = Client(target, keep_alive=config.keep_alive)
        self._auth = auth_headers(api_key)
        self._headers = [
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            *self._auth,
        ]
        self._path = _PATHS[config.endpoint_type]
        self._records: list[RequestRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._measured_in_flight = 0
        self._is_sending = True
        self._finished = 0
        self._failed = 0
        self._window_open = asyncio.Event()
        self._window_closed = asyncio.Event()
        self._warm_end = self._stop_at = 0.0  # set when the run starts
        self._window_start = 0.0
        self._window_end = 0.0
        self._last_measured_end = 0.0
        self._server_cpu: list[proc.CpuSample] = []
        self._generator_cpu: list[proc.CpuSample] = []
        self._scrapes: list[asyncio.Task[server_stages.Scrape | None]] = []
        self._probe = HealthProbe(target, self._auth, config.health_interval_ms / 1000)
        seconds = config.warmup_seconds + config.duration
        self._progress = Progress(len(workload), seconds, config.progress)

    async def execute(self) -> RunResult:
        cfg = self.config
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        self._warm_end = start + cfg.warmup_seconds
        self._stop_at = self._warm_end + cfg.duration
        opener = None
        if cfg.warmup_seconds:
            opener = loop.call_later(cfg.warmup_seconds, self._open_window)
        else:
            self._open_window()
        ticker = asyncio.create_task(self._tick())
        prober = None
        if cfg.health_interval_ms:
            probing = self._probe.run(self._window_open, self._window_closed)
            prober = asyncio.create_task(probing)
        try:
            await self._send_all()
            self._is_sending = False
            sending_end = time.perf_counter()
            if self._tasks:
                left = min(cfg.request_timeout + 10, self.give_up_at - time.perf_counter())
                await asyncio.wait(set(self._tasks), timeout=max(0.0, left))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._window_open.is_set():
                self._close_window()
        finally:
            if opener is not None:
                opener.cancel()
            ticker.cancel()
            if prober is not None:
                self._window_closed.set()
                if not self._window_open.is_set():
                    prober.cancel()  # still waiting for a window that never opened
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
            self._client.close()
            scrapes = await asyncio.gather(*self._scrapes)
            self._progress.update("done", self._finished, self._failed, force=True)
            self._progress.close()
        if not self._window_open.is_set() or not any(not r.is_warmup for r in self._records):
            done = sum(1 for r in self._records if r.success)
            raise RuntimeError(
                f"no request went out in the measured window: {len(self._records)} went out "
                f"in the warm-up ({done} of them completed); lengthen --duration (or raise "
                "--num-prompts)"
            )
        cpu = self._server_cpu
        gen = self._generator_cpu
        stages = {}
        if len(scrapes) == 2 and scrapes[0] is not None and scrapes[1] is not None:
            stages = server_stages.means_ms(scrapes[0], scrapes[1])
        return RunResult(
            records=self._records,
            window_start=self._window_start,
            window_end=self._last_measured_end or self._window_end,
            sending_end=sending_end,
            health_s=self._probe.latencies,
            health_failed=self._probe.failed,
            health_servers=dict(self._probe.servers),
            server_cpu=(cpu[0], cpu[1]) if len(cpu) == 2 else None,
            generator_cpu=(gen[0], gen[1]) if len(gen) == 2 else None,
            num_connects=self._client.num_connects,
            server_stages_ms=stages,
        )

    async def _send_all(self) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed + 1)  # arrivals: apart from the dataset's draws
        slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        is_paced = math.isfinite(cfg.request_rate)
        scale = 1.0 / (cfg.request_rate * cfg.burstiness) if is_paced else 0.0
        next_at = time.perf_counter()
        for i in range(len(self.workload)):
            if is_paced and i:
                next_at += float(rng.gamma(cfg.burstiness, scale))
                delay = min(next_at, self._stop_at) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if slots is not None:
                left = self._stop_at - time.perf_counter()
                try:
                    await within(slots.acquire(), max(0.0, left))
                except asyncio.TimeoutError:
                    return
            now = time.perf_counter()
            if now >= self._stop_at:
                if slots is not None:
                    slots.release()
                return
            task = asyncio.create_task(self._send(i, now < self._warm_end, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, i: int, is_warmup: bool, slots: asyncio.Semaphore | None) -> None:
        request = self.workload.requests[i]
        record = RequestRecord(request.kind, is_warmup)
        self._records.append(record)
        handler = StreamHandler(record)
        keep_alive = self.config.keep_alive
        parts = request_bytes(
            self.target, "POST", self._path, self.workload.body(i), self._headers, keep_alive
        )
        if not is_warmup:
            self._measured_in_flight += 1
        record.start = time.perf_counter()
        try:
            await self._client.request(parts, handler, self.config.request_timeout)
            handler.finish()
        except HttpTimeout as e:
            record.error = f"timeout: {e}"
        except HttpError as e:
            record.error = f"connection: {e}"
        except ValueError as e:  # the stream broke its format (bench/stream.py)
            record.error = str(e) if str(e).startswith("stream:") else f"stream: {e}"
        except asyncio.CancelledError:
            record.error = "cancelled: still in flight when the run's time was up"
            raise
        finally:
            if slots is not None:
                slots.release()
            self._finished += 1
            self._failed += not record.success
            if not is_warmup:
                self._measured_in_flight -= 1
                self._last_measured_end = time.perf_counter()
                if not self._is_sending and not self._measured_in_flight:
                    self._close_window()

    def _open_window(self) -> None:
        self._window_start = time.perf_counter()
        if self.server_root is not None:
            self._server_cpu.append(proc.tree_cpu(self.server_root))
        self._generator_cpu.append(proc.self_cpu())
        self._scrapes.append(asyncio.ensure_future(self._scrape()))
        self._window_open.set()

    def _close_window(self) -> None:
        if self._window_closed.is_set():
            return
        self._window_end = time.perf_counter()
        if self.server_root is not None and self._server_cpu:
            self._server_cpu.append(proc.tree_cpu(self.server_root))
        self._generator_cpu.append(proc.self_cpu())
        self._scrapes.append(asyncio.ensure_future(self._scrape()))
        self._window_closed.set()

    async def _scrape(self) -> server_stages.Scrape | None:
        """The server's /metrics histograms now; None where it has none (not fanin, an error)."""
        client = Client(self.target, keep_alive=False)
        try:
            status, body = await fetch(client, "/metrics", self._auth, timeout=5.0)
        except HttpError:
            return None
        finally:
            client.close()
        return server_stages.parse(body.decode(errors="replace")) if status == 200 else None

    async def _tick(self) -> None:
        while True:
            if not self._window_open.is_set():
                phase = "warm-up"
            elif self._is_sending:
                phase = "measure"
            else:
                phase = "drain"
            self._progress.update(phase, self._finished, self._failed)
            await asyncio.sleep(0.25)
