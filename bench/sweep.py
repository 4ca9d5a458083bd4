"""``fanin bench sweep``: one workload, several server configurations, one table.

Each configuration is ``[inline:|pool:]NxW`` (bench/specs.py). For each one the sweep
starts ``fanin serve``, waits for ``/ready``, runs the workload (the same requests and photos
every time; each server starts cold), stops the server with SIGTERM and checks that nothing of
it is left. A configuration that fails to start, or whose run fails, is reported and the
sweep goes on. Results are written after every configuration, so an interrupted sweep keeps
what it measured; at the end come the markdown table (ratios against the first configuration
that ran) and the plots.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench import report_sweep
from bench.aio import run_async
from bench.cli import (
    BenchError,
    api_key_of,
    build_sweep_parser,
    fetch_model,
    image_source,
    raise_open_files_limit,
    result_stem,
    serving_images,
    write_text,
)
from bench.config import BenchConfig, SweepConfig, from_args, validate
from bench.images import DistinctImages
from bench.report import machine, run_result
from bench.runner import Run
from bench.serve import ServedFanin, respawns_in
from bench.specs import ServerSpec, parse_env, resolve_specs
from bench.workload import Model, Workload, WorkloadError

_STOP_RESERVE_S = 15.0  # what a server's stop takes, kept free of a --time-budget's end


@dataclass
class _Context:
    """What every configuration of one sweep shares while it runs."""

    api_key: str | None
    env: dict[str, str]
    flags: list[str]  # for every `fanin serve`, after the configuration's own
    images: DistinctImages | None
    image_url_base: str | None
    deadline: float  # time.monotonic() at which --time-budget runs out (inf: none)
    workloads: dict[Model, Workload] = field(default_factory=dict)  # one per served model
    #: With --rate-multiples: the rate that saturated the first configuration (closed loop).
    saturation_rate: float | None = None


@dataclass
class Sweep:
    """Everything one sweep needs, decided before the first server starts."""

    config: BenchConfig
    sweep: SweepConfig
    specs: list[ServerSpec]
    model_dir: str | None
    serve_args: list[str]
    out_dir: Path
    command: list[str]

    async def run(self) -> dict[str, Any]:
        """Every configuration in turn; SIGTERM or SIGINT cancels this, which still stops the
        server of the configuration that runs (``_one``'s ``finally``) before it ends."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        env = parse_env(self.sweep.env)
        flags = list(self.serve_args)
        if self.config.image_transport == "http":
            flags.append("--allow-private-media-urls")  # the photos come from 127.0.0.1
        doc: dict[str, Any] = {
            "machine": machine(),
            "command": self.command,
            "model_dir": self.model_dir,
            "serve_args": self.serve_args,
            "env": env,
            "workload": msgspec.to_builtins(self.config),
            "entries": [],
        }
        budget = self.sweep.time_budget
        deadline = time.monotonic() + budget if budget else math.inf
        # What a configuration takes at the least: its run, and half a minute to start and stop.
        slowest = self.config.warmup_seconds + self.config.duration + 30
        images = image_source(self.config)
        async with serving_images(self.config, images) as image_server:
            context = _Context(
                api_key_of(self.config),
                env,
                flags,
                images,
                image_server.base_url if image_server else None,
                deadline,
            )
            for i, spec in enumerate(self.specs):
                print(f"[{i + 1}/{len(self.specs)}] {spec.label}", file=sys.stderr, flush=True)
                left = deadline - time.monotonic()
                entries: list[dict[str, Any]]
                if left < slowest:
                    entries = [
                        {
                            "label": spec.label,
                            "status": "skipped",
                            "error": f"--time-budget: {max(0, left):.0f} s left, a "
                            f"configuration may take {slowest:.0f} s",
                        }
                    ]
                else:
                    started = time.monotonic()
                    fetched = image_server.num_served if image_server else 0
                    entries = await self._one(spec, context)
                    if image_server is not None:
                        entries[-1]["images_fetched"] = image_server.num_served - fetched
                    slowest = max(slowest, time.monotonic() - started)
                for entry in entries:
                    doc["entries"].append(entry)
                    print(f"  {report_sweep.entry_line(entry)}", file=sys.stderr, flush=True)
                self._write_json(doc)
        return doc

    async def _one(self, spec: ServerSpec, context: _Context) -> list[dict[str, Any]]:
        """Start the configuration's server, run the workload against it (once, or once per
        rate multiple), stop it. One entry per run, each with the server's start and stop."""
        base: dict[str, Any] = {"label": spec.label, "flags": spec.flags()}
        log = self.out_dir / f"serve-{spec.slug}.log"
        server = ServedFanin.start(self.model_dir, spec.flags() + context.flags, log, context.env)
        base["pid"] = server.pid
        entries: list[dict[str, Any]] = []
        try:
            # Within --time-budget, the server's stop must fit too.
            usable = context.deadline - _STOP_RESERVE_S - time.monotonic()
            start_timeout = min(self.sweep.server_start_timeout, usable)
            problem = await server.wait_ready(max(1.0, start_timeout))
            if problem is not None:
                base.update(status="failed to start", error=problem, log_tail=server.log_tail())
                return [base]
            model = await fetch_model(server.target, self.config.model, context.api_key)
            if model not in context.workloads:
                context.workloads[model] = Workload(
                    self.config, model, context.images, context.image_url_base
                )
            config = msgspec.structs.replace(self.config, base_url=server.target.origin)
            for label, multiple in self._runs(spec, context):
                entry = {**base, "label": label}
                entries.append(entry)
                offset = server.log_size()
                result = await self._run(config, multiple, server, model, context)
                entry.update(status="ok", **result)
                respawns = respawns_in(server.log_path, offset)
                if respawns:
                    entry["respawns"] = respawns
                code = server.proc.poll()
                if code is not None:
                    raise BenchError(f"the server exited with code {code} during the run")
                if self.sweep.rate_multiples and context.saturation_rate is None:
                    context.saturation_rate = float(result["metrics"]["window_request_throughput"])
        except (BenchError, WorkloadError, RuntimeError, OSError) as e:
            failed = entries[-1] if entries else base
            failed.update(status="failed", error=str(e), log_tail=server.log_tail())
            entries = entries or [base]
        except Exception as e:  # one configuration's surprise must not lose the others
            failed = entries[-1] if entries else base
            failed.update(status="failed", error=f"{type(e).__name__}: {e}")
            failed["traceback"] = traceback.format_exc()
            entries = entries or [base]
        finally:
            stop = await asyncio.to_thread(server.stop, self.sweep.server_stop_timeout)
            for entry in entries or [base]:
                entry["stop"] = {
                    "exit_code": stop.exit_code,
                    "seconds": round(stop.seconds, 2),
                    "killed": stop.killed,
                }
        return entries

    def _runs(self, spec: ServerSpec, context: _Context) -> list[tuple[str, float | None]]:
        """The runs against this server, each a label and a multiple of the saturating rate
        (None: the workload as given). With --rate-multiples, the first configuration first
        runs closed loop to find that rate."""
        multiples = self.sweep.rate_multiples
        if not multiples:
            return [(spec.label, None)]
        runs: list[tuple[str, float | None]] = []
        if context.saturation_rate is None:
            runs.append((f"{spec.label} closed loop", None))
        return runs + [(f"{spec.label} at {m:g}x", m) for m in multiples]

    async def _run(
        self,
        config: BenchConfig,
        multiple: float | None,
        server: ServedFanin,
        model: Model,
        context: _Context,
    ) -> dict[str, Any]:
        if multiple is not None:
            assert context.saturation_rate is not None  # the closed-loop run came first
            rate = multiple * context.saturation_rate
            config = msgspec.structs.replace(config, request_rate=rate, max_concurrency=None)
        give_up_at = time.perf_counter() + (context.deadline - _STOP_RESERVE_S - time.monotonic())
        workload = context.workloads[model]
        run = Run(config, server.target, workload, server.pid, context.api_key, give_up_at)
        result = run_result(config, model.name, await run.execute())
        if multiple is not None:
            result["offered_rate"] = config.request_rate
        return result

    def _write_json(self, doc: dict[str, Any]) -> None:
        text = msgspec.json.format(msgspec.json.encode(doc)).decode()
        write_text(self.out_dir / "sweep.json", text)


def sweep_main(argv: list[str]) -> int:
    """``fanin bench sweep [MODEL] [flags] [-- serve flags]``."""
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    parser = build_sweep_parser()
    args = parser.parse_args(argv)
    try:
        sweep = from_args(SweepConfig, args)
        config = from_args(BenchConfig, args)
        validate(config)
        specs = resolve_specs(sweep)
        parse_env(sweep.env)
        if sweep.rate_multiples and config.max_concurrency is None:
            raise ValueError("--rate-multiples needs --max-concurrency (its closed-loop run)")
    except ValueError as e:
        parser.error(str(e))
    out_dir = Path(config.result_dir or result_stem("fanin-sweep"))
    command = ["fanin", "bench", "sweep", *argv, *(["--", *serve_args] if serve_args else [])]
    print(f"fanin bench sweep: {len(specs)} configurations, results in {out_dir}", file=sys.stderr)
    raise_open_files_limit()
    plan = Sweep(config, sweep, specs, args.model_dir, serve_args, out_dir, command)
    try:
        doc = run_async(plan.run())
    except (BenchError, WorkloadError) as e:
        print(f"fanin bench sweep: error: {e}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print(f"fanin bench sweep: stopped; what ran is in {out_dir}", file=sys.stderr)
        return 130
    markdown = report_sweep.markdown(doc)
    write_text(out_dir / "sweep.md", markdown)
    plotted = report_sweep.plot(doc, out_dir / "sweep.png")
    print(markdown)
    print(
        f"results: {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}"
        + (f", {out_dir / 'sweep.png'}" if plotted else " (no plot: matplotlib is missing)"),
        file=sys.stderr,
    )
    problems = strict_problems(doc, plotted) if sweep.strict else []
    for problem in problems:
        print(f"fanin bench sweep: --strict: {problem}", file=sys.stderr)
    ran = [e for e in doc["entries"] if e["status"] == "ok"]
    return 0 if ran and not problems else 1


def strict_problems(doc: dict[str, Any], plotted: bool) -> list[str]:
    """What makes a sweep fail under ``--strict``."""
    problems = []
    for e in doc["entries"]:
        if e["status"] != "ok":
            problems.append(f"{e['label']}: {e['status']}: {e.get('error', '')}")
        elif e["metrics"]["failed"]:
            problems.append(f"{e['label']}: {e['metrics']['failed']} requests failed")
        if e.get("respawns"):
            problems.append(f"{e['label']}: API servers died during the run: {e['respawns']}")
        stop = e.get("stop")  # none for a configuration skipped before it started
        if stop and (stop["exit_code"] != 0 or stop["killed"]):
            problems.append(f"{e['label']}: exit code {stop['exit_code']}, killed {stop['killed']}")
    if not plotted:
        problems.append("no plot (matplotlib is missing)")
    return problems
