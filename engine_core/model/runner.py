"""The model runner the scheduler drives: ``load_runner(config)`` and the ``ModelRunner`` API.

``load_runner`` reads config.json and returns the decoder runner (Qwen2 / Qwen2.5 / Llama /
Qwen2-VL / Qwen2.5-VL) or the encoder-only embedding runner (BERT family).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult
from engine_core.model.errors import ModelLoadError
from engine_core.model.spec import read_spec
from ipc.config import EngineConfig
from ipc.messages import EngineRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner(ABC):
    """Owns the weights, the KV cache and per-request model state."""

    facts: RunnerFacts
    device: torch.device

    @abstractmethod
    def admit(self, request: EngineRequest) -> None:
        """Take the per-request state of a request ``engine_core.validation`` accepted (again
        after a preemption); an exception fails that request alone."""

    @abstractmethod
    def has_image(self, content_hash: str) -> bool:
        """Whether this image's encoder output is cached (a request may send its hash alone)."""

    @abstractmethod
    def execute(
        self, chunks: list[Chunk], *, encodes: Sequence[ImageRef] = (), greedy: bool = False
    ) -> StepResult:
        """Queue one step on the device without waiting for it: encode ``encodes`` and the
        images the chunks touch, write each chunk's K/V into its slot, and return the logits of
        chunks with ``wants_logits`` (float32, in chunk order; with ``greedy``, their argmax
        ids instead, already fed) and pooled states of ``wants_pooled``."""

    def feed(self, slots: list[int], token_ids: torch.Tensor) -> None:  # noqa: B027
        """Keep ``token_ids`` (device) as the ids last sampled for ``slots``: decodes of the next
        step marked ``feeds_sampled`` read them there (a no-op for runners that never decode)."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Drop per-request state (positions, encoder-cache pins); unknown ids are ignored."""

    def reset_encoder_cache(self) -> None:  # noqa: B027 (a no-op where there is no cache)
        """Forget cached image-encoder outputs that no running request holds."""


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
        from engine_core.model.bert import EncoderRunner

        return EncoderRunner(config, model_dir, spec, device, dtype)
    from engine_core.model.decoder_runner import DecoderRunner

    return DecoderRunner(config, model_dir, spec, device, dtype)
