"""The IO thread's pinned copies of image pixels stay within their budget, counted in the
blocks torch's pinned-memory cache hands out, and the budget comes back as the copies die.
Pinning needs CUDA: a copy stands in for it here (the GPU suite runs the real one)."""

from __future__ import annotations

import gc

import numpy as np
import torch

from engine_core.model.host import PixelPinner, pinned_block_bytes
from ipc import messages

BLOCK = 8192  # what a 5,000-byte photo takes in the cache


def _request(rid: str, images: int) -> messages.EngineRequest:
    items = [
        messages.MultiModalItem(
            f"h{rid}{i}", "image", (1, 2, 2), 1 + i, 1, torch.zeros(5000, dtype=torch.uint8)
        )
        for i in range(images)
    ]
    prompt = np.zeros(images + 2, dtype=np.int32)
    return messages.EngineRequest(rid, prompt, sampling=messages.SamplingParams(), mm_items=items)


def test_block_sizes_are_powers_of_two() -> None:
    assert [pinned_block_bytes(n) for n in (1, 4096, 4097, 5000, 4_700_000)] == [
        1,
        4096,
        8192,
        8192,
        8 << 20,
    ]


def test_pins_within_the_budget_and_gets_it_back_when_the_copies_die() -> None:
    copies: list[int] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        copies.append(t.nbytes)
        return t.clone()

    pinner = PixelPinner(budget=3 * BLOCK, pin=pin)
    first, second = _request("a", 2), _request("b", 2)
    originals = [item.pixel_values for item in second.mm_items]
    pinner(first)
    pinner(second)
    pinner(messages.AbortRequests(["a"]))  # not a request: left alone
    assert copies == [5000, 5000, 5000] and pinner.left == 0
    # The budget ran out at b's second image: it stays as it came, to be pinned when encoded.
    assert second.mm_items[0].pixel_values is not originals[0]
    assert second.mm_items[1].pixel_values is originals[1]
    del first
    gc.collect()
    assert pinner.left == 2 * BLOCK
    for item in second.mm_items:
        item.pixel_values = None  # as when a request ends
    gc.collect()
    assert pinner.left == 3 * BLOCK


def test_a_failed_pin_leaves_the_pixels_and_the_budget() -> None:
    def exhausted(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: out of memory")

    pinner = PixelPinner(budget=4 * BLOCK, pin=exhausted)
    req = _request("c", 2)
    before = [item.pixel_values for item in req.mm_items]
    pinner(req)
    assert all(item.pixel_values is old for item, old in zip(req.mm_items, before, strict=True))
    assert pinner.left == 4 * BLOCK
