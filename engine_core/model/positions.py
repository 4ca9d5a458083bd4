"""M-RoPE positions of a prompt (Qwen2-VL), as transformers' ``get_rope_index`` builds them.

Text runs get ``arange(n) + cur`` in all three rows. An image with grid (t, h, w) gets
T = ``arange(t) + cur``, H = ``arange(h / merge) + cur``, W = ``arange(w / merge) + cur`` as a
meshgrid flattened in (t, h, w) order; then ``cur += max(h, w) / merge`` (still images get no
temporal scaling). After the prompt, all three rows are ``index + rope_delta`` with
``rope_delta = max position + 1 - prompt_len``.
"""

from __future__ import annotations

import torch


def mrope_positions(
    prompt_len: int, images: list[tuple[int, int, tuple[int, int, int]]], merge: int
) -> tuple[torch.Tensor, int]:
    """images: ``(offset, length, (t, h, w))`` sorted by offset, non-overlapping.
    Returns (positions (3, prompt_len) int64, rope_delta)."""
    pieces: list[torch.Tensor] = []
    cur = 0
    done = 0
    for offset, length, (t, h, w) in images:
        if offset > done:
            pieces.append(torch.arange(offset - done).expand(3, -1) + cur)
            cur += offset - done
        gt, gh, gw = torch.meshgrid(
            torch.arange(t), torch.arange(h // merge), torch.arange(w // merge), indexing="ij"
        )
        pieces.append(torch.stack([gt, gh, gw]).reshape(3, -1) + cur)
        cur += max(h, w) // merge
        done = offset + length
    if prompt_len > done:
        pieces.append(torch.arange(prompt_len - done).expand(3, -1) + cur)
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64)
    max_pos = int(positions.max()) if prompt_len else -1
    return positions, max_pos + 1 - prompt_len


def text_positions(start: int, n: int, delta: int = 0) -> torch.Tensor:
    """(3, n) positions ``start + delta .. start + delta + n`` in all three rows."""
    return (torch.arange(start, start + n) + delta).expand(3, -1)
