"""Our Triton kernels against the eager functions they replace on CUDA, run on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, read when a kernel is defined: hence a fresh
interpreter per run). Shapes are odd on purpose: heads, head_dim and widths that are not
powers of two exercise every mask."""

from __future__ import annotations

import textwrap

import pytest

from tests.engine_core.triton_interpreter import run_interpreted

pytest.importorskip("triton", reason="Triton is not installed with this torch")

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine_core.model import kernels, triton_kernels as tk

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)):
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        x = torch.randn(37, 80, generator=gen).to(dtype)
        close(tk.quick_gelu(x), kernels.quick_gelu(x))
        close(tk.quick_gelu(x[:, :40]), kernels.quick_gelu(x[:, :40]))  # strided input
        qkv = torch.randn(37, 3, 5, 12, generator=gen).to(dtype)
        cos, sin = torch.randn(37, 1, 12, generator=gen), torch.randn(37, 1, 12, generator=gen)
        got, want = tk.qkv_rotary_fp32(qkv, cos, sin), kernels.qkv_rotary_fp32(qkv, cos, sin)
        for a, b in zip(got, want, strict=True):
            assert a.is_contiguous() and a.shape == (37, 5, 12)
            close(a, b)
        r, s = (torch.randn(37, 100, generator=gen).to(dtype) for _ in range(2))
        w, b = (torch.randn(100, generator=gen).to(dtype) for _ in range(2))
        for a, c in zip(
            tk.add_layer_norm(r, s, w, b, 1e-6), kernels.add_layer_norm(r, s, w, b, 1e-6),
            strict=True,
        ):
            close(a, c)
        w80 = torch.randn(80, generator=gen).to(dtype)
        close(tk.rms_norm(x, w80, 1e-6), kernels.rms_norm(x, w80, 1e-6))
        y = torch.randn(37, 80, generator=gen).to(dtype)
        for a, c in zip(
            tk.add_rms_norm(x, y, w80, 1e-6), kernels.add_rms_norm(x, y, w80, 1e-6), strict=True
        ):
            close(a, c)
        # the decoder's packed projection (7 q heads, 3 kv heads of 12), rows strided
        packed = torch.randn(37, 200, generator=gen).to(dtype)[:, : (7 + 2 * 3) * 12]
        cos_d, sin_d = cos.to(dtype), sin.to(dtype)
        rows = torch.randperm(50, generator=gen)[:37]  # scattered cache rows, 13 left untouched
        got_kv, want_kv = (torch.zeros(2, 50, 3, 12, dtype=dtype) for _ in "ab")
        close(tk.rotary_store(packed, cos_d, sin_d, *got_kv, rows),
              kernels.rotary_store(packed, cos_d, sin_d, *want_kv, rows))
        close(got_kv, want_kv)
        assert want_kv[:, rows].abs().sum() > 0
        gate_up = torch.randn(3, 2 * 1100, generator=gen).to(dtype)  # two row blocks
        close(tk.silu_mul(gate_up), kernels.silu_mul(gate_up))
        empty = torch.empty(0, 80, dtype=dtype)
        assert tk.quick_gelu(empty).shape == (0, 80)
    # The runner's choice on CUDA goes through the same check (here on the interpreter).
    chosen = kernels._triton_kernels(kernels._fields(kernels.Kernels.eager()),
                                     torch.device("cpu"), torch.float32)
    assert chosen == tk.KERNELS and set(chosen) == set(kernels._fields(kernels.Kernels.eager()))
    print("ok")
    """
)


def test_triton_kernels_equal_the_eager_functions_they_replace() -> None:
    run_interpreted(SCRIPT)
