"""OpenAI request and response bodies as msgspec structs.

Requests are decoded straight into these types (wrong types become a 400 naming the field);
unknown fields are ignored, except the ones listed in ``routes_common.reject_unsupported`` whose
silent omission would change the answer. Responses are encoded from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
#: Integers passed on to the engine travel as 64-bit msgpack integers: bounded here, a larger
#: value is the client's 400 instead of an encoding failure (a 500). Seeds: vLLM's range too.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
#: Client-controlled sizes that cost work on every generated token: a request past these gets
#: a 400 naming the limit (msgspec's "Expected `array` of length <= 32 - at `$.stop`").
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
StopString = Annotated[str, Meta(max_length=MAX_STOP_CHARS)]


class _Req(msgspec.Struct, kw_only=True):
    pass


class ImageUrl(_Req, kw_only=True):
    url: str
    detail: str | None = None


class TextPart(_Req, tag_field="type", tag="text", kw_only=True):
    text: str


class ImagePart(_Req, tag_field="type", tag="image_url", kw_only=True):
    image_url: ImageUrl


ContentPart = TextPart | ImagePart


class ChatMessage(_Req, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Req, kw_only=True):
    include_usage: bool = False


class _SamplingFields(_Req):
    """Fields shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int64 | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: Annotated[int, Meta(ge=-1, le=INT64_MAX)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0)] = 1.0
    min_tokens: Annotated[int, Meta(ge=0, le=INT64_MAX)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Int64], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    priority: Int64 = 0


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


PromptInput = str | list[str | int | list[int]]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: PromptInput
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class EmbeddingRequest(_Req, kw_only=True):
    model: str
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Req, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Req, kw_only=True):
    model: str | None = None
    tokens: list[Annotated[int, Meta(ge=0)]]


class _Resp(msgspec.Struct, kw_only=True, omit_defaults=False):
    pass


class PromptTokensDetails(_Resp, kw_only=True):
    cached_tokens: int = 0


class Usage(_Resp, kw_only=True):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Resp, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(_Resp, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Resp, kw_only=True):
    content: list[ChatLogprob]


class AssistantMessage(_Resp, kw_only=True):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Resp, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Resp, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Resp, omit_defaults=True, kw_only=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Resp, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Resp, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Resp, kw_only=True):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(_Resp, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(_Resp, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(_Resp, kw_only=True):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingList(_Resp, kw_only=True):
    data: list[EmbeddingData]
    model: str
    usage: Usage
    object: str = "list"


class ModelCard(_Resp, kw_only=True):
    id: str
    created: int
    owned_by: str = "fanin"
    root: str = ""
    max_model_len: int = 0
    object: str = "model"


class ModelList(_Resp, kw_only=True):
    data: list[ModelCard]
    object: str = "list"
