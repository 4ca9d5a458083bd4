"""CUDA-graph decode steps against eager ones through the real engine loop (scheduler, step in
flight, sampler), on a GPU.

    python bench/engine_graphs.py --model DIR [--out FILE.json]

The requests arrive together but finish at different steps, so the graphed batches have several
sizes and most are padded up to a bucket; one carries an image (M-RoPE), one samples with a
seed, one asks for logprobs, one has a repetition penalty (the ``logits`` graphs and the
sampler); once those are done the rest decode in the ``greedy`` graphs (argmax inside the
graph, ids fed on the device). Two comparisons: graphs with eager kernels and FlashAttention
against no graphs (the same kernels: tokens must be identical), and the production setup
(graphs, compiled kernels, the Triton decode attention) against no graphs (bf16 rounding may
split near-ties: a match rate). Exit status 1
when the first is not identical. tests/engine_core/test_cuda_graphs.py runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any
from unittest import mock

import msgspec
import skimage.data
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from bench.datasets import sharegpt_prompts
from bench.engine_correctness import hf_inputs, to_request
from bench.runner_loop import EngineRun, run_engine
from engine_core.model.kernels import Kernels
from engine_core.model.runner_factory import load_runner
from ipc.config import EngineConfig
from ipc.messages import EngineRequest, SamplingParams


def requests(model_dir: str) -> list[EngineRequest]:
    processor = AutoProcessor.from_pretrained(model_dir)
    cases: list[tuple[str, Image.Image | None]] = [
        (t, None) for t in sharegpt_prompts(5, min_chars=100, max_chars=800)
    ]
    cases.append(("Describe this picture.", Image.fromarray(skimage.data.coffee())))
    image_token_id = AutoConfig.from_pretrained(model_dir).image_token_id
    base = [
        to_request(i, hf_inputs(processor, text, image), image_token_id, torch.bfloat16, 24)
        for i, (text, image) in enumerate(cases)
    ]
    special = [
        SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
    ]
    return base + [
        msgspec.structs.replace(base[i], request_id=f"s{i}", sampling=params)
        for i, params in enumerate(special)
    ]


def serve(
    model_dir: str, reqs: list[EngineRequest], eager: bool, device: str, attention: str
) -> EngineRun:
    config = EngineConfig(
        dtype="bfloat16",
        device=device,  # type: ignore[arg-type]
        max_model_len=2048,
        max_num_seqs=len(reqs),
        max_num_batched_tokens=64,
        enforce_eager=eager,
        decode_attention=attention,  # type: ignore[arg-type]
    )
    runner = load_runner(config, model_dir)
    has_graphs = getattr(runner, "graphs", None) is not None
    if device == "cuda" and has_graphs == eager:
        raise RuntimeError(f"enforce_eager={eager}, yet graphs captured: {has_graphs}")
    run = run_engine(runner, config, reqs)
    del runner
    if device == "cuda":
        torch.cuda.empty_cache()
    return run


def compare(model_dir: str, compiled: bool, device: str = "cuda") -> dict[str, Any]:
    """Serve the requests eagerly and with graphs (compiled kernels or not); the first
    divergence of every request and the logprobs of the one that asks for them. (On the CPU
    both runs are eager: a smoke test of this script.)"""
    reqs = requests(model_dir)
    eager = serve(model_dir, reqs, True, device, "flash")
    if compiled:
        graphed = serve(model_dir, reqs, False, device, "triton")
    else:
        with mock.patch.object(Kernels, "compiled", classmethod(lambda cls, *a, **k: cls.eager())):
            graphed = serve(model_dir, reqs, False, device, "flash")
    same = total = 0
    diverged: dict[str, int] = {}
    for r in reqs:
        a, b = eager.tokens(r.request_id), graphed.tokens(r.request_id)
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        if a != b:
            diverged[r.request_id] = k
        same, total = same + k, total + len(a)
    want = [o.logprobs[0] for o in eager.outputs["s1"] if o.logprobs]
    got = [o.logprobs[0] for o in graphed.outputs["s1"] if o.logprobs]
    return {
        "compiled_kernels": compiled,
        "identical": not diverged,
        "match_rate": same / total,
        "first_divergence": diverged,
        "logprob_max_diff": max(
            (abs(g.logprob - w.logprob) for g, w in zip(got, want, strict=True)), default=0.0
        ),
        "logprob_top_ids_equal": [g.top_ids for g in got] == [w.top_ids for w in want],
        "lengths_equal": all(
            len(eager.tokens(r.request_id)) == len(graphed.tokens(r.request_id)) for r in reqs
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    report = {
        "same_kernels": compare(args.model, False, args.device),
        "compiled": compare(args.model, True, args.device),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    raise SystemExit(0 if report["same_kernels"]["identical"] else 1)


if __name__ == "__main__":
    main()
