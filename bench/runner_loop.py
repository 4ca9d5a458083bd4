"""Drive an engine in-process, without sockets: either the ModelRunner directly (the model side
alone), or the real engine loop (``EngineCore``: scheduler, pipeline, sampler, runner) with an
in-memory stand-in for the IO thread, which is what a served engine runs per step."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from engine_core.batch import Chunk
from engine_core.core import EngineCore
from engine_core.io_thread import Inbound, InboxEvent
from engine_core.model.runner import ModelRunner
from engine_core.sampler import Sampler
from engine_core.validation import validate_request
from ipc import messages
from ipc.config import EngineConfig
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
        error = validate_request(r, runner.facts, runner.has_image)
        if error:
            raise ValueError(error)
        runner.admit(r)
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
        assert logits is not None
        for row, i in enumerate(owners):
            last[i] = logits[row]
    return torch.stack([last[i] for i in range(len(requests))])


def release(runner: ModelRunner, requests: list[EngineRequest]) -> None:
    for r in requests:
        runner.release(r.request_id)


@dataclass
class EngineRun:
    """What the engine loop sent: every request's outputs, and when each step's batch left."""

    outputs: dict[str, list[messages.RequestOutput]] = field(default_factory=dict)
    #: (time.perf_counter() when sent, the batch), one per step that produced outputs
    batches: list[tuple[float, messages.OutputBatch]] = field(default_factory=list)

    def tokens(self, request_id: str) -> list[int]:
        return [t for o in self.outputs[request_id] for t in o.new_token_ids]

    def decode_step_s(self) -> float:
        """Seconds per step once every request is decoding: from the batch that completed the
        last first token to the batch before the first finish."""
        firsts = [
            next(i for i, (_, b) in enumerate(self.batches) if _has_token(b, rid))
            for rid in self.outputs
        ]
        ends = [
            next(i for i, (_, b) in enumerate(self.batches) if _finishes(b, rid))
            for rid in self.outputs
        ]
        start, stop = max(firsts), min(ends) - 1
        if stop <= start:
            raise ValueError("no step had every request decoding")
        return (self.batches[stop][0] - self.batches[start][0]) / (stop - start)


def _has_token(batch: messages.OutputBatch, request_id: str) -> bool:
    return any(o.request_id == request_id and o.new_token_ids for o in batch.outputs)


def _finishes(batch: messages.OutputBatch, request_id: str) -> bool:
    return any(o.request_id == request_id and o.finish_reason for o in batch.outputs)


class _MemoryIO:
    """The IO thread's part for an in-process engine: an inbox, and a SHUTDOWN queued once
    every request has finished."""

    def __init__(self, run: EngineRun, request_ids: set[str]) -> None:
        self.inbox: queue.SimpleQueue[InboxEvent] = queue.SimpleQueue()
        self._run, self._open = run, set(request_ids)

    def send(self, client: bytes | None, msg: msgspec.Struct) -> None:
        if not isinstance(msg, messages.OutputBatch):
            return
        self._run.batches.append((time.perf_counter(), msg))
        for out in msg.outputs:
            self._run.outputs.setdefault(out.request_id, []).append(out)
            if out.finish_reason is not None:
                self._open.discard(out.request_id)
        if not self._open:
            self.inbox.put(Inbound(b"", messages.Shutdown("all requests finished")))

    def set_load(self, load: messages.EngineLoad) -> None:
        pass


def run_engine(
    runner: ModelRunner, config: EngineConfig, requests: list[EngineRequest]
) -> EngineRun:
    """Serve ``requests`` (all submitted at once) through a real ``EngineCore`` on ``runner``
    until each has finished; raises if any of them ended with an error."""
    run = EngineRun()
    io = _MemoryIO(run, {r.request_id for r in requests})
    core = EngineCore(config, runner, Sampler(config.seed, runner.device), io)
    for r in requests:
        io.inbox.put(Inbound(b"bench", r))
    core.run()
    errors = {rid: outs[-1].error for rid, outs in run.outputs.items() if outs[-1].error}
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(requests)} requests failed: {errors}")
    return run
