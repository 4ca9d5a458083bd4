"""M-RoPE positions equal transformers' get_rope_index, for real grids from the processor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from conftest import image_request
from PIL import Image

from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.positions import mrope_positions
from engine_core.model.request_state import RequestState


def _photos(*names: str) -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, n)()) for n in names]


@pytest.mark.parametrize(
    ("text", "photos"),
    [
        ("Only words here, no pictures at all.", []),
        ("What is this?", ["astronaut"]),
        ("First, then second.", ["coffee", "chelsea"]),
    ],
)
def test_positions_match_hf(
    hf_model: Any, encode: Callable[..., Any], text: str, photos: list[str]
) -> None:
    encoded = encode(text, _photos(*photos) if photos else None)
    request = image_request("p", encoded, hf_model.config.image_token_id)
    assert len(request.mm_items) == len(photos)
    expected, expected_delta = hf_model.model.get_rope_index(
        encoded["input_ids"],
        mm_token_type_ids=encoded["mm_token_type_ids"],
        image_grid_thw=encoded.get("image_grid_thw"),
    )
    spans = [(m.offset, m.length, m.grid_thw) for m in request.mm_items]
    merge = hf_model.config.vision_config.spatial_merge_size
    positions, delta = mrope_positions(request.prompt_token_ids.size, spans, merge)
    assert torch.equal(torch.from_numpy(positions), expected[:, 0])
    assert delta == int(expected_delta)
    if photos:
        assert delta < 0  # an image takes fewer positions than tokens


def test_text_between_two_images_and_decode_positions(
    hf_model: Any, encode: Callable[..., Any]
) -> None:
    """Two images with text between them (one user turn holding both), and the positions of
    generated tokens: index + rope_delta in all three rows, as HF's decode path computes."""
    processor_out = encode("Look at both.", _photos("rocket", "coffee"))
    request = image_request("q", processor_out, hf_model.config.image_token_id)
    first, second = request.mm_items
    assert second.offset > first.offset + first.length  # text tokens lie between them
    state = RequestState(request, EncoderCache(0), 2, is_mrope=True)
    n = request.prompt_token_ids.size
    assert state.positions is not None
    both = state.chunk_positions(n - 3, 6)  # the prompt's tail and three generated tokens
    assert np.array_equal(both[:, :3], state.positions[:, n - 3 :])
    expected = np.arange(n, n + 3) + state.rope_delta
    assert np.array_equal(both[:, 3:], np.broadcast_to(expected, (3, 3)))
    # A decode (all generated) and a chunk inside the prompt take the same rule.
    assert np.array_equal(state.chunk_positions(n + 3, 1), both[:, 5:6] + 1)
    assert np.array_equal(state.chunk_positions(2, 4), state.positions[:, 2:6])
