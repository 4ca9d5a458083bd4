"""Engine model-side throughput on a GPU: prefill tokens/s and decode tokens/s at several batch
sizes, each beside Hugging Face on the same model and GPU and beside the memory-bandwidth floor
(weights + KV read per decode step over measured copy bandwidth).

    python bench/engine_bench.py --model DIR [--batches 1,16,64] [--ctx 512] [--steps 64]
        [--rounds 3] [--out engine.json]

Ours drives ``ModelRunner.execute`` directly (bench/runner_loop.py): the model, attention and
KV path, without the scheduler or sockets; greedy argmax on the device stands in for the
sampler. HF: a forward pass for prefill, ``generate`` for decode. Both models stay loaded and
are measured alternately, ``--rounds`` times: each figure is the median over rounds, and the
ratios come with their range over rounds (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.runner_loop import decode_greedy, make_request, prefill, release
from engine_core.model.runner import ModelRunner, load_runner
from ipc.config import EngineConfig


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s from a large copy (reads + writes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = sync_time()
    for _ in range(10):
        dst.copy_(src)
    return 2 * nbytes * 10 / (sync_time() - t0)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 8000), size=(n, length)).tolist()


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


def ours_decode(runner: ModelRunner, args: argparse.Namespace, batch: int) -> float:
    """Seconds per decode step at ``batch`` sequences of ``ctx`` prompt tokens."""
    vocab = runner.facts.vocab_size
    reqs = [
        make_request(f"d{batch}-{i}", p, args.steps)
        for i, p in enumerate(prompts(batch, args.ctx, vocab, 2))
    ]
    first = prefill(runner, reqs, args.budget)
    t0 = sync_time()
    decode_greedy(runner, reqs, first, args.steps + 1)
    step_s = (sync_time() - t0) / args.steps
    release(runner, reqs)
    return step_s


@torch.inference_mode()
def hf_prefill(model: Any, args: argparse.Namespace, vocab: int) -> float:
    ids = torch.tensor(prompts(1, args.prefill_len, vocab, 1), device="cuda")
    t0 = sync_time()
    for _ in range(4):
        model(input_ids=ids)
    return 4 * args.prefill_len / (sync_time() - t0)


@torch.inference_mode()
def hf_decode(model: Any, args: argparse.Namespace, vocab: int, batch: int) -> float:
    """Seconds per decode step: generate(1 + steps) minus generate(1), over steps."""
    ids = torch.tensor(prompts(batch, args.ctx, vocab, 2), device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = sync_time()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = sync_time()
    n = args.hf_steps + 1
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return ((sync_time() - t1) - (t1 - t0)) / args.hf_steps


def load_both(args: argparse.Namespace) -> tuple[Any, ModelRunner]:
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16)
    hf = hf.cuda().eval()
    config = EngineConfig(
        model=args.model,
        dtype="bfloat16",
        device="cuda",
        max_model_len=max(args.ctx + args.steps + 8, args.prefill_len + 8),
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.budget,
        enforce_eager=args.enforce_eager,
    )
    return hf, load_runner(config)


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Per round, ours then HF for each figure: ``{figure: {"ours": [...], "hf": [...]}}``, and
    the decoder's weight bytes (what every decode step reads once)."""
    hf, runner = load_both(args)
    vocab = runner.facts.vocab_size
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in hf.named_parameters() if "visual" not in n
    )
    figures: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {
        "prefill_tok_s": (lambda: ours_prefill(runner, args), lambda: hf_prefill(hf, args, vocab))
    }
    for b in args.batches:
        figures[f"decode_ms_b{b}"] = (
            lambda b=b: ours_decode(runner, args, b) * 1e3,
            lambda b=b: hf_decode(hf, args, vocab, b) * 1e3,
        )
    for ours, theirs in figures.values():  # warm-up: kernels, allocator, cuBLAS plans
        ours(), theirs()
    samples: dict[str, dict[str, list[float]]] = {k: {"ours": [], "hf": []} for k in figures}
    for _ in range(args.rounds):
        for name, (ours, theirs) in figures.items():
            samples[name]["ours"].append(ours())
            samples[name]["hf"].append(theirs())
    return samples, weight_bytes


def kv_bytes_per_token(model_dir: str) -> int:
    """K and V of every layer for one token, in bf16."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--batches", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--ctx", type=int, default=512, help="prompt tokens per decode sequence")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed (ours)")
    parser.add_argument("--hf-steps", type=int, default=16, help="decode steps timed (HF)")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=2048, help="max tokens per engine step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (ours)")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    bw = copy_bandwidth()
    kv_per_token = kv_bytes_per_token(args.model)
    samples, weight_bytes = measure(args)
    med = {k: {who: statistics.median(v) for who, v in s.items()} for k, s in samples.items()}
    floor = {
        b: (weight_bytes + b * (args.ctx + args.steps / 2) * kv_per_token) / bw * 1e3
        for b in args.batches
    }
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes": weight_bytes,
        "samples": samples,
        "floor_ms_per_step": floor,
    }
    print(
        f"GPU {report['gpu']}, copy bandwidth {bw / 1e9:.0f} GB/s, decoder weights "
        f"{weight_bytes / 1e9:.2f} GB; medians of {args.rounds} alternating rounds; ours "
        f"{'eager' if args.enforce_eager else 'with CUDA graphs for decode'}"
    )

    def ratio_range(name: str, ours_over_hf: bool) -> str:
        s = samples[name]
        rs = [(o / h if ours_over_hf else h / o) for o, h in zip(s["ours"], s["hf"], strict=True)]
        return f"{min(rs):.2f}-{max(rs):.2f}"

    p = med["prefill_tok_s"]
    print(
        f"prefill tok/s: ours {p['ours']:.0f}  HF {p['hf']:.0f}  ours/HF "
        f"{p['ours'] / p['hf']:.2f}x (rounds {ratio_range('prefill_tok_s', True)})"
    )
    print(
        "| batch | ours ms/step | HF ms/step | floor ms/step | ours tok/s | HF tok/s "
        "| HF/ours (range) | floor/ours |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batches:
        name = f"decode_ms_b{b}"
        o, h = med[name]["ours"], med[name]["hf"]
        print(
            f"| {b} | {o:.2f} | {h:.2f} | {floor[b]:.2f} | {b / o * 1e3:.0f} | {b / h * 1e3:.0f} "
            f"| {h / o:.2f}x ({ratio_range(name, False)}) | {floor[b] / o:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
