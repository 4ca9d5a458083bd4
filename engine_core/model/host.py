"""Host-to-device copies that never make the host wait.

A copy from pageable host memory synchronises the stream first (the GPU drains before the host
can go on); from pinned memory it is queued like a kernel. The busy loop prepares step k+1 while
the GPU runs step k, so every per-step input goes through ``to_device``. torch's pinned-memory
cache reuses a buffer only after the copies that read it have run.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ipc.messages import EngineRequest

logger = logging.getLogger(__name__)


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``: queued from pinned memory on CUDA, the tensor itself on CPU."""
    host = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A pinned copy of a host tensor when ``device`` is CUDA (so its later upload is queued,
    not synchronous); the tensor itself otherwise or when already pinned."""
    if device.type != "cuda" or tensor.is_pinned():
        return tensor
    return tensor.pin_memory()


def pin_pixels(msg: object) -> None:
    """Copy an ``EngineRequest``'s image pixels to pinned memory, in place. The IO thread runs
    this as requests arrive (on CUDA): the copy, a millisecond or more per photo, then runs
    beside the busy loop, torch releasing the GIL for it, instead of inside a step. Where it
    fails (pinned memory exhausted) the pixels stay as they came: ``pinned`` retries later."""
    if not isinstance(msg, EngineRequest):
        return
    for item in msg.mm_items:
        if item.pixel_values is not None and not item.pixel_values.is_pinned():
            try:
                item.pixel_values = item.pixel_values.pin_memory()
            except RuntimeError as exc:
                logger.warning("pinning the pixels of %s failed: %r", msg.request_id, exc)
                return


class HostCopy:
    """Device tensors copied to pinned host memory without waiting: ``wait`` blocks until the
    copies (and everything queued before them) are done and returns the host tensors. On the
    CPU the tensors are already there."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        on_cuda = [t.is_cuda for t in tensors]
        if not any(on_cuda):
            self._host = tensors
            return
        self._host = []
        for t, is_cuda in zip(tensors, on_cuda, strict=True):
            if is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
            self._host.append(t)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
        return self._host
