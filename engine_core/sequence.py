"""The engine's record of one request: its tokens, its KV slot, and how far it has been computed.

The sequence is the single owner of per-request state in the engine process (the model runner
keeps only model-side state keyed by request id). Tokens live in one preallocated int32 buffer of
``prompt + max_tokens`` entries, so that a chunk is a slice of it, never a copy.
"""

from __future__ import annotations

import enum
import math
import time

import numpy as np
import torch

from engine_core.batch import images_by_offset
from ipc.messages import EngineRequest, PoolingParams, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One request inside the engine. ``num_computed`` tokens are in the KV slot or in a step
    already queued on the device; the tokens still to run are the rest of the prompt, or during
    decode the one token sampled last. ``num_inflight`` tokens have been asked of queued steps
    and are not back yet: they come after ``token_ids``, which holds only known tokens."""

    __slots__ = (
        "request",
        "client",
        "order",
        "status",
        "slot",
        "num_prompt_tokens",
        "num_tokens",
        "num_computed",
        "num_preemptions",
        "needs_check",
        "num_inflight",
        "image_spans",
        "num_encoded_images",
        "generator",
        "stop_ids",
        "stop_id_array",
        "_buffer",
        "added_at",
        "scheduled_at",
    )

    def __init__(self, request: EngineRequest, client: bytes, order: int) -> None:
        self.request = request
        #: ZeroMQ routing identity of the API server that sent the request: outputs go there.
        self.client = client
        #: Admission counter: breaks ties between equal (priority, arrival_time).
        self.order = order
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None
        prompt = request.prompt_token_ids
        self.num_prompt_tokens = int(prompt.shape[0])
        max_tokens = request.sampling.max_tokens if request.sampling is not None else 0
        self._buffer = np.empty(self.num_prompt_tokens + max_tokens, dtype=np.int32)
        self._buffer[: self.num_prompt_tokens] = prompt
        self.num_tokens = self.num_prompt_tokens
        self.num_computed = 0
        self.num_preemptions = 0
        #: True after a preemption until the scheduler validated and admitted the request again
        self.needs_check = False
        self.num_inflight = 0
        #: (offset, length, patches) of each image, in prompt order
        self.image_spans = [
            (item.offset, item.length, math.prod(item.grid_thw))
            for item in images_by_offset(request)
        ]
        #: images (a prefix of ``image_spans``) whose encoding is queued or done in the runner
        self.num_encoded_images = 0
        #: Generator of a seeded request, made by the sampler on its device at the first draw
        #: and kept (also across preemption), so the draws do not depend on the batch.
        self.generator: torch.Generator | None = None
        #: ``time.perf_counter()`` when the scheduler took the request, and when it first ran
        #: (``RequestOutput.queue_time`` / ``prefill_time``).
        self.added_at = time.perf_counter()
        self.scheduled_at: float | None = None
        # A client may send many stop token ids: the set (the scheduler's finish check) and
        # the index array (the sampler's min_tokens ban) are built once here, not every step.
        stop = request.sampling.stop_token_ids if request.sampling is not None else []
        self.stop_ids = frozenset(stop)
        self.stop_id_array = np.fromiter(self.stop_ids, dtype=np.int64, count=len(self.stop_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams | None:
        return self.request.sampling

    @property
    def pooling(self) -> PoolingParams | None:
        return self.request.pooling

    @property
    def rank(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then earlier arrival (as vLLM)."""
        return (self.request.priority, self.request.arrival_time, self.order)

    @property
    def token_ids(self) -> np.ndarray:
        """(num_tokens,) int32 view: prompt then generated tokens."""
        return self._buffer[: self.num_tokens]

    @property
    def output_ids(self) -> np.ndarray:
        """(num_output,) int32 view of the generated tokens."""
        return self._buffer[self.num_prompt_tokens : self.num_tokens]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens to run before the next token can be sampled (in-flight ones included)."""
        return self.num_tokens + self.num_inflight - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_pending > 1 or (self.num_output_tokens == 0 and self.num_inflight == 0)

    @property
    def is_done_asking(self) -> bool:
        """Every token max_tokens allows has been sampled or asked for."""
        params = self.sampling
        return (
            params is not None and self.num_output_tokens + self.num_inflight >= params.max_tokens
        )

    def chunk_tokens(self, start: int, n: int) -> np.ndarray:
        """(n,) int32 view of positions ``start .. start + n``; a position not known yet (an
        in-flight token) shows its value once ``append_token`` writes it."""
        return self._buffer[start : start + n]

    def append_token(self, token_id: int) -> None:
        self._buffer[self.num_tokens] = token_id
        self.num_tokens += 1
