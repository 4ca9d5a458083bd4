"""Image requests per second end to end: ``fanin serve`` on loopback, closed-loop clients each
sending a distinct photo (a crop of a scikit-image sample at 1024x768, JPEG, as a data URL) and
asking for a fixed number of output tokens, with the GPU's utilisation sampled meanwhile.

    python bench/engine_e2e.py --model DIR --out OUT_DIR [--api-server-count 4]
        [--renderer-num-workers 2] [--clients 64] [--tokens 16] [--warmup 3] [--duration 15]

Every load loop is bounded in requests and in time; traffic stays on 127.0.0.1. The server
runs with OMP_NUM_THREADS=1 (each process would otherwise start a thread per core). Writes
OUT_DIR/e2e.json and OUT_DIR/serve.log, and prints one summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import io
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"
SIZE = (1024, 768)
MODEL_NAME = "fanin-e2e"
#: The figures this run stands beside (issue 11): today's engine and the compute floor, H200.
TODAY_REQ_S, FLOOR_REQ_S = 23.0, 73.0


def photo_urls(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct 1024x768 JPEG data URLs: random crops of upscaled skimage photos."""
    import skimage.data

    bases = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        skimage.data.hubble_deep_field(),
        skimage.data.retina(),
        skimage.data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(seed)
    urls = []
    for i in range(count):
        base = Image.fromarray(bases[i % len(bases)]).convert("RGB")
        dx, dy = (int(v) for v in rng.integers(1, 200, size=2))
        big = base.resize((SIZE[0] + dx, SIZE[1] + dy))
        crop = big.crop((dx, dy, dx + SIZE[0], dy + SIZE[1]))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


class GpuSampler:
    """``nvidia-smi`` utilisation samples every 200 ms while running (none without it)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        cmd = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.monotonic(), util, mem))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)

    def between(self, t0: float, t1: float) -> list[float]:
        return [u for t, u, _ in self.samples if t0 <= t <= t1]


async def _client(
    http: httpx.AsyncClient,
    urls: list[str],
    next_url: list[int],
    args: argparse.Namespace,
    stop_at: float,
    done: list[dict[str, Any]],
) -> None:
    while time.monotonic() < stop_at and next_url[0] < len(urls):
        url = urls[next_url[0]]
        next_url[0] += 1
        body = {
            "model": MODEL_NAME,
            "max_tokens": args.tokens,
            "ignore_eos": True,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Describe the picture."},
                    ],
                }
            ],
        }
        start = time.monotonic()
        try:
            r = await http.post("/v1/chat/completions", json=body, timeout=120)
            ok = r.status_code == 200
            tokens = r.json().get("usage", {}).get("completion_tokens", 0) if ok else 0
            server = r.headers.get("x-fanin-server")
        except httpx.HTTPError:
            ok, tokens, server = False, 0, None
        done.append(
            {"start": start, "end": time.monotonic(), "ok": ok, "tokens": tokens, "server": server}
        )


async def load(port: int, urls: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Closed loop: ``clients`` requests in flight until warm-up + duration (or the photos run
    out), each client on its own keep-alive connection."""
    done: list[dict[str, Any]] = []
    next_url = [0]
    stop_at = time.monotonic() + args.warmup + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits) as http:
        await asyncio.gather(
            *(_client(http, urls, next_url, args, stop_at, done) for _ in range(args.clients))
        )
    return done


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fanin serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"fanin serve not ready within {timeout_s:g} s")


def summarize(
    done: list[dict[str, Any]], t0: float, args: argparse.Namespace, gpu: GpuSampler
) -> dict[str, Any]:
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    window = [d for d in done if start <= d["end"] <= end]
    ok = [d for d in window if d["ok"]]
    latencies = sorted(d["end"] - d["start"] for d in ok)
    util = gpu.between(start, end)
    servers: dict[str, int] = {}
    for d in ok:
        servers[str(d["server"])] = servers.get(str(d["server"]), 0) + 1

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {
        "image_req_s": len(ok) / args.duration,
        "output_tok_s": sum(d["tokens"] for d in ok) / args.duration,
        "errors": len(window) - len(ok),
        "latency_p50_s": pct(0.5),
        "latency_p99_s": pct(0.99),
        "gpu_util_mean_pct": statistics.fmean(util) if util else None,
        "gpu_util_samples": len(util),
        "requests_per_server": servers,
        "requests_total": len(done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--api-server-count", type=int, default=4)
    parser.add_argument("--renderer-num-workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--port", type=int, default=18766)
    parser.add_argument("--photos", type=int, default=2000, help="distinct photos (an upper bound)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--extra", default="", help="more `fanin serve` flags, space-separated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "apiserver.launch.cli", "serve", args.model,
        "--host", HOST, "--port", str(args.port), "--served-model-name", MODEL_NAME,
        "--api-server-count", str(args.api_server_count),
        "--renderer-num-workers", str(args.renderer_num_workers),
        *args.extra.split(),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (args.out / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    gpu = GpuSampler()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            urls = pool.submit(photo_urls, args.photos)  # made while the model loads
            wait_ready(args.port, proc, args.ready_timeout)
            photos = urls.result()
        gpu.start()
        t0 = time.monotonic()
        done = asyncio.run(load(args.port, photos, args))
        result = summarize(done, t0, args, gpu)
    finally:
        gpu.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            result_rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result_rc = proc.wait(10)
        log.close()
    result.update(
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "serve_exit_status": result_rc,
            "today_req_s": TODAY_REQ_S,
            "floor_req_s": FLOOR_REQ_S,
        }
    )
    (args.out / "e2e.json").write_text(json.dumps(result, indent=1))
    util = result["gpu_util_mean_pct"]
    print(
        f"e2e {args.api_server_count}x{args.renderer_num_workers}, {args.clients} clients, "
        f"{args.tokens} tokens: {result['image_req_s']:.1f} image req/s (today {TODAY_REQ_S:g}, "
        f"floor {FLOOR_REQ_S:g}), p50 {result['latency_p50_s'] * 1e3:.0f} ms, p99 "
        f"{result['latency_p99_s'] * 1e3:.0f} ms, errors {result['errors']}, GPU util "
        f"{'n/a' if util is None else f'{util:.0f} %'}, serve exit {result_rc}"
    )


if __name__ == "__main__":
    main()
