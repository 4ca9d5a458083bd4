"""What the scheduler hands the model runner for one step, and what comes back.

The scheduler (engine_core.scheduler) owns sequences and KV slots; the runner
(engine_core.model.runner) owns the weights, the KV tensors and per-request model state
(M-RoPE positions, encoder outputs). They share only this module's types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ipc.messages import EngineRequest, MultiModalItem, RequestError


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
    #: True for a decode whose one token is the one the previous step sampled for this slot:
    #: the step was scheduled before that token came back, so ``token_ids`` holds it only once
    #: the previous step is resolved, and the runner takes it from the device (``feed``).
    feeds_sampled: bool = False


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Image ``index`` (in ``images_by_offset`` order) of ``request``, to encode this step."""

    request: EngineRequest
    index: int


def images_by_offset(request: EngineRequest) -> list[MultiModalItem]:
    """A request's images in prompt order: the order both sides number them in."""
    return sorted(request.mm_items, key=lambda item: item.offset)


@dataclass(slots=True)
class StepResult:
    """What one ``execute`` queued on the device; nothing here has been waited for.

    Rows of ``logits`` (float32, (n, vocab)) or of ``token_ids`` (int64, (n,), the greedy pick
    when the step asked for it) belong, in order, to the chunks with ``wants_logits`` whose
    request did not fail. ``pooled`` maps request id -> float32 (hidden,) embedding (pooled,
    not normalized). ``failed`` maps request id -> why that request's work failed this step;
    its chunks were left out and every other chunk ran.
    """

    logits: torch.Tensor | None
    token_ids: torch.Tensor | None = None
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    failed: dict[str, RequestError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunnerFacts:
    """What the runner learned at load time (never written back into the config)."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_slots: int  # KV slots, each holding max_model_len tokens
    #: Sequences that may run at once: ``--max-num-seqs``, at most one per KV slot.
    max_num_seqs: int
    #: Tokens one step may hold (``runner.step_token_budget``).
    max_num_batched_tokens: int
    supports_images: bool
    supports_embeddings: bool
    supports_generation: bool
    #: The poolings embeddings requests may ask for (empty without embeddings).
    poolings: tuple[str, ...]
    image_token_id: int | None
    #: ``Ready.pixel_dtype``: how API servers send image pixels ("uint8": the engine
    #: normalizes them itself).
    pixel_dtype: str = "float32"
    #: The vision tower's spatial merge (placeholders per image: patches / merge**2) and the
    #: length of one flattened patch; 1 and 0 without a tower.
    image_merge: int = 1
    image_patch_dim: int = 0
    #: ``Ready.uint8_one_frame``: the length of a uint8 patch row that holds a still image's
    #: one frame (the engine repeats it to the temporal patch); 0 where only whole rows go.
    image_frame_dim: int = 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_slots * self.max_model_len
