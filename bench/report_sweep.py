"""A sweep's results as markdown (machine, command, workload, the table with ratios against the
first configuration that ran, cores busy, each API server's share) and as a PNG."""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path
from typing import Any

_NA = "-"


def _baseline(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in entries if e["status"] == "ok"), None)


def _rate(entry: dict[str, Any]) -> float:
    """Requests completed per second in the measured window: what the sweep compares."""
    return float(entry["metrics"]["window_request_throughput"])


def entry_line(entry: dict[str, Any]) -> str:
    """A one-line summary of one configuration, for the console."""
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry.get('error', '')}"
    m, h = entry["metrics"], entry["health"]
    cores = entry["cpu"].get("server_cores_busy")
    return (
        f"{_rate(entry):.1f} req/s, TTFT p99 {m['p99_ttft_ms']:.0f} ms, "
        f"/health p99 {h['p99_ms']:.1f} ms, failed {m['failed']}"
        + (f", server cores {cores:.1f}" if cores is not None else "")
        + (f", API servers died {len(entry['respawns'])}" if entry.get("respawns") else "")
    )


def _workload_line(w: dict[str, Any]) -> str:
    parts = [f"dataset `{w['dataset']}`"]
    if "image" in w["dataset"]:
        parts.append(
            f"{w['images_per_request']} photo(s) of {w['image_size']} per request as "
            f"{w['image_transport']} URLs (distinct per request, JPEG q{w['image_quality']})"
        )
    unlimited = w["request_rate"] in (None, float("inf"))  # JSON has no inf: null
    if w["max_concurrency"] and unlimited:
        parts.append(f"{w['max_concurrency']} closed-loop clients")
    else:
        rate = "unlimited" if unlimited else f"{w['request_rate']:g}/s"
        parts.append(f"rate {rate} (burstiness {w['burstiness']:g})")
        if w["max_concurrency"]:
            parts.append(f"at most {w['max_concurrency']} in flight")
    out = f"{w['output_len']} output tokens" if w["output_len"] else "default output lengths"
    parts.append(out + (" (ignore_eos)" if w["ignore_eos"] else ""))
    parts.append(
        f"{w['warmup_seconds']:g} s warm-up + up to {w['duration']:g} s measured, "
        f"at most {w['num_prompts']} requests"
    )
    parts.append("keep-alive connections" if w["keep_alive"] else "a new connection per request")
    return "; ".join(parts)


def _command(doc: dict[str, Any]) -> str:
    """The command with the model directory shown as MODEL and the result folder as OUT (no
    machine's paths in a report)."""
    command = list(doc["command"])
    for i, word in enumerate(command):
        if doc.get("model_dir") and word == doc["model_dir"]:
            command[i] = "MODEL"
        elif i and command[i - 1] == "--result-dir":
            command[i] = "OUT"
        elif word.startswith("--result-dir="):
            command[i] = "--result-dir=OUT"
    return shlex.join(command)


def _ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    """The whole sweep as markdown, ready to paste into bench/results/."""
    entries = doc["entries"]
    base = _baseline(entries)
    machine = doc["machine"]
    model_dir = doc.get("model_dir")
    model = base["model"] if base else Path(model_dir).name if model_dir else "default model"
    lines = [
        f"## fanin bench sweep: {model}",
        "",
        f"- Machine: {machine['cpu'] or 'CPU unknown'}, {machine['cores']} cores, "
        f"{machine['memory_gib']:g} GiB"
        + "".join(f", {gpu}" for gpu in machine.get("gpus", []))
        + f"; Python {machine['python']}, {machine['platform']}; "
        f"fanin {machine['fanin']}; {machine['date']}",
        f"- Command: `{_command(doc)}`"
        + (f" (MODEL: a model directory named `{Path(model_dir).name}`)" if model_dir else ""),
        f"- Workload: {_workload_line(doc['workload'])}",
    ]
    if doc.get("serve_args") or doc.get("env"):
        env = " ".join(f"{k}={v}" for k, v in doc["env"].items())
        lines.append(
            f"- Every server also got: `{shlex.join(doc['serve_args'])}`"
            + (f", environment `{env}`" if env else "")
        )
    lines += [
        "- N x W = `--api-server-count N --renderer-num-workers W`; inline = "
        "`--preprocess-mode inline` (preprocessing on the event loop). req/s and output "
        "tok/s: completed in the measured window, per second (the steady rate); ratio: of "
        f"req/s, against {base['label'] if base else 'the first configuration'}; vLLM req/s: "
        "the measured requests over the time to the last response (vLLM's duration, which "
        "the drain at the end dilutes); latencies are of the measured requests. Cores busy: "
        "CPU time of the server's process tree (or of the bench) over the window.",
        "",
        "| config | req/s | ratio | vLLM req/s | output tok/s | TTFT median / p99 (ms) "
        "| TPOT median (ms) | E2E median / p99 (ms) | /health median / p99 / max (ms) "
        "| failed (429) | server cores busy | bench cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['label']} | {e['status']} |" + f" {_NA} |" * 10)
            continue
        m, h, cpu = e["metrics"], e["health"], e["cpu"]
        ratio = _rate(e) / _rate(base) if base and _rate(base) else 0.0
        server_cores = cpu.get("server_cores_busy")
        lines.append(
            f"| {e['label']} | {_rate(e):.1f} | {ratio:.2f}x | {m['request_throughput']:.1f} "
            f"| {m['window_output_throughput']:,.0f} "
            f"| {_ms(m['median_ttft_ms'])} / {_ms(m['p99_ttft_ms'])} "
            f"| {_ms(m['median_tpot_ms'])} "
            f"| {_ms(m['median_e2el_ms'])} / {_ms(m['p99_e2el_ms'])} "
            f"| {_ms(h['median_ms'])} / {_ms(h['p99_ms'])} / {_ms(h['max_ms'])} "
            f"| {m['failed']} ({m['rate_limited']}) "
            f"| {_NA if server_cores is None else f'{server_cores:.1f}'} "
            f"| {cpu.get('generator_cores_busy', 0):.2f} |"
        )
    lines += _overload_table(entries)
    lines += ["", "Completed requests per API server (`x-fanin-server`), and where CPU went:", ""]
    lines += ["| config | per server | cores by process |", "|---|---|---|"]
    for e in entries:
        if e["status"] == "ok":
            share = " / ".join(str(v) for v in e["servers"].values())
            by = e["cpu"].get("server_by_process", {})
            where = ", ".join(f"{k.removeprefix('fanin-')} {v:.2f}" for k, v in by.items())
            lines.append(f"| {e['label']} | {share} | {where or _NA} |")
    failed = [e for e in entries if e["status"] != "ok"]
    if failed:
        lines += ["", "Not measured:", ""]
        lines += [f"- {e['label']}: {e['status']}: {e.get('error', '')}" for e in failed]
    died = [e for e in entries if e.get("respawns")]
    if died:
        lines += ["", "API servers that died during the run (respawned by the launcher):", ""]
        lines += [f"- {e['label']}: {'; '.join(e['respawns'])}" for e in died]
    unclean = [e for e in entries if e.get("stop", {}).get("killed")]
    if unclean:
        lines += ["", "Had to be killed after SIGTERM:", ""]
        lines += [f"- {e['label']}: {', '.join(e['stop']['killed'])}" for e in unclean]
    errors = [(e["label"], e["first_errors"]) for e in entries if e.get("first_errors")]
    if errors:
        lines += ["", "Request errors (first kinds):", ""]
        lines += [f"- {label}: {'; '.join(errs)}" for label, errs in errors]
    lines += ["", "![sweep](sweep.png)"]
    return "\n".join(lines) + "\n"


def _overload_table(entries: list[dict[str, Any]]) -> list[str]:
    """With --rate-multiples: what each paced run offered, and what became of it."""
    paced = [e for e in entries if e["status"] == "ok" and "offered_rate" in e]
    if not paced:
        return []
    lines = [
        "",
        "Overload: Poisson arrivals at multiples of the rate the first configuration completed "
        "closed loop; a client gives up after --request-timeout (a timeout). TTFT is of the "
        "admitted requests.",
        "",
        "| config | offered req/s | completed req/s | 429 (%) | client timeouts | 5xx "
        "| other errors | TTFT median / p99 (ms) | /health p99 / max (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in paced:
        m, h, errors = e["metrics"], e["health"], e["metrics"]["errors"]
        refused, timeouts = errors.get("http 429", 0), errors.get("timeout", 0)
        server_errors = sum(n for kind, n in errors.items() if kind.startswith("http 5"))
        other = m["failed"] - refused - timeouts - server_errors
        share = 100 * refused / max(m["num_requests"], 1)
        lines.append(
            f"| {e['label']} | {e['offered_rate']:.1f} | {_rate(e):.1f} "
            f"| {refused} ({share:.0f} %) | {timeouts} | {server_errors} | {other} "
            f"| {_ms(m['median_ttft_ms'])} / {_ms(m['p99_ttft_ms'])} "
            f"| {_ms(h['p99_ms'])} / {_ms(h['max_ms'])} |"
        )
    return lines


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Request throughput, /health p99 and max, TTFT, and cores busy per configuration, as
    one PNG. False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    entries = [e for e in doc["entries"] if e["status"] == "ok"]
    labels = [e["label"] for e in entries]
    x = list(range(len(entries)))
    width = max(10.0, 0.9 * len(entries) + 4)
    fig, axes = plt.subplots(2, 2, figsize=(width, 9), layout="constrained")
    (rps, health), (ttft, cores) = axes
    values = [_rate(e) for e in entries]
    bars = rps.bar(x, values, color="tab:blue")
    if values:
        for bar, v in zip(bars, values, strict=True):
            rps.annotate(f"{v / values[0]:.2f}x", (bar.get_x() + bar.get_width() / 2, v),
                         ha="center", va="bottom", fontsize=8)  # fmt: skip
    rps.set_title("requests completed per second in the window, ratio to the first")
    series = {
        health: ("/health latency (ms)", "health", ("p99_ms", "max_ms", "median_ms")),
        ttft: ("latency (ms)", "metrics", ("median_ttft_ms", "p99_ttft_ms", "median_e2el_ms")),
    }
    for ax, (title, part, keys) in series.items():
        for key, style in zip(keys, ("o-", "s--", "^:"), strict=True):
            label = key.removesuffix("_ms").replace("_e2el", " E2E").replace("_ttft", " TTFT")
            ax.plot(x, [e[part][key] for e in entries], style, label=label)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    server = [e["cpu"].get("server_cores_busy", 0.0) for e in entries]
    bench = [e["cpu"].get("generator_cores_busy", 0.0) for e in entries]
    cores.bar(x, server, label="server")
    cores.bar(x, bench, bottom=server, label="load generator")
    cores.set_title("cores busy")
    cores.legend()
    for ax in (rps, health, ttft, cores):
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    model = entries[0]["model"] if entries else ""
    title = textwrap.fill(f"fanin bench sweep: {model}; {_workload_line(doc['workload'])}", 130)
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
