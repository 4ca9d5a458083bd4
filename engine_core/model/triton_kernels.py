"""Hand-written Triton kernels for the vision tower's memory-bound pieces, on CUDA.

The tower runs three elementwise passes per block over ~16,000 patches x 1,280 (x 5,120 in
the MLP) for a step of four 1024x768 photos. ``torch.compile``'s kernels for them ran at a
fifth to a third of the H200's copy bandwidth (``bench/engine_profile.py``: quick_gelu 194-387
us a call where reading and writing its 164 MB take 78 us at 4.2 TB/s), and they were a quarter
of the tower's GPU time. Each kernel here does one pass at full width:

- ``quick_gelu``: ``x * sigmoid(1.702 x)``, flat;
- ``qkv_rotary_fp32``: one program per patch reads its packed q | k | v row once and writes
  q and k rotated (fp32 arithmetic, as HF) and v, each to its own contiguous tensor;
- ``add_layer_norm``: one program per patch: the residual add (rounded to the model dtype, as
  HF adds) and the LayerNorm of the sum in fp32.

Same arithmetic as the eager functions in ``engine_core.model.kernels`` except that every
intermediate stays in fp32 and is rounded once, so a result may differ from eager in the last
bit of the model dtype (as the compiled kernels' do). The per-model sizes (heads, head_dim,
width) are compile-time constants and the row kernels take no other size, so they compile
once, when the engine first runs the tower (its start-up memory profile). The flat kernel's
length is specialised, as Triton does by default, on being a multiple of 16: that is what
lets its loads be 16-byte vectors (without it this kernel ran as slowly as inductor's
dynamic-shape one, which cannot assume it either); rows x the MLP width always is one for
these models, so serving never meets a second variant. Tests run them through Triton's
interpreter on the CPU (tests/engine_core/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per program of the flat kernels, and of a row's part in the gated MLP's.
FLAT_BLOCK = 4096
ROW_BLOCK = 1024


@triton.jit  # ``n`` specialised: a length not known to be a multiple of 16 makes every load scalar
def _quick_gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = x * tl.sigmoid(1.702 * x)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _quick_gelu_kernel[(triton.cdiv(n, FLAT_BLOCK),)](x, y, n, BLOCK=FLAT_BLOCK)
    return y


@triton.jit
def _rotate_row(
    src,
    head_stride,
    out,
    cos_row,
    sin_row,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate the H heads of one token, read from ``src`` (heads ``head_stride`` apart, last
    dimension contiguous), in fp32, into ``out`` (H x D contiguous)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (dims < D)
    half: tl.constexpr = D // 2
    # rotate_half(x) = [-x[half:], x[:half]]: lane d reads lane d +- half, negated below half
    partner = tl.where(dims < half, dims + half, dims - half)
    sign = tl.where(dims < half, -1.0, 1.0)
    cos = tl.load(cos_row + dims, mask=dims < D).to(tl.float32)
    sin = tl.load(sin_row + dims, mask=dims < D).to(tl.float32)
    at = src + heads * head_stride
    x = tl.load(at + dims, mask=mask).to(tl.float32)
    other = tl.load(at + partner, mask=mask).to(tl.float32)
    rotated = x * cos + sign * other * sin
    tl.store(out + heads * D + dims, rotated.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _copy_row(
    src, out, H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Copy the H x D contiguous heads of one token from ``src`` to ``out``."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    inner, mask = heads * D + dims, (heads < H) & (dims < D)
    tl.store(out + inner, tl.load(src + inner, mask=mask), mask=mask)


@triton.jit
def _qkv_rotary_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = qkv_ptr + row * (3 * H * D)
    out = row * (H * D)
    cos, sin = cos_ptr + row * D, sin_ptr + row * D
    _rotate_row(src, D, q_ptr + out, cos, sin, H, D, BLOCK_H, BLOCK_D)
    _rotate_row(src + H * D, D, k_ptr + out, cos, sin, H, D, BLOCK_H, BLOCK_D)
    _copy_row(src + 2 * (H * D), v_ptr + out, H, D, BLOCK_H, BLOCK_D)


def qkv_rotary_fp32(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv`` (N, 3, H, D); cos/sin (N, 1, D) fp32 -> q, k rotated and v, each (N, H, D)."""
    n, _, heads, dim = qkv.shape
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q, k, v = (torch.empty(n, heads, dim, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if n:
        _qkv_rotary_kernel[(n,)](
            qkv,
            cos,
            sin,
            q,
            k,
            v,
            H=heads,
            D=dim,
            BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_D=triton.next_power_of_2(dim),
        )
    return q, k, v


@triton.jit(do_not_specialize=["eps"])
def _add_layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, eps, E: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < E
    at = row * E + cols
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + at, mask=mask, other=0.0).to(tl.float32)
    summed = (x + r).to(s_ptr.dtype.element_ty)  # HF adds in the model dtype
    tl.store(s_ptr + at, summed, mask=mask)
    s = summed.to(tl.float32)
    mean = tl.sum(s, axis=0) / E
    centred = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / E + eps)
    w = tl.load(w_ptr + cols, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask).to(tl.float32)
    tl.store(y_ptr + at, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x``, then ``(layer_norm(s), s)``; x and residual (N, E)."""
    x, residual = x.contiguous(), residual.contiguous()
    width = x.shape[-1]
    y, summed = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // width if width else 0
    if rows:
        _add_layer_norm_kernel[(rows,)](
            x, residual, weight, bias, y, summed, eps, E=width, BLOCK=triton.next_power_of_2(width)
        )
    return y, summed


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    s_ptr,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    E: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < E
    at = row * E + cols
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + at, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + at, x, mask=mask)
    h = x.to(tl.float32)
    h = h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / E + eps))
    # HF: normalise in fp32, cast back, then scale by the weight in the model dtype
    w = tl.load(w_ptr + cols, mask=mask)
    y = h.to(y_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _launch_rms(x, x, weight, y, y, eps, has_residual=False)
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` in the model dtype, then ``(rms_norm(s), s)``."""
    x, residual = x.contiguous(), residual.contiguous()
    y, summed = torch.empty_like(x), torch.empty_like(x)
    _launch_rms(x, residual, weight, y, summed, eps, has_residual=True)
    return y, summed


def _launch_rms(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    summed: torch.Tensor,
    eps: float,
    has_residual: bool,
) -> None:
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            residual,
            weight,
            y,
            summed,
            eps,
            HAS_RESIDUAL=has_residual,
            E=width,
            BLOCK=triton.next_power_of_2(width),
        )


@triton.jit
def _rotary_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    index_ptr,
    row_stride,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = qkv_ptr + row * row_stride
    cos, sin = cos_ptr + row * D, sin_ptr + row * D
    dest = tl.load(index_ptr + row).to(tl.int64) * (HKV * D)
    _rotate_row(src, D, q_ptr + row * (HQ * D), cos, sin, HQ, D, BLOCK_HQ, BLOCK_D)
    _rotate_row(src + HQ * D, D, k_ptr + dest, cos, sin, HKV, D, BLOCK_HKV, BLOCK_D)
    _copy_row(src + (HQ + HKV) * D, v_ptr + dest, HKV, D, BLOCK_HKV, BLOCK_D)


def rotary_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    write_index: torch.Tensor,
) -> torch.Tensor:
    """The decoder's packed projection ``qkv`` (T, (Hq + 2 Hkv) D) -> q rotated (T, Hq, D);
    k rotated and v written straight into rows ``write_index`` of the flat caches ``k_rows``
    and ``v_rows`` (R, Hkv, D). One launch a layer where rotary and two ``index_copy_`` took
    three to five (a strided source costs ``index_copy_`` a copy of its own)."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    assert k_rows.is_contiguous() and v_rows.is_contiguous()
    n = qkv.shape[0]
    kv_heads, dim = k_rows.shape[1:]
    heads = qkv.shape[1] // dim - 2 * kv_heads
    q = torch.empty(n, heads, dim, dtype=qkv.dtype, device=qkv.device)
    if n:
        _rotary_store_kernel[(n,)](
            qkv,
            cos,
            sin,
            q,
            k_rows,
            v_rows,
            write_index,
            qkv.stride(0),
            HQ=heads,
            HKV=kv_heads,
            D=dim,
            BLOCK_HQ=triton.next_power_of_2(heads),
            BLOCK_HKV=triton.next_power_of_2(kv_heads),
            BLOCK_D=triton.next_power_of_2(dim),
        )
    return q


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, INNER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INNER
    gate = tl.load(x_ptr + row * (2 * INNER) + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * (2 * INNER) + INNER + cols, mask=mask).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * INNER + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    gate_up = gate_up.contiguous()
    inner = gate_up.shape[-1] // 2
    y = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype, device=gate_up.device)
    rows = y.numel() // inner if inner else 0
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(inner, ROW_BLOCK))](
            gate_up, y, INNER=inner, BLOCK=ROW_BLOCK
        )
    return y


#: Every kernel of this module by the name ``engine_core.model.kernels.Kernels`` gives it.
KERNELS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "rotary_store": rotary_store,
    "add_layer_norm": add_layer_norm,
    "qkv_rotary_fp32": qkv_rotary_fp32,
    "silu_mul": silu_mul,
    "quick_gelu": quick_gelu,
}
