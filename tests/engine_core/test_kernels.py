"""The fused kernels: eager they are HF's numerics (checked token for token elsewhere); here,
that torch.compile traces each of them whole on inputs shaped like the models' and gives the
same values (the ``aot_eager`` backend: dynamo and AOT autograd without code generation, which
is the CUDA machine's part), and that a compile failure falls back to eager."""

from __future__ import annotations

import logging

import pytest
import torch

from engine_core.model import kernels
from engine_core.model.kernels import Kernels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fused() -> Kernels:
    """Compiled once for the module: a compile of the seven kernels costs CI's 2 cores ~10 s."""
    torch._dynamo.reset()
    compiled = Kernels.compiled(CPU, torch.float32, backend="aot_eager")
    assert compiled.is_compiled
    return compiled


def test_every_kernel_traces_whole_and_matches_eager(fused: Kernels) -> None:
    with torch.no_grad():  # as the engine runs them
        x = torch.randn(5, 32)
        w = torch.randn(32)
        qk = torch.randn(5, 3, 2, 8)
        cos, sin = torch.randn(5, 1, 8), torch.randn(5, 1, 8)
        eager = Kernels.eager()
        torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), eager.rms_norm(x, w, 1e-6))
        for got, want in zip(
            fused.add_rms_norm(x, x * 2, w, 1e-5),
            eager.add_rms_norm(x, x * 2, w, 1e-5),
            strict=True,
        ):
            torch.testing.assert_close(got, want)
        packed, rows = qk.reshape(5, -1)[:, :32], torch.tensor([6, 0, 3, 1, 4])
        caches = [torch.zeros(2, 7, 1, 8) for _ in "ab"]
        torch.testing.assert_close(
            fused.rotary_store(packed, cos, sin, *caches[0], rows),
            eager.rotary_store(packed, cos, sin, *caches[1], rows),
        )
        torch.testing.assert_close(caches[0], caches[1])
        assert caches[0][:, 2].abs().sum() == 0 and caches[0][:, rows].abs().sum() > 0
        torch.testing.assert_close(
            fused.qkv_rotary_fp32(qk, cos, sin), eager.qkv_rotary_fp32(qk, cos, sin)
        )
        b = torch.randn(32)
        torch.testing.assert_close(
            fused.add_layer_norm(x, x * 2, w, b, 1e-6), eager.add_layer_norm(x, x * 2, w, b, 1e-6)
        )
        torch.testing.assert_close(fused.silu_mul(x), eager.silu_mul(x))
        torch.testing.assert_close(fused.quick_gelu(x), eager.quick_gelu(x))


def test_the_start_up_compile_serves_the_steps_without_recompiling(fused: Kernels) -> None:
    """Steps run under no_grad with 1 row or many: what ``compiled`` compiled must serve them
    all (a recompile while serving stalls the step; here it raises, and the kernel falls back)."""
    torch.compiler.set_stance("fail_on_recompile")
    try:
        with torch.no_grad():
            for rows in (1, 7):
                x, w = torch.randn(rows, 64), torch.randn(64)
                qk, cos = torch.randn(rows, 3, 4, 16), torch.randn(rows, 1, 16)
                fused.rms_norm(x, w, 1e-6)
                fused.add_rms_norm(x, x, w, 1e-6)
                fused.rotary_store(
                    qk.reshape(rows, -1)[:, :96],
                    cos,
                    cos,
                    *torch.zeros(2, rows, 1, 16),
                    torch.arange(rows),
                )
                fused.qkv_rotary_fp32(qk, cos, cos)
                fused.add_layer_norm(x, x, w, w, 1e-6)
                fused.silu_mul(x)
                fused.quick_gelu(x)
    finally:
        torch.compiler.set_stance("default")
    assert fused.fallen_back() == []


def test_a_failing_compile_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(fn: object, backend: str) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "_compile", broken)
    with caplog.at_level(logging.WARNING):
        got = Kernels.compiled(CPU, torch.float32)
    assert not got.is_compiled and got == Kernels.eager()
    assert "no compiler here" in caplog.text


def test_a_kernel_that_fails_later_runs_eagerly_from_then_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        raise RuntimeError("recompile failed")

    guarded = kernels._Guarded("quick_gelu", flaky, kernels.quick_gelu)
    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(guarded(x), kernels.quick_gelu(x))
        torch.testing.assert_close(guarded(x), kernels.quick_gelu(x))
    assert len(calls) == 1 and guarded.is_eager and "recompile failed" in caplog.text
