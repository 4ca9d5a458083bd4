"""Attention over the per-slot KV cache: bottom-right causal masks over a cached prefix, GQA,
and the FlashAttention metadata (the CUDA op itself needs a GPU; bench/ checks it there)."""

from __future__ import annotations

import torch

from engine_core.model.attention import attend, build_meta


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Plain softmax attention of one chunk: q (n, Hq, D), k/v (start + n, Hkv, D)."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / d**0.5
    keys = torch.arange(start + n)
    allowed = keys[None, :] <= (start + torch.arange(n))[:, None]  # query i sees 0..start+i
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def test_sdpa_matches_reference_for_mixed_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    slots_total, max_len, hkv, hq, d = 5, 64, 2, 6, 16
    k_cache = torch.randn(slots_total, max_len, hkv, d, generator=gen)
    v_cache = torch.randn(slots_total, max_len, hkv, d, generator=gen)
    # fresh prefill, prefill against a cached prefix, and two decodes, slots out of order
    slots, starts, lens = [3, 0, 4, 1], [0, 20, 40, 63], [9, 7, 1, 1]
    q = torch.randn(sum(lens), hq, d, generator=gen)
    meta = build_meta(slots, starts, lens, max_len, torch.device("cpu"), use_flash=False)
    out = attend(q, k_cache, v_cache, meta, d**-0.5)
    offset = 0
    for slot, start, n in zip(slots, starts, lens, strict=True):
        expected = _reference(
            q[offset : offset + n], k_cache[slot, : start + n], v_cache[slot, : start + n], start
        )
        torch.testing.assert_close(out[offset : offset + n], expected, rtol=1e-4, atol=1e-5)
        offset += n


def test_flash_metadata() -> None:
    meta = build_meta([2, 0, 5], [0, 30, 7], [4, 1, 3], 100, torch.device("cpu"), use_flash=True)
    assert meta.write_index.tolist() == [200, 201, 202, 203, 30, 507, 508, 509]
    assert meta.cum_seq_q is not None and meta.cum_seq_k is not None
    assert meta.seqused_k is not None
    assert meta.cum_seq_q.tolist() == [0, 4, 5, 8]
    assert meta.cum_seq_k.tolist()[:3] == [200, 0, 500]  # each sequence starts at its slot
    assert meta.seqused_k.tolist() == [4, 31, 10]
    assert (meta.max_q, meta.max_k) == (4, 31)
    assert meta.cum_seq_q.dtype == meta.seqused_k.dtype == torch.int32
    no_flash = build_meta([2], [0], [4], 100, torch.device("cpu"), use_flash=False)
    assert no_flash.cum_seq_q is None
