"""The device inputs of an eager decoder step, built from host arrays without waiting on the GPU.

A step's chunks become one flat batch: their token ids concatenated (a decode fed from the
device takes its id from ``last_tokens[slot]``, the id last sampled for that slot), their
positions (1-D or M-RoPE, (3, T)), and the rows whose hidden states the step returns.
"""

from __future__ import annotations

import numpy as np
import torch

from engine_core.batch import Chunk
from engine_core.model.host import to_device
from engine_core.model.request_state import RequestState


def token_ids(chunks: list[Chunk], last_tokens: torch.Tensor) -> torch.Tensor:
    """(T,) int64 ids of the flat batch, on ``last_tokens``' device."""
    device = last_tokens.device
    host = np.concatenate([c.token_ids for c in chunks]).astype(np.int64)
    ends = np.cumsum([c.token_ids.size for c in chunks])
    fed = [(int(end) - 1, c.slot) for c, end in zip(chunks, ends, strict=True) if c.feeds_sampled]
    if fed:
        host[[row for row, _ in fed]] = 0  # not an id yet: the device overwrites it
    ids = to_device(host, device)
    if fed:
        rows, slots = to_device(np.asarray(fed, dtype=np.int64).T.copy(), device)
        ids = ids.index_copy(0, rows, last_tokens[slots])
    return ids


def positions(
    chunks: list[Chunk], states: list[RequestState], device: torch.device
) -> torch.Tensor:
    """(3, T) int64 rotary positions of the flat batch."""
    parts = [
        state.chunk_positions(c.start, int(c.token_ids.size))
        for c, state in zip(chunks, states, strict=True)
    ]
    return to_device(np.concatenate(parts, axis=1), device)


def last_rows(chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """(n,) device index of the rows of the flat batch whose logits the step returns: each
    chunk's last token, for the chunks that want logits."""
    ends = np.cumsum([c.token_ids.size for c in chunks])
    rows = [int(end) - 1 for c, end in zip(chunks, ends, strict=True) if c.wants_logits]
    return to_device(np.asarray(rows, dtype=np.int64), device)
