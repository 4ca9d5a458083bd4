"""Results as data (the JSON written for every run) and as markdown tables (one run; a sweep
with ratios against its first configuration), ready to paste into bench/results/."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shlex
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

from bench import proc
from bench.config import BenchConfig
from bench.metrics import latency_summary, served_in_window, server_share, summarize
from bench.runner import RunResult


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    gpus = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    gpus.append(line.split(":", 1)[1].strip())
    try:
        version = metadata.version("fanin")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "fanin": version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _grouped(per_process: dict[str, float]) -> dict[str, float]:
    """fanin-api-server-0, -1, ... -> fanin-api-server (summed)."""
    out: dict[str, float] = {}
    for name, cores in per_process.items():
        key = re.sub(r"-\d+$", "", name)
        out[key] = out.get(key, 0.0) + cores
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def run_result(config: BenchConfig, model_name: str, run: RunResult) -> dict[str, Any]:
    """The JSON result of one run."""
    measured = run.measured
    result: dict[str, Any] = {
        "model": model_name,
        "config": msgspec.to_builtins(config),
        "metrics": {
            **summarize(measured, run.duration, config.percentiles, config.goodput_slos),
            **served_in_window(run.records, run.window_start, run.sending_end),
        },
        "warmup_requests": sum(1 for r in run.records if r.is_warmup),
        "servers": server_share(measured),
        "health": latency_summary(run.health_s, run.health_failed),
        "health_servers": run.health_servers,
        "connections_opened": run.num_connects,
        "requests_by_kind": dict(Counter(r.kind for r in measured)),
        "images_sent": sum(1 for r in measured if r.kind == "image") * config.images_per_request,
        "first_errors": sorted({r.error for r in measured if r.error})[:5],
        "server_stages_ms": run.server_stages_ms,
    }
    cpu: dict[str, Any] = {}
    if run.server_cpu is not None:
        total, per = proc.cores_busy(*run.server_cpu)
        cpu.update(server_cores_busy=round(total, 3), server_by_process=_grouped(per))
    if run.generator_cpu is not None:
        cpu["generator_cores_busy"] = round(proc.cores_busy(*run.generator_cpu)[0], 3)
    result["cpu"] = cpu
    return result


def _num(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _stat_row(metrics: dict[str, Any], name: str, label: str, percentiles: list[float]) -> str:
    cells = [_num(metrics[f"mean_{name}_ms"], 2), _num(metrics[f"median_{name}_ms"], 2)]
    cells += [_num(metrics[f"p{p:g}_{name}_ms"], 2) for p in percentiles]
    return f"| {label} (ms): mean / median / {' / '.join(f'p{p:g}' for p in percentiles)} | " + (
        " / ".join(cells) + " |"
    )


def run_markdown(result: dict[str, Any], command: list[str] | None = None) -> str:
    """One run as a two-column markdown table."""
    m = result["metrics"]
    config = result["config"]
    percentiles = [float(p) for p in config["metric_percentiles"].split(",") if p.strip()]
    health = result["health"]
    other_failures = m["failed"] - m["rate_limited"]
    lines = [
        f"## fanin bench: {config['dataset']} against {config['base_url']}",
        "",
    ]
    if command:
        lines += [f"Command: `{shlex.join(command)}`", ""]
    lines += [
        "| metric | value |",
        "|---|---:|",
        f"| model | {result['model']} |",
        f"| successful requests | {m['completed']} |",
        f"| failed requests (429 / other) | {m['rate_limited']} / {other_failures} |",
        f"| measured duration (s) | {_num(m['duration'], 2)} |",
        f"| request throughput (req/s) | {_num(m['request_throughput'], 2)} |",
        f"| completed in the window of {_num(m['window_seconds'], 2)} s, per second "
        f"(req/s / output tok/s) | {_num(m['window_request_throughput'], 2)} / "
        f"{_num(m['window_output_throughput'])} |",
    ]
    if "request_goodput" in m:
        lines.append(f"| request goodput (req/s) | {_num(m['request_goodput'], 2)} |")
    lines += [
        f"| output token throughput (tok/s) | {_num(m['output_throughput'])} |",
        f"| total token throughput (tok/s) | {_num(m['total_token_throughput'])} |",
        _stat_row(m, "ttft", "TTFT", percentiles),
        _stat_row(m, "tpot", "TPOT", percentiles),
        _stat_row(m, "itl", "ITL", percentiles),
        _stat_row(m, "e2el", "E2E latency", percentiles),
        f"| /health (ms): median / p99 / max ({health['count']} probes, "
        f"{health['failed']} failed) | {_num(health['median_ms'], 2)} / "
        f"{_num(health['p99_ms'], 2)} / {_num(health['max_ms'], 2)} |",
    ]
    stages = result.get("server_stages_ms") or {}
    if stages:
        named = ", ".join(f"{k.replace('_', ' ')} {_num(v, 2)}" for k, v in stages.items())
        lines.append(f"| server-side means (ms; bench/server_stages.py) | {named} |")
    cpu = result["cpu"]
    if "server_cores_busy" in cpu:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu["server_by_process"].items())
        lines.append(f"| server cores busy | {cpu['server_cores_busy']:.2f} ({parts}) |")
    if "generator_cores_busy" in cpu:
        lines.append(f"| load generator cores busy | {cpu['generator_cores_busy']:.2f} |")
    share = " / ".join(f"{k}: {v}" for k, v in result["servers"].items())
    lines.append(f"| completed per API server | {share or '-'} |")
    if result["first_errors"]:
        lines += ["", "Errors (first kinds):", *(f"- {e}" for e in result["first_errors"])]
    return "\n".join(lines) + "\n"
