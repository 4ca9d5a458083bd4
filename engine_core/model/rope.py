"""Rotary position embeddings: 1-D RoPE (Qwen2, Llama) and Qwen2-VL's M-RoPE.

Positions are always ``(3, T)`` (temporal, height, width). For a text-only model the three rows
are equal and only row 0 is read; for M-RoPE each frequency band takes its row from
``mrope_section``. Numerics follow HF: angles in fp32, cos/sin cast to the model dtype before
they are applied, the rotation itself in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine_core.model.errors import ModelLoadError

# Rope types whose frequencies do not depend on the current sequence length.
_STATIC_ROPE_TYPES = ("linear", "llama3", "yarn")


def _inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", "mrope"):
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type {rope_type!r} (supported: default, "
            f"{', '.join(_STATIC_ROPE_TYPES)})"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, and their application to q and k."""

    def __init__(
        self, config: PretrainedConfig, head_dim: int, mrope_section: tuple[int, ...] | None
    ) -> None:
        super().__init__()
        inv_freq, self.scaling = _inv_freq(config, head_dim)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.mrope_section = list(mrope_section) if mrope_section else None
        if self.mrope_section is not None and sum(self.mrope_section) != head_dim // 2:
            raise ModelLoadError(
                f"mrope_section {self.mrope_section} does not sum to head_dim/2 = {head_dim // 2}"
            )

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, T) int64 -> cos, sin, each (T, 1, head_dim) in ``dtype``."""
        if self.mrope_section is None:
            freqs = positions[0, :, None].float() * self.inv_freq  # (T, D/2)
        else:
            all_freqs = positions[:, :, None].float() * self.inv_freq  # (3, T, D/2)
            bands = all_freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim) rotated by cos/sin (T, 1, head_dim)."""
    return x * cos + _rotate_half(x) * sin
