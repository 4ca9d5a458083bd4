"""Per-request model state of the decoder runner: M-RoPE positions and image embeddings.

Taken at ``check_request`` and kept until ``release``. An image's embeddings are computed the
first time a chunk touches its placeholders (the whole image at once, then sliced per chunk)
and pinned in the encoder cache until the request is released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.positions import mrope_positions, text_positions
from engine_core.model.vision import VisionEncoder
from ipc.messages import EngineRequest


@dataclass(slots=True)
class ImageState:
    content_hash: str
    offset: int
    length: int
    grid_thw: tuple[int, int, int]
    pixels: torch.Tensor | None  # dropped once encoded
    embeds: torch.Tensor | None  # (length, hidden), pinned in the encoder cache


class RequestState:
    """What the runner remembers about one admitted request."""

    def __init__(
        self, request: EngineRequest, cache: EncoderCache, merge: int, is_mrope: bool
    ) -> None:
        self.request_id = request.request_id
        self.prompt_len = int(request.prompt_token_ids.size)
        self.images = [
            ImageState(
                item.content_hash,
                item.offset,
                item.length,
                tuple(item.grid_thw),
                item.pixel_values,
                cache.acquire(item.content_hash, request.request_id),
            )
            for item in sorted(request.mm_items, key=lambda item: item.offset)
        ]
        self.positions: torch.Tensor | None = None
        self.rope_delta = 0
        if is_mrope:
            spans = [(im.offset, im.length, im.grid_thw) for im in self.images]
            self.positions, self.rope_delta = mrope_positions(self.prompt_len, spans, merge)

    def chunk_positions(self, start: int, n: int) -> torch.Tensor:
        """(3, n) positions of tokens ``start .. start + n`` (prompt or generated)."""
        if self.positions is None:
            return text_positions(start, n)
        split = min(max(start, self.prompt_len), start + n)
        parts = [self.positions[:, start:split]]
        if split < start + n:
            parts.append(text_positions(split, start + n - split, self.rope_delta))
        return torch.cat(parts, dim=1)

    def place_images(
        self,
        embeds: torch.Tensor,
        start: int,
        n: int,
        vision: VisionEncoder | None,
        cache: EncoderCache,
    ) -> None:
        """Overwrite the rows of ``embeds`` ((n, hidden), tokens ``start .. start + n``) that are
        image placeholders with the image embeddings, encoding an image on first touch."""
        for im in self.images:
            lo, hi = max(im.offset, start), min(im.offset + im.length, start + n)
            if lo >= hi:
                continue
            if im.embeds is None:
                im.embeds = cache.acquire(im.content_hash, self.request_id)
            if im.embeds is None:
                if im.pixels is None or vision is None:
                    raise RuntimeError(f"image {im.content_hash!r} of {self.request_id} is gone")
                im.embeds = vision.encode(im.pixels, im.grid_thw)
                cache.put(im.content_hash, im.embeds, self.request_id)
            im.pixels = None
            embeds[lo - start : hi - start] = im.embeds[lo - im.offset : hi - im.offset]

    def release(self, cache: EncoderCache) -> None:
        for im in self.images:
            cache.release(im.content_hash, self.request_id)
