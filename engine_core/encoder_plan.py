"""Encoder work of one step: which images the vision tower encodes, within a budget of patches.

A chunk may run only once every image it touches is encoded, in an earlier step or in this one
(the runner encodes a step's images in one batched call before the decoder runs). ``fit``
shortens a chunk to end before the first image this step's budget cannot take; ``encode_ahead``
spends what is left on the next images of prefilling and waiting sequences, so that their
chunks find them ready and more images share one call. An image larger than the whole budget
could never be encoded: ``Scheduler.add`` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from engine_core.batch import ImageRef
from engine_core.sequence import Sequence, SequenceStatus
from ipc.messages import EngineRequest


def encoder_budget_error(request: EngineRequest, budget: int) -> str | None:
    """The 400 message for a request with an image of more than ``budget`` patches."""
    for item in request.mm_items:
        patches = math.prod(item.grid_thw)
        if patches > budget:
            return (
                f"image {item.content_hash!r} has {patches} patches (grid "
                f"{tuple(item.grid_thw)}); the engine encodes at most {budget} per step "
                "(--max-num-encoder-patches): send a smaller image"
            )
    return None


class EncoderPlan:
    """The images one step encodes. ``budget`` is in patches; ``ahead_tokens`` bounds the image
    tokens encoded ahead for waiting sequences (beyond the first), whose encoder-cache entries
    stay pinned until they run."""

    def __init__(self, budget: int, ahead_tokens: int) -> None:
        self.left = budget
        self.refs: list[ImageRef] = []
        self._ahead_left = ahead_tokens

    def fit(self, seq: Sequence, start: int, n: int) -> int:
        """How many of the ``n`` tokens from ``start`` can run: every image they touch is
        encoded or now planned; the chunk stops before an image that does not fit."""
        while seq.num_encoded_images < len(seq.image_spans):
            offset, _, patches = seq.image_spans[seq.num_encoded_images]
            if offset >= start + n:
                break
            if patches > self.left:
                return offset - start  # images before ``start`` are always encoded
            self._take(seq, patches)
        return n

    def encode_ahead(self, seqs: Iterable[Sequence]) -> None:
        """Plan the next images of ``seqs`` (in order) while the budget lasts."""
        first_waiting = True
        for seq in seqs:
            is_waiting = seq.status is SequenceStatus.WAITING
            while seq.num_encoded_images < len(seq.image_spans):
                _, length, patches = seq.image_spans[seq.num_encoded_images]
                if patches > self.left:
                    return
                if is_waiting and not first_waiting:
                    if length > self._ahead_left:
                        return
                    self._ahead_left -= length
                self._take(seq, patches)
            if is_waiting:
                first_waiting = False

    def _take(self, seq: Sequence, patches: int) -> None:
        self.refs.append(ImageRef(seq.request, seq.num_encoded_images))
        seq.num_encoded_images += 1
        self.left -= patches
