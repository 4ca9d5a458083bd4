"""Our Qwen2-VL / Qwen2.5-VL vision tower (plain torch over a flat batch of patches).

Qwen2-VL: patch embedding (a Conv3d whose kernel equals its stride, i.e. a linear map of the
flattened patch), blocks of LayerNorm -> fused-qkv attention with 2-D rotary positions ->
LayerNorm -> MLP (quick_gelu), then the patch merger (LayerNorm, then an MLP over each
``merge x merge`` block of patches concatenated). Qwen2.5-VL: RMSNorm, a SwiGLU MLP with bias,
and windowed attention except in ``fullatt_block_indexes``. Module and parameter names follow
the checkpoint's ``visual.*`` names, except the patch embedding (a Linear here) and the packed
gate/up GEMM of Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from engine_core.model.errors import ModelLoadError
from engine_core.model.kernels import Kernels
from engine_core.model.vision_attention import Segments, TowerAttention

NORM_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class TowerSpec:
    """Shapes and options of one tower, read from the checkpoint's vision config."""

    is_qwen2_5: bool
    patch_dim: int  # in_channels * temporal_patch_size * patch_size**2
    embed_dim: int
    num_heads: int
    depth: int
    mlp_dim: int
    hidden_act: str
    out_dim: int
    merge: int
    rope_theta: float
    window: int  # Qwen2.5-VL window side in merged units; 0 = no windowed layers
    full_blocks: frozenset[int]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def tower_spec(model_type: str, config: PretrainedConfig) -> TowerSpec:
    """The tower's spec; raises ModelLoadError for a config this tower cannot run."""
    is_2_5 = model_type == "qwen2_5_vl"
    patch = config.patch_size
    merge = config.spatial_merge_size
    embed = config.hidden_size if is_2_5 else config.embed_dim
    rope = getattr(config, "rope_parameters", None) or {}
    spec = TowerSpec(
        is_qwen2_5=is_2_5,
        patch_dim=config.in_channels * config.temporal_patch_size * patch * patch,
        embed_dim=embed,
        num_heads=config.num_heads,
        depth=config.depth,
        mlp_dim=config.intermediate_size if is_2_5 else int(embed * config.mlp_ratio),
        hidden_act=config.hidden_act,
        out_dim=config.out_hidden_size if is_2_5 else config.hidden_size,
        merge=merge,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        window=config.window_size // merge // patch if is_2_5 else 0,
        full_blocks=frozenset(config.fullatt_block_indexes)
        if is_2_5
        else frozenset(range(config.depth)),
    )
    if spec.embed_dim % spec.num_heads or spec.head_dim % 4:
        raise ModelLoadError(
            f"vision tower: embed dim {spec.embed_dim} over {spec.num_heads} heads does not "
            "give a head dim divisible by 4 (2-D rotary needs it)"
        )
    if spec.hidden_act not in ("quick_gelu", "silu"):
        raise ModelLoadError(f"vision tower: unsupported activation {spec.hidden_act!r}")
    return spec


class Norm(nn.Module):
    """LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6 as in the checkpoints."""

    def __init__(self, dim: int, is_rms: bool, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if is_rms else nn.Parameter(torch.zeros(dim))
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.kernels.rms_norm(x, self.weight, NORM_EPS)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, NORM_EPS)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + x), residual + x)``: the residual add fused into the norm."""
        if self.bias is None:
            return self.kernels.add_rms_norm(x, residual, self.weight, NORM_EPS)
        return self.kernels.add_layer_norm(x, residual, self.weight, self.bias, NORM_EPS)


class Attention(nn.Module):
    def __init__(self, spec: TowerSpec, kernels: Kernels, attention: TowerAttention) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = nn.Linear(spec.embed_dim, 3 * spec.embed_dim, bias=True)
        self.proj = nn.Linear(spec.embed_dim, spec.embed_dim, bias=True)
        self.kernels, self.attention = kernels, attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        q, k, v = self.kernels.qkv_rotary_fp32(qkv, cos, sin)
        out = self.attention(q, k, v, segments, self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class Mlp(nn.Module):
    """fc2(quick_gelu(fc1 x)) for Qwen2-VL; down(silu(gate x) * up x), gate/up packed, for
    Qwen2.5-VL."""

    def __init__(self, spec: TowerSpec, kernels: Kernels) -> None:
        super().__init__()
        self.is_gated = spec.is_qwen2_5
        if self.is_gated:
            self.gate_up_proj = nn.Linear(spec.embed_dim, 2 * spec.mlp_dim, bias=True)
            self.down_proj = nn.Linear(spec.mlp_dim, spec.embed_dim, bias=True)
        else:
            self.fc1 = nn.Linear(spec.embed_dim, spec.mlp_dim, bias=True)
            self.fc2 = nn.Linear(spec.mlp_dim, spec.embed_dim, bias=True)
        self.is_silu = spec.hidden_act == "silu"
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            if self.is_silu:
                return self.down_proj(self.kernels.silu_mul(self.gate_up_proj(x)))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.kernels.quick_gelu(gate) * up)
        h = self.fc1(x)
        return self.fc2(F.silu(h) if self.is_silu else self.kernels.quick_gelu(h))


class Block(nn.Module):
    def __init__(self, spec: TowerSpec, kernels: Kernels, attention: TowerAttention) -> None:
        super().__init__()
        self.norm1 = Norm(spec.embed_dim, spec.is_qwen2_5, kernels)
        self.norm2 = Norm(spec.embed_dim, spec.is_qwen2_5, kernels)
        self.attn = Attention(spec, kernels, attention)
        self.mlp = Mlp(spec, kernels)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: Segments,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it is added): the next norm adds
        them, so each residual add is fused into the norm after it."""
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1.add_forward(x, residual)
        h, residual = self.norm2.add_forward(self.attn(h, cos, sin, segments), residual)
        return self.mlp(h), residual


class Merger(nn.Module):
    """Norm each patch, concatenate each merge x merge block, MLP (GELU) to the decoder width."""

    def __init__(self, spec: TowerSpec, kernels: Kernels) -> None:
        super().__init__()
        self.ln_q = Norm(spec.embed_dim, spec.is_qwen2_5, kernels)
        self.width = spec.embed_dim * spec.merge * spec.merge
        self.fc1 = nn.Linear(self.width, self.width, bias=True)
        self.fc2 = nn.Linear(self.width, spec.out_dim, bias=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``x`` the last block's output, ``residual`` the stream it is added to."""
        h, _ = self.ln_q.add_forward(x, residual)
        return self.fc2(F.gelu(self.fc1(h.view(-1, self.width))))


class Tower(nn.Module):
    """patches (N, patch_dim), in tower order -> merged units (N / merge^2, out_dim)."""

    def __init__(self, spec: TowerSpec, kernels: Kernels, attention: TowerAttention) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = nn.Linear(spec.patch_dim, spec.embed_dim, bias=False)
        self.blocks = nn.ModuleList(Block(spec, kernels, attention) for _ in range(spec.depth))
        self.merger = Merger(spec, kernels)

    def forward(
        self,
        patches: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        full: Segments,
        windows: Segments | None,
    ) -> torch.Tensor:
        """cos/sin (N, 1, head_dim) fp32; ``windows`` for the windowed blocks (Qwen2.5-VL)."""
        x, residual = self.patch_embed(patches), None
        for i, block in enumerate(self.blocks):
            segments = full if i in self.spec.full_blocks or windows is None else windows
            x, residual = block(x, residual, cos, sin, segments)
        assert residual is not None, "a tower has at least one block"
        return self.merger(x, residual)


def checkpoint_targets(spec: TowerSpec) -> dict[str, tuple[str, slice | None]]:
    """Checkpoint name (after ``visual.``) -> (our parameter, rows of it) for names that
    differ; every other name is ours as it is."""
    targets: dict[str, tuple[str, slice | None]] = {
        "patch_embed.proj.weight": ("patch_embed.weight", None),
        "merger.mlp.0.weight": ("merger.fc1.weight", None),
        "merger.mlp.0.bias": ("merger.fc1.bias", None),
        "merger.mlp.2.weight": ("merger.fc2.weight", None),
        "merger.mlp.2.bias": ("merger.fc2.bias", None),
    }
    if spec.is_qwen2_5:
        gate, up = slice(0, spec.mlp_dim), slice(spec.mlp_dim, 2 * spec.mlp_dim)
        for i in range(spec.depth):
            for kind in ("weight", "bias"):
                packed = f"blocks.{i}.mlp.gate_up_proj.{kind}"
                targets[f"blocks.{i}.mlp.gate_proj.{kind}"] = (packed, gate)
                targets[f"blocks.{i}.mlp.up_proj.{kind}"] = (packed, up)
    return targets
