"""Trains the default model's byte-level BPE tokenizer on text every Python install has.

The corpus is a fixed, sorted list of the interpreter's own stdlib modules, so two builds on
the same Python give the same tokenizer without reading anything from the network.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from apiserver.launch.default_model.chat_template import CHAT_TEMPLATE

VOCAB_SIZE = 8192
CORPUS_BYTES = 4 << 20
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Qwen2-VL's added tokens, in Qwen2-VL's order; they take the last ids of the vocabulary.
SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
]


def corpus_files() -> list[Path]:
    """The stdlib modules the tokenizer is trained on: sorted, capped at CORPUS_BYTES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= CORPUS_BYTES:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise RuntimeError(f"no stdlib sources under {stdlib} to train the tokenizer on")
    return chosen


def _texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train the BPE model and wrap it as an HF tokenizer with Qwen2-VL's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_texts(corpus_files()), trainer=trainer)
    # Added after training so they land at the end of the vocabulary, as in Qwen2-VL.
    bpe.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
