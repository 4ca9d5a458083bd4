"""Where the GPU time of the vision tower and of a prefill step goes, kernel by kernel, and
what the tower's attention would cost through each attention backend torch has.

    python bench/engine_profile.py --model DIR [--images 4] [--size 1024x768]
        [--prefill-len 2048] [--out profile.json]

Three parts, each after a warm-up, each figure the median of ``--repeats`` timed calls:

- the tower on ``--images`` distinct photos in one call (as the engine encodes a step's
  images) and one prefill step of ``--prefill-len`` tokens, under ``torch.profiler``: CUDA
  time per call by kernel kind (GEMM, attention, norm, fused/elementwise, copy, other) and the
  heaviest kernels, beside the wall time per call (a gap between the two is host or launch
  time);
- the tower's attention alone at its real shape (``--images`` segments of one image's patches):
  the varlen kernel the tower uses, against SDPA's cuDNN, FlashAttention and memory-efficient
  backends over the same segments batched as (images, heads, patches, head_dim), each checked
  against the varlen output;
- the tower's GEMM shapes alone, in TFLOP/s, beside the square-matrix rate.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from bench import engine_bench
from bench.engine_bench import PHOTO_SIZES, Images, matmul_rate, prompts, tower_flops
from bench.runner_loop import make_request, prefill, release
from engine_core.batch import Chunk
from engine_core.model.runner_factory import load_runner
from engine_core.model.vision_attention import Segments, TowerAttention, attend_runs
from ipc.config import EngineConfig

#: Kernel-name fragments -> kind, first match wins (names are lower-cased first).
KINDS = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "linear", "addmm")),
    ("norm", ("layer_norm", "layernorm", "rms")),
    ("fused/elementwise", ("triton", "elementwise", "vectorized", "unrolled", "reduce")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` synchronised calls, after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_profile(fn: Callable[[], Any], repeats: int, top: int) -> dict[str, Any]:
    """CUDA (or CPU) kernel time per call of ``fn`` by kind, and its ``top`` heaviest kernels."""
    fn()
    sync()
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync()
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if on_gpu and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not on_gpu and event.cpu_parent is not None:
            continue  # CPU: top-level ops only, or children would be counted twice
        us = event.device_time if on_gpu else event.cpu_time
        by_kind[kind_of(event.name)] += us / 1e3 / repeats
        entry = by_name[event.name]
        entry[0] += us / 1e3 / repeats
        entry[1] += 1 / repeats
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernel_ms": sum(by_kind.values()),
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "kernels_per_call": sum(v[1] for v in by_name.values()),
        "top": [
            {"name": n[:110], "ms": round(v[0], 4), "calls": round(v[1], 1)} for n, v in heaviest
        ],
    }


def attention_backends(
    attention: TowerAttention,
    num_heads: int,
    head_dim: int,
    patches: int,
    images: int,
    device: torch.device,
    dtype: Any,
    repeats: int,
) -> dict[str, Any]:
    """ms per call and TFLOP/s of full attention over ``images`` segments of ``patches``: the
    tower's choice, its varlen kernel alone and each SDPA backend over the batched segments;
    then the first call of cuDNN at lengths it has not seen (it builds a graph per shape)
    against a repeated call. Each is called ``warm_after`` times first, as a recurring size is
    served."""
    gen = torch.Generator(device=device).manual_seed(0)
    n = images * patches
    q, k, v = (
        torch.randn(n, num_heads, head_dim, device=device, generator=gen).to(dtype)
        for _ in range(3)
    )
    scale = head_dim**-0.5
    flops = 4 * images * patches * patches * num_heads * head_dim
    results: dict[str, Any] = {"shape": [images, num_heads, patches, head_dim]}
    candidates: dict[str, TowerAttention] = {f"tower's: {attention.describe()}": attention}
    if attention.varlen is not None:
        candidates["varlen alone"] = TowerAttention(varlen=attention.varlen, device=device)
    for backend in (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ):
        candidates[f"sdpa {backend.name}"] = TowerAttention(batched=backend, device=device)
    reference = attend_runs(q, k, v, Segments.of([patches] * images), scale, SDPBackend.MATH)
    reference = reference.float()
    for name, attend in candidates.items():

        def fn(a: TowerAttention = attend) -> torch.Tensor:
            return a(q, k, v, a.prepare([patches] * images), scale)

        try:
            for _ in range(attend.warm_after + 1):  # the shape built (or not) for good
                out = fn()
            ms = wall_ms(fn, repeats)
        except RuntimeError as exc:
            results[name] = {"error": str(exc).splitlines()[0][:160]}
            continue
        error = float((out.float() - reference).norm() / reference.norm())
        results[name] = {
            "ms": round(ms, 3),
            "TFLOPs": round(flops / ms / 1e9, 1),
            "rel_err_vs_math": error,
        }
    first, again = [], []
    cudnn = TowerAttention(batched=SDPBackend.CUDNN_ATTENTION, device=device)
    for extra in range(1, 6):  # lengths no call above used
        m = patches + 28 * extra
        x = torch.randn(m, num_heads, head_dim, device=device, generator=gen).to(dtype)
        seg = cudnn.prepare([m])
        for times in (first, again):
            sync()
            t0 = time.perf_counter()
            try:
                cudnn(x, x, x, seg, scale)
            except RuntimeError:
                break
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    results["cuDNN at a new length: first call ms"] = [round(t, 3) for t in first]
    results["cuDNN at a new length: second call ms"] = [round(t, 3) for t in again]
    return results


def gemm_rates(
    rows: int, spec: Any, device: torch.device, dtype: Any, repeats: int
) -> dict[str, float]:
    """TFLOP/s of the tower's GEMMs (with bias, as nn.Linear runs them) at ``rows`` patches."""
    e, m = spec.embed_dim, spec.mlp_dim
    shapes = {"qkv": (e, 3 * e), "proj": (e, e), "fc1": (e, m), "fc2": (m, e)}
    out = {}
    for name, (k, n) in shapes.items():
        x = torch.randn(rows, k, device=device).to(dtype)
        w = torch.randn(n, k, device=device).to(dtype)
        b = torch.randn(n, device=device).to(dtype)
        ms = wall_ms(lambda x=x, w=w, b=b: F.linear(x, w, b), repeats)
        out[name] = round(2 * rows * k * n / ms / 1e9, 1)
    return out


def decode_profile(runner: Any, batch: int, ctx: int, repeats: int, top: int) -> dict[str, Any]:
    """One decode step of ``batch`` sequences at ``ctx`` tokens through ``runner.execute``
    (the captured graph where there is one, greedy): GPU time per step by kernel kind, the
    wall time of a step waited for alone, and of steps queued back to back (the GPU's own
    rate: what a loop that never waits could reach)."""
    vocab = runner.facts.vocab_size
    reqs = [
        make_request(f"d{batch}-{i}", p, 8) for i, p in enumerate(prompts(batch, ctx, vocab, 2))
    ]
    prefill(runner, reqs, runner.facts.max_num_batched_tokens)
    chunks = [
        Chunk(r, i, ctx, np.array([1], dtype=np.int32), wants_logits=True)
        for i, r in enumerate(reqs)
    ]
    step = lambda: runner.execute(chunks, greedy=True)  # noqa: E731
    alone = wall_ms(step, repeats)
    queued = wall_ms(lambda: [step() for _ in range(repeats)], 3) / repeats
    profiled = kernel_profile(step, repeats, top)
    release(runner, reqs)
    return {"wall_ms_alone": alone, "wall_ms_queued": queued, **profiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=4, help="photos in one tower call")
    parser.add_argument("--size", default="1024x768", choices=sorted(PHOTO_SIZES))
    parser.add_argument("--prefill-len", type=int, default=2048)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--decode-batches", default="1,64", type=ints)
    parser.add_argument("--ctx", type=int, default=1024, help="context of each decode sequence")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    from transformers import AutoProcessor

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine_bench.DEVICE, engine_bench.DTYPE = device, dtype  # what its helpers run on
    config = EngineConfig(
        dtype=str(dtype).removeprefix("torch."),  # type: ignore[arg-type]
        device=device.type,  # type: ignore[arg-type]
        cpu_kv_cache_bytes=1 << 30,
        max_model_len=max(args.prefill_len, args.ctx) + 8,
        max_num_seqs=max([4, *args.decode_batches]),
        max_num_batched_tokens=args.prefill_len,
    )
    runner = load_runner(config, args.model)
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("out", "model")},
        "matmul_TFLOPs": matmul_rate(8192 if device.type == "cuda" else 256) / 1e12,
    }
    vision = runner.vision
    if vision is not None:
        processor = AutoProcessor.from_pretrained(args.model)
        images = Images(processor, PHOTO_SIZES[args.size], args.images)
        items = [(p.pin_memory() if device.type == "cuda" else p, g) for p, g in images.items]
        grid = items[0][1]
        patches = grid[0] * grid[1] * grid[2]
        encode = lambda: vision.encode(items)  # noqa: E731
        for _ in range(vision.attention.warm_after + 1):  # as a recurring size is served
            encode()
        ms = wall_ms(encode, args.repeats)
        flops = args.images * tower_flops(vision.spec, grid)
        report["tower"] = {
            "grid": grid,
            "wall_ms": ms,
            "img_s": args.images / ms * 1e3,
            "TFLOPs": flops / ms / 1e9,
            **kernel_profile(encode, args.repeats, args.top),
        }
        report["tower_attention"] = attention_backends(
            vision.attention,
            vision.spec.num_heads,
            vision.spec.head_dim,
            patches,
            args.images,
            device,
            dtype,
            args.repeats,
        )
        report["tower_gemm_TFLOPs"] = gemm_rates(
            args.images * patches, vision.spec, device, dtype, args.repeats
        )
    vocab = runner.facts.vocab_size
    reqs = [make_request("p", prompts(1, args.prefill_len, vocab, 1)[0], 1)]

    def one_prefill() -> None:
        prefill(runner, reqs, args.prefill_len)
        release(runner, reqs)

    ms = wall_ms(one_prefill, args.repeats)
    report["prefill"] = {
        "tokens": args.prefill_len,
        "wall_ms": ms,
        "tok_s": args.prefill_len / ms * 1e3,
        **kernel_profile(one_prefill, args.repeats, args.top),
    }
    if args.decode_batches:
        report["decode"] = {
            str(b): decode_profile(runner, b, args.ctx, args.repeats, args.top)
            for b in args.decode_batches
        }
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['gpu']}, torch {r['torch']}, matmul {r['matmul_TFLOPs']:.0f} TFLOP/s")
    for part in ("tower", "prefill"):
        if part not in r:
            continue
        p = r[part]
        rate = (
            f"{p['img_s']:.1f} img/s, {p['TFLOPs']:.0f} TFLOP/s"
            if part == "tower"
            else (f"{p['tok_s']:,.0f} tok/s")
        )
        print(
            f"\n{part}: wall {p['wall_ms']:.2f} ms/call ({rate}); kernels "
            f"{p['kernel_ms']:.2f} ms/call, {p['kernels_per_call']:.0f} launches"
        )
        for kind, ms in p["by_kind_ms"].items():
            print(f"  {kind:<18} {ms:8.3f} ms  {100 * ms / p['kernel_ms']:5.1f} %")
        for k in p["top"]:
            print(f"    {k['ms']:8.3f} ms  x{k['calls']:<6} {k['name']}")
    for b, d in r.get("decode", {}).items():
        print(
            f"\ndecode batch {b}: {d['wall_ms_alone']:.3f} ms a step waited for alone, "
            f"{d['wall_ms_queued']:.3f} queued back to back; kernels {d['kernel_ms']:.3f} ms, "
            f"{d['kernels_per_call']:.0f} launches"
        )
        for kind, ms in d["by_kind_ms"].items():
            print(f"  {kind:<18} {ms:8.3f} ms")
        for k in d["top"][:6]:
            print(f"    {k['ms']:8.3f} ms  x{k['calls']:<6} {k['name']}")
    if "tower_attention" in r:
        print(f"\ntower attention alone, shape {r['tower_attention']['shape']}:")
        for name, v in r["tower_attention"].items():
            if name != "shape":
                print(f"  {name:<22} {v}")
        print(f"tower GEMMs (TFLOP/s): {r['tower_gemm_TFLOPs']}")


if __name__ == "__main__":
    main()
