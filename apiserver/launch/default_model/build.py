"""Builds the default model: a tiny, randomly initialised Qwen2-VL with a locally trained
tokenizer, saved with ``save_pretrained`` so it loads through the ordinary HF code path."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

import torch
from transformers import (
    GenerationConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.utils import logging as hf_logging

from apiserver.launch.default_model.chat_template import CHAT_TEMPLATE
from apiserver.launch.default_model.manifest import MANIFEST_NAME, write_manifest
from apiserver.launch.default_model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    train_tokenizer,
)

SEED = 0
HIDDEN = 128
NUM_HEADS = 4
# M-RoPE: how the head_dim/2 = 16 rotary frequencies are shared by the (t, h, w) positions.
MROPE_SECTION = (4, 6, 6)
# Qwen2-VL's defaults: 56*56 .. 28*28*1280 pixels per image (4 .. 1280 merged image tokens).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def _model_config(token_ids: dict[str, int], vocab_size: int) -> Qwen2VLConfig:
    text = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": list(MROPE_SECTION),
        },
        "bos_token_id": token_ids[ENDOFTEXT],
        "eos_token_id": token_ids[IM_END],
        "pad_token_id": token_ids[ENDOFTEXT],
    }
    vision = {
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 4,
        "hidden_size": HIDDEN,  # merger output feeds the text model, so it must match
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids[IMAGE_PAD],
        video_token_id=token_ids[VIDEO_PAD],
        vision_start_token_id=token_ids[VISION_START],
        vision_end_token_id=token_ids[VISION_END],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _write_model(out: Path) -> None:
    tokenizer = train_tokenizer()
    token_ids: dict[str, int] = {
        t: cast(int, tokenizer.convert_tokens_to_ids(t))  # one token in, one id out
        for t in (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    }
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    config = _model_config(token_ids, len(tokenizer))
    # fork_rng: a seeded init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[token_ids[IM_END], token_ids[ENDOFTEXT]],
        pad_token_id=token_ids[ENDOFTEXT],
        bos_token_id=token_ids[ENDOFTEXT],
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard bar is noise in the server's log
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _is_replaceable(path: Path) -> bool:
    """An existing folder we may overwrite: empty, or a model we built earlier."""
    return path.is_dir() and (not any(path.iterdir()) or (path / MANIFEST_NAME).is_file())


def build_model(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Build the default model into ``out_dir`` atomically and return its path.

    The model is built in a sibling temporary folder and renamed into place, so readers never
    see half a model. An existing ``out_dir`` is replaced only if it is empty, an earlier fanin
    build (it has a manifest) or ``overwrite`` is set; anything else raises FileExistsError.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not (overwrite and out.is_dir()) and not _is_replaceable(out):
        raise FileExistsError(f"{out} exists and is not an empty folder or a fanin-built model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _write_model(tmp)
        # mkdtemp (and safetensors) made these private; the model itself is not secret.
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        write_manifest(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
