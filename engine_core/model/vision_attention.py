"""Attention of the vision tower: full (non-causal) attention inside each segment of a flat
batch of patches, a segment being one frame of one image or one window.

CUDA in bf16/fp16, chosen once per encoder (``tower_attention``), each choice checked against
SDPA on a small batch first:
- segments that come in few runs of equal length (full attention over a step's images, most
  of one size), in shapes that recur (``TowerAttention``: cuDNN builds a graph per shape):
  SDPA's cuDNN backend, one call per run, the run's segments batched as
  (segments, heads, patches, head_dim). On the H200 at a 1024x768 photo's 3,996 patches and
  head_dim 80 it ran at 340 TFLOP/s against FlashAttention-2's 240, which pads head_dim 80
  to 96 (``bench/engine_profile.py``);
- otherwise (Qwen2.5-VL's ~70 windows of an image, in many runs): one varlen FlashAttention
  call over ``cu_seqlens`` for the whole batch, through ``torch.nn.attention.varlen.varlen_attn``
  or, in torch releases without it, the private ``aten._flash_attention_forward``.
Elsewhere (CPU, float32): SDPA's default choice, one call per run of equal-length segments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine_core.model.host import to_device

logger = logging.getLogger(__name__)

Varlen = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]


#: Runs of equal-length segments up to which the batched (cuDNN) path is taken: each run is
#: one call, and a step's images are of a few sizes at most, windows of many.
MAX_BATCHED_RUNS = 4


@dataclass(frozen=True, slots=True)
class Segments:
    """Segment boundaries of one batch: ``lens`` and their ``runs`` ((length, count) of
    consecutive equal lengths) on the host; ``cu`` ((S+1,) int32 prefix sums on the device)
    when the varlen kernel runs; ``batched`` when the batched kernel does (decided once per
    tower call by ``TowerAttention.prepare``, then read by every block)."""

    lens: list[int]
    cu: torch.Tensor | None
    max_len: int
    runs: tuple[tuple[int, int], ...]
    batched: bool = False

    @classmethod
    def of(cls, lens: list[int]) -> Segments:
        """Host-side segments (``TowerAttention.prepare`` adds what its kernel needs)."""
        runs: list[tuple[int, int]] = []
        for n in lens:
            if runs and runs[-1][0] == n:
                runs[-1] = (n, runs[-1][1] + 1)
            else:
                runs.append((n, 1))
        return cls(lens, None, max(lens, default=0), tuple(runs))


def _varlen_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)


def _flash_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, False, False, scale=scale
    )
    return out[0]


class TowerAttention:
    """q, k, v (N, H, D) -> (N, H, D), each segment attending only to itself, by the kernels
    chosen for this device (``tower_attention``): ``varlen`` in one call over ``cu_seqlens``,
    ``batched`` (an SDPA backend: cuDNN) once per run of equal-length segments; SDPA's
    default per run where neither is given.

    cuDNN builds an execution graph for each shape it first sees, 45-73 ms on the H200's host
    for a 1024x768 photo's 3,996 patches (``bench/engine_profile.py``), in a cache of the
    calling thread that torch never trims. Images come in any size, so a tower call takes the
    batched path only once each of its run shapes has come in ``warm_after`` earlier calls
    (through ``varlen`` until then: a shape must recur to repay its build, at ~3 ms saved per
    image), and at most ``max_shapes`` shapes are ever built."""

    def __init__(
        self,
        varlen: Varlen | None = None,
        batched: SDPBackend | None = None,
        device: torch.device | None = None,
        warm_after: int = 16,
        max_shapes: int = 64,
    ) -> None:
        self.varlen, self.batched, self.device = varlen, batched, device
        self.warm_after, self.max_shapes = warm_after, max_shapes
        self._seen: OrderedDict[tuple[int, int], int] = OrderedDict()  # (count, length) -> calls
        self._built: set[tuple[int, int]] = set()

    @property
    def built_shapes(self) -> int:
        return len(self._built)

    def prepare(self, lens: list[int]) -> Segments:
        """The segments of one tower call, with the path every block of it takes."""
        segments = Segments.of(lens)
        if self._takes_batched(segments):
            return dataclasses.replace(segments, batched=True)
        if self.varlen is None or not lens:
            return segments
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        return dataclasses.replace(segments, cu=to_device(cu, self.device or torch.device("cpu")))

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
    ) -> torch.Tensor:
        if segments.batched:
            return attend_runs(q, k, v, segments, scale, self.batched)
        if self.varlen is not None and segments.cu is not None:
            return self.varlen(q, k, v, segments.cu, segments.max_len, scale)
        return attend_runs(q, k, v, segments, scale, None)

    def _takes_batched(self, segments: Segments) -> bool:
        if self.batched is None or len(segments.runs) > MAX_BATCHED_RUNS:
            return False
        if self.varlen is None or all(run in self._built for run in segments.runs):
            return True
        for run in segments.runs:
            calls = self._seen.pop(run, 0) + 1
            self._seen[run] = calls  # most recent last: the oldest are forgotten first
            if calls >= self.warm_after and len(self._built) < self.max_shapes:
                self._built.add(run)
                logger.info(
                    "vision attention: %s for %d x %d patches from the next call on",
                    self.batched.name,
                    *run,
                )
        while len(self._seen) > 16 * self.max_shapes:
            self._seen.popitem(last=False)
        return False

    def describe(self) -> str:
        parts = []
        if self.batched is not None:
            parts.append(
                f"{self.batched.name} for <= {MAX_BATCHED_RUNS} runs of shapes seen "
                f"{self.warm_after} times (at most {self.max_shapes})"
            )
        parts.append(self.varlen.__name__.strip("_") if self.varlen else "SDPA per run")
        return ", else ".join(parts)


def tower_attention(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int
) -> TowerAttention:
    """The kernels for this device, dtype and head shape: on CUDA in bf16/fp16 the first varlen
    entry point of this torch and the cuDNN backend, each only if it runs and agrees with SDPA
    on a small batch; SDPA per run of equal-length segments elsewhere or where neither does."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return TowerAttention()
    candidates: list[Varlen] = []
    try:
        from torch.nn.attention import varlen  # noqa: F401 (torch >= 2.10)

        candidates.append(_varlen_attn)
    except ImportError:
        pass
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        candidates.append(_flash_op)
    chosen: Varlen | None = None
    for kernel in candidates:
        problem = _problem(
            TowerAttention(varlen=kernel, device=device), device, dtype, num_heads, head_dim
        )
        if problem is None:
            chosen = kernel
            break
        logger.warning("vision attention: %s unusable (%s)", kernel.__name__, problem)
    batched: SDPBackend | None = SDPBackend.CUDNN_ATTENTION
    problem = _problem(
        TowerAttention(batched=batched, device=device), device, dtype, num_heads, head_dim
    )
    if problem is not None:
        logger.warning("vision attention: SDPA's cuDNN backend unusable (%s)", problem)
        batched = None
    return TowerAttention(varlen=chosen, batched=batched, device=device)


def _problem(
    attention: TowerAttention,
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    head_dim: int,
) -> str | None:
    """Why ``attention`` cannot serve (an error, or a result off SDPA's), or None. Three
    segments of three lengths, then a run of two equal ones: the varlen and the batched form."""
    gen = torch.Generator(device=device).manual_seed(0)
    for lens in ([37, 64, 5], [64, 64]):
        q, k, v = (
            torch.randn(sum(lens), num_heads, head_dim, device=device, generator=gen).to(dtype)
            for _ in range(3)
        )
        segments = attention.prepare(lens)
        scale = head_dim**-0.5
        try:
            got = attention(q, k, v, segments, scale)
        except RuntimeError as exc:
            return repr(exc)
        want = attend_runs(q, k, v, segments, scale, SDPBackend.MATH)
        error = float((got.float() - want.float()).norm() / want.float().norm())
        if not error < 2e-2:
            return f"relative error {error:.3g} against SDPA"
    return None


def attend_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Segments,
    scale: float,
    backend: SDPBackend | None,
) -> torch.Tensor:
    """SDPA once per run of equal-length segments (through ``backend``, or SDPA's own choice)."""
    outs = []
    start = 0
    for n, count in segments.runs:
        stop = start + count * n
        # (count, n, H, D) -> (count, H, n, D), the layout SDPA batches over
        qs, ks, vs = (x[start:stop].view(count, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        # cuDNN writes its output in q's layout, so this is a view there: a step's images of
        # one size (one run) then cost no copy (41 MB a layer for 4 photos)
        outs.append(o.transpose(1, 2).reshape(stop - start, *q.shape[1:]))
        start = stop
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs) if outs else torch.empty_like(q)
