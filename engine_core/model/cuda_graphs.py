"""CUDA graphs for the decode-only steps of the decoder runner.

An eager decode step of a 2B model costs 20-30 ms of host work (Python and kernel launches, 28
layers deep) for 1-2 ms of GPU work (bench/results/engine.md); replaying a captured graph removes
the host part. One graph per batch bucket (1, 2, 4, 8, then multiples of 16 up to the largest
batch). A step of n sequences replays the smallest bucket >= n, padded by repeating its first
sequence: the pad rows write that sequence's K/V again into the same cache row (same values) and
their logits are dropped.

Everything a step varies lives in static device buffers: token ids, positions, the KV rows to
write and the flash-attention metadata. ``max_seqlen_k`` is fixed at ``max_model_len`` (the
true lengths travel in ``seqused_k``), and graphs need the FlashAttention path, so they are used
on CUDA in bf16/fp16 only.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine_core.model.attention import AttnMeta
from engine_core.model.qwen2 import Decoder
from engine_core.model.rope import RotaryEmbedding

logger = logging.getLogger(__name__)

# Rows of the input buffer, each (max_batch + 1,) int64; only K_START uses the extra column
# (cum_seq_k has one entry more than the batch).
IDS, POSITION, WRITE_ROW, K_START, K_LEN = range(5)


def buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 16, ending at ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    """Captured decode steps over one KV cache; ``run`` replays the right one."""

    def __init__(
        self,
        decoder: Decoder,
        rotary: RotaryEmbedding,
        kv: torch.Tensor,
        max_model_len: int,
        max_batch: int,
        dtype: torch.dtype,
    ) -> None:
        self._decoder, self._rotary, self._kv, self._dtype = decoder, rotary, kv, dtype
        self._max_len = max_model_len
        self.buckets = buckets(max_batch)
        device = kv.device
        self._inputs = torch.zeros(5, max_batch + 1, dtype=torch.int64, device=device)
        self._inputs[K_LEN] = 1  # capture-time inputs: token 0 at position 0 of slot 0
        self._cum_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: smaller ones reuse its pool memory
            self._graphs[b] = self._capture(b, pool)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s (%.0f MiB)",
            self.buckets,
            (torch.cuda.memory_reserved(device) - before) / 2**20,
        )

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @torch.no_grad()
    def run(
        self, token_ids: list[int], positions: list[int], slots: list[int], starts: list[int]
    ) -> torch.Tensor:
        """Decode one token for each sequence: ``token_ids[i]`` at cache position ``starts[i]``
        of slot ``slots[i]``, rotary position ``positions[i]``. Returns float32 logits
        (n, vocab), a copy (the graph's output buffer is overwritten by the next replay)."""
        n = len(token_ids)
        b = next(size for size in self.buckets if size >= n)
        host = np.empty((5, b + 1), dtype=np.int64)
        slot = np.asarray(slots, dtype=np.int64)
        start = np.asarray(starts, dtype=np.int64)
        host[IDS, :n] = token_ids
        host[POSITION, :n] = positions
        host[WRITE_ROW, :n] = slot * self._max_len + start
        host[K_START, :n] = slot * self._max_len
        host[K_LEN, :n] = start + 1
        host[:, n:] = host[:, :1]  # pad rows repeat the first sequence
        self._inputs[:, : b + 1].copy_(torch.from_numpy(host))
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:n].clone()

    def _forward(self, b: int) -> torch.Tensor:
        inputs = self._inputs
        meta = AttnMeta(
            slots=[],
            starts=[],
            lens=[],
            write_index=inputs[WRITE_ROW, :b],
            cum_seq_q=self._cum_q[: b + 1],
            cum_seq_k=inputs[K_START, : b + 1].to(torch.int32),
            seqused_k=inputs[K_LEN, :b].to(torch.int32),
            max_q=1,
            max_k=self._max_len,
        )
        embeds = self._decoder.embed_tokens(inputs[IDS, :b])
        cos, sin = self._rotary.cos_sin(inputs[POSITION, :b].expand(3, -1), self._dtype)
        return self._decoder.logits(self._decoder(embeds, cos, sin, self._kv, meta))

    @torch.no_grad()
    def _capture(self, b: int, pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (lazy cuBLAS/flash initialisation must not be captured).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(b)
        return graph, logits
