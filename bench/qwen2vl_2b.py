"""Build a Qwen2-VL-2B-shaped model with random weights (bf16), for GPU benchmarks.

Shapes are Qwen2-VL-2B-Instruct's (28 layers, hidden 1536, 12 heads / 2 KV heads, vocab 151936,
32-block vision tower); the tokenizer, chat template and image processor are the default
model's. Built on the GPU in seconds; nothing is downloaded.

    python bench/qwen2vl_2b.py OUT_DIR
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import torch
from transformers import AutoConfig, AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from apiserver.launch.default_model import build_model


def build_2b(out_dir: pathlib.Path, device: str = "cuda") -> pathlib.Path:
    with tempfile.TemporaryDirectory() as tmp:
        small = build_model(pathlib.Path(tmp) / "default")
        small_cfg = AutoConfig.from_pretrained(small)
        processor = AutoProcessor.from_pretrained(small)
    special = {
        k: getattr(small_cfg, k)
        for k in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        )
    }
    eos = small_cfg.text_config.eos_token_id
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
            eos_token_id=eos,
            tie_word_embeddings=True,
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16),
        tie_word_embeddings=True,
        **special,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = eos
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--device", default="cuda")
    print(build_2b(parser.parse_args().out_dir, parser.parse_args().device))
