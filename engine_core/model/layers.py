"""Building blocks of the decoder: RMSNorm and the SwiGLU MLP (with packed gate/up). Their math
is ``engine_core.model.kernels`` (eager or compiled, chosen once by the runner)."""

from __future__ import annotations

import torch
from torch import nn

from engine_core.model.kernels import Kernels


class RMSNorm(nn.Module):
    """HF numerics: normalise in fp32, cast back, then scale by the weight in the model dtype."""

    def __init__(self, size: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + x), residual + x)``: the residual add fused into the norm."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up packed in one GEMM (checkpoint shards 0 and 1)."""

    def __init__(self, hidden: int, intermediate: int, kernels: Kernels) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_mul(self.gate_up_proj(x)))
