"""Validation of an EngineRequest against what a model can run (``check_request``).

Every function returns None when the request is fine, else the message the client gets (400).
"""

from __future__ import annotations

from collections.abc import Container

import numpy as np
import torch

from ipc.messages import EngineRequest, MultiModalItem


def check_kind(
    request: EngineRequest,
    supports_generation: bool,
    supports_embeddings: bool,
    poolings: tuple[str, ...],
) -> str | None:
    """Exactly one of sampling / pooling, and one the model can do."""
    if (request.sampling is None) == (request.pooling is None):
        return "a request needs exactly one of sampling or pooling parameters"
    if request.sampling is not None and not supports_generation:
        return "this model is an encoder-only embedding model; it cannot generate text"
    if request.pooling is not None:
        if not supports_embeddings:
            return "this model does not support embeddings"
        if request.pooling.pooling not in poolings:
            return (
                f"pooling {request.pooling.pooling!r} is not supported by this model "
                f"(supported: {', '.join(poolings)})"
            )
    return None


def check_tokens(request: EngineRequest, vocab_size: int, max_model_len: int) -> str | None:
    """A non-empty 1-D integer array of ids in [0, vocab), short enough to fit the context."""
    ids = request.prompt_token_ids
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype not in (np.int32, np.int64):
        return "prompt_token_ids must be a 1-D int32 array"
    if ids.size == 0:
        return "the prompt is empty"
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return f"token id {bad} is outside the vocabulary [0, {vocab_size})"
    # generation needs room for at least one new token
    limit = max_model_len - (1 if request.sampling is not None else 0)
    if ids.size > limit:
        return (
            f"the prompt has {ids.size} tokens; this model's context holds {max_model_len} "
            f"(max_model_len), including at least one generated token"
        )
    return None


def check_image(
    item: MultiModalItem,
    ids: np.ndarray,
    image_token_id: int,
    merge: int,
    patch_dim: int,
    is_cached: bool,
    accepts_uint8: bool = False,
) -> str | None:
    """Grid, pixel tensor dtype and shape, and the placeholder span of one image. Pixels are
    floating point (normalized), or uint8 when the engine normalizes them itself."""
    if item.modality != "image":
        return f"unsupported modality {item.modality!r}"
    t, h, w = item.grid_thw
    if min(t, h, w) < 1 or h % merge or w % merge:
        return f"image grid {item.grid_thw} is invalid (h and w must be multiples of {merge})"
    patches = t * h * w
    if item.length != patches // (merge * merge):
        return (
            f"image {item.content_hash!r} has {item.length} placeholder tokens; its grid "
            f"{item.grid_thw} needs {patches // (merge * merge)}"
        )
    end = item.offset + item.length
    if end > ids.size:
        return f"image placeholder span [{item.offset}, {end}) is outside the prompt"
    if not np.all(ids[item.offset : end] == image_token_id):
        return f"image placeholder span [{item.offset}, {end}) is not all image tokens"
    pixels = item.pixel_values
    if pixels is None:
        return None if is_cached else f"unknown image hash {item.content_hash!r} (send the pixels)"
    if not isinstance(pixels, torch.Tensor) or not (
        pixels.is_floating_point() or (accepts_uint8 and pixels.dtype == torch.uint8)
    ):
        wanted = "uint8 or floating-point" if accepts_uint8 else "floating-point"
        got = pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        return f"pixel_values must be a {wanted} tensor, not {got}"
    if tuple(pixels.shape) != (patches, patch_dim):
        return (
            f"pixel_values of shape {tuple(pixels.shape)} disagree with grid "
            f"{item.grid_thw}: expected ({patches}, {patch_dim})"
        )
    return None


def check_images(
    request: EngineRequest,
    image_token_id: int | None,
    merge: int,
    patch_dim: int,
    cached: Container[str],
    accepts_uint8: bool = False,
) -> str | None:
    """All images of a request: supported, valid, non-overlapping, covering every placeholder."""
    ids = request.prompt_token_ids
    if image_token_id is None:
        return "this model does not accept images" if request.mm_items else None
    covered = np.zeros(ids.size, dtype=bool)
    for item in request.mm_items:
        error = check_image(
            item, ids, image_token_id, merge, patch_dim, item.content_hash in cached, accepts_uint8
        )
        if error:
            return error
        span = covered[item.offset : item.offset + item.length]
        if span.any():
            return f"image placeholder spans overlap at offset {item.offset}"
        span[:] = True
    if np.any((ids == image_token_id) & ~covered):
        return "the prompt has image placeholder tokens that belong to no image"
    return None
