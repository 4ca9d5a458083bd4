"""Per-request model state of the decoder runner: M-RoPE positions and image embeddings.

Taken at ``admit`` and kept until ``release``. An image's embeddings come from the
encoder cache (pinned for the request until it is released) or from the step that encodes it
(``image_step``), always before a chunk touches its placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.batch import Chunk, images_by_offset
from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.positions import mrope_positions, text_positions
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
    """What the runner remembers about one admitted request. Its pixels stay as they came (the
    IO thread pins what its budget allows; the rest is pinned when encoded): requests are
    admitted as they arrive, and pinning each here put every waiting photo's copy on the
    busy loop."""

    def __init__(
        self,
        request: EngineRequest,
        cache: EncoderCache,
        merge: int,
        is_mrope: bool,
    ) -> None:
        self.request_id = request.request_id
        self.prompt_len = int(request.prompt_token_ids.size)
        self.images = []
        for item in images_by_offset(request):
            embeds = cache.acquire(item.content_hash, request.request_id)
            pixels = item.pixel_values
            self.images.append(
                ImageState(
                    item.content_hash,
                    item.offset,
                    item.length,
                    tuple(item.grid_thw),
                    None if embeds is not None else pixels,
                    embeds,
                )
            )
        self.positions: np.ndarray | None = None
        self.rope_delta = 0
        if is_mrope:
            spans = [(im.offset, im.length, im.grid_thw) for im in self.images]
            self.positions, self.rope_delta = mrope_positions(self.prompt_len, spans, merge)

    def chunk_positions(self, start: int, n: int) -> np.ndarray:
        """(3, n) positions of tokens ``start .. start + n`` (prompt or generated)."""
        if self.positions is None:
            return text_positions(start, n)
        split = min(max(start, self.prompt_len), start + n)
        if split == start:  # all generated: a decode
            return text_positions(start, n, self.rope_delta)
        if split == start + n:
            return self.positions[:, start:split]
        tail = text_positions(split, start + n - split, self.rope_delta)
        return np.concatenate([self.positions[:, start:split], tail], axis=1)

    def touched(self, start: int, n: int) -> list[int]:
        """Indices of the images whose placeholders overlap tokens ``start .. start + n``."""
        return [
            i
            for i, im in enumerate(self.images)
            if im.offset < start + n and start < im.offset + im.length
        ]

    def problem(self, chunk: Chunk) -> str | None:
        """Why ``chunk`` of this request cannot run this step, if it cannot."""
        n = int(chunk.token_ids.size)
        for i in self.touched(chunk.start, n):
            if self.images[i].embeds is None:
                return f"image {self.images[i].content_hash!r} was not encoded"
        pooling = chunk.request.pooling
        is_mean = chunk.wants_pooled and pooling is not None and pooling.pooling == "mean"
        if is_mean and (chunk.start != 0 or n != self.prompt_len):
            return "mean pooling needs the whole prompt in one chunk"
        return None

    def place_images(self, embeds: torch.Tensor, start: int, n: int) -> None:
        """Overwrite the rows of ``embeds`` ((n, hidden), tokens ``start .. start + n``) that are
        image placeholders with the image embeddings (encoded before the step's forward)."""
        for i in self.touched(start, n):
            im = self.images[i]
            if im.embeds is None:
                raise RuntimeError(f"image {im.content_hash!r} of {self.request_id} is not encoded")
            lo, hi = max(im.offset, start), min(im.offset + im.length, start + n)
            embeds[lo - start : hi - start] = im.embeds[lo - im.offset : hi - im.offset]

    def release(self, cache: EncoderCache) -> None:
        for im in self.images:
            cache.release(im.content_hash, self.request_id)
