"""The Triton decode attention against SDPA, on the CPU through Triton's interpreter (read when a
kernel is defined: hence a fresh interpreter). ``check`` is what the CUDA graphs run before they
capture: lengths of one row, part of a block and several blocks, at 1 split (written by the
split kernel itself), 3 and the most splits (combined). Shapes: the 2B model's heads (12 over 2,
head_dim 128) and an odd one (3 query heads a KV head, head_dim 80: every mask). The
interpreter's ``tl.dot`` gives wrong sums on bfloat16 inputs (Triton 3.8: 1e10 off on a 16x16
product), so bfloat16 is checked on CUDA only, at start-up; float16 takes the same tensor-core
path here."""

from __future__ import annotations

import textwrap

import pytest

from tests.engine_core.triton_interpreter import run_interpreted

pytest.importorskip("triton", reason="Triton is not installed with this torch")

SCRIPT = textwrap.dedent(
    """
    import torch
    from engine_core.model import decode_attention as da

    cpu = torch.device("cpu")
    da.check(12, 2, 128, torch.float32, cpu)
    da.check(6, 2, 80, torch.float16, cpu)
    print("ok")
    """
)


def test_decode_attention_equals_sdpa() -> None:
    run_interpreted(SCRIPT)


def test_check_fails_on_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # check() is the CUDA graphs' only guard: it must reject a kernel that is off.
    import torch

    from engine_core.model import decode_attention as da

    def off_by_a_bit(*args: object, **kwargs: object) -> torch.Tensor:
        return da.reference(*args[:6]) * 1.1  # type: ignore[arg-type]

    monkeypatch.setattr(da, "decode_attention", off_by_a_bit)
    with pytest.raises(AssertionError):
        da.check(4, 2, 16, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    ("batch", "kv_heads", "max_len", "want"),
    [
        (1, 2, 32768, 32),  # batch 1: split as far as allowed, 64 programs
        (1, 2, 512, 8),  # never under a block (64 rows) of the longest context
        (16, 2, 32768, 4),  # 32 programs: 4 splits, one program an SM
        (40, 2, 32768, 2),  # 80 programs: 2 splits
        (64, 2, 32768, 1),  # 128 programs on 132 SMs: one split, no combine
        (256, 2, 32768, 1),  # the batch alone fills the GPU
        (1, 2, 100, 1),
    ],
)
def test_num_splits_fill_the_gpu_without_short_splits(
    batch: int, kv_heads: int, max_len: int, want: int
) -> None:
    from engine_core.model import decode_attention as da

    assert da.num_splits(batch, kv_heads, max_len, num_sms=132) == want
