"""The KV cache: one contiguous slot of ``max_model_len`` tokens per running sequence.

Layout: ``(layers, 2, num_slots, max_model_len, num_kv_heads, head_dim)``; the scheduler assigns
slot indices ``0 .. num_slots - 1``. Why per-slot and not paged: decode attention reads each
sequence's KV contiguously; on CUDA one FlashAttention call over the flat view
``(num_slots * max_len, Hkv, D)`` with ``cum_seq_k = slot * max_len`` and ``seqused_k`` = the
current lengths serves decode, chunked prefill against a cached prefix and mixed batches alike;
and the buffers have static shapes, which CUDA graphs need. The price is reserving
``max_model_len`` tokens per sequence, so ``num_slots`` is capped by the memory budget.
"""

from __future__ import annotations

import torch

from engine_core.model.errors import ModelLoadError
from engine_core.model.spec import DecoderSpec


def bytes_per_token(spec: DecoderSpec, dtype: torch.dtype) -> int:
    """K and V of every layer for one token."""
    element = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * element


def count_slots(budget_bytes: int, max_num_seqs: int, max_model_len: int, per_token: int) -> int:
    """``min(max_num_seqs, budget // (max_model_len * per_token))``; error if not even one fits."""
    per_slot = max_model_len * per_token
    slots = min(max_num_seqs, max(budget_bytes, 0) // per_slot)
    if slots < 1:
        raise ModelLoadError(
            f"KV cache budget of {budget_bytes / 2**20:.1f} MiB cannot hold one sequence of "
            f"max_model_len={max_model_len} tokens ({per_slot / 2**20:.1f} MiB at "
            f"{per_token} bytes/token); lower --max-model-len or raise the KV budget"
        )
    return slots


def allocate(
    spec: DecoderSpec, num_slots: int, max_model_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Zeroed cache, (layers, 2, num_slots, max_model_len, Hkv, D)."""
    shape = (spec.num_layers, 2, num_slots, max_model_len, spec.num_kv_heads, spec.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
