"""`make soak` (issue 13): half an hour of mixed traffic against `fanin serve`, then the checks
that nothing leaked. Not in CI (it runs for half an hour); its record is bench/results/soak.md.

    python -m bench.soak [MODEL] [--minutes 30] [--api-server-count 2] [--result-dir DIR]

The load comes in one-minute segments, each a `fanin bench` run (Poisson arrivals, photos and
ShareGPT prompts mixed, streamed, every photo distinct over the whole soak):

- the steady rate is ``STEADY_SHARE`` of what a closed loop of ``CALIBRATION_CLIENTS``
  completes in the first segment; a steady and a burst segment follow as the warm-up;
- ``BURSTS`` segments spread over the run are bursts at twice the steady rate (some 429s are
  the expected answer there);
- beside the segments, clients that leave: about every ``LEAVER_INTERVAL_S`` a streamed
  request whose connection is closed at a random moment (before any answer, or mid-stream);
- at the start of the middle segment one API server is SIGKILLed; the launcher respawns it.

Every ``SAMPLE_S``: each process's RSS and open file descriptors, and the engine's running,
waiting, KV usage and encoder-cache bytes from /metrics. The checks, once the load stopped
and the engine drained (bounded): engine running + waiting = 0 and KV usage back to its value
before the load; every process that lived through the run within ``RSS_GROWTH`` of its RSS
after the warm-up (the engine also within its encoder cache's budget, which the distinct
photos fill, and its RSS less that cache flat over the second half of the run) and within
``FD_SLACK`` descriptors of its count then; the
respawned server against the one it replaced; no 5xx, no timeouts, connection errors only
in the segment of the kill. The exit code is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from bench import proc
from bench.aio import run_async, within
from bench.cli import fetch_model, raise_open_files_limit, write_text
from bench.config import BenchConfig
from bench.http_client import Client, HttpError, fetch, request_bytes
from bench.images import DistinctImages
from bench.metrics import latency_summary
from bench.runner import Run
from bench.serve import ServedFanin
from bench.workload import Workload, images_needed

SEGMENT_S = 60.0
CALIBRATION_CLIENTS = 16
CALIBRATION_MAX_REQUESTS = 10_000
STEADY_SHARE = 0.5
BURSTS = 3
LEAVER_INTERVAL_S = 0.5
SAMPLE_S = 10.0
RSS_GROWTH = 0.10
#: The engine's RSS over the run's second half may vary by this share at most.
FLAT_SHARE = 0.02
ENGINE = "fanin-engine-core"
#: ``--encoder-cache-bytes`` the soak serves with (fanin's default), in MB.
ENCODER_CACHE_MB = 256
FD_SLACK = 8
DRAIN_TIMEOUT_S = 60.0
_PATH = "/v1/chat/completions"


@dataclass
class Sample:
    at: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    engine: dict[str, float]


@dataclass
class Segment:
    name: str
    rate: float
    outcomes: dict[str, int] = field(default_factory=dict)
    health_p99_ms: float = 0.0


class _Offset:
    """A window of the soak's one photo set, so that each segment's photos are new."""

    def __init__(self, images: DistinctImages, start: int, capacity: int) -> None:
        self._images, self._start, self.capacity = images, start, capacity

    def base64(self, index: int) -> list[bytes]:
        return self._images.base64(self._start + index)


def _outcome(record: Any) -> str:
    if record.success:
        return "ok"
    if record.status:
        return str(record.status)
    return record.error.split(":", 1)[0] or "error"  # timeout, connection, stream, cancelled


def _processes(root: int) -> dict[str, int]:
    """The server's processes by title (fanin-engine-core, fanin-api-server-N, ...)."""
    return {proc.process_name(pid): pid for pid in [root, *proc.descendants(root)]}


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Soak:
    def __init__(self, args: argparse.Namespace, server: ServedFanin) -> None:
        self.args = args
        self.server = server
        self.samples: list[Sample] = []
        self.segments: list[Segment] = []
        self.events: list[str] = []
        self.leavers = 0
        self._start = time.monotonic()
        self._client = Client(server.target, keep_alive=False)

    def _log(self, what: str) -> None:
        line = f"[{time.monotonic() - self._start:7.1f} s] {what}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)

    def _config(self, **kw: Any) -> BenchConfig:
        return BenchConfig(
            base_url=self.server.target.origin,
            dataset=self.args.dataset,
            image_size=self.args.image_size,
            output_len=self.args.output_len,
            ignore_eos=True,
            request_timeout=self.args.request_timeout,
            progress=False,
            seed=len(self.segments),
            **kw,
        )

    async def engine_metrics(self) -> dict[str, float]:
        status, body = await fetch(self._client, "/metrics", [], timeout=10.0)
        if status != 200:
            return {}
        wanted = {
            "fanin_engine_running",
            "fanin_engine_waiting",
            "fanin_engine_kv_cache_usage",
            "fanin_engine_encoder_cache_bytes",
        }
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name in wanted:
                    found[s.name.removeprefix("fanin_engine_")] = s.value
        return found

    async def sample(self) -> Sample:
        procs = _processes(self.server.pid)
        engine: dict[str, float] = {}
        with contextlib.suppress(HttpError):
            engine = await self.engine_metrics()
        s = Sample(
            time.monotonic() - self._start,
            {name: _rss_mb(pid) for name, pid in procs.items()},
            {name: _fds(pid) for name, pid in procs.items()},
            engine,
        )
        self.samples.append(s)
        return s

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            await self.sample()

    async def segment(self, name: str, rate: float, images: DistinctImages, first: int) -> int:
        """One segment at ``rate`` (inf: the calibration's closed loop); photos from ``first``
        on. Returns the photos it used."""
        paced = math.isfinite(rate)
        num = int(rate * SEGMENT_S * 1.5) + 10 if paced else CALIBRATION_MAX_REQUESTS
        config = self._config(
            num_prompts=num,
            duration=SEGMENT_S,
            request_rate=rate,
            max_concurrency=None if paced else CALIBRATION_CLIENTS,
        )
        used = images_needed(config, num)
        window = _Offset(images, first, used)
        workload = Workload(config, self.model, window)  # type: ignore[arg-type]
        result = await Run(config, self.server.target, workload).execute()
        seg = Segment(name, rate)
        for r in result.records:
            key = _outcome(r)
            seg.outcomes[key] = seg.outcomes.get(key, 0) + 1
        seg.health_p99_ms = latency_summary(result.health_s, result.health_failed)["p99_ms"]
        self.segments.append(seg)
        self._log(
            f"{name} at {rate:.2f} req/s: {seg.outcomes}, /health p99 {seg.health_p99_ms:.1f} ms"
        )
        return used

    async def _leavers(self, images: DistinctImages, first: int) -> None:
        """Streamed requests whose clients close the connection at a random moment."""
        count = int(self.args.minutes * 60 / LEAVER_INTERVAL_S * 1.5)
        config = self._config(num_prompts=count, duration=self.args.minutes * 60)
        workload = Workload(config, self.model, _Offset(images, first, images.capacity - first))  # type: ignore[arg-type]
        target = self.server.target
        headers = [("Content-Type", "application/json"), ("Accept", "text/event-stream")]
        rng = random.Random(7)
        for i in range(len(workload)):
            await asyncio.sleep(rng.expovariate(1 / LEAVER_INTERVAL_S))
            parts = request_bytes(target, "POST", _PATH, workload.body(i), headers, False)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                reader, writer = await within(
                    asyncio.open_connection(target.connect_host, target.port), 5.0
                )
                try:
                    writer.writelines(parts)
                    await writer.drain()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(reader.read(1 << 20), rng.uniform(0.0, 2.0))
                finally:
                    writer.transport.abort()  # a client that leaves without a goodbye
            self.leavers += 1

    def kill_one_server(self) -> None:
        procs = _processes(self.server.pid)
        name = "fanin-api-server-0"
        pid = procs.get(name)
        if pid is None:
            self._log(f"no {name} to kill: {sorted(procs)}")
            return
        os.kill(pid, signal.SIGKILL)
        self.killed = (name, pid)
        self._log(f"SIGKILLed {name} (pid {pid})")

    async def idle_kv_usage(self) -> float:
        """KV usage before any load (the gauge appears with the engine's first heartbeat)."""
        for _ in range(20):
            found = (await self.engine_metrics()).get("kv_cache_usage")
            if found is not None:
                return found
            await asyncio.sleep(0.5)
        return math.nan

    async def drained(self) -> dict[str, float]:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            engine = await self.engine_metrics()
            idle = engine.get("running", 1) + engine.get("waiting", 1) == 0
            if idle and engine.get("kv_cache_usage", 1) == self.idle_kv:
                return engine
            if time.monotonic() > deadline:
                return engine
            await asyncio.sleep(1.0)

    async def run(self) -> dict[str, Any]:
        args = self.args
        self.model = await fetch_model(self.server.target, None, None)
        self.idle_kv = await self.idle_kv_usage()
        # Photos for the whole soak at twice the steady rate's worst case, distinct throughout.
        width, height = (int(v) for v in args.image_size.split("x"))
        images = DistinctImages(width, height, 400_000)
        first = 0
        await self.sample()
        sampler = asyncio.create_task(self._sampler())
        first += await self.segment("calibration", math.inf, images, first)
        calibrated = self.segments[-1].outcomes.get("ok", 0) / SEGMENT_S
        steady = max(0.5, STEADY_SHARE * calibrated)
        self._log(
            f"closed loop of {CALIBRATION_CLIENTS}: {calibrated:.2f} req/s; steady {steady:.2f}"
        )
        # The warm-up sees the heaviest load of the run (a burst), so that what the allocators
        # keep after a peak is in the baseline and growth past it is what is measured.
        first += await self.segment("warm-up: steady", steady, images, first)
        first += await self.segment("warm-up: burst", 2 * steady, images, first)
        warm = await self.sample()
        leavers = asyncio.create_task(self._leavers(images, 300_000))
        total = max(3, int(args.minutes * 60 / SEGMENT_S) - 3)
        kill_at = total // 2
        others = [k for k in range(total) if k != kill_at]
        spread = (round((len(others) - 1) * (j + 1) / (BURSTS + 1)) for j in range(BURSTS))
        bursts = {others[i] for i in spread}
        for k in range(total):
            if k == kill_at:
                self.kill_one_server()
            name = "burst" if k in bursts else ("kill" if k == kill_at else "steady")
            first += await self.segment(name, steady * (2 if k in bursts else 1), images, first)
        leavers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leavers
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        self._log(f"load stopped; {self.leavers} clients left mid-request; draining")
        engine = await self.drained()
        await asyncio.sleep(SAMPLE_S)  # connections close, buffers go back
        end = await self.sample()
        return self.report(warm, end, engine, calibrated, steady)

    def report(
        self, warm: Sample, end: Sample, engine: dict[str, float], calibrated: float, steady: float
    ) -> dict[str, Any]:
        checks: list[tuple[str, bool]] = []
        running = engine.get("running", math.nan) + engine.get("waiting", math.nan)
        checks.append((f"engine running + waiting = {running:g} (0)", running == 0))
        kv = engine.get("kv_cache_usage", math.nan)
        checks.append(
            (f"KV usage {kv:g}, idle before the load {self.idle_kv:g}", kv == self.idle_kv)
        )
        killed = getattr(self, "killed", None)
        for name, before in warm.rss_mb.items():
            after = end.rss_mb.get(name, math.nan)
            same = killed is None or name != killed[0]
            label = name if same else f"{name} (respawned) against the one killed"
            # The engine's encoder cache fills up to its budget with the soak's distinct
            # photos (then evicts): memory that is meant to stay, on top of the allowance.
            extra = ENCODER_CACHE_MB if name == ENGINE else 0.0
            bound = f"+{RSS_GROWTH:.0%}" + (f" + {extra:.0f} MB of encoder cache" if extra else "")
            checks.append(
                (
                    f"{label}: RSS {before:.0f} -> {after:.0f} MB (at most {bound})",
                    after <= before * (1 + RSS_GROWTH) + extra,
                )
            )
            fd_before, fd_after = warm.fds.get(name, -1), end.fds.get(name, -1)
            checks.append(
                (
                    f"{label}: open fds {fd_before} -> {fd_after} (at most +{FD_SLACK})",
                    0 <= fd_after <= fd_before + FD_SLACK,
                )
            )
        # Growth that has stopped is a high-water mark; growth that goes on is a leak. The
        # encoder cache may still be filling towards its budget: that is not a leak.
        late = [x for x in self.samples if x.at >= end.at / 2]
        if late:
            cache = [x.engine.get("encoder_cache_bytes", 0.0) / 2**20 for x in late]
            rest = [x.rss_mb.get(ENGINE, math.nan) - c for x, c in zip(late, cache, strict=True)]
            checks.append(
                (
                    f"{ENGINE}: RSS less its encoder cache ({min(cache):.0f}..{max(cache):.0f} "
                    f"MB) over the second half {min(rest):.0f}..{max(rest):.0f} MB "
                    f"(flat within {FLAT_SHARE:.0%})",
                    max(rest) <= min(rest) * (1 + FLAT_SHARE),
                )
            )
        if killed is not None:
            respawned = _processes(self.server.pid).get(killed[0])
            checks.append(
                (
                    f"{killed[0]} respawned (pid {killed[1]} -> {respawned})",
                    respawned not in (None, killed[1]),
                )
            )
        bad = {"5xx": 0, "timeout": 0, "connection outside the kill": 0}
        for seg in self.segments:
            for key, n in seg.outcomes.items():
                if key.startswith("5"):
                    bad["5xx"] += n
                elif key == "timeout":
                    bad["timeout"] += n
                elif key == "connection" and seg.name != "kill":
                    bad["connection outside the kill"] += n
        for key, n in bad.items():
            checks.append((f"{key}: {n}", n == 0))
        return {
            "args": vars(self.args),
            "calibrated_req_s": calibrated,
            "steady_req_s": steady,
            "leavers": self.leavers,
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "samples": [dataclasses.asdict(s) for s in self.samples],
            "events": self.events,
            "checks": [{"what": w, "ok": ok} for w, ok in checks],
        }


def markdown(result: dict[str, Any], command: str) -> str:
    args = result["args"]
    lines = [
        "## fanin soak",
        "",
        f"- Command: `{command}`",
        f"- {args['minutes']:g} minutes; `--api-server-count {args['api_server_count']}`; "
        f"dataset {args['dataset']}, photos {args['image_size']}, {args['output_len']} output "
        f"tokens; closed loop of {CALIBRATION_CLIENTS}: {result['calibrated_req_s']:.2f} req/s, "
        f"steady {result['steady_req_s']:.2f} req/s, bursts at 2x; "
        f"{result['leavers']} clients left mid-request.",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {c['what']} | {'ok' if c['ok'] else '**FAILED**'} |" for c in result["checks"]),
        "",
        "| segment | rate req/s | outcomes | /health p99 ms |",
        "|---|---:|---|---:|",
    ]
    for seg in result["segments"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(seg["outcomes"].items()))
        rate = "closed loop" if not math.isfinite(seg["rate"]) else f"{seg['rate']:.2f}"
        lines.append(f"| {seg['name']} | {rate} | {outcomes} | {seg['health_p99_ms']:.1f} |")
    names = sorted({n for s in result["samples"] for n in s["rss_mb"]})
    lines += [
        "",
        "RSS MB / open fds per process, every few samples:",
        "",
        "| s | " + " | ".join(names) + " | engine running / waiting / KV |",
        "|---:|" + "---:|" * (len(names) + 1),
    ]
    samples = result["samples"]
    step = max(1, len(samples) // 20)
    for s in [*samples[::step], samples[-1]]:
        cells = [
            f"{s['rss_mb'][n]:.0f} / {s['fds'][n]}" if n in s["rss_mb"] else "-" for n in names
        ]
        e = s["engine"]
        engine = (
            f"{e.get('running', 0):g} / {e.get('waiting', 0):g} / {e.get('kv_cache_usage', 0):.3f}"
        )
        lines.append(f"| {s['at']:.0f} | " + " | ".join(cells) + f" | {engine} |")
    lines += ["", "Events:", "", *(f"- {e}" for e in result["events"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", nargs="?", help="model directory (default: fanin's default)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--api-server-count", default="2")
    parser.add_argument("--dataset", default="image:0.4,sharegpt:0.6")
    parser.add_argument("--image-size", default="512x384")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--result-dir", default="soak-results")
    args = parser.parse_args(argv)
    if args.minutes < 6:
        parser.error("--minutes: at least 6 (calibration, warm-up, a burst, a kill, a steady one)")
    raise_open_files_limit()
    out = Path(args.result_dir)
    server = ServedFanin.start(
        args.model,
        [
            *("--api-server-count", args.api_server_count),
            *("--encoder-cache-bytes", str(ENCODER_CACHE_MB << 20)),
        ],
        out / "serve.log",
    )
    try:
        why = run_async(server.wait_ready(300.0))
        if why is not None:
            print(f"soak: the server {why}\n{server.log_tail()}", file=sys.stderr)
            return 1
        result = run_async(Soak(args, server).run())
    finally:
        stop = server.stop(60.0)
    result["stop"] = {"exit_code": stop.exit_code, "killed": stop.killed}
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command)
    write_text(out / "soak.json", msgspec.json.format(msgspec.json.encode(result)).decode())
    write_text(out / "soak.md", text)
    print(text)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
