"""Host-to-device copies that never make the host wait.

A copy from pageable host memory synchronises the stream first (the GPU drains before the host
can go on); from pinned memory it is queued like a kernel. The busy loop prepares step k+1 while
the GPU runs step k, so every per-step input goes through ``to_device``. torch's pinned-memory
cache reuses a buffer only after the copies that read it have run.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

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


#: Image pixels the IO thread holds in pinned memory at once, counted as torch's pinned-memory
#: cache allocates them (whole powers of two: a 4.7 MB photo takes an 8 MiB block). The cache
#: takes a block it lacks with cudaHostAlloc (milliseconds per photo, on the driver's lock the
#: busy loop's launches need too) and keeps it for good. Unbounded, every waiting request's
#: pixels were pinned: 944 waited on the GPU host in a burst (7.4 GiB of blocks) while steps
#: took 42.9 ms instead of 5.5 (this and the IO thread's starved sends were fixed together,
#: not measured apart). 1 GiB holds 128 photos, about twice what a saturated engine has in
#: flight; pixels past it stay where they came and are pinned when they are encoded
#: (``PixelInput.to_tower``).
PINNED_PIXEL_BYTES = 1 << 30


def pinned_block_bytes(nbytes: int) -> int:
    """What torch's pinned-memory cache allocates for ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


class PixelPinner:
    """``prepare`` for the IO thread: copies an ``EngineRequest``'s image pixels to pinned
    memory in place, while the pinned pixels alive stay within ``budget`` bytes, so that
    their upload is queued behind the running step instead of stalling it. The copy, a
    millisecond or more per photo, runs beside the busy loop (torch releases the GIL for it).
    ``pin``: the copy (a stand-in in tests; pinning needs CUDA)."""

    def __init__(
        self,
        budget: int = PINNED_PIXEL_BYTES,
        pin: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory,
    ) -> None:
        self._left = budget
        self._pin = pin
        self._lock = threading.Lock()  # the budget is given back from whichever thread frees

    @property
    def left(self) -> int:
        return self._left

    def __call__(self, msg: object) -> None:
        if not isinstance(msg, EngineRequest):
            return
        for item in msg.mm_items:
            pixels = item.pixel_values
            if pixels is None or pixels.is_pinned():
                continue
            size = pinned_block_bytes(pixels.nbytes)
            with self._lock:
                if size > self._left:
                    return
                self._left -= size
            try:
                item.pixel_values = self._pin(pixels)
            except RuntimeError as exc:  # pinned memory exhausted: pinned when encoded
                self._give_back(size)
                logger.warning("pinning the pixels of %s failed: %r", msg.request_id, exc)
                return
            weakref.finalize(item.pixel_values, self._give_back, size)

    def _give_back(self, size: int) -> None:
        with self._lock:
            self._left += size


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
