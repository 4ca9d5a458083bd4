"""Frontend CPU per image request through a real API server, beside the raw cost of the same
work done by hand (base64 decode + PIL decode + the model's HF image processor), measured in
one run on the same photos.

    python -m bench.frontend_cpu OUT_DIR [--model DIR] [--rounds 5] [--batch 12]
        [--sizes 1024x768 1920x1080] [--transfers uint8 normalized] [--modes process pool]

raw: in this process, one thread (torch on one thread too, as a budgeted API server gives each
render worker), per photo: ``base64.b64decode`` of the data URL's text, ``Image.open`` +
``load`` + ``convert("RGB")``, then the image processor with its own defaults (float output);
CPU time (``time.thread_time``) per photo, and each step apart.

served: one ``fanin serve MODEL --api-server-count 1 --renderer-num-workers 1
--api-server-threads 1 --pixel-transfer T --preprocess-mode M`` on loopback per transfer T and
mode M, all running at once; one client sends the photos one after the other as chat requests (a
data URL each, max_tokens 1). The CPU time of the API server process and of its render worker
processes (all their threads, from /proc/PID/task/*/schedstat) over those requests, less what it
burns idle over the same wall time, divided by the requests: HTTP, JSON, template, tokenizer,
image decode, processor, content hash, wire, response. ``normalized`` is the float path, for
comparison.

Measurements go in rounds (raw, then each server, on the same ``--batch`` photos), so that a
noisy neighbour hits all of them alike; the table gives medians over rounds. Every photo is
distinct (a seeded crop of one of scikit-image's sample photos, resized, JPEG quality 90), so
the engine's encoder cache never answers for one. The goal: served <= 1.2 x raw. Writes
``OUT_DIR/frontend_cpu.json`` and ``OUT_DIR/frontend_cpu.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench import proc
from bench.outputs import model_dir, write_results

_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
IDLE_S = 2.0
WARMUP = 3


def photos(width: int, height: int, n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs of ``width`` x ``height``: random crops (at least half of each
    side) of scikit-image's sample photos, resized."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _SAMPLES]
    out = []
    for i in range(n):
        source = sources[i % len(sources)]
        w, h = source.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = source.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def raw_costs(processor: Any, jpegs: list[bytes]) -> dict[str, float]:
    """Milliseconds of CPU per photo for each step done by hand, in this thread."""
    texts = [base64.b64encode(j).decode() for j in jpegs]
    steps = {"base64_ms": 0.0, "decode_ms": 0.0, "processor_ms": 0.0, "processor_uint8_ms": 0.0}
    for text in texts:
        t0 = time.thread_time()
        data = base64.b64decode(text, validate=True)
        t1 = time.thread_time()
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
        t2 = time.thread_time()
        processor(images=[image], return_tensors="pt")
        t3 = time.thread_time()
        processor(images=[image], return_tensors="pt", do_rescale=False, do_normalize=False)
        t4 = time.thread_time()
        for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[key] += seconds * 1000 / len(texts)
    steps["raw_ms"] = steps["base64_ms"] + steps["decode_ms"] + steps["processor_ms"]
    return steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of every thread of ``pids``, in ns resolution (schedstat's first field)."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):  # a thread that just ended
                continue
    return total / 1e9


def _frontend_pids(launcher: int) -> list[int]:
    """The API server under ``launcher`` and its render worker processes (in the default
    ``--preprocess-mode process`` the image work is theirs)."""
    for pid in proc.descendants(launcher):
        if proc.process_name(pid).startswith("fanin-api-server"):
            return [pid, *proc.descendants(pid)]
    raise RuntimeError("no API server process under the launcher")


class Served:
    """One `fanin serve` with one API server, started at once, ready after ``wait``."""

    def __init__(self, model: Path, transfer: str, mode: str, log: Path, gpu_share: float) -> None:
        self.transfer, self.mode = transfer, mode
        self.port = _free_port()
        argv = [sys.executable, "-m", "apiserver.launch.cli", "serve", str(model)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--api-server-count", "1"]
        argv += ["--renderer-num-workers", "1", "--api-server-threads", "1"]
        argv += ["--pixel-transfer", transfer, "--preprocess-mode", mode]
        argv += ["--served-model-name", "bench"]
        argv += ["--gpu-memory-utilization", f"{gpu_share:.2f}"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
        self.idle_rate = 0.0

    def wait(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fanin serve exited with {self.proc.returncode}")
            try:
                if self.client.get("/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("fanin serve not ready")
            time.sleep(0.25)
        self.frontend = _frontend_pids(self.proc.pid)

    def measure_idle(self) -> None:
        start = _cpu_seconds(self.frontend)
        time.sleep(IDLE_S)
        self.idle_rate = (_cpu_seconds(self.frontend) - start) / IDLE_S

    def post(self, jpeg: bytes) -> None:
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this photo?"},
        ]
        body = {
            "model": "bench",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": content}],
        }
        self.client.post("/v1/chat/completions", json=body).raise_for_status()

    def cost(self, jpegs: list[bytes]) -> dict[str, float]:
        """Milliseconds of the API server's CPU, and of wall time, per image request."""
        cpu0, wall0 = _cpu_seconds(self.frontend), time.perf_counter()
        for jpeg in jpegs:
            self.post(jpeg)
        wall = time.perf_counter() - wall0
        cpu = _cpu_seconds(self.frontend) - cpu0 - self.idle_rate * wall
        return {"served_ms": cpu * 1000 / len(jpegs), "wall_ms": wall * 1000 / len(jpegs)}

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, help="default: build the default model in a temp dir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=12, help="photos per size and round")
    p.add_argument("--sizes", nargs="+", default=["1024x768", "1920x1080"])
    p.add_argument("--transfers", nargs="+", default=["uint8", "normalized"])
    p.add_argument("--modes", nargs="+", default=["process", "pool"], help="--preprocess-mode")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # A `timeout` around this script must still stop the servers it started (``finally``).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with model_dir(args.model) as model:
        rows = run(model, args)
    write_results(args.out, "frontend_cpu", rows, _table(rows))
    return 0


def run(model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoImageProcessor

    torch.set_num_threads(1)
    processor = AutoImageProcessor.from_pretrained(model)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    per_size = WARMUP + args.rounds * args.batch
    images = {size: photos(*size, per_size, seed=i) for i, size in enumerate(sizes)}
    kinds = [(t, m) for t in args.transfers for m in args.modes]
    servers = [
        Served(model, t, m, args.out / f"serve_{t}_{m}.log", 0.8 / len(kinds)) for t, m in kinds
    ]
    raw: dict[Any, list[dict[str, float]]] = {size: [] for size in sizes}
    served: dict[Any, list[dict[str, float]]] = {
        (s.transfer, s.mode, z): [] for s in servers for z in sizes
    }
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in servers:
            server.wait(deadline)
        for size in sizes:
            raw_costs(processor, images[size][:WARMUP])
            for server in servers:
                for jpeg in images[size][:WARMUP]:
                    server.post(jpeg)
        for server in servers:
            server.measure_idle()
        for r in range(args.rounds):
            for size in sizes:
                batch = images[size][WARMUP + r * args.batch : WARMUP + (r + 1) * args.batch]
                raw[size].append(raw_costs(processor, batch))
                for server in servers:
                    served[server.transfer, server.mode, size].append(server.cost(batch))
    finally:
        for server in servers:
            server.stop()
    rows = []
    for (transfer, mode, size), costs in served.items():
        row = {
            "size": f"{size[0]}x{size[1]}",
            "transfer": transfer,
            "mode": mode,
            "jpeg_kb": sum(map(len, images[size])) / len(images[size]) / 1024,
            **_medians(raw[size]),
            **_medians(costs),
            "ratios": [c["served_ms"] / w["raw_ms"] for c, w in zip(costs, raw[size], strict=True)],
            "host": platform.node(),
            "cpus": os.cpu_count(),
        }
        row["ratio"] = statistics.median(row["ratios"])
        rows.append(row)
    return rows


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| photo | pixels | mode | JPEG KB | base64 ms | decode ms | processor ms (uint8) | raw ms "
        "| served CPU ms | served / raw (range) | wall ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = min(r["ratios"]), max(r["ratios"])
        lines.append(
            f"| {r['size']} | {r['transfer']} | {r['mode']} | {r['jpeg_kb']:.0f} "
            f"| {r['base64_ms']:.2f} "
            f"| {r['decode_ms']:.1f} | {r['processor_ms']:.1f} ({r['processor_uint8_ms']:.1f}) "
            f"| {r['raw_ms']:.1f} | {r['served_ms']:.1f} | {r['ratio']:.2f} "
            f"({low:.2f}-{high:.2f}) | {r['wall_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
