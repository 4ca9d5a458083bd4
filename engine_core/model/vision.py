"""The vision encoder: images (pixel patches + grid) -> embeddings at the decoder's width, every
image of a call in one batched pass of our tower (``vision_tower``).

Per grid shape it computes the layout (``vision_grid``) and the rotary cos/sin once and keeps
them in a small LRU; a batch concatenates its images' tables and attention segments, so the
tower itself never looks at an image boundary except through ``cu_seqlens``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PretrainedConfig

from engine_core.model.errors import ModelLoadError
from engine_core.model.host import to_device
from engine_core.model.kernels import Kernels
from engine_core.model.loader import CheckpointTensor, copy_into
from engine_core.model.pixels import PixelInput
from engine_core.model.vision_attention import tower_attention
from engine_core.model.vision_grid import GridLayout, grid_layout
from engine_core.model.vision_tower import Tower, checkpoint_targets, tower_spec

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]
#: Bytes of per-grid tables (layout and fp32 cos/sin on the device) kept between calls.
GRID_CACHE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class _GridTables:
    layout: GridLayout
    cos: torch.Tensor  # (N, 1, head_dim) fp32, tower order
    sin: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes + 2 * self.cos.numel() * 4


class VisionEncoder:
    """pixel patches + grid of each image -> its (t*h*w / merge^2, hidden) embeddings."""

    def __init__(
        self,
        model_type: str,
        config: PretrainedConfig,
        dtype: torch.dtype,
        device: torch.device,
        kernels: Kernels,
        pixel_input: PixelInput,
    ) -> None:
        self.spec = tower_spec(model_type, config)
        self.dtype, self.device = dtype, device
        self.pixel_input = pixel_input
        self.merge_size = self.spec.merge
        self.patch_dim = self.spec.patch_dim
        self.attention = tower_attention(device, dtype, self.spec.num_heads, self.spec.head_dim)
        logger.info("vision attention: %s", self.attention.describe())
        with torch.device("meta"):
            tower = Tower(self.spec, kernels, self.attention)
        self.tower = tower.to_empty(device=device).to(dtype).eval()
        half = self.spec.head_dim // 2
        exponents = torch.arange(0, half, 2, dtype=torch.float32) / half
        self._inv_freq = (1.0 / (self.spec.rope_theta**exponents)).to(device)
        self._grids: OrderedDict[Grid, _GridTables] = OrderedDict()
        self._grid_bytes = 0

    @property
    def uses_flash(self) -> bool:
        return self.attention.varlen is not None

    def load_weights(self, tensors: list[CheckpointTensor], source: str) -> None:
        """Copy ``visual.*`` tensors in; raise ModelLoadError for a missing or misshapen one."""
        params = dict(self.tower.named_parameters())
        targets = checkpoint_targets(self.spec)
        loaded: set[str] = set()
        for item in tensors:
            local = item.key.removeprefix("visual.")
            target, rows = targets.get(local, (local, None))
            if target not in params:
                continue
            if target == "patch_embed.weight":
                # Conv3d (E, C, T, P, P) with kernel == stride is a linear over the patch.
                item = CheckpointTensor(
                    item.file, item.name, item.key, item.tensor.reshape(item.tensor.shape[0], -1)
                )
            copy_into(params[target], item, rows)
            loaded.add(local)
        renamed = {target for target, _ in targets.values()}
        wanted = {name for name in params if name not in renamed} | set(targets)
        missing = sorted(wanted - loaded)
        if missing:
            raise ModelLoadError(
                f"checkpoint {source} lacks vision tensor visual.{missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def device_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The one place where pixels from the wire become the tower's input on its device
        (uint8 ones rescaled and normalized there: ``engine_core.model.pixels``)."""
        return self.pixel_input.to_tower(pixel_values)

    @torch.no_grad()
    def encode(self, images: list[tuple[torch.Tensor, Grid]]) -> list[torch.Tensor]:
        """``images``: (pixel_values (t*h*w, patch_dim), grid) each. One pass of the tower for
        all of them; returns each image's embeddings (its own tensor, not a view)."""
        if not images:
            return []
        tables = [self._tables(grid) for _, grid in images]
        layouts = [t.layout for t in tables]
        pixels = torch.cat([self.device_pixels(p) for p, _ in images])
        order, unorder = self._orders(layouts)
        if order is not None:
            pixels = pixels[order]
        cos = torch.cat([t.cos for t in tables])
        sin = torch.cat([t.sin for t in tables])
        full = self.attention.prepare([n for lay in layouts for n in lay.frame_lens])
        windows = None
        if self.spec.window:
            windows = self.attention.prepare([n for lay in layouts for n in lay.window_lens])
        merged = self.tower(pixels, cos, sin, full, windows)
        if unorder is not None:
            merged = merged[unorder]
        units = [lay.num_patches // (self.merge_size**2) for lay in layouts]
        return [part.clone() for part in merged.split(units)]

    def _orders(self, layouts: list[GridLayout]) -> tuple[torch.Tensor | None, ...]:
        """The batch's patch permutation and unit un-permutation (None without windows)."""
        if not self.spec.window:
            return None, None
        orders, unorders = [], []
        patches = units = 0
        for lay in layouts:
            assert lay.order is not None and lay.unorder is not None
            orders.append(lay.order + patches)
            unorders.append(lay.unorder + units)
            patches += lay.num_patches
            units += lay.num_patches // (self.merge_size**2)
        return (
            to_device(np.concatenate(orders), self.device),
            to_device(np.concatenate(unorders), self.device),
        )

    def _tables(self, grid: Grid) -> _GridTables:
        tables = self._grids.get(grid)
        if tables is not None:
            self._grids.move_to_end(grid)
            return tables
        layout = grid_layout(grid, self.merge_size, self.spec.window)
        positions = to_device(layout.positions, self.device)
        # HF's angles: position (fp32) times inverse frequency, rows then columns, twice.
        angles = positions[:, :, None].float() * self._inv_freq  # (N, 2, head_dim / 4)
        angles = angles.flatten(1)
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        tables = _GridTables(layout, angles.cos(), angles.sin())
        self._grids[grid] = tables
        self._grid_bytes += tables.nbytes
        while self._grid_bytes > GRID_CACHE_BYTES and len(self._grids) > 1:
            _, old = self._grids.popitem(last=False)
            self._grid_bytes -= old.nbytes
        return tables
