"""Where each patch of an image sits for the vision tower: rotary positions and attention
segments, computed once per grid shape.

Patches arrive in the image processor's order: frame by frame, and inside a frame block-major
over ``merge x merge`` blocks, each block one merged output token ("unit"), blocks row-major.
A patch's rotary position is its (row, column) in the patch grid. Qwen2-VL attends over each
frame as a whole. Qwen2.5-VL also groups units into windows of ``window x window`` units
(clipped at the right and bottom edges; windows row-major, units row-major inside each): its
windowed layers attend within a window, its full layers within the frame. For windows the
tower runs in window order: patch rows are permuted on the way in and the merged units
permuted back on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class GridLayout:
    """One grid's layout in tower order (the processor's order when there are no windows)."""

    num_patches: int
    #: (num_patches, 2) int64: (row, column) of each patch, the rotary positions
    positions: np.ndarray
    #: patches per full-attention segment (one per frame)
    frame_lens: list[int]
    #: patches per window, in tower order; empty when the model has no windowed layers
    window_lens: list[int]
    #: (num_patches,) int64: tower row i is processor patch ``order[i]``; None for identity
    order: np.ndarray | None
    #: (num_units,) int64: processor unit j is tower unit ``unorder[j]``; None for identity
    unorder: np.ndarray | None

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.order, self.unorder) if a is not None)
        return self.positions.nbytes + extra


def _unit_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(h * w, 2) patch positions of one frame in the processor's block-major order."""
    rows = np.arange(h).reshape(h // merge, 1, merge, 1)
    cols = np.arange(w).reshape(1, w // merge, 1, merge)
    shape = (h // merge, w // merge, merge, merge)
    return np.stack(
        [np.broadcast_to(rows, shape).reshape(-1), np.broadcast_to(cols, shape).reshape(-1)],
        axis=1,
    )


def _windows(units_h: int, units_w: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Unit indices of one frame in window order, and the number of units per window."""
    index = np.arange(units_h * units_w).reshape(units_h, units_w)
    order: list[np.ndarray] = []
    sizes: list[int] = []
    for top in range(0, units_h, window):
        for left in range(0, units_w, window):
            block = index[top : top + window, left : left + window].reshape(-1)
            order.append(block)
            sizes.append(block.size)
    return np.concatenate(order), sizes


def grid_layout(grid: tuple[int, int, int], merge: int, window: int) -> GridLayout:
    """Layout of a ``(t, h, w)`` patch grid; ``window`` in merged units (0: no windows)."""
    t, h, w = grid
    frame = _unit_positions(h, w, merge)
    positions = np.tile(frame, (t, 1)).astype(np.int64)
    frame_patches = h * w
    if window <= 0:
        return GridLayout(t * frame_patches, positions, [frame_patches] * t, [], None, None)
    unit = merge * merge
    units_per_frame = frame_patches // unit
    frame_units, sizes = _windows(h // merge, w // merge, window)
    unit_order = np.concatenate([frame_units + f * units_per_frame for f in range(t)])
    order = (unit_order[:, None] * unit + np.arange(unit)).reshape(-1)
    return GridLayout(
        num_patches=t * frame_patches,
        positions=positions[order],
        frame_lens=[frame_patches] * t,
        window_lens=[s * unit for s in sizes] * t,
        order=order,
        unorder=np.argsort(unit_order),
    )
