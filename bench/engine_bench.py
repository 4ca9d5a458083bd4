"""Engine model-side throughput on a GPU: prefill tokens/s and decode tokens/s at several batch
sizes, each beside Hugging Face ``generate`` on the same model and machine and beside the
memory-bandwidth floor (weights + KV read per decode step over measured copy bandwidth).

    python bench/engine_bench.py --model DIR [--batches 1,16,64] [--ctx 512] [--steps 64]
        [--out bench/results/engine.json]

It drives ``ModelRunner.execute`` directly (bench/runner_loop.py): the model, attention and KV
path, without the scheduler or sockets; greedy argmax on the device stands in for the sampler.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import numpy as np
import torch

from bench.runner_loop import decode_greedy, make_request, prefill, release
from engine_core.model.runner import load_runner
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


def bench_ours(args: argparse.Namespace) -> dict:
    max_b = max(args.batches)
    config = EngineConfig(
        model=args.model,
        dtype="bfloat16",
        device="cuda",
        max_model_len=max(args.ctx + args.steps + 8, args.prefill_len + 8),
        max_num_seqs=max_b,
        max_num_batched_tokens=args.budget,
    )
    runner = load_runner(config)
    vocab = runner.facts.vocab_size
    res: dict = {"decode": {}}
    # Prefill: several full-length prompts, one budget-sized step after another.
    reqs = [
        make_request(f"p{i}", p, 1) for i, p in enumerate(prompts(4, args.prefill_len, vocab, 1))
    ]
    prefill(runner, reqs[:1], args.budget)  # warm-up
    release(runner, reqs[:1])
    t0 = sync_time()
    prefill(runner, reqs, args.budget)
    res["prefill_tok_s"] = 4 * args.prefill_len / (sync_time() - t0)
    release(runner, reqs)
    for b in args.batches:
        reqs = [
            make_request(f"d{b}-{i}", p, args.steps)
            for i, p in enumerate(prompts(b, args.ctx, vocab, 2))
        ]
        first = prefill(runner, reqs, args.budget)
        decode_greedy(runner, reqs, first, 4)  # warm-up at this batch size
        release(runner, reqs)
        first = prefill(runner, reqs, args.budget)
        t0 = sync_time()
        decode_greedy(runner, reqs, first, args.steps + 1)
        step_s = (sync_time() - t0) / args.steps
        release(runner, reqs)
        res["decode"][b] = {"ms_per_step": step_s * 1e3, "tok_s": b / step_s}
    del runner
    torch.cuda.empty_cache()
    return res


def bench_hf(args: argparse.Namespace) -> tuple[dict, int, dict]:
    from transformers import AutoModelForImageTextToText

    model = (
        AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    )
    text = model.config.get_text_config()
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n
    )
    kv_per_token = (
        2
        * text.num_hidden_layers
        * text.num_key_value_heads
        * (text.hidden_size // text.num_attention_heads)
        * 2
    )
    vocab = text.vocab_size
    res: dict = {"decode": {}}
    ids = torch.tensor(prompts(1, args.prefill_len, vocab, 1), device="cuda")
    with torch.inference_mode():
        model(input_ids=ids)
        t0 = sync_time()
        for _ in range(4):
            model(input_ids=ids)
        res["prefill_tok_s"] = 4 * args.prefill_len / (sync_time() - t0)
        for b in args.batches:
            ids = torch.tensor(prompts(b, args.ctx, vocab, 2), device="cuda")
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
            t0 = sync_time()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = sync_time()
            model.generate(
                ids, max_new_tokens=args.hf_steps + 1, min_new_tokens=args.hf_steps + 1, **kw
            )
            step_s = ((sync_time() - t1) - (t1 - t0)) / args.hf_steps
            res["decode"][b] = {"ms_per_step": step_s * 1e3, "tok_s": b / step_s}
    del model
    torch.cuda.empty_cache()
    return res, weight_bytes, {"kv_bytes_per_token": kv_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--batches", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument(
        "--ctx", type=int, default=512, help="prompt tokens per sequence in decode runs"
    )
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument(
        "--hf-steps", type=int, default=16, help="decode steps timed for HF generate"
    )
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=2048, help="max tokens per engine step")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    bw = copy_bandwidth()
    hf, weight_bytes, kv = bench_hf(args)
    ours = bench_ours(args)
    floor = {
        b: (weight_bytes + b * (args.ctx + args.steps / 2) * kv["kv_bytes_per_token"]) / bw * 1e3
        for b in args.batches
    }
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes": weight_bytes,
        "ours": ours,
        "hf": hf,
        "floor_ms_per_step": floor,
    }
    gpu, gb = report["gpu"], weight_bytes / 1e9
    print(f"GPU {gpu}, copy bandwidth {bw / 1e9:.0f} GB/s, weights {gb:.2f} GB")
    print(
        f"prefill tok/s: ours {ours['prefill_tok_s']:.0f}  HF {hf['prefill_tok_s']:.0f}  "
        f"ratio {ours['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x"
    )
    print(
        "| batch | ours ms/step | HF ms/step | floor ms/step | ours tok/s | HF tok/s "
        "| HF/ours | floor/ours |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batches:
        o, h = ours["decode"][b], hf["decode"][b]
        print(
            f"| {b} | {o['ms_per_step']:.2f} | {h['ms_per_step']:.2f} | {floor[b]:.2f} | "
            f"{o['tok_s']:.0f} | {h['tok_s']:.0f} | {h['ms_per_step'] / o['ms_per_step']:.2f}x | "
            f"{floor[b] / o['ms_per_step']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
