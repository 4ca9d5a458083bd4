"""Decode steps replayed from CUDA graphs give the same greedy tokens as eager steps (CUDA
only: bf16 FlashAttention). Requests arrive at different steps, so the graphed batches have
several sizes and most are padded up to a bucket; one request carries an image (M-RoPE)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import skimage.data
import torch
from conftest import image_request
from PIL import Image
from test_model_greedy import run_greedy

from bench.datasets import sharegpt_prompts
from engine_core.model.cuda_graphs import buckets


def test_buckets_cover_every_batch_size() -> None:
    for max_batch in (1, 3, 8, 20, 64):
        sizes = buckets(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_decode_matches_eager(
    make_runner: Callable[..., Any], encode: Callable[..., Any]
) -> None:
    encoded = [encode(t) for t in sharegpt_prompts(5, min_chars=100, max_chars=800)]
    encoded.append(encode("Describe this picture.", [Image.fromarray(skimage.data.coffee())]))
    outputs = {}
    for eager in (True, False):
        runner = make_runner(device="cuda", dtype="bfloat16", enforce_eager=eager)
        assert (runner.graphs is None) == eager
        image_token_id = runner.facts.image_token_id
        requests = [image_request(f"r{i}", e, image_token_id) for i, e in enumerate(encoded)]
        outputs[eager] = run_greedy(runner, requests, [0, 0, 1, 3, 3, 6], chunk_size=64)
        del runner
        torch.cuda.empty_cache()
    assert outputs[False] == outputs[True]
