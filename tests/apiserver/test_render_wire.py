"""The render workers' message framing in-process: tensors of every wire dtype (empty ones
included) and plain objects cross a socketpair intact, as views of one receive buffer at
64-byte offsets, also when the sender's sendmsg takes a few bytes a call."""

from __future__ import annotations

import socket
import threading
from typing import Any

import torch

from apiserver import render_workers as rw


class _Trickle:
    """A socket whose sendmsg sends at most ``limit`` bytes a call (as a signal or a full
    buffer may cut one short)."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock, self._limit = sock, limit
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        budget, out = self._limit, []
        for b in buffers:
            if budget == 0:
                break
            out.append(b[:budget])
            budget -= len(out[-1])
        return self._sock.sendmsg(out)


def _round_trip(message: Any, limit: int | None = None) -> tuple[Any, int]:
    a, b = socket.socketpair()
    sender: Any = a if limit is None else _Trickle(a, limit)
    thread = threading.Thread(target=rw._send, args=(sender, message))
    thread.start()
    try:
        got = rw._recv(b)
    finally:
        thread.join(10)
        a.close(), b.close()
    return got, getattr(sender, "calls", 1)


def _tensors() -> list[torch.Tensor]:
    return [
        torch.randint(0, 256, (3996, 588), dtype=torch.uint8),
        torch.randn(7, 5).to(torch.bfloat16),
        torch.arange(13, dtype=torch.int64),
        torch.empty(0, 4, dtype=torch.float16),
        torch.randn(3, 3),
    ]


def test_tensors_cross_as_aligned_views_of_one_buffer() -> None:
    sent = ("ok", _tensors(), {"took": 0.5})
    got, _ = _round_trip(sent)
    assert got[0] == "ok" and got[2] == {"took": 0.5}
    for g, w in zip(got[1], sent[1], strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
    # One buffer: every tensor lies after the first, at a multiple of 64 bytes from it, and
    # ends before the next begins.
    placed = [(g.data_ptr(), g.numel() * g.element_size()) for g in got[1] if g.numel()]
    first = placed[0][0]
    assert all((at - first) % 64 == 0 for at, _ in placed)
    for (at, size), (following, _) in zip(placed, placed[1:], strict=False):
        assert 0 <= following - (at + size) < 64  # only the padding between them


def test_short_sends_are_resumed() -> None:
    sent = _tensors()
    got, calls = _round_trip(sent, limit=100_000)
    assert calls > 20  # the 2.35 MB of patches took many calls
    for g, w in zip(got, sent, strict=True):
        assert torch.equal(g, w)
