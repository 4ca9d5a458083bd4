"""Attention over the per-slot KV cache, for a flat batch of chunks.

Every chunk ``i`` has ``n_i`` new tokens of one sequence whose first ``start_i`` tokens are
already cached in slot ``slot_i``. Query token ``j`` of the chunk sees keys ``0 .. start_i + j``
(causal, aligned bottom-right). One call serves prefill chunks, decodes and mixes of both.

CPU: SDPA per chunk over ``cache[slot, :start + n]``. CUDA: one FlashAttention-2 call over the
flat cache view ``(num_slots * max_len, Hkv, D)`` with ``cum_seq_k = slot * max_len`` and
``seqused_k = start + n``; FA2 aligns the causal mask bottom-right when ``seqused_k`` is given.
The CUDA graphs' decode steps may name a kernel of their own instead (``decode_attention``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine_core.model.host import to_device

DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


@dataclass(slots=True)
class AttnMeta:
    """Where each chunk's tokens sit: built once per step by the runner, read by every layer."""

    slots: list[int]
    starts: list[int]
    lens: list[int]  # new tokens per chunk; the flat batch is their concatenation
    #: (T,) int64 row of each new token in the flat cache view: slot * max_len + position
    write_index: torch.Tensor
    #: CUDA flash-op metadata (None on CPU): cum_seq_q (B+1,), cum_seq_k (B+1,), seqused_k (B,)
    cum_seq_q: torch.Tensor | None = None
    cum_seq_k: torch.Tensor | None = None
    seqused_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    #: a decode-only step's kernel in place of FlashAttention (the CUDA graphs' Triton one):
    #: (q, k_cache, v_cache, k_start, k_len, scale) -> (B, Hq, D)
    decode_kernel: DecodeKernel | None = None


def build_meta(
    slots: list[int],
    starts: list[int],
    lens: list[int],
    max_len: int,
    device: torch.device,
    use_flash: bool,
) -> AttnMeta:
    """Metadata for one step (uploads queued from pinned memory); the flash-op tensors only when
    ``use_flash``."""
    slot, start, n = (np.asarray(v, dtype=np.int64) for v in (slots, starts, lens))
    rows = np.repeat(slot * max_len + start - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    meta = AttnMeta(slots, starts, lens, to_device(rows, device))
    if use_flash:
        used = start + n
        host = np.zeros((3, len(lens) + 1), dtype=np.int32)
        host[0, 1:] = np.cumsum(n)  # cum_seq_q
        # The last cum_seq_k entry is never read as a start when seqused_k is given.
        host[1, :-1] = slot * max_len
        host[2, :-1] = used
        flash = to_device(host, device)
        meta.cum_seq_q, meta.cum_seq_k, meta.seqused_k = flash[0], flash[1], flash[2, :-1]
        meta.max_q, meta.max_k = int(n.max()), int(used.max())
    return meta


def can_use_flash(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention-2 runs on CUDA in fp16/bf16 only, and the op is private to torch: where
    it is missing (or for float32) attention falls back to SDPA."""
    has_op = hasattr(torch.ops.aten, "_flash_attention_forward")
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and has_op


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    """q (T, Hq, D); caches (num_slots, max_len, Hkv, D), already holding this step's K/V.
    Returns (T, Hq, D)."""
    if meta.decode_kernel is not None:
        assert meta.cum_seq_k is not None and meta.seqused_k is not None
        return meta.decode_kernel(q, k_cache, v_cache, meta.cum_seq_k[:-1], meta.seqused_k, scale)
    if meta.cum_seq_q is not None:
        return _attend_flash(q, k_cache, v_cache, meta, scale)
    return _attend_sdpa(q, k_cache, v_cache, meta, scale)


def _attend_flash(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    num_slots, max_len, hkv, d = k_cache.shape
    out = torch.ops.aten._flash_attention_forward(
        q,
        k_cache.view(num_slots * max_len, hkv, d),
        v_cache.view(num_slots * max_len, hkv, d),
        meta.cum_seq_q,
        meta.cum_seq_k,
        meta.max_q,
        meta.max_k,
        0.0,
        True,
        False,
        scale=scale,
        seqused_k=meta.seqused_k,
    )
    return out[0]


def _attend_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    outs = []
    offset = 0
    gqa = q.shape[1] != k_cache.shape[2]
    for slot, start, n in zip(meta.slots, meta.starts, meta.lens, strict=True):
        total = start + n
        qi = q[offset : offset + n].transpose(0, 1)[None]  # (1, Hq, n, D)
        ki = k_cache[slot, :total].transpose(0, 1)[None]  # (1, Hkv, total, D)
        vi = v_cache[slot, :total].transpose(0, 1)[None]
        if start == 0:
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, is_causal=n > 1, scale=scale, enable_gqa=gqa
            )
        else:
            # is_causal aligns top-left; the cached prefix needs a bottom-right mask.
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=start)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        outs.append(oi[0].transpose(0, 1))
        offset += n
    return torch.cat(outs)
