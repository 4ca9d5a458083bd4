"""The elementwise pieces of the hot paths, as plain torch functions with HF's numerics, and
their compiled form for CUDA.

Eager, each function is a handful of small kernels (an RMSNorm is eight: upcast, square, mean,
add, rsqrt, multiply, downcast, scale), and a decode step of a 28-layer model launches about a
thousand of them: inside a CUDA graph the launches are free but each kernel still costs the GPU
a few microseconds, several times what the weights take to read at batch 1. ``Kernels.compiled``
runs the same functions through ``torch.compile`` (dynamic shapes, so one compile serves every
batch size): each becomes one fused kernel. On CUDA our own Triton kernels take their place
(``triton_kernels``): inductor's dynamic-shape ones ran at a fifth to a third of the copy
bandwidth on the vision tower's shapes, and each compiled call costs tens of microseconds of
host time in dynamo's and AOT autograd's wrappers, which an eager prefill step pays four times
a layer. CPU always runs them eagerly, which is what the tests compare with HF token for token;
compiled and Triton kernels keep intermediates in fp32, so on CUDA a result may differ from
eager in the last bf16 bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine_core.model.rope import apply_rotary

logger = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF numerics: normalise in fp32, cast back, then scale by the weight in the model dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` in the model dtype (HF's residual add), then ``(rms_norm(s), s)``."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rotary_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    write_index: torch.Tensor,
) -> torch.Tensor:
    """The decoder's attention inputs from its packed projection ``qkv`` (T, (Hq + 2 Hkv) D):
    returns q rotated (T, Hq, D); k rotated and v go into rows ``write_index`` of the flat
    caches ``k_rows`` / ``v_rows`` (R, Hkv, D). Rotation in the model dtype, as HF."""
    t = qkv.shape[0]
    kv_heads, dim = k_rows.shape[1:]
    kv_size = kv_heads * dim
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv_size, kv_size, kv_size], dim=-1)
    k_rows.index_copy_(0, write_index, apply_rotary(k.view(t, kv_heads, dim), cos, sin))
    v_rows.index_copy_(0, write_index, v.view(t, kv_heads, dim))
    return apply_rotary(q.view(t, -1, dim), cos, sin)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` in the model dtype, then ``(layer_norm(s), s)`` (the vision
    tower's residual add and its next LayerNorm: one kernel compiled, two reads of ``s``
    saved)."""
    summed = residual + x
    return F.layer_norm(summed, summed.shape[-1:], weight, bias, eps), summed


def qkv_rotary_fp32(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vision tower's attention inputs from its packed projection ``qkv`` (N, 3, H, D):
    q and k rotated in fp32 (cos/sin (N, 1, D) fp32) and cast back, v as it is, each its own
    contiguous (N, H, D) tensor. Compiled, the three come out of one pass over ``qkv``
    (separately, the strided reads of q and k ran at a sixth of the copy bandwidth)."""
    q, k, v = qkv.unbind(1)
    return (
        apply_rotary(q.float(), cos, sin).to(qkv.dtype),
        apply_rotary(k.float(), cos, sin).to(qkv.dtype),
        v.contiguous(),
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's vision MLP activation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


#: Never compiled: rotary_store writes into the KV cache, and dynamo guards on its views'
#: sizes (duck sizing ties the cache's row count to whatever size it happens to equal), so a
#: new batch size could recompile mid-step; eager it is two index_copy_ calls more.
_EAGER_ONLY = ("rotary_store",)


@dataclass(frozen=True, slots=True)
class Kernels:
    """The functions the models call; built once per runner and handed to their modules."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_store: Callable[..., torch.Tensor]
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    qkv_rotary_fp32: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    quick_gelu: Callable[[torch.Tensor], torch.Tensor]
    is_compiled: bool = False

    @classmethod
    def eager(cls) -> Kernels:
        return cls(
            rms_norm,
            add_rms_norm,
            rotary_store,
            add_layer_norm,
            qkv_rotary_fp32,
            silu_mul,
            quick_gelu,
        )

    @classmethod
    def compiled(
        cls, device: torch.device, dtype: torch.dtype, backend: str = "inductor"
    ) -> Kernels:
        """The fast kernels, each tried once on small inputs of ``dtype`` on ``device``
        against its eager self: on CUDA our Triton ones (``triton_kernels``), which launch
        straight from Python; ``torch.compile``'d ones elsewhere or where Triton is missing or
        fails the check; the eager ones (with a warning) where compiling fails too."""
        eager = _fields(cls.eager())
        fast = _triton_kernels(eager, device, dtype) if device.type == "cuda" else {}
        rest = {name: fn for name, fn in eager.items() if name not in fast}
        try:
            compiled = {
                name: _compile(fn, backend) for name, fn in rest.items() if name not in _EAGER_ONLY
            }
            _try(compiled, eager, device, dtype)
        except Exception as exc:  # a missing compiler or a codegen bug costs speed, not service
            logger.warning("torch.compile of the fused kernels failed; running eager: %r", exc)
            compiled = {}
        if not fast and not compiled:
            return cls.eager()
        kinds = {
            "Triton": list(fast),
            "torch.compile": list(compiled),
            "eager": [n for n in rest if n not in compiled],
        }
        fast.update({**rest, **compiled})
        logger.info(
            "fused kernels: %s",
            "; ".join(f"{kind} for {', '.join(names)}" for kind, names in kinds.items() if names),
        )
        return cls(
            **{name: _Guarded(name, fn, eager[name]) for name, fn in fast.items()},
            is_compiled=True,
        )

    def fallen_back(self) -> list[str]:
        """Compiled kernels that failed since the start and run eagerly now."""
        return [
            fn.name for fn in _fields(self).values() if isinstance(fn, _Guarded) and fn.is_eager
        ]


class _Guarded:
    """A compiled kernel that turns into its eager self, for good, the first time it raises
    (a recompile for an input it has not seen can fail long after the start-up check)."""

    def __init__(self, name: str, fast: Callable[..., Any], eager: Callable[..., Any]) -> None:
        self.name = name
        self._fast: Callable[..., Any] | None = fast
        self._eager = eager

    @property
    def is_eager(self) -> bool:
        return self._fast is None

    def __call__(self, *args: Any) -> Any:
        if self._fast is not None:
            try:
                return self._fast(*args)
            except Exception as exc:  # the eager function computes the same values
                logger.warning("compiled kernel %s failed (%r); eager from now on", self.name, exc)
                self._fast = None
        return self._eager(*args)


def _fields(kernels: Kernels) -> dict[str, Callable[..., Any]]:
    return {
        "rms_norm": kernels.rms_norm,
        "add_rms_norm": kernels.add_rms_norm,
        "rotary_store": kernels.rotary_store,
        "add_layer_norm": kernels.add_layer_norm,
        "qkv_rotary_fp32": kernels.qkv_rotary_fp32,
        "silu_mul": kernels.silu_mul,
        "quick_gelu": kernels.quick_gelu,
    }


def _triton_kernels(
    eager: dict[str, Callable[..., Any]], device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[..., Any]]:
    """Our Triton kernels by name, checked against eager; none (with a warning) where Triton
    is missing or a kernel fails the check."""
    try:
        from engine_core.model import triton_kernels

        fast = dict(triton_kernels.KERNELS)
        _try(fast, eager, device, dtype)
    except Exception as exc:  # the compiled kernels compute the same values
        logger.warning("the Triton kernels failed their check; compiled ones instead: %r", exc)
        return {}
    return fast


def _compile(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


@torch.no_grad()  # as the steps run: dynamo guards on grad mode (see the docstring)
def _try(
    fast: dict[str, Callable[..., Any]],
    eager: dict[str, Callable[..., Any]],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Compile every kernel now, on inputs shaped like the models' (2-D activations; q and k as
    strided views of a packed projection), and check it against eager within rounding; 1 and 3
    rows cover the size-1 specialisation. Under no_grad, as every step runs: compiled with
    grad on, each kernel was compiled twice more at the engine's first steps (the GPU host's
    log: "GLOBAL_STATE changed: grad_mode", then the size-1 guard again), seconds of start-up
    each, and any shape first seen while serving would have stalled a step as long."""
    gen = torch.Generator(device=device).manual_seed(0)
    for t in (1, 3):
        x = torch.randn(t, 64, device=device, generator=gen).to(dtype)
        w = torch.randn(64, device=device, generator=gen).to(dtype)
        qk = torch.randn(t, 3, 4, 16, device=device, generator=gen).to(dtype)
        cos = torch.randn(t, 1, 16, device=device, generator=gen)
        # the decoder's packed projection (4 q heads, 1 kv head of 16) and cache rows it writes
        packed = qk.view(t, -1)[:, : 6 * 16]
        rows = torch.arange(t, device=device) * 2 + 1
        caches = torch.zeros(2, 2 * t + 1, 1, 16, device=device, dtype=dtype)
        cases = {
            "rms_norm": (x, w, 1e-6),
            "add_rms_norm": (x, x, w, 1e-6),
            "rotary_store": (packed, cos.to(dtype), cos.to(dtype), *caches, rows),
            "add_layer_norm": (x, x, w, w, 1e-6),
            "qkv_rotary_fp32": (qk, cos, cos),
            "silu_mul": (x,),
            "quick_gelu": (x,),
        }
        for name, fn in fast.items():
            # each gets its own copies: a kernel that writes into an input (the KV cache) is
            # checked on what it wrote as well as on what it returned
            got_args, want_args = _copies(cases[name]), _copies(cases[name])
            got, want = fn(*got_args), eager[name](*want_args)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(got_args, want_args, rtol=2e-2, atol=2e-2)


def _copies(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh copies of the tensors in ``args``, one per distinct tensor: a tensor passed twice
    stays one tensor (dynamo guards on such aliasing, and the steps pass cos/sin like that)."""
    memo: dict[int, torch.Tensor] = {}
    for a in args:
        if isinstance(a, torch.Tensor) and id(a) not in memo:
            memo[id(a)] = a.clone()
    return tuple(memo.get(id(a), a) for a in args)
