"""The images of one step: encode all that are missing in one batched call of the vision tower,
and keep a failure inside one request's images that request's failure.

Images with the same content hash are encoded once; an encoder-cache hit is not encoded at all.
Outputs go into the encoder cache, pinned for every request that holds them. When the batched
call fails (a vision-tower error, CUDA out of memory on a huge image), the allocator's cache is
emptied and each image is encoded alone: those that fail again fail their requests (413 when an
image alone does not fit in memory, 500 otherwise), and every other image is kept.
"""

from __future__ import annotations

import logging

import torch

from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.request_state import ImageState, RequestState
from engine_core.model.vision import VisionEncoder
from ipc.messages import RequestError

logger = logging.getLogger(__name__)

Wanted = list[tuple[RequestState, int]]


def encode_images(
    vision: VisionEncoder | None,
    cache: EncoderCache,
    wanted: Wanted,
    failed: dict[str, RequestError],
) -> None:
    """Give every wanted image ``(state, index)`` its embeddings, or add its request to
    ``failed``."""
    holders: dict[str, list[tuple[RequestState, ImageState]]] = {}
    for state, index in wanted:
        im = state.images[index]
        if im.embeds is None:
            im.embeds = cache.acquire(im.content_hash, state.request_id)
        if im.embeds is None:
            holders.setdefault(im.content_hash, []).append((state, im))
    todo: list[tuple[str, torch.Tensor, tuple[int, int, int]]] = []
    for content_hash, group in holders.items():
        pixels = next((im.pixels for _, im in group if im.pixels is not None), None)
        if pixels is None or vision is None:
            _fail(group, failed, RequestError(500, f"image {content_hash!r} is gone"))
        else:
            todo.append((content_hash, pixels, group[0][1].grid_thw))
    for content_hash, embeds in _encode_isolated(vision, todo, holders, failed):
        for state, im in holders[content_hash]:
            cache.put(content_hash, embeds, state.request_id)
            im.embeds, im.pixels = embeds, None


def _encode_isolated(
    vision: VisionEncoder | None,
    todo: list[tuple[str, torch.Tensor, tuple[int, int, int]]],
    holders: dict[str, list[tuple[RequestState, ImageState]]],
    failed: dict[str, RequestError],
) -> list[tuple[str, torch.Tensor]]:
    if not todo or vision is None:
        return []
    try:
        outs = vision.encode([(pixels, grid) for _, pixels, grid in todo])
        return [(content_hash, out) for (content_hash, _, _), out in zip(todo, outs, strict=True)]
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        logger.warning("encoding %d image(s) failed (%r); retrying each alone", len(todo), exc)
    # Out of the except block: the failed call's frames (and activations) are freed by now.
    done = []
    for item in todo:
        _free_memory(vision.device)
        try:
            done.append((item[0], vision.encode([(item[1], item[2])])[0]))
        except RuntimeError as exc:
            _fail(holders[item[0]], failed, _error(item, exc))
    return done


def _error(item: tuple[str, torch.Tensor, tuple[int, int, int]], exc: RuntimeError) -> RequestError:
    content_hash, _, grid = item
    logger.error("encoding image %r (grid %s) failed: %r", content_hash, grid, exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return RequestError(
            413, f"image {content_hash!r} (grid {grid}) does not fit in the engine's free memory"
        )
    return RequestError(500, f"encoding image {content_hash!r} failed: {exc}")


def _fail(
    group: list[tuple[RequestState, ImageState]],
    failed: dict[str, RequestError],
    error: RequestError,
) -> None:
    for state, _ in group:
        failed.setdefault(state.request_id, error)


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
