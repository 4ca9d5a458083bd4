"""The runner of decoder models (Qwen2 / Qwen2.5 / Llama / Qwen2-VL / Qwen2.5-VL).

One step: encode the step's images (one batched vision call, ``image_step``), embed the
concatenated new tokens of all chunks, place image embeddings, compute positions (1-D or
M-RoPE), run the decoder over the per-slot KV cache, and return last-token logits (or greedy
ids) and pooled hidden states for the chunks that want them. Everything is queued on the device;
nothing waits for the GPU. A failure inside one request's work (its state, its images) leaves
that request out of the step and comes back in ``StepResult.failed``; only a failure of the
batched forward itself raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult
from engine_core.model import step_inputs
from engine_core.model.attention import build_meta, can_use_flash
from engine_core.model.cuda_graphs import capture_decode_graphs
from engine_core.model.encoder_cache import EncoderCache
from engine_core.model.host import to_device
from engine_core.model.image_step import encode_images
from engine_core.model.kernels import Kernels
from engine_core.model.kv_cache import allocate, bytes_per_token, count_slots
from engine_core.model.loader import iter_tensors
from engine_core.model.memory import cuda_kv_budget
from engine_core.model.pixels import PixelInput
from engine_core.model.qwen2 import Decoder
from engine_core.model.request_state import RequestState
from engine_core.model.rope import RotaryEmbedding
from engine_core.model.runner import ModelRunner, context_length, step_token_budget
from engine_core.model.spec import DecoderSpec, ModelSpec
from engine_core.model.vision import VisionEncoder
from ipc.config import EngineConfig
from ipc.messages import EngineRequest, RequestError

logger = logging.getLogger(__name__)

_POOLINGS = ("last", "mean")


class DecoderRunner(ModelRunner):
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        assert spec.decoder is not None
        self.spec: DecoderSpec = spec.decoder
        self.device, self.dtype = device, dtype
        self.use_flash = can_use_flash(device, dtype)
        self.max_model_len = context_length(config, self.spec.max_position_embeddings)
        self.max_num_batched_tokens = step_token_budget(config, device)
        is_fast = self._use_graphs(config)
        self.kernels = Kernels.compiled(device, dtype) if is_fast else Kernels.eager()
        self.decoder, self.vision = self._load(config, model_dir)
        self.rotary = RotaryEmbedding(
            self.spec.text_config, self.spec.head_dim, self.spec.mrope_section
        ).to(device)
        self.encoder_cache = EncoderCache(config.encoder_cache_bytes)
        self.states: dict[str, RequestState] = {}
        #: requests whose work failed, left out of every step until they are released
        self._failed: dict[str, RequestError] = {}
        per_token = bytes_per_token(self.spec, dtype)
        budget = (
            config.cpu_kv_cache_bytes
            if device.type == "cpu"
            else cuda_kv_budget(self, config, is_fast)
        )
        num_slots = count_slots(budget, config.max_num_seqs, self.max_model_len, per_token)
        max_num_seqs = min(num_slots, config.max_num_seqs)
        self.kv = allocate(self.spec, num_slots, self.max_model_len, dtype, device)
        #: the id last sampled for each slot: the next step's decodes read it on the device
        self.last_tokens = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.graphs = None
        if is_fast:
            self.graphs = capture_decode_graphs(
                self.decoder,
                self.rotary,
                self.kv,
                self.last_tokens,
                self.max_model_len,
                max_num_seqs,
                dtype,
                triton_attention=config.decode_attention == "triton",
            )
        self.facts = RunnerFacts(
            model_dir=model_dir,
            max_model_len=self.max_model_len,
            vocab_size=self.spec.vocab_size,
            eos_token_ids=self.spec.eos_token_ids,
            num_slots=num_slots,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            supports_images=self.vision is not None,
            supports_embeddings=True,
            supports_generation=True,
            poolings=_POOLINGS,
            image_token_id=self.spec.image_token_id,
            pixel_dtype=self.vision.pixel_input.wire_dtype if self.vision else "float32",
            image_merge=self.vision.merge_size if self.vision else 1,
            image_patch_dim=self.vision.patch_dim if self.vision else 0,
            image_frame_dim=self.vision.pixel_input.frame_dim if self.vision else 0,
        )

    def _use_graphs(self, config: EngineConfig) -> bool:
        return self.device.type == "cuda" and self.use_flash and not config.enforce_eager

    @torch.no_grad()
    def _load(self, config: EngineConfig, model_dir: str) -> tuple[Decoder, VisionEncoder | None]:
        """The decoder and, for VL models, the vision tower, with the checkpoint's weights."""
        # Built on the meta device: every parameter is then loaded from the checkpoint, so
        # random initialisation would be wasted work.
        with torch.device("meta"):
            decoder = Decoder(self.spec, self.kernels)
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
                self.spec.model_type,
                self.spec.vision_config,
                self.dtype,
                self.device,
                self.kernels,
                pixels,
            )
            vision.load_weights([t for t in tensors if t.key.startswith("visual.")], model_dir)
        return decoder.eval(), vision

    def admit(self, request: EngineRequest) -> None:
        self._new_state(request)

    def has_image(self, content_hash: str) -> bool:
        return content_hash in self.encoder_cache

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
                        f"image {im.content_hash!r} was evicted from the encoder cache while "
                        "the request was preempted; send the request again"
                    )
        return state

    @torch.no_grad()
    def execute(
        self, chunks: list[Chunk], *, encodes: Sequence[ImageRef] = (), greedy: bool = False
    ) -> StepResult:
        self._check_bounds(chunks)
        failed: dict[str, RequestError] = {}
        states = self._states([c.request for c in chunks] + [r.request for r in encodes], failed)
        wanted = [
            (states[r.request.request_id], r.index)
            for r in encodes
            if r.request.request_id in states
        ]
        for c in chunks:
            state = states.get(c.request.request_id)
            if state is not None:
                wanted += [(state, i) for i in state.touched(c.start, int(c.token_ids.size))]
        encode_images(self.vision, self.encoder_cache, wanted, failed)
        self._failed.update(failed)
        live = []
        for c in chunks:
            rid = c.request.request_id
            if rid not in self._failed and (problem := states[rid].problem(c)):
                self._failed[rid] = RequestError(500, problem)
            if rid in self._failed:
                failed[rid] = self._failed[rid]
            else:
                live.append(c)
        result = self._forward(live, [states[c.request.request_id] for c in live], greedy)
        result.failed = failed
        return result

    def _check_bounds(self, chunks: list[Chunk]) -> None:
        num_slots = self.kv.shape[2]
        for c in chunks:
            n = int(c.token_ids.size)
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

    def _states(
        self, requests: list[EngineRequest], failed: dict[str, RequestError]
    ) -> dict[str, RequestState]:
        states: dict[str, RequestState] = {}
        for request in requests:
            rid = request.request_id
            if rid in states or rid in self._failed or rid in failed:
                continue
            try:
                states[rid] = self._state(request)
            except RuntimeError as exc:
                logger.error("request %s cannot run: %s", rid, exc)
                failed[rid] = RequestError(503, str(exc))
        return states

    def _forward(self, chunks: list[Chunk], states: list[RequestState], greedy: bool) -> StepResult:
        if not chunks:
            empty = torch.empty(0, self.spec.vocab_size, device=self.device)
            return StepResult(
                logits=None if greedy else empty, token_ids=empty[:, 0].long() if greedy else None
            )
        if self.graphs is not None and self._is_decode(chunks, states):
            out = self.graphs.run(
                [int(c.token_ids[0]) if not c.feeds_sampled else 0 for c in chunks],
                [c.start + s.rope_delta for c, s in zip(chunks, states, strict=True)],
                [c.slot for c in chunks],
                [c.start for c in chunks],
                [c.feeds_sampled for c in chunks],
                greedy,
            )
            return StepResult(logits=None, token_ids=out) if greedy else StepResult(logits=out)
        embeds = self.decoder.embed_tokens(step_inputs.token_ids(chunks, self.last_tokens))
        offset = 0
        for c, state in zip(chunks, states, strict=True):
            n = int(c.token_ids.size)
            if state.images:
                state.place_images(embeds[offset : offset + n], c.start, n)
            offset += n
        cos, sin = self.rotary.cos_sin(
            step_inputs.positions(chunks, states, self.device), self.dtype
        )
        lens = [int(c.token_ids.size) for c in chunks]
        meta = build_meta(
            [c.slot for c in chunks],
            [c.start for c in chunks],
            lens,
            self.max_model_len,
            self.device,
            self.use_flash,
        )
        hidden = self.decoder(embeds, cos, sin, self.kv, meta)
        return self._outputs(chunks, hidden, greedy)

    def _is_decode(self, chunks: list[Chunk], states: list[RequestState]) -> bool:
        """One generated token per chunk (past the prompt: no image placeholders), and few
        enough chunks for a captured graph."""
        assert self.graphs is not None
        return len(chunks) <= self.graphs.max_batch and all(
            c.token_ids.size == 1 and c.wants_logits and c.start >= s.prompt_len
            for c, s in zip(chunks, states, strict=True)
        )

    def _outputs(self, chunks: list[Chunk], hidden: torch.Tensor, greedy: bool) -> StepResult:
        rows = step_inputs.last_rows(chunks, self.device)
        logits = self.decoder.logits(hidden.index_select(0, rows))
        pooled: dict[str, torch.Tensor] = {}
        ends = np.cumsum([c.token_ids.size for c in chunks])
        for c, end in zip(chunks, ends, strict=True):
            pooling = c.request.pooling
            if not c.wants_pooled or pooling is None:
                continue
            n = int(c.token_ids.size)
            if pooling.pooling == "last":
                vec = hidden[int(end) - 1]
            else:
                vec = hidden[int(end) - n : int(end)].float().mean(0)
            pooled[c.request.request_id] = vec.float()
        if not greedy:
            return StepResult(logits=logits, pooled=pooled)
        token_ids = logits.argmax(dim=-1)
        self.feed([c.slot for c in chunks if c.wants_logits], token_ids)
        return StepResult(logits=None, token_ids=token_ids, pooled=pooled)

    def feed(self, slots: list[int], token_ids: torch.Tensor) -> None:
        """Keep ``token_ids[i]`` (device) as the id last sampled for ``slots[i]``."""
        if slots:
            index = to_device(np.asarray(slots, dtype=np.int64), self.device)
            self.last_tokens.index_copy_(0, index, token_ids)

    def release(self, request_id: str) -> None:
        self._failed.pop(request_id, None)
        state = self.states.pop(request_id, None)
        if state is not None:
            state.release(self.encoder_cache)

    def reset_encoder_cache(self) -> None:
        self.encoder_cache.clear()

    @property
    def encoder_cache_bytes(self) -> int:
        return self.encoder_cache.total_bytes
