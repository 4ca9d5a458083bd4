"""The engine's one admission check: ``validate_request`` decides whether the loaded model can
run a request, with one message per problem (the 400 the client gets).

msgspec already enforced the field types and ``Meta`` ranges when the frame was decoded; this
adds what depends on the loaded model, all of it read from the runner's ``RunnerFacts``:
what the model does (generation, embeddings and which poolings, images), the vocabulary, the
context length, and each image's grid, pixels and placeholder span. API servers make the same
checks before a response starts; these are the backstop. Called once per admission (and
again when a preempted request comes back, since its cached images may have been evicted).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine_core.batch import RunnerFacts
from ipc.messages import EngineRequest, MultiModalItem

#: Most alternatives a request may ask logprobs for (vLLM's and OpenAI's default limit).
MAX_LOGPROBS = 20


def validate_request(
    request: EngineRequest,
    facts: RunnerFacts,
    has_image: Callable[[str], bool],
    allow_priority: bool = False,
) -> str | None:
    """None if the engine can take ``request``, else the 400 message. ``has_image``: whether
    an image's encoder output is cached (a request may then send its hash without pixels)."""
    return (
        _check_kind(request, facts, allow_priority)
        or _check_prompt(request, facts)
        or _check_sampling(request, facts)
        or _check_images(request, facts, has_image)
    )


def _check_kind(request: EngineRequest, facts: RunnerFacts, allow_priority: bool) -> str | None:
    if (request.sampling is None) == (request.pooling is None):
        return "exactly one of sampling and pooling parameters must be set"
    if request.priority != 0 and not allow_priority:
        return f"priority {request.priority} needs --scheduling-policy priority"
    if request.sampling is not None and not facts.supports_generation:
        return "this model is an embedding model; it cannot generate text"
    if request.pooling is not None:
        if not facts.supports_embeddings:
            return "this model does not support embeddings"
        if request.pooling.pooling not in facts.poolings:
            return (
                f"pooling {request.pooling.pooling!r} is not supported by this model "
                f"(supported: {', '.join(facts.poolings)})"
            )
    return None


def _check_prompt(request: EngineRequest, facts: RunnerFacts) -> str | None:
    prompt = request.prompt_token_ids
    if prompt.ndim != 1 or prompt.dtype not in (np.int32, np.int64):
        return f"prompt_token_ids must be a 1-D int32 array, got {prompt.dtype}{prompt.shape}"
    num_prompt = int(prompt.shape[0])
    if num_prompt == 0:
        return "the prompt is empty"
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= facts.vocab_size:
        bad = low if low < 0 else high
        return f"prompt token id {bad} is outside the vocabulary [0, {facts.vocab_size})"
    if request.sampling is None:
        if num_prompt > facts.max_model_len:
            return (
                f"the prompt has {num_prompt} tokens, more than the model's maximum "
                f"context length of {facts.max_model_len} (max_model_len)"
            )
        return None
    max_tokens = request.sampling.max_tokens
    if num_prompt + max_tokens > facts.max_model_len:
        return (
            f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is "
            f"{num_prompt + max_tokens} tokens, more than the model's maximum context "
            f"length of {facts.max_model_len} (max_model_len)"
        )
    return None


def _check_sampling(request: EngineRequest, facts: RunnerFacts) -> str | None:
    params = request.sampling
    if params is None:
        return None
    if params.min_tokens > params.max_tokens:
        return f"min_tokens ({params.min_tokens}) is larger than max_tokens ({params.max_tokens})"
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < facts.vocab_size]
    if bad_stop:
        return f"stop token ids {bad_stop} are outside the vocabulary [0, {facts.vocab_size})"
    if params.seed is not None and not -(1 << 63) <= params.seed < (1 << 64):
        return f"seed {params.seed} does not fit in 64 bits"
    if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
        return f"logprobs ({params.logprobs}) must be at most {MAX_LOGPROBS}"
    return None


def _check_images(
    request: EngineRequest, facts: RunnerFacts, has_image: Callable[[str], bool]
) -> str | None:
    """Every image supported and valid, spans that do not overlap and cover every
    placeholder token."""
    ids = request.prompt_token_ids
    if facts.image_token_id is None:
        return "this model does not accept images" if request.mm_items else None
    covered = np.zeros(ids.size, dtype=bool)
    for item in request.mm_items:
        error = _check_image(item, ids, facts, has_image)
        if error:
            return error
        span = covered[item.offset : item.offset + item.length]
        if span.any():
            return f"image placeholder spans overlap at offset {item.offset}"
        span[:] = True
    if np.any((ids == facts.image_token_id) & ~covered):
        return "the prompt has image placeholder tokens that belong to no image"
    return None


def _check_image(
    item: MultiModalItem, ids: np.ndarray, facts: RunnerFacts, has_image: Callable[[str], bool]
) -> str | None:
    """Grid, pixel tensor dtype and shape, and the placeholder span of one image. Pixels are
    floating point (normalized), or uint8 when the engine normalizes them itself."""
    if item.modality != "image":
        return f"unsupported modality {item.modality!r}"
    merge = facts.image_merge
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
    if not np.all(ids[item.offset : end] == facts.image_token_id):
        return f"image placeholder span [{item.offset}, {end}) is not all image tokens"
    pixels = item.pixel_values
    if pixels is None:
        if has_image(item.content_hash):
            return None
        return f"unknown image hash {item.content_hash!r} (send the pixels)"
    accepts_uint8 = facts.pixel_dtype == "uint8"
    if not isinstance(pixels, torch.Tensor) or not (
        pixels.is_floating_point() or (accepts_uint8 and pixels.dtype == torch.uint8)
    ):
        wanted = "uint8 or floating-point" if accepts_uint8 else "floating-point"
        got = pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        return f"pixel_values must be a {wanted} tensor, not {got}"
    widths = [facts.image_patch_dim]
    if pixels.dtype == torch.uint8 and facts.image_frame_dim:
        widths.append(facts.image_frame_dim)  # a still image's one frame
    if pixels.ndim != 2 or pixels.shape[0] != patches or pixels.shape[1] not in widths:
        expected = " or ".join(f"({patches}, {w})" for w in widths)
        return (
            f"pixel_values of shape {tuple(pixels.shape)} disagree with grid "
            f"{item.grid_thw}: expected {expected}"
        )
    return None
