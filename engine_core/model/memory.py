"""How much GPU memory the KV cache may take: what is left of ``gpu_memory_utilization`` after
everything else a step can need at its peak."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine_core.model.attention import build_meta
from engine_core.model.kv_cache import allocate
from ipc.config import EngineConfig

if TYPE_CHECKING:
    from engine_core.model.decoder_runner import DecoderRunner

#: Headroom for the decode CUDA graphs' memory pool, besides their logits: 328 MiB held 8
#: buckets of one variant for the default model on an H100; there are two variants now.
GRAPH_FIXED_BYTES = 1 << 30
#: Per sequence of a step: the sampler's float32 rows (logits copy, probabilities, a sort's
#: values, int64 indices and the scatter back): about eight vocab-sized rows.
SAMPLER_ROWS = 8


def cuda_kv_budget(runner: DecoderRunner, config: EngineConfig, with_graphs: bool) -> int:
    """``gpu_memory_utilization * total`` minus: the peak of weights plus one profiling pass of
    the vision tower over a full encoder budget of patches and one of the decoder over
    the step's token budget (with a one-slot scratch cache that is not counted); memory held
    outside torch's allocator (CUDA context, other processes); the encoder cache's budget; the
    sampler's rows; and the decode graphs (``GRAPH_FIXED_BYTES`` plus their logits)."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        if runner.vision is not None:
            _profile_vision(runner, config.max_num_encoder_patches)
        scratch_bytes = _profile_decoder(runner)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    other = (total - free) - torch.cuda.memory_reserved(device)
    vocab = runner.spec.vocab_size
    sampler = SAMPLER_ROWS * config.max_num_seqs * vocab * 4
    # Decode graphs keep memory for good (mostly a fixed cost per graph), plus their largest
    # bucket's float32 logits.
    graphs = GRAPH_FIXED_BYTES + 2 * config.max_num_seqs * vocab * 4 if with_graphs else 0
    return int(
        config.gpu_memory_utilization * total
        - peak
        - other
        - config.encoder_cache_bytes
        - sampler
        - graphs
    )


def _profile_vision(runner: DecoderRunner, patches: int) -> None:
    """One tower pass over a grid of about ``patches`` patches, two merge blocks high."""
    assert runner.vision is not None
    merge = runner.vision.merge_size
    width = max(patches // (2 * merge) // merge * merge, merge)
    grid = (1, 2 * merge, width)
    pixels = torch.zeros(2 * merge * width, runner.vision.patch_dim, dtype=runner.dtype)
    runner.vision.encode([(pixels, grid)])


def _profile_decoder(runner: DecoderRunner) -> int:
    """A forward over the step's token budget; returns the scratch cache's bytes."""
    n = min(runner.max_num_batched_tokens, runner.max_model_len)
    device, dtype = runner.device, runner.dtype
    scratch = allocate(runner.spec, 1, n, dtype, device)
    meta = build_meta([0], [0], [n], n, device, runner.use_flash)
    cos, sin = runner.rotary.cos_sin(torch.zeros(3, n, dtype=torch.int64, device=device), dtype)
    embeds = torch.zeros(n, runner.spec.hidden_size, dtype=dtype, device=device)
    runner.decoder.logits(runner.decoder(embeds, cos, sin, scratch, meta)[-1:])
    return scratch.numel() * scratch.element_size()
