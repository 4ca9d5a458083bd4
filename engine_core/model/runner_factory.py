"""``load_runner(config, model_dir)``: reads config.json and builds the decoder runner (Qwen2 /
Qwen2.5 / Llama / Qwen2-VL / Qwen2.5-VL) or the encoder-only embedding runner (BERT family) on
the device and in the dtype the config asks for."""

from __future__ import annotations

import torch

from engine_core.model.decoder_runner import DecoderRunner
from engine_core.model.errors import ModelLoadError
from engine_core.model.runner import ModelRunner
from engine_core.model.spec import read_spec
from ipc.config import EngineConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(config: EngineConfig) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but CUDA is not available")
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def load_runner(config: EngineConfig, model_dir: str) -> ModelRunner:
    """Build the runner that fits the checkpoint in ``model_dir``."""
    spec = read_spec(model_dir)
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    if spec.kind == "encoder":
        from engine_core.model.bert import EncoderRunner  # transformers: only for BERT models

        return EncoderRunner(config, model_dir, spec, device, dtype)
    return DecoderRunner(config, model_dir, spec, device, dtype)
