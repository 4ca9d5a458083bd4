"""Decode steps replayed from CUDA graphs give what eager steps give, through the real engine
loop (CUDA only: bf16 FlashAttention). The checks and the requests are bench/engine_graphs.py's
(the GPU suite runs that script, where pytest may be missing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.engine_graphs import compare
from engine_core.model.cuda_graphs import buckets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_buckets_cover_every_batch_size() -> None:
    for max_batch in (1, 3, 8, 20, 64):
        sizes = buckets(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_batch


@needs_cuda
def test_graphed_decode_matches_eager(default_model_dir: Path) -> None:
    """The same kernels on both sides: greedy, seeded draws and logprobs all identical."""
    report = compare(str(default_model_dir), compiled=False)
    assert report["identical"], report["first_divergence"]
    assert report["logprob_top_ids_equal"] and report["logprob_max_diff"] < 0.05


@needs_cuda
def test_compiled_kernels_serve_like_eager(default_model_dir: Path) -> None:
    """The production setup (graphs and compiled kernels): every request completes at its
    length, and the tokens agree with eager but for bf16 rounding at near-ties."""
    report = compare(str(default_model_dir), compiled=True)
    assert report["lengths_equal"] and report["match_rate"] > 0.8, report
