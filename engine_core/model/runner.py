"""The ``ModelRunner`` API the scheduler drives (``runner_factory.load_runner`` builds one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult
from engine_core.model.errors import ModelLoadError
from ipc.config import EngineConfig
from ipc.messages import EngineRequest


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

    @property
    def encoder_cache_bytes(self) -> int:
        """Bytes of image-encoder outputs cached (0 where there is no cache)."""
        return 0


#: ``--max-num-batched-tokens`` by default: vLLM's serving figures (a big GPU's step takes
#: several image prompts of ~1,000 tokens at once; 2,048 holds about two beside 64 decodes,
#: which capped the default model at ~160 image requests/s on an H200).
LARGE_GPU_BYTES, LARGE_GPU_TOKENS, DEFAULT_TOKENS = 70 << 30, 8192, 2048


def step_token_budget(config: EngineConfig, device: torch.device) -> int:
    """``--max-num-batched-tokens``, or the default for this device."""
    if config.max_num_batched_tokens is not None:
        return config.max_num_batched_tokens
    is_large = (
        device.type == "cuda"
        and torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES
    )
    if is_large:
        return LARGE_GPU_TOKENS
    return DEFAULT_TOKENS


def context_length(config: EngineConfig, max_position_embeddings: int) -> int:
    """``--max-model-len``, or the model's own limit; more than the model's is a load error."""
    if config.max_model_len is not None and config.max_model_len > max_position_embeddings:
        raise ModelLoadError(
            f"max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={max_position_embeddings}"
        )
    return config.max_model_len or max_position_embeddings
