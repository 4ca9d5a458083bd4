"""The vision tower: HF's own module (Qwen2-VL or Qwen2.5-VL), weights from our checkpoint."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from engine_core.model.errors import ModelLoadError
from engine_core.model.loader import CheckpointTensor, copy_into
from engine_core.model.pixels import PixelInput


def _tower_class(model_type: str) -> type[nn.Module]:
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    return Qwen2VisionTransformerPretrainedModel


class VisionEncoder:
    """pixel patches + grid -> image embeddings at the decoder's hidden size."""

    def __init__(
        self,
        model_type: str,
        config: PretrainedConfig,
        dtype: torch.dtype,
        device: torch.device,
        pixel_input: PixelInput,
    ) -> None:
        with device:
            self.tower = _tower_class(model_type)._from_config(config, dtype=dtype)
        self.tower.eval()
        self.dtype = dtype
        self.device = device
        self.pixel_input = pixel_input
        self.merge_size: int = config.spatial_merge_size
        self.patch_dim: int = (
            config.in_channels * config.temporal_patch_size * config.patch_size * config.patch_size
        )

    def load_weights(self, tensors: list[CheckpointTensor], source: str) -> None:
        """Copy ``visual.*`` tensors in; raise ModelLoadError for a missing or misshapen one."""
        params = dict(self.tower.named_parameters())
        loaded: set[str] = set()
        for item in tensors:
            local = item.key.removeprefix("visual.")
            if local in params:
                copy_into(params[local], item)
                loaded.add(local)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ModelLoadError(
                f"checkpoint {source} lacks vision tensor visual.{missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """pixel_values (t*h*w, C*T*P*P) of one image -> (t*h*w / merge^2, hidden)."""
        grid = torch.tensor([grid_thw], dtype=torch.int64, device=self.device)
        pixels = self.pixel_input.to_tower(pixel_values)
        out = self.tower(pixels, grid_thw=grid)
        # transformers >= 5.2x returns a ModelOutput (merged states in pooler_output); older
        # 5.x releases return the merged tensor itself.
        return out if isinstance(out, torch.Tensor) else out.pooler_output
