"""The runner of decoder models (Qwen2 / Qwen2.5 / Llama / Qwen2-VL / Qwen2.5-VL).

One step: embed the concatenated new tokens of all chunks, place image embeddings, compute
positions (1-D or M-RoPE), run the decoder over the per-slot KV cache, and return last-token
logits / pooled hidden states for the chunks that want them.
"""

from __future__ import annotations

import numpy as np
import torch

from engine_core.batch import Chunk, RunnerFacts, StepResult
from engine_core.model import checks
from engine_core.model.attention import build_meta, can_use_flash
from engine_core.model.cuda_graphs import DecodeGraphs
from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.errors import ModelLoadError
from engine_core.model.kv_cache import allocate, bytes_per_token, count_slots
from engine_core.model.loader import iter_tensors
from engine_core.model.pixels import PixelInput
from engine_core.model.qwen2 import Decoder
from engine_core.model.request_state import RequestState
from engine_core.model.rope import RotaryEmbedding
from engine_core.model.runner import ModelRunner
from engine_core.model.spec import DecoderSpec, ModelSpec
from engine_core.model.vision import VisionEncoder
from ipc.config import EngineConfig
from ipc.messages import EngineRequest

_POOLINGS = ("last", "mean")
#: KV-budget headroom for the decode CUDA graphs' memory pool, besides their logits.
GRAPH_FIXED_BYTES = 512 << 20


class DecoderRunner(ModelRunner):
    def __init__(
        self, config: EngineConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype
    ) -> None:
        assert spec.decoder is not None
        self.spec: DecoderSpec = spec.decoder
        self.device, self.dtype = device, dtype
        self.use_flash = can_use_flash(device, dtype)
        self.max_model_len = self._max_model_len(config)
        self.decoder, self.vision = self._load(config)
        self.rotary = RotaryEmbedding(
            self.spec.text_config, self.spec.head_dim, self.spec.mrope_section
        ).to(device)
        self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
        self.states: dict[str, RequestState] = {}
        per_token = bytes_per_token(self.spec, dtype)
        budget = config.cpu_kv_cache_bytes if device.type == "cpu" else self._cuda_kv_budget(config)
        num_slots = count_slots(budget, config.max_num_seqs, self.max_model_len, per_token)
        self.kv = allocate(self.spec, num_slots, self.max_model_len, dtype, device)
        self.graphs = None
        if self._use_graphs(config):
            self.graphs = DecodeGraphs(
                self.decoder,
                self.rotary,
                self.kv,
                self.max_model_len,
                min(num_slots, config.max_num_seqs),
                dtype,
            )
        self.facts = RunnerFacts(
            model_name=config.served_model_name or config.model,
            max_model_len=self.max_model_len,
            vocab_size=self.spec.vocab_size,
            eos_token_ids=self.spec.eos_token_ids,
            num_slots=num_slots,
            supports_images=self.vision is not None,
            supports_embeddings=True,
            supports_generation=True,
            image_token_id=self.spec.image_token_id,
            pixel_dtype=self.vision.pixel_input.wire_dtype if self.vision else "float32",
        )

    def _use_graphs(self, config: EngineConfig) -> bool:
        return self.device.type == "cuda" and self.use_flash and not config.enforce_eager

    def _max_model_len(self, config: EngineConfig) -> int:
        limit = self.spec.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ModelLoadError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        return config.max_model_len or limit

    @torch.no_grad()
    def _load(self, config: EngineConfig) -> tuple[Decoder, VisionEncoder | None]:
        """The decoder and, for VL models, the vision tower, with the checkpoint's weights."""
        model_dir = config.model
        # Built on the meta device: every parameter is then loaded from the checkpoint, so
        # random initialisation would be wasted work.
        with torch.device("meta"):
            decoder = Decoder(self.spec)
        decoder = decoder.to_empty(device=self.device).to(self.dtype)
        decoder.tie()
        tensors = list(iter_tensors(model_dir))
        decoder.load_weights([t for t in tensors if not t.key.startswith("visual.")], model_dir)
        vision = None
        if self.spec.vision_config is not None:
            pixels = PixelInput.for_model(
                model_dir, self.spec.vision_config, self.device, self.dtype, config.pixel_transfer
            )
            vision = VisionEncoder(
                self.spec.model_type, self.spec.vision_config, self.dtype, self.device, pixels
            )
            vision.load_weights([t for t in tensors if t.key.startswith("visual.")], model_dir)
        return decoder.eval(), vision

    def _cuda_kv_budget(self, config: EngineConfig) -> int:
        """gpu_memory_utilization * total - peak use of weights plus a profiling forward pass of
        max_num_batched_tokens (with a one-slot scratch cache that is not counted) - memory held
        outside torch's allocator (CUDA context, other processes) - headroom for the decode
        graphs (``GRAPH_FIXED_BYTES`` plus their logits). The vision tower's
        activations are not profiled: leave headroom for large images."""
        n = min(config.max_num_batched_tokens, self.max_model_len)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch = allocate(self.spec, 1, n, self.dtype, self.device)
        meta = build_meta([0], [0], [n], n, self.device, self.use_flash)
        with torch.no_grad():
            cos, sin = self.rotary.cos_sin(
                torch.zeros(3, n, dtype=torch.int64, device=self.device), self.dtype
            )
            embeds = torch.zeros(n, self.spec.hidden_size, dtype=self.dtype, device=self.device)
            self.decoder.logits(self.decoder(embeds, cos, sin, scratch, meta)[-1:])
        torch.cuda.synchronize(self.device)
        peak = (
            torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        )
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        other = (total - free) - torch.cuda.memory_reserved(self.device)
        # Decode graphs keep memory for good: 328 MiB for 8 buckets of the default model on an
        # H100 (mostly fixed per-graph cost), plus their largest bucket's float32 logits.
        graphs = 0
        if self._use_graphs(config):
            graphs = GRAPH_FIXED_BYTES + 2 * config.max_num_seqs * self.spec.vocab_size * 4
        return int(config.gpu_memory_utilization * total - peak - other - graphs)

    def check_request(self, request: EngineRequest) -> str | None:
        merge = self.vision.merge_size if self.vision else 1
        patch_dim = self.vision.patch_dim if self.vision else 0
        uint8 = self.vision is not None and self.vision.pixel_input.accepts_uint8
        error = (
            checks.check_kind(request, True, True, _POOLINGS)
            or checks.check_tokens(request, self.spec.vocab_size, self.max_model_len)
            or checks.check_images(
                request, self.spec.image_token_id, merge, patch_dim, self.encoder_cache, uint8
            )
        )
        if error is None:
            self._new_state(request)
        return error

    def _new_state(self, request: EngineRequest) -> RequestState:
        self.release(request.request_id)
        merge = self.vision.merge_size if self.vision else 1
        state = RequestState(
            request, self.encoder_cache, merge, self.spec.mrope_section is not None
        )
        self.states[request.request_id] = state
        return state

    def _state(self, request: EngineRequest) -> RequestState:
        state = self.states.get(request.request_id)
        if state is None:
            # Re-admitted after a release (a preempted request comes back with its generated
            # tokens folded into the prompt, so it is not re-validated): its images need
            # their pixels or a still-cached encoder output.
            state = self._new_state(request)
            for im in state.images:
                if im.pixels is None and im.embeds is None:
                    self.release(request.request_id)
                    raise RuntimeError(
                        f"request {request.request_id}: image {im.content_hash!r} was evicted "
                        "from the encoder cache while the request was preempted"
                    )
        return state

    @torch.no_grad()
    def execute(self, chunks: list[Chunk]) -> StepResult:
        if not chunks:
            return StepResult(logits=torch.empty(0, self.spec.vocab_size))
        states = [self._state(c.request) for c in chunks]
        lens = [int(c.token_ids.size) for c in chunks]
        num_slots = self.kv.shape[2]
        for c, n in zip(chunks, lens, strict=True):
            if (
                not 0 <= c.slot < num_slots
                or n < 1
                or c.start < 0
                or c.start + n > self.max_model_len
            ):
                raise ValueError(
                    f"chunk of {c.request.request_id} (slot {c.slot}, start "
                    f"{c.start}, {n} tokens) does not fit the KV cache"
                )
        if self.graphs is not None and self._is_decode(chunks, states):
            return StepResult(logits=self._decode_graphed(chunks, states))
        ids = torch.from_numpy(np.concatenate([c.token_ids for c in chunks]).astype(np.int64))
        embeds = self.decoder.embed_tokens(ids.to(self.device, non_blocking=True))
        positions, offset = [], 0
        for c, state, n in zip(chunks, states, lens, strict=True):
            positions.append(state.chunk_positions(c.start, n))
            if state.images:
                state.place_images(
                    embeds[offset : offset + n], c.start, n, self.vision, self.encoder_cache
                )
            offset += n
        cos, sin = self.rotary.cos_sin(torch.cat(positions, dim=1).to(self.device), self.dtype)
        meta = build_meta(
            [c.slot for c in chunks],
            [c.start for c in chunks],
            lens,
            self.max_model_len,
            self.device,
            self.use_flash,
        )
        hidden = self.decoder(embeds, cos, sin, self.kv, meta)
        return self._outputs(chunks, lens, hidden)

    def _is_decode(self, chunks: list[Chunk], states: list[RequestState]) -> bool:
        """One generated token per chunk (past the prompt: no image placeholders), and few
        enough chunks for a captured graph."""
        assert self.graphs is not None
        return len(chunks) <= self.graphs.max_batch and all(
            c.token_ids.size == 1 and c.wants_logits and c.start >= s.prompt_len
            for c, s in zip(chunks, states, strict=True)
        )

    def _decode_graphed(self, chunks: list[Chunk], states: list[RequestState]) -> torch.Tensor:
        assert self.graphs is not None
        return self.graphs.run(
            [int(c.token_ids[0]) for c in chunks],
            [c.start + s.rope_delta for c, s in zip(chunks, states, strict=True)],
            [c.slot for c in chunks],
            [c.start for c in chunks],
        )

    def _outputs(self, chunks: list[Chunk], lens: list[int], hidden: torch.Tensor) -> StepResult:
        ends = np.cumsum(lens)
        rows = [int(end) - 1 for c, end in zip(chunks, ends, strict=True) if c.wants_logits]
        logits = self.decoder.logits(hidden[rows]) if rows else torch.empty(0, self.spec.vocab_size)
        pooled: dict[str, np.ndarray] = {}
        for c, end, n in zip(chunks, ends, lens, strict=True):
            if not c.wants_pooled or c.request.pooling is None:
                continue
            if c.request.pooling.pooling == "last":
                vec = hidden[int(end) - 1]
            elif c.start == 0 and n == c.request.prompt_token_ids.size:
                vec = hidden[int(end) - n : int(end)].float().mean(0)
            else:
                raise ValueError(
                    f"mean pooling of {c.request.request_id} needs its whole prompt in one chunk"
                )
            pooled[c.request.request_id] = vec.float().cpu().numpy()
        return StepResult(logits=logits, pooled=pooled)

    def release(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            state.release(self.encoder_cache)

    def reset_encoder_cache(self) -> None:
        self.encoder_cache.clear()
