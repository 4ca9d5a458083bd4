"""CUDA graphs for the decode-only steps of the decoder runner.

An eager decode step of a 2B model costs 20-30 ms of host work (Python and kernel launches, 28
layers deep) for 1-2 ms of GPU work (bench/results/engine.md); replaying a captured graph removes
the host part. One graph per batch bucket (1, 2, 4, 8, then multiples of 16 up to the largest
batch) and per variant: ``logits`` returns the float32 logits for the sampler, ``greedy`` also
takes the argmax inside the graph, so a plain greedy step never leaves the device. A step of n
sequences replays the smallest bucket >= n, padded by repeating its first sequence: the pad
rows write that sequence's K/V again into the same cache row (same values) and their outputs
are dropped.

Everything a step varies lives in one static device buffer of inputs (token ids, positions,
the KV rows to write, the flash-attention metadata, slots, and whether a row's token comes
from the device), filled by one non-blocking copy from pinned memory. A row fed from the device
reads its token from ``last_tokens[slot]``, which every step's sampled ids are written into
(the greedy graphs do it themselves). ``max_seqlen_k`` is fixed at ``max_model_len`` (the true
lengths travel in ``seqused_k``), and graphs need the FlashAttention path, so they are used on
CUDA in bf16/fp16 only. Their attention is our Triton decode kernel (``decode_attention``, with
the split count that fills the GPU at each bucket) unless the config asks for FlashAttention's
or our kernel fails its check at capture.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from engine_core.model.attention import AttnMeta, DecodeKernel
from engine_core.model.qwen2 import Decoder
from engine_core.model.rope import RotaryEmbedding
from engine_core.model.spec import DecoderSpec

logger = logging.getLogger(__name__)

# Rows of the input buffer, each (max_batch + 1,) int64; only K_START uses the extra column
# (cum_seq_k has one entry more than the batch).
IDS, POSITION, WRITE_ROW, K_START, K_LEN, SLOT, FED = range(7)
NUM_INPUTS = 7
VARIANTS = ("logits", "greedy")


def buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 16, ending at ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def capture_decode_graphs(
    decoder: Decoder,
    rotary: RotaryEmbedding,
    kv: torch.Tensor,
    last_tokens: torch.Tensor,
    max_model_len: int,
    max_batch: int,
    dtype: torch.dtype,
    triton_attention: bool,
) -> DecodeGraphs | None:
    """The decode graphs; None (every step eager, with an error in the log) when capturing
    fails: slower, but serving."""
    try:
        return DecodeGraphs(
            decoder, rotary, kv, last_tokens, max_model_len, max_batch, dtype, triton_attention
        )
    except RuntimeError:
        logger.exception("capturing the decode CUDA graphs failed; decoding eagerly")
        torch.cuda.synchronize(kv.device)
        torch.cuda.empty_cache()
        return None


class DecodeGraphs:
    """Captured decode steps over one KV cache; ``run`` replays the right one."""

    def __init__(
        self,
        decoder: Decoder,
        rotary: RotaryEmbedding,
        kv: torch.Tensor,
        last_tokens: torch.Tensor,
        max_model_len: int,
        max_batch: int,
        dtype: torch.dtype,
        triton_attention: bool,
    ) -> None:
        self._decoder, self._rotary, self._kv, self._dtype = decoder, rotary, kv, dtype
        self._last_tokens = last_tokens
        self._max_len = max_model_len
        self.buckets = buckets(max_batch)
        device = kv.device
        self._kernels = (
            _decode_kernels(decoder.spec, max_model_len, self.buckets, device, dtype)
            if triton_attention
            else {}
        )
        self._inputs = torch.zeros(NUM_INPUTS, max_batch + 1, dtype=torch.int64, device=device)
        self._inputs[K_LEN] = 1  # capture-time inputs: token 0 at position 0 of slot 0
        self._cum_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: smaller ones reuse its pool memory
            for variant in VARIANTS:
                self._graphs[variant, b] = self._capture(variant, b, pool)
        logger.info(
            "captured decode CUDA graphs for batch sizes %s, %d variants (%.0f MiB), attention: %s",
            self.buckets,
            len(VARIANTS),
            (torch.cuda.memory_reserved(device) - before) / 2**20,
            "Triton" if self._kernels else "FlashAttention-2",
        )

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @torch.no_grad()
    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        starts: list[int],
        fed: list[bool],
        greedy: bool,
    ) -> torch.Tensor:
        """Decode one token for each sequence: ``token_ids[i]`` (or, where ``fed[i]``, the id
        last sampled for its slot) at cache position ``starts[i]`` of slot ``slots[i]``,
        rotary position ``positions[i]``. Returns float32 logits (n, vocab), or with
        ``greedy`` the argmax ids (n,) int64: views of the graph's output, valid until the
        next replay is queued."""
        n = len(token_ids)
        b = next(size for size in self.buckets if size >= n)
        host = torch.empty((NUM_INPUTS, b + 1), dtype=torch.int64, pin_memory=True)
        rows = host.numpy()
        slot = np.asarray(slots, dtype=np.int64)
        start = np.asarray(starts, dtype=np.int64)
        rows[IDS, :n] = token_ids
        rows[POSITION, :n] = positions
        rows[WRITE_ROW, :n] = slot * self._max_len + start
        rows[K_START, :n] = slot * self._max_len
        rows[K_LEN, :n] = start + 1
        rows[SLOT, :n] = slot
        rows[FED, :n] = fed
        rows[:, n:] = rows[:, :1]  # pad rows repeat the first sequence
        self._inputs[:, : b + 1].copy_(host, non_blocking=True)
        graph, out = self._graphs["greedy" if greedy else "logits", b]
        graph.replay()
        return out[:n]

    def _forward(self, variant: str, b: int) -> torch.Tensor:
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
            decode_kernel=self._kernels.get(b),
        )
        slots = inputs[SLOT, :b]
        ids = torch.where(inputs[FED, :b] != 0, self._last_tokens[slots], inputs[IDS, :b])
        embeds = self._decoder.embed_tokens(ids)
        cos, sin = self._rotary.cos_sin(inputs[POSITION, :b].expand(3, -1), self._dtype)
        logits = self._decoder.logits(self._decoder(embeds, cos, sin, self._kv, meta))
        if variant == "logits":
            return logits
        tokens = logits.argmax(dim=-1)
        self._last_tokens.index_copy_(0, slots, tokens)
        return tokens

    @torch.no_grad()
    def _capture(
        self, variant: str, b: int, pool: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first (lazy cuBLAS/flash initialisation must not be captured).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(variant, b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self._forward(variant, b)
        return graph, out


def _decode_kernels(
    spec: DecoderSpec,
    max_len: int,
    sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, DecodeKernel]:
    """Our decode attention for each batch bucket, with its split count; none (with a warning:
    FlashAttention's kernel serves instead) where Triton is missing or the kernel fails its
    check on this model's heads."""
    try:
        from engine_core.model import decode_attention

        decode_attention.check(spec.num_heads, spec.num_kv_heads, spec.head_dim, dtype, device)
    except Exception as exc:  # a missing compiler or a codegen bug costs speed, not service
        logger.warning("Triton decode attention failed its check; FlashAttention instead: %r", exc)
        return {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return {
        b: functools.partial(
            decode_attention.decode_attention,
            splits=decode_attention.num_splits(b, spec.num_kv_heads, max_len, sms),
        )
        for b in sizes
    }
