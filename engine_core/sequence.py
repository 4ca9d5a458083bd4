"""The engine's record of one request: its tokens, its KV slot, and how far it has been computed.

The sequence is the single owner of per-request state in the engine process (the model runner
keeps only model-side state keyed by request id). Tokens live in one preallocated int32 buffer of
``prompt + max_tokens`` entries, so that a chunk is a slice of it, never a copy.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from ipc.messages import EngineRequest, PoolingParams, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One request inside the engine. ``num_computed`` tokens of ``token_ids`` are in the KV slot;
    the tokens still to run are ``token_ids[num_computed:]`` (the whole prompt at first, then
    during decode the one token sampled last step)."""

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
        "generator",
        "stop_ids",
        "stop_id_array",
        "_buffer",
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
        #: Generator of a seeded request, made by the sampler on its device at the first draw
        #: and kept (also across preemption), so the draws do not depend on the batch.
        self.generator: torch.Generator | None = None
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
        """Tokens to run before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_pending > 1 or self.num_output_tokens == 0

    def append_token(self, token_id: int) -> None:
        self._buffer[self.num_tokens] = token_id
        self.num_tokens += 1
