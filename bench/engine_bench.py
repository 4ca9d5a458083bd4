"""Engine model-side throughput on a GPU, each figure beside Hugging Face on the same model and
GPU and beside its floor:

- vision tower, images/s at 1024x768 and 1920x1080 photos: ours as served (every image of a
  step in one call, as many as the encoder budget takes) and one per call, HF's one per call
  and batched; floor = the tower's FLOPs over the measured bf16 matmul rate;
- prefill tokens/s: ours in budget-sized steps, HF one forward; against the matmul rate (the
  goal line is 40 % of it);
- decode ms/step at several batch sizes through the real engine loop (scheduler, step in
  flight, sampler, CUDA graphs), HF ``generate`` at some of them; floor = (decoder weights +
  the batch's KV) read once over the measured copy bandwidth.

    python bench/engine_bench.py --model DIR [--batches 1,16,64,256] [--ctx 1024] [--steps 64]
        [--rounds 3] [--out engine_bench.json]

Ours and HF stay loaded and are measured alternately, ``--rounds`` times after a warm-up; each
figure is the median over rounds (these machines are shared and noisy). ``--device cpu`` runs
every code path on the CPU in float32 (a smoke test; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.runner_loop import make_request, prefill, release, run_engine
from engine_core.model.runner import ModelRunner
from engine_core.model.runner_factory import load_runner
from ipc.config import EngineConfig

PHOTO_SIZES = {"1024x768": (1024, 768), "1920x1080": (1920, 1080)}


DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16


def sync_time() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s from a large copy (reads + writes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = sync_time()
    for _ in range(10):
        dst.copy_(src)
    return 2 * nbytes * 10 / (sync_time() - t0)


def matmul_rate(n: int = 8192) -> float:
    """bf16 GEMM FLOP/s at n x n x n."""
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    a @ b
    t0 = sync_time()
    for _ in range(20):
        a @ b
    return 2 * n**3 * 20 / (sync_time() - t0)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 8000), size=(n, length)).tolist()


def tower_flops(spec: Any, grid: tuple[int, int, int]) -> float:
    """FLOPs of one image through the tower: GEMMs plus attention over each segment."""
    t, h, w = grid
    n, e, m = t * h * w, spec.embed_dim, spec.mlp_dim
    mlp_gemms = 3 if spec.is_qwen2_5 else 2
    gemms = 2 * n * (3 * e * e + e * e + mlp_gemms * e * m)
    frame = h * w
    full = 4 * t * frame * frame * e
    window = 0.0
    if spec.window:
        side = spec.window * spec.merge
        window = 4 * n * min(side * side, frame) * e
    blocks = sum(full if i in spec.full_blocks else window for i in range(spec.depth))
    unit = e * spec.merge**2
    merger = 2 * (n // spec.merge**2) * (unit * unit + unit * spec.out_dim)
    return spec.depth * gemms + blocks + 2 * n * spec.patch_dim * e + merger


class Images:
    """Processor outputs of real photos at one size: (pixels, grid) per image."""

    def __init__(self, processor: Any, size: tuple[int, int], count: int) -> None:
        import skimage.data

        base = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
        photos = [Image.fromarray(base[i % 3]).resize(size) for i in range(count)]
        out = processor.image_processor(images=photos, return_tensors="pt")
        self.pixels, self.grids = out["pixel_values"], out["image_grid_thw"]
        self.items = []
        row = 0
        for g in self.grids.tolist():
            n = g[0] * g[1] * g[2]
            self.items.append((self.pixels[row : row + n].to(DTYPE), tuple(g)))
            row += n


def ours_vision(runner: ModelRunner, images: Images, per_call: int) -> float:
    """Images/s encoding ``images`` ``per_call`` at a time (host pixels, as the engine holds
    them, pinned), once the tower's attention has seen the batch's shape often enough to pick
    its kernel for it (``TowerAttention``)."""
    assert runner.vision is not None
    items = [(p.pin_memory() if DEVICE.type == "cuda" else p, g) for p, g in images.items]
    for _ in range(runner.vision.attention.warm_after + 1):  # as a recurring size is served
        runner.vision.encode(items[:per_call])
    t0 = sync_time()
    for i in range(0, len(items), per_call):
        runner.vision.encode(items[i : i + per_call])
    return len(items) / (sync_time() - t0)


@torch.inference_mode()
def hf_vision(hf: Any, images: Images, per_call: int) -> float:
    pixels = images.pixels.to(DEVICE, DTYPE)
    grids = images.grids.to(DEVICE)
    rows = [g[0] * g[1] * g[2] for g in images.grids.tolist()]
    starts = np.concatenate([[0], np.cumsum(rows)])
    t0 = sync_time()
    for i in range(0, len(rows), per_call):
        j = min(i + per_call, len(rows))
        hf.model.visual(pixels[starts[i] : starts[j]], grid_thw=grids[i:j])
    return len(rows) / (sync_time() - t0)


def ours_prefill(runner: ModelRunner, args: argparse.Namespace) -> float:
    """Tokens/s prefilling 4 prompts of ``prefill_len`` in budget-sized steps."""
    vocab = runner.facts.vocab_size
    reqs = [
        make_request(f"p{i}", p, 1) for i, p in enumerate(prompts(4, args.prefill_len, vocab, 1))
    ]
    t0 = sync_time()
    prefill(runner, reqs, args.budget)
    elapsed = sync_time() - t0
    release(runner, reqs)
    return 4 * args.prefill_len / elapsed


def decode_tokens(args: Any, batch: int) -> int:
    """Tokens each of ``batch`` sequences generates: ``steps`` with all of them decoding, plus
    the steps while the others' prompts are prefilled (the step budget takes a few at a time,
    and the first ones decode meanwhile)."""
    return args.steps + math.ceil(batch * args.ctx / args.budget) + 1


def ours_decode(runner: ModelRunner, config: EngineConfig, args: Any, batch: int) -> float:
    """Seconds per decode step of the engine loop at ``batch`` sequences of ``ctx`` tokens."""
    vocab = runner.facts.vocab_size
    reqs = [
        make_request(f"d{batch}-{i}", p, decode_tokens(args, batch))
        for i, p in enumerate(prompts(batch, args.ctx, vocab, 2))
    ]
    return run_engine(runner, config, reqs).decode_step_s()


@torch.inference_mode()
def hf_prefill(model: Any, args: argparse.Namespace, vocab: int) -> float:
    ids = torch.tensor(prompts(1, args.prefill_len, vocab, 1), device=DEVICE)
    t0 = sync_time()
    for _ in range(4):
        model(input_ids=ids)
    return 4 * args.prefill_len / (sync_time() - t0)


@torch.inference_mode()
def hf_decode(model: Any, args: argparse.Namespace, vocab: int, batch: int) -> float:
    """Seconds per decode step: generate(1 + steps) minus generate(1), over steps."""
    ids = torch.tensor(prompts(batch, args.ctx, vocab, 2), device=DEVICE)
    kw: dict[str, Any] = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = sync_time()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = sync_time()
    n = args.hf_steps + 1
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return ((sync_time() - t1) - (t1 - t0)) / args.hf_steps


def count_syncs(runner: ModelRunner, config: EngineConfig, args: Any) -> dict[str, float]:
    """Synchronising CUDA calls torch reports (sync debug mode) per step of a short greedy run
    at batch 16, beyond the loop's one wait per step for the previous step's results."""
    vocab = runner.facts.vocab_size
    n = min(256, args.ctx)
    reqs = [make_request(f"sync-{i}", p, 16) for i, p in enumerate(prompts(16, n, vocab, 3))]
    if DEVICE.type != "cuda":
        return {"steps": len(run_engine(runner, config, reqs).batches), "reported_syncs": 0}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = run_engine(runner, config, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"steps": len(run.batches), "reported_syncs": len(syncs)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(args.model, dtype=DTYPE)
    hf = hf.to(DEVICE).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    config = EngineConfig(
        dtype=str(DTYPE).removeprefix("torch."),  # type: ignore[arg-type]
        device=DEVICE.type,  # type: ignore[arg-type]
        cpu_kv_cache_bytes=1 << 30,
        max_model_len=max(
            args.ctx + decode_tokens(args, max(args.batches)) + 8, args.prefill_len + 8
        ),
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.budget,
        enforce_eager=args.enforce_eager,
        decode_attention=args.decode_attention,
    )
    runner = load_runner(config, args.model)
    vocab = runner.facts.vocab_size
    figures: dict[str, tuple[Callable[[], float], Callable[[], float] | None]] = {}
    vision: dict[str, Any] = {}
    if runner.vision is not None and not args.decode_only:
        for name, size in PHOTO_SIZES.items():
            images = Images(processor, size, args.images)
            patches = int(images.grids[0].prod())
            per_step = max(1, config.max_num_encoder_patches // patches)
            vision[name] = {
                "grid": images.items[0][1],
                "per_step": per_step,
                "tflop": tower_flops(runner.vision.spec, images.items[0][1]) / 1e12,
            }
            figures[f"vision_{name}_img_s"] = (
                lambda im=images, k=per_step: ours_vision(runner, im, k),
                lambda im=images, k=per_step: hf_vision(hf, im, k),
            )
            figures[f"vision_{name}_one_per_call_img_s"] = (
                lambda im=images: ours_vision(runner, im, 1),
                lambda im=images: hf_vision(hf, im, 1),
            )
    if not args.decode_only:
        figures["prefill_tok_s"] = (
            lambda: ours_prefill(runner, args),
            lambda: hf_prefill(hf, args, vocab),
        )
    for b in args.batches:
        figures[f"decode_ms_b{b}"] = (
            lambda b=b: ours_decode(runner, config, args, b) * 1e3,
            (lambda b=b: hf_decode(hf, args, vocab, b) * 1e3) if b in args.hf_batches else None,
        )
    samples: dict[str, dict[str, list[float]]] = {k: {"ours": [], "hf": []} for k in figures}
    errors: dict[str, str] = {}
    # Round 0 is the warm-up (kernels, allocator, cuBLAS plans). A figure that fails is
    # reported and left out; the others still run.
    for round_ in range(args.rounds + 1):
        for name, pair in figures.items():
            for who, measure_one in zip(("ours", "hf"), pair, strict=True):
                if measure_one is None or f"{name} {who}" in errors:
                    continue
                try:
                    value = measure_one()
                except Exception as exc:  # one figure's failure must not lose the others
                    errors[f"{name} {who}"] = f"{type(exc).__name__}: {exc}"
                    continue
                if round_:
                    samples[name][who].append(value)
    decoder = [p for n, p in hf.named_parameters() if "visual" not in n]
    embedding = hf.get_input_embeddings().weight.numel()
    return {
        "samples": samples,
        "errors": errors,
        "vision": vision,
        "decoder_weight_bytes": sum(p.numel() * p.element_size() for p in decoder),
        # what a prefill token multiplies by: every decoder weight but the embedding table
        "decoder_matmul_params": sum(p.numel() for p in decoder) - embedding,
        "kv_bytes_per_token": _kv_bytes_per_token(runner),
        "graphs": getattr(runner, "graphs", None) is not None,
        "compiled_kernels": bool(getattr(getattr(runner, "kernels", None), "is_compiled", False)),
        "vision_flash": bool(runner.vision is not None and runner.vision.uses_flash),
        "syncs": count_syncs(runner, config, args),
        "kernels_fallen_back": runner.kernels.fallen_back() if hasattr(runner, "kernels") else [],
    }


def _kv_bytes_per_token(runner: ModelRunner) -> int:
    kv = runner.kv  # type: ignore[attr-defined]  (the decoder runner's cache)
    layers, _, _, _, heads, dim = kv.shape
    return 2 * layers * heads * dim * kv.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--batches", default="1,16,64,256", type=ints)
    parser.add_argument("--hf-batches", default="1,64", type=ints, help="decode batches for HF")
    parser.add_argument("--ctx", type=int, default=1024, help="prompt tokens per decode sequence")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per sequence (ours)")
    parser.add_argument("--hf-steps", type=int, default=16, help="decode steps timed (HF)")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=2048, help="max tokens per engine step")
    parser.add_argument("--images", type=int, default=12, help="photos per vision measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (ours)")
    parser.add_argument(
        "--decode-attention", default="triton", choices=["triton", "flash"], help="ours, graphed"
    )
    parser.add_argument("--decode-only", action="store_true", help="no vision, no prefill")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    global DEVICE, DTYPE
    if args.device == "cpu":
        DEVICE, DTYPE = torch.device("cpu"), torch.float32
        bw, rate = copy_bandwidth(1 << 24), matmul_rate(256)
    else:
        bw, rate = copy_bandwidth(), matmul_rate()
    result = measure(args)
    report = {
        "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "copy_bandwidth_GBps": bw / 1e9,
        "matmul_TFLOPs": rate / 1e12,
        **result,
    }
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_report(report: dict[str, Any]) -> None:
    """The tables of one run (also used by bench/engine_report.py)."""
    samples, args = report["samples"], report["args"]
    bw, rate = report["copy_bandwidth_GBps"] * 1e9, report["matmul_TFLOPs"] * 1e12
    med = {k: {who: _median(v) for who, v in s.items()} for k, s in samples.items()}
    print(
        f"GPU {report['gpu']}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
        f"graphs {report['graphs']}, compiled kernels {report['compiled_kernels']}, vision "
        f"flash {report['vision_flash']}, decode attention "
        f"{args.get('decode_attention', 'flash')}; medians of {args['rounds']} alternating rounds"
    )
    if report["vision"]:
        print(
            "| vision | grid | ours img/s (per step) | ours 1/call | HF 1/call | HF batched "
            "| floor img/s | ours / floor |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, v in report["vision"].items():
            served, one = med[f"vision_{name}_img_s"], med[f"vision_{name}_one_per_call_img_s"]
            floor = rate / (v["tflop"] * 1e12)
            print(
                f"| {name} | {tuple(v['grid'])} | {served['ours']:.1f} ({v['per_step']}) "
                f"| {one['ours']:.1f} | {one['hf']:.1f} | {served['hf']:.1f} | {floor:.1f} "
                f"| {served['ours'] / floor:.0%} |"
            )
    if "prefill_tok_s" in med:
        p = med["prefill_tok_s"]
        prefill_floor = rate / (2 * report["decoder_matmul_params"])
        print(
            f"prefill tok/s: ours {p['ours']:.0f}, HF {p['hf']:.0f}; matmul-rate floor "
            f"{prefill_floor:.0f} (ours at {p['ours'] / prefill_floor:.0%}; goal 40 %)"
        )
    print("| batch | ours ms/step | HF ms/step | floor ms/step | ours / floor | ours tok/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in args["batches"]:
        o, h = med[f"decode_ms_b{b}"]["ours"], med[f"decode_ms_b{b}"]["hf"]
        kv = b * (args["ctx"] + args["steps"] / 2) * report["kv_bytes_per_token"]
        floor = (report["decoder_weight_bytes"] + kv) / bw * 1e3
        hf = f"{h:.2f}" if h == h else "-"
        print(f"| {b} | {o:.2f} | {hf} | {floor:.2f} | {o / floor:.2f}x | {b / o * 1e3:.0f} |")
    for figure, error in report.get("errors", {}).items():
        print(f"not measured: {figure}: {error}")
    s = report["syncs"]
    print(f"synchronising calls reported in a {s['steps']}-step run: {s['reported_syncs']}")
    if report.get("kernels_fallen_back"):
        print(f"compiled kernels that failed and ran eagerly: {report['kernels_fallen_back']}")


if __name__ == "__main__":
    main()
