"""Wire pixels -> the vision tower's input, on the engine's device.

Where the model's image processor allows it, API servers send each image as uint8 patches
straight from the processor run with ``do_rescale=False, do_normalize=False``: one byte per
value instead of two (bf16) or four (float32), and no float pass over the pixels on the API
servers' CPUs. transformers' torchvision backend resizes uint8 images in uint8, so these bytes
are exactly what it would have rescaled and normalized; ``PixelInput`` does that here with the
processor's own formula in the same float32 arithmetic (rescale and normalize fused into
``(x - mean / r) / (std / r)`` with ``r`` the rescale factor, the way
``TorchvisionBackend.rescale_and_normalize`` computes it), so the tower sees the very values
it would have seen (tests/engine_core/test_pixels.py compares them on real photos).

Patches are laid out (rows, channels * temporal_patch * patch * patch), channel-major, as the
Qwen2-VL processors flatten them. For a still image the processor fills the temporal patch
with copies of its one frame, so uint8 patches may also come with one frame each (the
processor run with ``temporal_patch_size=1``: ``Ready.uint8_one_frame``), half the bytes on
every hop from the render worker to the GPU; the copies are made here, on the device. Float
pixels (already normalized) are still accepted: the ``normalized`` transfer, and clients that
never heard of uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AutoImageProcessor, PretrainedConfig

from engine_core.model.errors import ModelLoadError
from engine_core.model.host import pinned

Transfer = Literal["auto", "uint8", "normalized"]
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class PixelInput:
    """Turns wire pixels into the tower's input. ``wire_dtype`` is what API servers are told
    to send (``Ready.pixel_dtype``): "uint8", or the tower's dtype for normalized pixels."""

    device: torch.device
    dtype: torch.dtype
    channels: int
    #: The tower's temporal patch (frames per patch row) and, where uint8 rows may hold one
    #: frame of a still image instead, that row's length (channels * patch**2; else 0).
    temporal: int = 1
    frame_dim: int = 0
    #: (channels,) float32 on ``device``: x -> (x * scale - shift) / divisor, see ``_stats``.
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    divisor: torch.Tensor | None = None

    @property
    def wire_dtype(self) -> str:
        return "uint8" if self.accepts_uint8 else _NAMES[self.dtype]

    @property
    def accepts_uint8(self) -> bool:
        return self.scale is not None

    @classmethod
    def for_model(
        cls,
        model_dir: str,
        vision_config: PretrainedConfig,
        device: torch.device,
        dtype: torch.dtype,
        transfer: Transfer,
    ) -> PixelInput:
        """For the image processor that API servers load from ``model_dir`` (as they do:
        transformers' default backend). A checkpoint without one (API servers then refuse
        images; engine-only tools send normalized pixels) gets the normalized transfer."""
        channels = int(vision_config.in_channels)
        if transfer == "normalized":
            return cls(device, dtype, channels)
        try:
            processor = AutoImageProcessor.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            if transfer == "uint8":
                raise ModelLoadError(f"--pixel-transfer uint8: no image processor: {exc}") from exc
            return cls(device, dtype, channels)
        temporal = int(getattr(vision_config, "temporal_patch_size", 1))
        frame_dim = channels * int(getattr(vision_config, "patch_size", 0)) ** 2
        return cls.for_processor(processor, channels, device, dtype, transfer, temporal, frame_dim)

    @classmethod
    def for_processor(
        cls,
        processor: object,
        channels: int,
        device: torch.device,
        dtype: torch.dtype,
        transfer: Transfer,
        temporal: int = 1,
        frame_dim: int = 0,
    ) -> PixelInput:
        """uint8 transfer when ``transfer`` asks for it or, for ``auto``, when ``processor`` is
        a torchvision one (whose uint8 output is exact); one-frame rows of ``frame_dim``
        values too when the tower's ``temporal`` patch is more than one frame and the
        processor patches with the same one."""
        backend = getattr(processor, "backend", None)
        if transfer == "normalized" or backend != "torchvision":
            if transfer == "uint8":
                raise ModelLoadError(
                    f"--pixel-transfer uint8 needs transformers' torchvision image processor; "
                    f"{type(processor).__name__} runs on {backend or 'PIL'} "
                    "(install torchvision, or use --pixel-transfer normalized)"
                )
            return cls(device, dtype, channels)
        if temporal < 2 or int(getattr(processor, "temporal_patch_size", 1)) != temporal:
            temporal, frame_dim = 1, 0  # nothing to repeat, or a processor of another layout
        scale, shift, divisor = _stats(processor, channels)
        return cls(
            device,
            dtype,
            channels,
            temporal,
            frame_dim,
            scale.to(device),
            shift.to(device),
            divisor.to(device),
        )

    def to_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(rows, patch_dim) wire pixels -> the same shape in the tower's dtype on its device;
        uint8 rows of one frame (``frame_dim``) come out ``temporal`` times as wide. Pixels
        the IO thread did not pin (its budget was spent) are pinned here: an upload from
        pageable memory would wait for the step in flight."""
        pixel_values = pinned(pixel_values, self.device)
        if pixel_values.dtype != torch.uint8:
            return pixel_values.to(self.device, self.dtype, non_blocking=True)
        assert self.scale is not None and self.shift is not None and self.divisor is not None
        rows, width = pixel_values.shape
        x = pixel_values.to(self.device, non_blocking=True).view(rows, self.channels, -1)
        # (rows, C, T*P*P) float32; the per-channel stats broadcast as (C, 1).
        x = x.to(torch.float32).mul_(self.scale[:, None]).sub_(self.shift[:, None])
        x = x.div_(self.divisor[:, None]).to(self.dtype)
        if self.frame_dim and width == self.frame_dim:
            # The processor's layout is (C, T, P*P) per row with T copies of the frame.
            x = x.unsqueeze(2).expand(rows, self.channels, self.temporal, -1)
        return x.reshape(rows, -1)


def _stats(processor: object, channels: int) -> tuple[torch.Tensor, ...]:
    """(scale, shift, divisor) per channel such that (x * scale - shift) / divisor is what
    the processor computes from uint8 ``x``, operation for operation in float32: the fused
    ``(x - mean/r) / (std/r)`` when it both rescales and normalizes, else ``x * r`` or
    ``(x - mean) / std`` or ``x``."""
    do_rescale = bool(getattr(processor, "do_rescale", False))
    do_normalize = bool(getattr(processor, "do_normalize", False))
    rescale = float(getattr(processor, "rescale_factor", 1.0))
    ones = torch.ones(channels)
    if do_normalize:
        mean = _per_channel(getattr(processor, "image_mean", None), channels, "image_mean")
        std = _per_channel(getattr(processor, "image_std", None), channels, "image_std")
        if do_rescale:
            # transformers: torch.tensor(mean) * (1.0 / rescale_factor), in float32.
            mean, std = mean * (1.0 / rescale), std * (1.0 / rescale)
        return ones, mean, std
    if do_rescale:
        return torch.full((channels,), rescale), torch.zeros(channels), ones
    return ones, torch.zeros(channels), ones


def _per_channel(value: object, channels: int, name: str) -> torch.Tensor:
    """A per-channel statistic as float32, from a list or one number for every channel."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * channels
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        floats = []
    if len(floats) != channels:
        raise ModelLoadError(f"image processor {name} {value!r} does not give {channels} channels")
    return torch.tensor(floats, dtype=torch.float32)
