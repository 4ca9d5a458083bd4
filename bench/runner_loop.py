"""Drive an engine ModelRunner directly (no scheduler, no sockets): the model side alone, for
benchmarks and the GPU correctness check."""

from __future__ import annotations

import numpy as np
import torch

from engine_core.batch import Chunk
from engine_core.model.runner import ModelRunner
from ipc.messages import EngineRequest, SamplingParams


def make_request(
    request_id: str, token_ids: list[int] | np.ndarray, max_tokens: int
) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=np.asarray(token_ids, dtype=np.int32),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def prefill(runner: ModelRunner, requests: list[EngineRequest], budget: int) -> torch.Tensor:
    """Prefill every request into slots 0..len-1 in steps of at most ``budget`` tokens; returns
    the last-token logits, (len(requests), vocab)."""
    for r in requests:
        error = runner.check_request(r)
        if error:
            raise ValueError(error)
    done = [0] * len(requests)
    last: dict[int, torch.Tensor] = {}
    while any(d < len(r.prompt_token_ids) for d, r in zip(done, requests, strict=True)):
        chunks, owners, left = [], [], budget
        for i, r in enumerate(requests):
            n = min(len(r.prompt_token_ids) - done[i], left)
            if n <= 0:
                continue
            end = done[i] + n
            chunks.append(
                Chunk(
                    r, i, done[i], r.prompt_token_ids[done[i] : end], end == len(r.prompt_token_ids)
                )
            )
            if end == len(r.prompt_token_ids):
                owners.append(i)
            done[i], left = end, left - n
        logits = runner.execute(chunks).logits
        for row, i in enumerate(owners):
            last[i] = logits[row]
    return torch.stack([last[i] for i in range(len(requests))])


def decode_greedy(
    runner: ModelRunner, requests: list[EngineRequest], first: torch.Tensor, steps: int
) -> list[list[int]]:
    """Greedy decode ``steps`` tokens after ``prefill``; returns the generated ids per request."""
    out = [[int(t)] for t in first.argmax(-1).tolist()]
    for _ in range(steps - 1):
        chunks = [
            Chunk(
                r,
                i,
                len(r.prompt_token_ids) + len(out[i]) - 1,
                np.asarray(out[i][-1:], np.int32),
                True,
            )
            for i, r in enumerate(requests)
        ]
        for i, t in enumerate(runner.execute(chunks).logits.argmax(-1).tolist()):
            out[i].append(int(t))
    return out


def release(runner: ModelRunner, requests: list[EngineRequest]) -> None:
    for r in requests:
        runner.release(r.request_id)
