"""``fanin bench`` (one workload against a running server) and ``fanin bench sweep`` (one
workload against several server configurations that it starts and stops itself).

    fanin bench --max-concurrency 64 --output-len 16 --ignore-eos --duration 30
    fanin bench sweep --preset frontend --max-concurrency 64 --duration 10 -- --max-num-seqs 128

Everything after ``--`` in a sweep is passed to every ``fanin serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from bench.aio import run_async
from bench.config import BenchConfig, SweepConfig, add_flags, from_args, validate
from bench.http_client import Client, HttpError, fetch
from bench.images import DistinctImages
from bench.proc import listener_pid
from bench.report import machine, run_markdown, run_result
from bench.runner import Run, auth_headers
from bench.static import ImageServer
from bench.target import Target, TargetError, parse_target
from bench.workload import Model, Workload, WorkloadError, images_needed

API_KEY_ENVS = ("FANIN_API_KEY", "OPENAI_API_KEY")
_SWEEP_SKIPS = frozenset({"base_url", "allow_remote", "server_pid"})


class BenchError(Exception):
    """The run cannot go on (server unreachable, no model, ...); the message says why."""


def api_key_of(config: BenchConfig) -> str | None:
    return config.api_key or next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)


def raise_open_files_limit() -> None:
    """Many clients need many sockets: lift the soft limit to the hard one (as vLLM does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def fetch_model(target: Target, name: str | None, api_key: str | None) -> Model:
    """The served model from ``/v1/models`` (the one named ``name``, else the first)."""
    client = Client(target, keep_alive=False)
    try:
        status, body = await fetch(client, "/v1/models", auth_headers(api_key))
    except HttpError as e:
        raise BenchError(f"cannot reach the server at {target.origin}: {e}") from None
    if status != 200:
        raise BenchError(f"GET /v1/models answered {status}: {body[:200]!r}")
    try:
        cards = msgspec.json.decode(body)["data"]
        card = next((c for c in cards if name in (None, c["id"])), None)
    except (msgspec.DecodeError, KeyError, TypeError):
        raise BenchError("GET /v1/models did not return an OpenAI model list") from None
    if card is None:
        raise BenchError(f"the server has no model {name!r}")
    return Model(card["id"], str(card.get("root") or ""), int(card.get("max_model_len") or 0))


def image_source(config: BenchConfig) -> DistinctImages | None:
    """The run's photos, sized for ``num_prompts`` requests (None without image requests)."""
    count = images_needed(config, config.num_prompts)
    if not count:
        return None
    width, height = config.image_width_height
    return DistinctImages(width, height, count, config.image_quality)


@contextlib.asynccontextmanager
async def serving_images(
    config: BenchConfig, images: DistinctImages | None
) -> AsyncIterator[ImageServer | None]:
    """A local server of ``images`` while the block runs, when photos go as http URLs; None
    when they go as data URLs."""
    if images is None or config.image_transport != "http":
        yield None
        return
    async with ImageServer(images) as server:
        yield server


def result_stem(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanin bench",
        description="Load a running OpenAI-compatible server and report vLLM-style metrics. "
        "`fanin bench sweep --help`: the same workload against several fanin configurations.",
    )
    add_flags(parser, BenchConfig)
    return parser


def build_sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanin bench sweep",
        usage="fanin bench sweep [MODEL] [options] [-- FANIN_SERVE_FLAGS...]",
        description="Start `fanin serve MODEL` in each configuration in turn, run the same "
        "workload against it, stop it, and compare (ratios against the first configuration).",
    )
    parser.add_argument(
        "model_dir",  # not "model": --model is the served name, as in `fanin bench`
        nargs="?",
        metavar="MODEL",
        help="model directory (default: fanin's built-in default model)",
    )
    add_flags(parser, SweepConfig)
    add_flags(parser, BenchConfig, skip=_SWEEP_SKIPS)
    return parser


async def _bench(config: BenchConfig, target: Target, command: list[str]) -> int:
    api_key = api_key_of(config)
    model = await fetch_model(target, config.model, api_key)
    server_root = config.server_pid
    if server_root is None and target.is_loopback:
        server_root = listener_pid(target.port)
    images = image_source(config)
    async with serving_images(config, images) as image_server:
        base_url = image_server.base_url if image_server else None
        workload = Workload(config, model, images, base_url)
        run = await Run(config, target, workload, server_root, api_key).execute()
    result = {"machine": machine(), "command": command, **run_result(config, model.name, run)}
    if image_server is not None:
        result["images_fetched"] = image_server.num_served
    markdown = run_markdown(result, command)
    print(markdown)
    if config.result_dir:
        stem = Path(config.result_dir) / result_stem("bench")
        write_text(
            stem.with_suffix(".json"), msgspec.json.format(msgspec.json.encode(result)).decode()
        )
        write_text(stem.with_suffix(".md"), markdown)
        print(f"results: {stem}.json, {stem}.md", file=sys.stderr)
    return 0


def run_main(argv: list[str]) -> int:
    """``fanin bench [flags]``."""
    parser = build_run_parser()
    args = parser.parse_args(argv)
    try:
        config = from_args(BenchConfig, args)
        validate(config)
        target = parse_target(config.base_url, config.allow_remote)
    except (ValueError, TargetError) as e:
        parser.error(str(e))
    raise_open_files_limit()
    try:
        return run_async(_bench(config, target, ["fanin", "bench", *argv]))
    except (BenchError, WorkloadError, RuntimeError) as e:
        print(f"fanin bench: error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fanin bench ...``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:
        from bench.sweep import sweep_main

        return sweep_main(argv[1:])
    return run_main(argv)
