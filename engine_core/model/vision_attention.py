"""Attention of the vision tower: full (non-causal) attention inside each segment of a flat
batch of patches, a segment being one frame of one image or one window.

CUDA in bf16/fp16: one varlen FlashAttention call over ``cu_seqlens`` for the whole batch,
through ``torch.nn.attention.varlen.varlen_attn`` or, in torch releases without it, the
private ``aten._flash_attention_forward``. Elsewhere (CPU, float32): SDPA, one call per run of
equal-length segments (a 1024x768 Qwen2.5-VL image has ~70 windows, most of one size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Varlen = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]


@dataclass(frozen=True, slots=True)
class Segments:
    """Segment boundaries of one batch: ``lens`` on the host, ``cu`` ((S+1,) int32 prefix sums
    on the device) only when a varlen kernel runs."""

    lens: list[int]
    cu: torch.Tensor | None
    max_len: int


def _varlen_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)


def _flash_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, False, False, scale=scale
    )
    return out[0]


def varlen_kernel(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int
) -> Varlen | None:
    """The first varlen FlashAttention entry point of this torch that runs on ``device`` and
    ``dtype`` for this head shape and agrees with SDPA on a small batch; None (then ``attend``
    runs SDPA per segment) where none does."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    candidates: list[Varlen] = []
    try:
        from torch.nn.attention import varlen  # noqa: F401 (torch >= 2.10)

        candidates.append(_varlen_attn)
    except ImportError:
        pass
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        candidates.append(_flash_op)
    for kernel in candidates:
        problem = _problem(kernel, device, dtype, num_heads, head_dim)
        if problem is None:
            return kernel
        logger.warning("vision attention: %s unusable (%s)", kernel.__name__, problem)
    return None


def _problem(
    kernel: Varlen, device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int
) -> str | None:
    gen = torch.Generator(device=device).manual_seed(0)
    lens = [37, 64, 5]
    q, k, v = (
        torch.randn(sum(lens), num_heads, head_dim, device=device, generator=gen).to(dtype)
        for _ in range(3)
    )
    cu = torch.tensor([0, 37, 101, 106], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    try:
        got = kernel(q, k, v, cu, max(lens), scale)
    except RuntimeError as exc:
        return repr(exc)
    want = attend(q, k, v, Segments(lens, None, max(lens)), scale, None)
    error = float((got.float() - want.float()).norm() / want.float().norm())
    return None if error < 2e-2 else f"relative error {error:.3g} against SDPA"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    scale: float,
    kernel: Varlen | None,
) -> torch.Tensor:
    """q, k, v (N, H, D) -> (N, H, D), each segment attending only to itself."""
    if kernel is not None and segments.cu is not None:
        return kernel(q, k, v, segments.cu, segments.max_len, scale)
    out = torch.empty_like(q)
    start = 0
    lens = segments.lens
    i = 0
    while i < len(lens):
        n, j = lens[i], i
        while j < len(lens) and lens[j] == n:
            j += 1
        stop = start + (j - i) * n
        # (runs, n, H, D) -> (runs, H, n, D), the layout SDPA batches over
        qs, ks, vs = (x[start:stop].view(j - i, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[start:stop] = o.transpose(1, 2).reshape(stop - start, *q.shape[1:])
        start, i = stop, j
    return out
