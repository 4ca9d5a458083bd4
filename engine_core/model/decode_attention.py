"""Decode attention in Triton: one new token per sequence against its cached K/V, on CUDA.

FlashAttention-2's split-KV path, which decode steps used before, reads every KV head once per
*query* head: Qwen2-VL-2B has 12 query heads over 2 KV heads, so at batch 64 and 1k tokens of
context its kernel took 0.96 ms a step where reading the batch's KV once takes 0.44 ms at the
H200's copy rate, and at batch 1 its combine kernel alone took 0.19 ms (bench/results/engine.md).
Here a program owns one (sequence, KV head, split of the context) and computes the whole group of
query heads that share the KV head as the rows of one matrix product, so each K/V block is read
once; a second small kernel combines the splits. Splits give small batches enough programs to
fill the GPU; once the batch alone does (batch 64 of the 2B model: 128 programs on 132 SMs) there
is one, and the program writes its output itself with no combine launch.

The cache is the runner's flat view ``(num_slots * max_len, Hkv, D)``; sequence ``b`` reads rows
``k_start[b] .. k_start[b] + k_len[b]`` (the CUDA graphs' device-side metadata, so the kernels
read the lengths on the device and never make the host wait). Scores and the softmax are fp32;
the probabilities are rounded to the cache dtype for the second product, as FlashAttention does.
Tests run it through Triton's interpreter on the CPU (tests/engine_core/test_decode_attention.py);
on CUDA it is checked against SDPA before the graphs are captured (``check``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Context rows a program reads per iteration.
BLOCK_N = 64
#: The most splits of one sequence's context; a power of two (the combine kernel's block).
MAX_SPLITS = 32


@triton.jit(do_not_specialize=["scale", "splits"])
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_start_ptr,
    k_len_ptr,
    acc_ptr,
    peak_ptr,
    denom_ptr,
    out_ptr,
    scale,
    splits,
    stride_qb,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HQ: tl.constexpr,
    SINGLE: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(k_start_ptr + b).to(tl.int64)
    length = tl.load(k_len_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * G + group
    head_mask = group < G
    dim_mask = dims < D
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    peak = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for block in range(lo, hi, BLOCK_N):
        rows = block + cols
        valid = rows < hi
        at = (start + rows)[:, None] * stride_kr + kv_head * stride_kh + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + at, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        peak_new = tl.maximum(peak, tl.max(s, 1))
        alpha = tl.exp(peak - peak_new)
        p = tl.exp(s - peak_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + at, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        peak = peak_new
    out_mask = head_mask[:, None] & dim_mask[None, :]
    if SINGLE:  # the whole context was this program's: normalise and write the output
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:  # partials (B, HQ, splits[, D]): an empty split leaves peak -inf, denom 0: weight 0
        row = (b * HQ + heads) * splits + split
        tl.store(peak_ptr + row, peak, mask=head_mask)
        tl.store(denom_ptr + row, denom, mask=head_mask)
        tl.store(acc_ptr + row[:, None] * BLOCK_D + dims[None, :], acc, mask=out_mask)


@triton.jit(do_not_specialize=["splits"])
def _combine_kernel(
    acc_ptr,
    peak_ptr,
    denom_ptr,
    out_ptr,
    splits,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HQ: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    in_use = parts < splits
    row = (b * HQ + head) * splits + parts
    peak = tl.load(peak_ptr + row, mask=in_use, other=float("-inf"))
    denom = tl.load(denom_ptr + row, mask=in_use, other=0.0)
    top = tl.max(peak, 0)
    weight = tl.where(peak > float("-inf"), tl.exp(peak - top), 0.0)
    acc = tl.load(
        acc_ptr + row[:, None] * BLOCK_D + dims[None, :],
        mask=in_use[:, None] & (dims[None, :] < D),
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(denom * weight, 0)
    tl.store(
        out_ptr + b * stride_ob + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < D,
    )


def num_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits of each context so that the batch's programs number about one per SM, none shorter
    than a block of ``max_len``. One program an SM reads as fast as several (H200, batch 64 of
    the 2B model at 1k context: 26.1 us a layer at 1 split, 25.5 at 3 and 27.4 at 6, each with
    a combine launch), and a single split needs no combine at all; at batch 1 splits as short
    as 64 rows pay (6.0 us at 16 splits, 8.3 at 4: bench/results/engine.md)."""
    wanted = round(num_sms / (batch * num_kv_heads))
    return max(1, min(MAX_SPLITS, wanted, max_len // BLOCK_N))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
    splits: int,
) -> torch.Tensor:
    """q (B, Hq, D), last dim contiguous; caches (num_slots, max_len, Hkv, D) contiguous;
    k_start, k_len (B,) integer rows of the flat cache. Returns (B, Hq, D) in q's dtype."""
    batch, hq, d = q.shape
    num_slots, max_len, hkv, _ = k_cache.shape
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert hq % hkv == 0 and 1 <= splits <= MAX_SPLITS
    block_d = triton.next_power_of_2(d)
    out = torch.empty_like(q)
    single = splits == 1
    # the partials are the combine's input; a single split writes ``out`` and needs none
    parts = 0 if single else splits
    acc = torch.empty(batch, hq, parts, block_d, dtype=torch.float32, device=q.device)
    peak = torch.empty(batch, hq, parts, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(peak)
    _split_kernel[(batch, hkv, splits)](
        q,
        k_cache,
        v_cache,
        k_start,
        k_len,
        acc,
        peak,
        denom,
        out,
        scale,
        splits,
        q.stride(0),
        q.stride(1),
        hkv * d,
        d,
        out.stride(0),
        out.stride(1),
        G=hq // hkv,
        D=d,
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),  # tl.dot takes 16 rows or more
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        HQ=hq,
        SINGLE=single,
    )
    if single:
        return out
    _combine_kernel[(batch, hq)](
        acc,
        peak,
        denom,
        out,
        splits,
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_D=block_d,
        BLOCK_S=MAX_SPLITS,
        HQ=hq,
    )
    return out


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same attention by SDPA, one sequence at a time (tests and the start-up check)."""
    max_len = k_cache.shape[1]
    outs = []
    for i, (start, n) in enumerate(zip(k_start.tolist(), k_len.tolist(), strict=True)):
        slot = start // max_len
        k = k_cache[slot, :n].transpose(0, 1)[None]  # (1, Hkv, n, D)
        v = v_cache[slot, :n].transpose(0, 1)[None]
        qi = q[i][None, :, None]  # (1, Hq, 1, D)
        o = torch.nn.functional.scaled_dot_product_attention(
            qi, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@torch.no_grad()
def check(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Raise unless the kernels match ``reference`` within rounding for this model's heads:
    lengths of 1 row, of part of a block, of several blocks, with 1, several and the most
    splits."""
    gen = torch.Generator(device=device).manual_seed(0)
    slots, max_len = 3, 4 * BLOCK_N
    shape = (slots, max_len, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in "kv")
    q = torch.randn(4, num_heads, head_dim, device=device, generator=gen).to(dtype)
    k_start = torch.tensor([2, 0, 1, 2], device=device) * max_len
    k_len = torch.tensor([1, 37, max_len, 3 * BLOCK_N + 5], device=device, dtype=torch.int32)
    scale = head_dim**-0.5
    want = reference(q, k_cache, v_cache, k_start, k_len, scale)
    for splits in (1, 3, MAX_SPLITS):  # MAX_SPLITS: most splits empty, as short contexts leave them
        got = decode_attention(q, k_cache, v_cache, k_start, k_len, scale, splits)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
