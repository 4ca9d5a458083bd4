"""Engine steps with one step in flight: step k+1 is scheduled and queued on the device before
the loop waits for the tokens of step k.

One ``advance``: schedule step k+1 (host); queue it (``Runner.execute``: images, decoder, and
for plain greedy steps the argmax, all on the device); wait for step k's results and resolve
them (``Scheduler.update``: outputs, stop checks, slots freed); only then queue step k+1's
sampling if the runner did not pick its tokens (the sampler may need step k's tokens for
penalties), feed the sampled ids to the runner for step k+2's decodes, and start a
non-blocking copy of the results to pinned host memory. While the host waits for step k and
does its bookkeeping, the GPU is already running step k+1.

What keeps this exact: tokens are emitted only once resolved, in order; a request that
finishes at step k has its step k+1 result dropped (one wasted row, never an extra token);
an abort between steps drops the request's in-flight results the same way; a slot freed at
step k is reused only by work queued after step k+1 (one stream, in order); and preemption,
which folds a request's known tokens into its prompt, first drains the step in flight
(``Scheduler.needs_sync``). On the CPU the same order runs synchronously.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult
from engine_core.model.host import HostCopy
from engine_core.sampler import Sampler, SamplerOutput, is_plain_greedy
from engine_core.scheduler import ScheduledStep, Scheduler
from engine_core.sequence import Sequence
from engine_core.step_stats import StepStats
from ipc.messages import EngineRequest, TokenLogprobs


class Runner(Protocol):
    """What the loop needs of ``engine_core.model.runner.ModelRunner``."""

    facts: RunnerFacts
    device: torch.device

    def admit(self, request: EngineRequest) -> None: ...

    def has_image(self, content_hash: str) -> bool: ...

    def execute(
        self, chunks: list[Chunk], *, encodes: list[ImageRef] = ..., greedy: bool = ...
    ) -> StepResult: ...

    def feed(self, slots: list[int], token_ids: torch.Tensor) -> None: ...

    def release(self, request_id: str) -> None: ...

    def reset_encoder_cache(self) -> None: ...


@dataclass(slots=True)
class _InFlight:
    """A queued step and the host copy of its results."""

    step: ScheduledStep
    result: StepResult
    sampled: list[Sequence]  # the rows of its tokens, in order
    slots: list[int]  # their slots when scheduled (a finished request's slot may be free now)
    draw: SamplerOutput | None = None
    copy: HostCopy | None = None
    pooled_ids: list[str] = field(default_factory=list)


class Pipeline:
    """Drives scheduler, runner and sampler one step ahead of the results."""

    def __init__(self, scheduler: Scheduler, runner: Runner, sampler: Sampler) -> None:
        self.scheduler = scheduler
        self._runner = runner
        self._sampler = sampler
        self._in_flight: _InFlight | None = None
        self.stats = StepStats()
        self._waited_s = 0.0  # this advance's wait for results on the device

    @property
    def is_busy(self) -> bool:
        """A step is queued whose results are not resolved yet."""
        return self._in_flight is not None

    def advance(self) -> bool:
        """Schedule and queue the next step, then resolve the one before it. False when there
        was nothing to do."""
        started, self._waited_s = time.perf_counter(), 0.0
        if self._in_flight is not None and self.scheduler.needs_sync():
            self.drain()
        step = self.scheduler.schedule()
        queued = self._queue(step) if step.chunks or step.encodes else None
        resolved = self._in_flight is not None
        self.drain()
        if queued is not None:
            self._finish_queueing(queued)
            self._in_flight = queued
            self.stats.record(step, time.perf_counter() - started, self._waited_s)
        return queued is not None or resolved

    def drain(self) -> None:
        """Resolve the step in flight, if any."""
        if self._in_flight is not None:
            self._resolve(self._in_flight)
            self._in_flight = None

    def _queue(self, step: ScheduledStep) -> _InFlight:
        rows = [(c, s) for c, s in zip(step.chunks, step.seqs, strict=True) if c.wants_logits]
        result = self._runner.execute(
            step.chunks,
            encodes=step.encodes,
            greedy=bool(rows) and is_plain_greedy([s for _, s in rows]),
        )
        rows = [(c, s) for c, s in rows if s.request_id not in result.failed]
        return _InFlight(step, result, [s for _, s in rows], [c.slot for c, _ in rows])

    def _finish_queueing(self, item: _InFlight) -> None:
        """Sampling (when the runner did not pick the tokens), feeding, and the host copy."""
        result = item.result
        tensors: list[torch.Tensor] = []
        if item.sampled:
            if result.token_ids is None:
                assert result.logits is not None
                item.draw = self._sampler.sample(
                    result.logits, item.sampled, self._runner.facts.eos_token_ids
                )
                self._runner.feed(item.slots, item.draw.token_ids)
                tensors = item.draw.tensors()
            else:
                tensors = [result.token_ids]
        item.pooled_ids = list(result.pooled)
        tensors += [result.pooled[rid] for rid in item.pooled_ids]
        item.copy = HostCopy(tensors)

    def _resolve(self, item: _InFlight) -> None:
        assert item.copy is not None
        waiting = time.perf_counter()
        host = item.copy.wait()
        self._waited_s += time.perf_counter() - waiting
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        used = 0
        if item.sampled:
            if item.draw is not None:
                used = len(item.draw.tensors())
                tokens, logprobs = item.draw.resolve(host[:used])
            else:
                used = 1
                tokens, logprobs = host[0].tolist(), [None] * len(item.sampled)
        pooled: dict[str, np.ndarray] = {
            rid: host[used + i].numpy() for i, rid in enumerate(item.pooled_ids)
        }
        self.scheduler.update(item.step, tokens, logprobs, pooled, item.result.failed)
