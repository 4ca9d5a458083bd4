"""uint8 pixels rescaled and normalized on the engine's device equal the image processor's own
float output, bit for bit, on real photos (scikit-image's samples at their own sizes, and
resized to 1024x768 and 1920x1080), in float32 and after the cast to bfloat16; the vision
tower (the default model's, in bfloat16) gives the same embeddings from either; and what each
form costs on the wire and on the device.

    python -m bench.pixel_exactness OUT_DIR [--model DIR]

Runs on CUDA when there is a GPU, else on the CPU. Writes ``OUT_DIR/pixel_exactness.json``
and ``.md``; prints the table and exits 1 if any photo differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.outputs import model_dir, write_results
from engine_core.model.pixels import PixelInput

_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


def _photos() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = [(n, Image.fromarray(getattr(data, n)()).convert("RGB")) for n in _SAMPLES]
    out.append(("astronaut 1024x768", out[0][1].resize((1024, 768), Image.BICUBIC)))
    out.append(("hubble 1920x1080", out[4][1].resize((1920, 1080), Image.BICUBIC)))
    return out


def _timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its milliseconds, the median of 5 runs, synchronized on CUDA."""
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return out, sorted(times)[2]


def check(model: Path, device: torch.device) -> list[dict[str, Any]]:
    from transformers import AutoConfig, AutoImageProcessor

    from engine_core.model.runner_factory import load_runner
    from ipc.config import EngineConfig

    processor = AutoImageProcessor.from_pretrained(model)
    vision_config = AutoConfig.from_pretrained(model).vision_config
    f32 = PixelInput.for_model(str(model), vision_config, device, torch.float32, "auto")
    bf16 = PixelInput.for_model(str(model), vision_config, device, torch.bfloat16, "auto")
    engine = EngineConfig(device=device.type, dtype="bfloat16")
    runner = load_runner(engine, str(model))
    assert runner.vision is not None
    rows = []
    for name, image in _photos():
        floats = processor(images=[image], return_tensors="pt")
        raw = processor(images=[image], return_tensors="pt", do_rescale=False, do_normalize=False)
        grid = tuple(floats["image_grid_thw"][0].tolist())
        want = floats["pixel_values"].to(device)
        pixels = raw["pixel_values"]
        got, normalize_ms = _timed(lambda p=pixels: f32.to_tower(p), device)
        got_bf16 = bf16.to_tower(pixels)
        from_uint8, tower_ms = _timed(lambda p=pixels, g=grid: runner.vision.encode(p, g), device)
        from_float = runner.vision.encode(floats["pixel_values"].to(torch.bfloat16), grid)
        rows.append(
            {
                "photo": name,
                "size": f"{image.width}x{image.height}",
                "patches": int(pixels.shape[0]),
                "float32_equal": bool(torch.equal(got, want)),
                "float32_max_diff": float((got - want).abs().max()),
                "bfloat16_equal": bool(torch.equal(got_bf16, want.to(torch.bfloat16))),
                "embeddings_equal": bool(torch.equal(from_uint8, from_float)),
                "embeddings_max_diff": float((from_uint8 - from_float).float().abs().max()),
                "uint8_mb": pixels.numel() / 1e6,
                "bfloat16_mb": pixels.numel() * 2 / 1e6,
                "normalize_ms": normalize_ms,
                "tower_ms": tower_ms,
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"device: {device} ({name})",
        "",
        "| photo | size | patches | float32 equal | bf16 equal | embeddings equal (max diff) "
        "| uint8 MB | bf16 MB | normalize ms | tower ms |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['photo']} | {r['size']} | {r['patches']} | {r['float32_equal']} "
            f"| {r['bfloat16_equal']} | {r['embeddings_equal']} ({r['embeddings_max_diff']:.3g}) "
            f"| {r['uint8_mb']:.2f} | {r['bfloat16_mb']:.2f} | {r['normalize_ms']:.2f} "
            f"| {r['tower_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, help="default: build the default model in a temp dir")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with model_dir(args.model) as model:
        rows = check(model, device)
    write_results(args.out, "pixel_exactness", rows, _table(rows, device))
    exact = all(r["float32_equal"] and r["bfloat16_equal"] for r in rows)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
