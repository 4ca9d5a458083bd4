"""What the scheduler hands the model runner for one step, and what comes back.

The scheduler (engine_core.scheduler) owns sequences and KV slots; the runner
(engine_core.model.runner) owns the weights, the KV tensors and per-request model state
(M-RoPE positions, encoder outputs). They share only this module's types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ipc.messages import EngineRequest


@dataclass(slots=True)
class Chunk:
    """One sequence's share of a step: ``token_ids`` go into KV slot ``slot`` at positions
    ``start .. start + len(token_ids)`` (``start`` tokens of this sequence are already cached
    there). A decode step is a chunk of one token."""

    request: EngineRequest
    slot: int
    start: int
    token_ids: np.ndarray  # (n,) int32
    #: True when the step must return this chunk's last-token logits (end of prefill, decode).
    wants_logits: bool
    #: True when the step must return the pooled hidden state (last prefill chunk of a pooling
    #: request; pooling requests are prefilled in one chunk).
    wants_pooled: bool = False


@dataclass(slots=True)
class StepResult:
    """``logits[i]`` (float32, (vocab,)) belongs to the i-th chunk with ``wants_logits``;
    ``pooled`` maps request id -> float32 (hidden,) embedding (already pooled, not normalized)."""

    logits: torch.Tensor
    pooled: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunnerFacts:
    """What the runner learned at load time (never written back into the config)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_slots: int  # KV slots, each holding max_model_len tokens
    supports_images: bool
    supports_embeddings: bool
    supports_generation: bool
    image_token_id: int | None
    #: ``Ready.pixel_dtype``: how API servers send image pixels.
    pixel_dtype: str = "float32"
