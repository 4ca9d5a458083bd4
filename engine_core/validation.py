"""Checks the engine makes on every request before admitting it (model-independent part).

msgspec already enforced the field types and ``Meta`` ranges when the frame was decoded; this
adds what depends on the engine: lengths, vocabulary, what the loaded model supports. The
model-specific checks (image items) are ``ModelRunner.check_request``.
"""

from __future__ import annotations

import numpy as np

from engine_core.batch import RunnerFacts
from ipc.messages import EngineRequest

#: Most alternatives a request may ask logprobs for (vLLM's and OpenAI's default limit).
MAX_LOGPROBS = 20


def validate_request(
    request: EngineRequest, facts: RunnerFacts, allow_priority: bool = False
) -> str | None:
    """None if the engine can take ``request``, else the 400 message. API servers make the
    same checks before a response starts; these are the backstop."""
    if (request.sampling is None) == (request.pooling is None):
        return "exactly one of sampling and pooling parameters must be set"
    if request.priority != 0 and not allow_priority:
        return f"priority {request.priority} needs --scheduling-policy priority"
    if request.sampling is not None and not facts.supports_generation:
        return f"model {facts.model_name!r} does not support generation"
    if request.pooling is not None and not facts.supports_embeddings:
        return f"model {facts.model_name!r} does not support embeddings"
    prompt = request.prompt_token_ids
    if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
        return f"prompt token ids must be a 1-D integer array, got {prompt.dtype}{prompt.shape}"
    num_prompt = int(prompt.shape[0])
    if num_prompt == 0:
        return "the prompt is empty"
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= facts.vocab_size:
        bad = low if low < 0 else high
        return f"prompt token id {bad} is outside the vocabulary [0, {facts.vocab_size})"
    if request.sampling is None:
        if num_prompt > facts.max_model_len:
            return (
                f"the prompt has {num_prompt} tokens, more than the model's maximum "
                f"context length of {facts.max_model_len}"
            )
        return None
    params = request.sampling
    if num_prompt + params.max_tokens > facts.max_model_len:
        return (
            f"the prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) is "
            f"{num_prompt + params.max_tokens} tokens, more than the model's maximum context "
            f"length of {facts.max_model_len}"
        )
    if params.min_tokens > params.max_tokens:
        return f"min_tokens ({params.min_tokens}) is larger than max_tokens ({params.max_tokens})"
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < facts.vocab_size]
    if bad_stop:
        return f"stop token ids {bad_stop} are outside the vocabulary [0, {facts.vocab_size})"
    if params.seed is not None and not -(1 << 63) <= params.seed < (1 << 64):
        return f"seed {params.seed} does not fit in 64 bits"
    if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
        return f"logprobs ({params.logprobs}) must be at most {MAX_LOGPROBS}"
    return None
