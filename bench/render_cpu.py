"""CPU of one chat-with-a-photo render, in this process on one thread: the API server's
render (``Renderer.chat_blocking``: template, one tokenization with a placeholder per image
expanded afterwards, decode, the image processor with uint8 output, content hash) beside the
same prompt made the Hugging Face way (template, then the processor on text and images, which
expands the placeholders in the text and tokenizes all of it), photo by photo in turn so that
a noisy neighbour hits both alike.

    python -m bench.render_cpu [OUT_DIR] [--model DIR] [--photos 24] [--sizes 1024x768 1920x1080]

Every photo is distinct (``bench.frontend_cpu.photos``). Writes ``OUT_DIR/render_cpu.json``
and ``.md`` when OUT_DIR is given, and prints the table: medians of thread CPU ms.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.frontend_cpu import photos
from bench.outputs import model_dir, write_results

CHAT = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in this photo?"}],
    }
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--model", type=Path, help="default: build the default model in a temp dir")
    p.add_argument("--photos", type=int, default=24, help="per size, after 3 of warm-up")
    p.add_argument("--sizes", nargs="+", default=["1024x768", "1920x1080"])
    args = p.parse_args()
    with model_dir(args.model) as model:
        rows = run(model, args)
    write_results(args.out, "render_cpu", rows, _table(rows))
    return 0


def run(model: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from apiserver.config import ServerConfig
    from apiserver.media import MediaBytes
    from apiserver.renderer import Renderer
    from ipc import messages

    torch.set_num_threads(1)  # as a budgeted API server gives each render worker
    config = json.loads((model / "config.json").read_text())
    ready = messages.Ready(
        protocol_version=messages.PROTOCOL_VERSION,
        model=str(model),
        max_model_len=32768,
        vocab_size=int(config["text_config"]["vocab_size"]),
        kv_capacity_tokens=32768,
        max_num_seqs=1,
        supports_images=True,
        supports_embeddings=False,
        supports_generation=True,
        pixel_dtype="uint8",
        image_token_id=int(config["image_token_id"]),
    )
    processor = AutoProcessor.from_pretrained(model)
    renderer = Renderer(AutoTokenizer.from_pretrained(model), processor, ready, ServerConfig(), 1)
    rows = []
    try:
        for index, size in enumerate(args.sizes):
            width, height = (int(v) for v in size.split("x"))
            ours, theirs = [], []
            for n, jpeg in enumerate(photos(width, height, 3 + args.photos, seed=index)):
                t0 = time.thread_time()
                renderer.chat_blocking(CHAT, [MediaBytes(jpeg)], True, 16)
                t1 = time.thread_time()
                image = Image.open(io.BytesIO(jpeg)).convert("RGB")
                text = processor.apply_chat_template(CHAT, add_generation_prompt=True)
                processor(
                    text=[text], images=[image], return_tensors="pt",
                    do_rescale=False, do_normalize=False,
                )  # fmt: skip
                t2 = time.thread_time()
                if n >= 3:
                    ours.append((t1 - t0) * 1000)
                    theirs.append((t2 - t1) * 1000)
            rows.append(
                {
                    "size": size,
                    "photos": args.photos,
                    "fanin_ms": statistics.median(ours),
                    "hf_ms": statistics.median(theirs),
                    "ratio": statistics.median(a / b for a, b in zip(ours, theirs, strict=True)),
                }
            )
    finally:
        renderer.close()
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| photo | photos | fanin render CPU ms | HF processor CPU ms (decode + text + images) "
        "| fanin / HF (median of per-photo ratios) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['photos']} | {r['fanin_ms']:.1f} | {r['hf_ms']:.1f} "
            f"| {r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
