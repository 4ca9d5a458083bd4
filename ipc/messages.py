"""Every message that crosses the API-server <-> engine-core socket.

Frames on the wire: ``[kind byte][msgpack body][aux buffer 0][aux buffer 1]...`` (see
``ipc.codec``). Structs are array-like (field order is the schema), so new fields go at the
end and always carry a default. Array fields (``numpy.ndarray`` / ``torch.Tensor``) are encoded
by the codec as ``(dtype, shape, aux index)`` references to their own zero-copy frame, or inline
when small.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import torch

PROTOCOL_VERSION = 1


class Kind(enum.IntEnum):
    """First frame of every multipart message: which struct the body holds."""

    HELLO = 1  # api server -> engine
    READY = 2  # engine -> api server (answer to HELLO)
    ADD = 3  # api server -> engine
    ABORT = 4  # api server -> engine
    UTILITY = 5  # api server -> engine
    UTILITY_RESULT = 6  # engine -> api server
    OUTPUTS = 7  # engine -> api server
    ENGINE_DEAD = 8  # engine -> api server
    SHUTDOWN = 9  # launcher/api server -> engine


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of every wire struct. Value structs (params, load) add ``frozen=True``: msgspec
    allows a frozen subclass, mypy's dataclass rules do not (hence their ``type: ignore``)."""


NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class SamplingParams(_Msg, frozen=True):  # type: ignore[misc]
    """How to pick each new token. ``top_k=0`` and ``min_p=0`` disable those filters;
    ``temperature=0`` is greedy. ``logprobs``: None for none, k >= 0 for the sampled token's
    logprob plus the k most likely alternatives."""

    max_tokens: PosInt = 16
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: NonNegInt = 0
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    logprobs: NonNegInt | None = None


class PoolingParams(_Msg, frozen=True):  # type: ignore[misc]
    """Ask for one embedding of the prompt instead of generated tokens."""

    pooling: Literal["last", "mean", "cls"] = "last"
    normalize: bool = True


class MultiModalItem(_Msg):
    """One image of a request, already run through the model's image processor.

    ``pixel_values`` is None when the API server knows the engine already holds the encoder
    output for ``content_hash``. ``offset``/``length`` locate the item's placeholder tokens in
    ``EngineRequest.prompt_token_ids``.
    """

    content_hash: str
    modality: Literal["image"]
    grid_thw: tuple[int, int, int]
    offset: NonNegInt
    length: PosInt
    pixel_values: torch.Tensor | None = None


class EngineRequest(_Msg):
    """ADD: one generation or pooling request. Exactly one of sampling / pooling is set.

    ``prompt_token_ids`` is a 1-D int32 array (a zero-copy frame, not a msgpack int list).
    ``arrival_time`` and ``deadline`` are wall-clock seconds (time.time()).
    """

    request_id: str
    prompt_token_ids: np.ndarray
    mm_items: list[MultiModalItem] = []
    sampling: SamplingParams | None = None
    pooling: PoolingParams | None = None
    arrival_time: float = 0.0
    priority: int = 0
    deadline: float | None = None


class AbortRequests(_Msg):
    """ABORT: stop these requests and free their KV; unknown ids are ignored."""

    request_ids: list[str]


class UtilityCall(_Msg):
    """UTILITY: an out-of-band query to the engine, answered by a UtilityResult with the same
    ``call_id``. ``op`` names a fixed operation; there is no generic method dispatch."""

    call_id: int
    op: Literal["ping", "stats", "reset_encoder_cache"]


class UtilityResult(_Msg):
    """UTILITY_RESULT: ``result`` on success, ``error`` on failure."""

    call_id: int
    result: dict[str, Any] = {}
    error: str | None = None


class Hello(_Msg):
    """HELLO: first message of an API server on a (re)connected socket. The engine aborts any
    request still owned by a previous holder of this client index."""

    client_index: NonNegInt
    pid: int
    protocol_version: int = PROTOCOL_VERSION


class Ready(_Msg):
    """READY: what API servers need to know about the engine, sent in answer to HELLO.
    ``model`` is the directory the engine loaded: API servers load the same tokenizer and
    processor from it, so the two sides can never disagree on the vocabulary."""

    protocol_version: int
    model: str
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    max_num_seqs: int
    supports_images: bool
    supports_embeddings: bool
    supports_generation: bool
    eos_token_ids: list[int] = []
    engine_pid: int = 0
    #: How API servers send pixel patches: "uint8" straight from the image processor run
    #: without rescaling and normalizing (the engine does both on its device, exactly), or
    #: normalized in this dtype, the vision tower's. Either is the smallest exact form.
    pixel_dtype: Literal["float32", "bfloat16", "float16", "uint8"] = "float32"
    image_token_id: int | None = None
    #: ``EngineConfig.scheduling_policy``: API servers refuse a nonzero priority under fcfs.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    #: uint8 patches of a still image may hold its one frame, not the temporal patch's copies
    #: of it (the processor run with ``temporal_patch_size=1``): the engine repeats it on its
    #: device, and every hop on the way carries half the bytes. Last, as every field added to
    #: an array-like struct: a peer of the release before decodes READY without it.
    uint8_one_frame: bool = False


class EngineLoad(_Msg, frozen=True):  # type: ignore[misc]
    """Snapshot of engine load, carried by every output batch (admission control, metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    #: Prompt tokens of the waiting requests (what their prefill still costs).
    num_waiting_tokens: int = 0
    #: Requests that started running since the engine started, preemptions counted again: API
    #: servers derive the rate the engine drains its queue at from its growth.
    num_admitted: int = 0
    #: Bytes of image-encoder outputs the engine keeps (``--encoder-cache-bytes`` bounds the
    #: ones no request holds).
    encoder_cache_bytes: int = 0


class TokenLogprobs(_Msg):
    """Logprob of one sampled token and its ``top`` most likely alternatives."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class RequestError(_Msg):
    """Why the engine failed one request; ``status`` is the HTTP status the API server uses."""

    status: int
    message: str


class RequestOutput(_Msg):
    """New results for one request in one engine step (deltas, never the whole state)."""

    request_id: str
    new_token_ids: list[int] = []
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    embedding: np.ndarray | None = None
    error: RequestError | None = None
    #: On a request's first token only: seconds from the engine's scheduler taking it to its
    #: first step, and from that step to the token (encoding and prefill included).
    queue_time: float | None = None
    prefill_time: float | None = None


class OutputBatch(_Msg):
    """OUTPUTS: everything one engine step produced for one API server."""

    outputs: list[RequestOutput]
    load: EngineLoad = EngineLoad()


class EngineDead(_Msg):
    """ENGINE_DEAD: the engine hit a fatal error and will exit; fail everything in flight."""

    reason: str


class Shutdown(_Msg):
    """SHUTDOWN: stop the engine (sent by the launcher on a clean exit)."""

    reason: str = ""


#: The body struct for each kind (used by the codec to pick a decoder).
KIND_TYPES: dict[Kind, type[msgspec.Struct]] = {
    Kind.HELLO: Hello,
    Kind.READY: Ready,
    Kind.ADD: EngineRequest,
    Kind.ABORT: AbortRequests,
    Kind.UTILITY: UtilityCall,
    Kind.UTILITY_RESULT: UtilityResult,
    Kind.OUTPUTS: OutputBatch,
    Kind.ENGINE_DEAD: EngineDead,
    Kind.SHUTDOWN: Shutdown,
}
TYPE_KINDS: dict[type[msgspec.Struct], Kind] = {t: k for k, t in KIND_TYPES.items()}

#: Messages an API server may send to the engine, and the engine to an API server.
TO_ENGINE = (Kind.HELLO, Kind.ADD, Kind.ABORT, Kind.UTILITY, Kind.SHUTDOWN)
FROM_ENGINE = (Kind.READY, Kind.OUTPUTS, Kind.UTILITY_RESULT, Kind.ENGINE_DEAD)
