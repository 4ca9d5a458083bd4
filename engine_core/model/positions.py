"""M-RoPE positions of a prompt (Qwen2-VL), as transformers' ``get_rope_index`` builds them.

Text runs get ``arange(n) + cur`` in all three rows. An image with grid (t, h, w) gets
T = ``arange(t) + cur``, H = ``arange(h / merge) + cur``, W = ``arange(w / merge) + cur`` as a
meshgrid flattened in (t, h, w) order; then ``cur += max(h, w) / merge`` (still images get no
temporal scaling). After the prompt, all three rows are ``index + rope_delta`` with
``rope_delta = max position + 1 - prompt_len``.
"""

from __future__ import annotations

import numpy as np

# numpy, not torch: a step builds the positions of every chunk (one per running decode), and
# a torch op on a few CPU ints costs microseconds of dispatch that numpy does not.


def mrope_positions(
    prompt_len: int, images: list[tuple[int, int, tuple[int, int, int]]], merge: int
) -> tuple[np.ndarray, int]:
    """images: ``(offset, length, (t, h, w))`` sorted by offset, non-overlapping.
    Returns (positions (3, prompt_len) int64, rope_delta)."""
    pieces: list[np.ndarray] = []
    cur = 0
    done = 0
    for offset, length, (t, h, w) in images:
        if offset > done:
            pieces.append(text_positions(0, offset - done, cur))
            cur += offset - done
        # (3, t * h' * w'): the t, h and w index of each patch in (t, h, w) order.
        pieces.append(np.indices((t, h // merge, w // merge), dtype=np.int64).reshape(3, -1) + cur)
        cur += max(h, w) // merge
        done = offset + length
    if prompt_len > done:
        pieces.append(text_positions(0, prompt_len - done, cur))
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    max_pos = int(positions.max()) if prompt_len else -1
    return positions, max_pos + 1 - prompt_len


def text_positions(start: int, n: int, delta: int = 0) -> np.ndarray:
    """(3, n) positions ``start + delta .. start + delta + n`` in all three rows (read-only)."""
    return np.broadcast_to(np.arange(start + delta, start + delta + n, dtype=np.int64), (3, n))
