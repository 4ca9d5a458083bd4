"""The bench's settings, each defined once: a frozen struct whose fields give the flags of
``fanin bench`` and ``fanin bench sweep`` (name, type, default and help text), validated by
``msgspec.convert`` so that a bad value is a usage error naming its flag.

Names and meanings follow vLLM's ``benchmark_serving`` where it has the setting
(``--request-rate``, ``--burstiness``, ``--max-concurrency``, ``--num-prompts``, ``--goodput``,
``--ignore-eos``, ``--metric-percentiles``, ``--random-input-len``, ...).
"""

from __future__ import annotations

import argparse
import math
import re
import types
import typing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

_SIZE = re.compile(r"^(\d+)x(\d+)$")
DAY = 24 * 3600.0  # every bound in time is finite
GOODPUT_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el", "e2el": "e2el"}


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One workload and how it is sent."""

    base_url: Annotated[
        str,
        Meta(description="server to load (its root URL; only this machine unless --allow-remote)"),
    ] = "http://127.0.0.1:8000"
    allow_remote: Annotated[
        bool, Meta(description="allow a --base-url that is not loopback (127.0.0.0/8, ::1)")
    ] = False
    endpoint_type: Annotated[
        Literal["chat", "completions"],
        Meta(description="/v1/chat/completions or /v1/completions (text datasets only)"),
    ] = "chat"
    model: Annotated[
        str | None, Meta(description="model name in requests; default: the server's first model")
    ] = None
    api_key: Annotated[
        str | None, Meta(description="sent as 'Authorization: Bearer KEY' (also FANIN_API_KEY)")
    ] = None
    dataset: Annotated[
        str,
        Meta(
            description="image, sharegpt or random, or a mix with weights, e.g. "
            "'image:0.6,sharegpt:0.4'"
        ),
    ] = "image"
    num_prompts: Annotated[
        int, Meta(ge=1, le=10_000_000, description="requests to send at most, warm-up included")
    ] = 1000
    duration: Annotated[
        float, Meta(gt=0, le=DAY, description="seconds to measure at most, after the warm-up")
    ] = 60.0
    warmup_seconds: Annotated[
        float, Meta(ge=0, le=DAY, description="seconds of load before measuring (not in results)")
    ] = 0.0
    request_rate: Annotated[
        float, Meta(gt=0, description="requests per second (inf: as fast as allowed)")
    ] = math.inf
    burstiness: Annotated[
        float, Meta(gt=0, description="gamma shape of arrivals (1: Poisson; <1 burstier)")
    ] = 1.0
    max_concurrency: (
        Annotated[
            int, Meta(ge=1, description="requests in flight at most (closed loop at inf rate)")
        ]
        | None
    ) = None
    output_len: (
        Annotated[
            int,
            Meta(
                ge=1, description="output tokens per request (default 128; ShareGPT: its reply's)"
            ),
        ]
        | None
    ) = None
    ignore_eos: Annotated[bool, Meta(description="ask for exactly the output length")] = False
    temperature: Annotated[float, Meta(ge=0, description="sampling temperature")] = 0.0
    random_input_len: Annotated[
        int, Meta(ge=1, description="prompt tokens of the random dataset")
    ] = 1024
    random_range_ratio: Annotated[
        float, Meta(ge=0, lt=1, description="random prompt lengths vary by +-this fraction")
    ] = 0.0
    tokenizer: Annotated[
        str | None,
        Meta(description="tokenizer directory for text datasets; default: the served model's"),
    ] = None
    image_size: Annotated[
        str, Meta(description="WIDTHxHEIGHT of the photos (each request's are distinct)")
    ] = "1024x768"
    images_per_request: Annotated[int, Meta(ge=1, le=64, description="photos per request")] = 1
    image_transport: Annotated[
        Literal["data", "http"],
        Meta(
            description="photos as data: URLs, or as http URLs of a static server the bench "
            "runs on 127.0.0.1 (the server then needs --allow-private-media-urls)"
        ),
    ] = "data"
    image_quality: Annotated[int, Meta(ge=1, le=100, description="JPEG quality")] = 90
    image_prompt: Annotated[str, Meta(description="the text sent with the photos")] = (
        "Describe this image."
    )
    goodput: Annotated[
        list[str] | None,
        Meta(description="SLOs in ms for goodput, e.g. 'ttft:500 tpot:50 e2e:2000'"),
    ] = None
    metric_percentiles: Annotated[
        str, Meta(description="comma-separated percentiles to report besides the median")
    ] = "99"
    request_timeout: Annotated[
        float, Meta(gt=0, le=DAY, description="seconds allowed per request")
    ] = 300.0
    health_interval_ms: Annotated[
        float, Meta(ge=0, description="a /health probe every this many ms (0: none)")
    ] = 50.0
    keep_alive: Annotated[
        bool, Meta(description="reuse connections (as SDK clients do); off: one per request")
    ] = True
    server_pid: Annotated[
        int | None,
        Meta(description="pid whose process tree's CPU is recorded; default: the listener's"),
    ] = None
    seed: Annotated[int, Meta(description="seed of the arrivals and the dataset mix")] = 0
    result_dir: Annotated[
        str | None, Meta(description="write the JSON result and markdown table here")
    ] = None
    progress: Annotated[bool, Meta(description="progress bar on stderr")] = True

    @property
    def image_width_height(self) -> tuple[int, int]:
        match = _SIZE.match(self.image_size)
        assert match, "checked in validate()"
        return int(match.group(1)), int(match.group(2))

    @property
    def percentiles(self) -> list[float]:
        return [float(p) for p in self.metric_percentiles.split(",") if p.strip()]

    @property
    def goodput_slos(self) -> dict[str, float]:
        """vLLM's metric name (ttft, tpot, e2el) -> SLO in ms."""
        slos = {}
        for item in self.goodput or []:
            key, _, value = item.partition(":")
            slos[GOODPUT_KEYS[key]] = float(value)
        return slos


class SweepConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Server configurations to measure one workload against, one after another."""

    configs: Annotated[
        list[str] | None,
        Meta(
            description="[inline:|pool:|process:]NxW each: --api-server-count N, "
            "--renderer-num-workers W, --preprocess-mode (none given: fanin's default), "
            "e.g. 'inline:1x1 pool:1x4 4x2 process:4x2'"
        ),
    ] = None
    preset: Annotated[
        Literal["frontend"] | None,
        Meta(
            description="'frontend': inline 1x1, pool 1x1, 1x4, 1xCORES, then N x 1 and N x 2 "
            "for N = 1, 2, 4, 8, ... up to the cores"
        ),
    ] = None
    env: Annotated[
        list[str] | None, Meta(description="KEY=VALUE set in every server's environment")
    ] = None
    server_start_timeout: Annotated[
        float, Meta(gt=0, le=DAY, description="seconds a server gets to answer /ready")
    ] = 600.0
    server_stop_timeout: Annotated[
        float, Meta(gt=0, le=DAY, description="seconds a server gets to exit after SIGTERM")
    ] = 60.0
    time_budget: (
        Annotated[
            float,
            Meta(
                gt=0,
                le=DAY,
                description="seconds the whole sweep may take: a configuration that would not "
                "fit (judged by the slowest so far) is skipped and reported",
            ),
        ]
        | None
    ) = None
    rate_multiples: Annotated[
        list[float] | None,
        Meta(
            description="overload runs: the first configuration first runs closed loop "
            "(--max-concurrency clients) to find the rate that saturates it, then every "
            "configuration runs Poisson arrivals at these multiples of that rate (e.g. '1 2')",
        ),
    ] = None
    strict: Annotated[
        bool,
        Meta(
            description="exit 1 unless every configuration ran without a failed request, "
            "stopped cleanly on SIGTERM, and the plot was written (for CI)"
        ),
    ] = False


def _unwrap(annotation: Any) -> tuple[Any, Meta | None]:
    """``Annotated[T, Meta(...)] | None`` or ``Annotated[T | None, Meta(...)]`` -> (T, Meta)."""
    meta = None
    if typing.get_origin(annotation) is Annotated:
        annotation, meta = typing.get_args(annotation)[:2]
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
        inner, inner_meta = _unwrap(members[0])
        return inner, meta or inner_meta
    return annotation, meta


def add_flags(
    parser: argparse.ArgumentParser,
    struct: type[msgspec.Struct],
    skip: frozenset[str] = frozenset(),
) -> None:
    """One ``--flag`` per field of ``struct`` (those in ``skip`` left out)."""
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in msgspec.structs.fields(struct):
        if field.name in skip:
            continue
        kind, meta = _unwrap(hints[field.name])
        shown = "unset" if field.default is None else field.default
        kw: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        kw["help"] = f"{meta.description if meta else ''} (default: {shown})"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kw["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kw.update(nargs="+", metavar="VALUE", type=item)
        else:
            kw["type"] = kind
        parser.add_argument("--" + field.name.replace("_", "-"), **kw)


def from_args(struct: type[msgspec.Struct], args: argparse.Namespace) -> Any:
    """The struct from parsed flags (unset ones keep their defaults); ``ValueError`` names
    the flag of a bad value."""
    names = {f.name for f in msgspec.structs.fields(struct)}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as e:
        match = re.search(r" - at `\$\.(\w+)[^`]*`$", str(e))
        if not match:
            raise ValueError(str(e)) from None
        flag = "--" + match.group(1).replace("_", "-")
        raise ValueError(f"{flag}: {str(e)[: match.start()]}") from None


def validate(config: BenchConfig) -> None:
    """Checks that need more than a field's type; ``ValueError`` names the flag."""
    if not _SIZE.match(config.image_size):
        raise ValueError(f"--image-size: expected WIDTHxHEIGHT, got {config.image_size!r}")
    width, height = config.image_width_height
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise ValueError(f"--image-size: {config.image_size} is outside 8x8 .. 8192x8192")
    try:
        percentiles = config.percentiles
    except ValueError:
        raise ValueError(
            f"--metric-percentiles: not numbers: {config.metric_percentiles!r}"
        ) from None
    if not all(0 < p < 100 for p in percentiles):
        raise ValueError("--metric-percentiles: each must be between 0 and 100")
    for item in config.goodput or []:
        key, _, value = item.partition(":")
        if key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput: unknown metric {key!r} (ttft, tpot, e2e)")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r} is not METRIC:MILLISECONDS") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {item!r} needs a positive number of ms")
