"""Continuous batching: which sequences run in the next step, with how many tokens each.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first (decodes,
then the next chunk of prompts being prefilled), then waiting sequences in (priority, arrival)
order, lower priority value first as in vLLM. Long prompts are split over steps when chunked
prefill is on. Pooling requests are prefilled in one chunk.

KV memory is one slot per running sequence, each slot holding ``max_model_len`` tokens, and
admission refuses ``prompt + max_tokens > max_model_len``: a running sequence therefore never runs
out of KV mid-decode, and the only reason to preempt is priority. A waiting request with strictly
better priority than the worst running one, when no slot is free, preempts it by recompute: the
victim's slot is freed and it goes back to waiting with its generated tokens folded into its
prompt, to be prefilled again later.

Pure Python over ``Sequence`` records: the runner is only asked to validate (``check_request``)
and to forget (``release``) requests, so the scheduler is testable without a model.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np

from engine_core.batch import Chunk, RunnerFacts
from engine_core.sequence import Sequence, SequenceStatus
from engine_core.validation import validate_request
from ipc.config import EngineConfig
from ipc.messages import EngineLoad, EngineRequest, RequestError, RequestOutput, TokenLogprobs

logger = logging.getLogger(__name__)


class RequestGate(Protocol):
    """The two runner calls the scheduler needs (``ModelRunner`` provides both)."""

    def check_request(self, request: EngineRequest) -> str | None: ...

    def release(self, request_id: str) -> None: ...


@dataclass(slots=True)
class ScheduledStep:
    """One step's work: ``chunks[i]`` belongs to ``seqs[i]``."""

    chunks: list[Chunk]
    seqs: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    """Owns every live ``Sequence`` and the KV slots. Only the busy loop calls it (no locks)."""

    def __init__(
        self,
        config: EngineConfig,
        facts: RunnerFacts,
        gate: RequestGate,
        emit: Callable[[bytes, RequestOutput], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.facts = facts
        self.max_num_seqs = min(config.max_num_seqs, facts.num_slots)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.allow_priority = config.scheduling_policy == "priority"
        self._gate = gate
        self._emit = emit
        self._clock = clock
        self._order = itertools.count()
        self._free_slots = list(range(facts.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: list[Sequence] = []  # sorted by Sequence.rank
        self.running: list[Sequence] = []
        self._live: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_admitted = 0

    def add(self, request: EngineRequest, client: bytes) -> bool:
        """Admit a request, or answer it at once with a 400 error output. True if admitted."""
        message = validate_request(request, self.facts, self.allow_priority)
        if message is None and request.request_id in self._live:
            message = f"request id {request.request_id!r} is already running"
        if message is None:
            message = self._check(request)
        if message is not None:
            self._emit(
                client,
                RequestOutput(
                    request.request_id,
                    finish_reason="error",
                    num_prompt_tokens=request.prompt_token_ids.size,
                    error=RequestError(400, message),
                ),
            )
            return False
        seq = Sequence(request, client, next(self._order))
        self._live[seq.request_id] = seq
        self._enqueue(seq)
        return True

    def abort(self, request_ids: Iterable[str]) -> list[str]:
        """Drop these requests and free their slots; unknown ids are ignored. No output is sent:
        the API server asked for it (or is gone)."""
        aborted = []
        for request_id in request_ids:
            seq = self._live.get(request_id)
            if seq is not None:
                self._remove(seq)
                aborted.append(request_id)
        return aborted

    def abort_client(self, client: bytes) -> list[str]:
        """Drop every request of one API server (it died or was replaced)."""
        return self.abort([s.request_id for s in self._live.values() if s.client == client])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Pick this step's chunks. Expired waiting requests are finished here."""
        self._expire_deadlines()
        self._preempt_for_priority()
        step = ScheduledStep([], [])
        budget = self.max_num_batched_tokens
        # Decodes first (one token each, latency-critical), then chunks of running prefills.
        for seq in sorted(self.running, key=lambda s: s.is_prefill):
            if budget == 0:
                break
            budget -= self._add_chunk(step, seq, min(seq.num_pending, budget))
        while self.waiting and budget > 0 and self._has_free_slot():
            seq = self.waiting[0]
            take = self._admission_size(seq, budget)
            if take == 0:
                break
            if seq.num_preemptions and (message := self._check(seq.request)):
                self._finish(seq, "error", RequestError(400, message))
                continue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
            self.num_admitted += 1
            budget -= self._add_chunk(step, seq, take)
        return step

    def update(
        self,
        step: ScheduledStep,
        sampled: list[int],
        logprobs: list[TokenLogprobs | None],
        pooled: dict[str, np.ndarray],
    ) -> None:
        """Apply one executed step and emit its deltas: ``sampled[i]`` and ``logprobs[i]``
        belong to the i-th chunk that wanted logits, ``pooled`` maps request id -> embedding."""
        draws = iter(zip(sampled, logprobs, strict=True))
        for chunk, seq in zip(step.chunks, step.seqs, strict=True):
            seq.num_computed += len(chunk.token_ids)
            out = RequestOutput(seq.request_id, num_prompt_tokens=seq.num_prompt_tokens)
            if chunk.wants_pooled:
                out.embedding = _pooled_embedding(pooled[seq.request_id], seq)
                self._finish(seq, "stop", output=out)
            elif chunk.wants_logits:
                token, token_logprobs = next(draws)
                seq.append_token(token)
                out.new_token_ids = [token]
                out.logprobs = None if token_logprobs is None else [token_logprobs]
                reason = self._finish_reason(seq, token)
                if reason is None:
                    self._emit(seq.client, out)
                else:
                    self._finish(seq, reason, output=out)

    def load(self) -> EngineLoad:
        """Load snapshot for API servers. KV usage counts slots: a taken slot is capacity gone
        however full it is."""
        used = self.facts.num_slots - len(self._free_slots)
        return EngineLoad(
            len(self.running),
            len(self.waiting),
            used / self.facts.num_slots,
            num_waiting_tokens=sum(s.num_pending for s in self.waiting),
            num_admitted=self.num_admitted,
        )

    def stats(self) -> dict[str, int]:
        """Counts for the ``stats`` utility call."""
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_slots": self.facts.num_slots,
            "num_free_slots": len(self._free_slots),
            "kv_capacity_tokens": self.facts.num_slots * self.facts.max_model_len,
            "kv_used_tokens": sum(s.num_computed for s in self.running),
            "num_preemptions": self.num_preemptions,
        }

    def _check(self, request: EngineRequest) -> str | None:
        try:
            return self._gate.check_request(request)
        except Exception as exc:  # a request the runner chokes on fails alone
            logger.exception("check_request failed for %s", request.request_id)
            return f"invalid request: {exc}"

    def _has_free_slot(self) -> bool:
        return bool(self._free_slots) and len(self.running) < self.max_num_seqs

    def _admission_size(self, seq: Sequence, budget: int) -> int:
        """Tokens of a waiting sequence's prompt to run now (0: not this step). A prompt that
        must run whole (pooling, or chunking off) but exceeds even an empty step's budget runs
        over budget, as the last admission of its step, rather than never."""
        need = seq.num_pending
        if need <= budget:
            return need
        if seq.pooling is None and self.enable_chunked_prefill:
            return budget
        if need > self.max_num_batched_tokens:
            return need
        return 0

    def _add_chunk(self, step: ScheduledStep, seq: Sequence, n: int) -> int:
        assert seq.slot is not None
        start = seq.num_computed
        ends_prompt = start + n == seq.num_tokens
        chunk = Chunk(
            request=seq.request,
            slot=seq.slot,
            start=start,
            token_ids=seq.token_ids[start : start + n],
            wants_logits=ends_prompt and seq.sampling is not None,
            wants_pooled=ends_prompt and seq.pooling is not None,
        )
        step.chunks.append(chunk)
        step.seqs.append(seq)
        return n

    def _preempt_for_priority(self) -> None:
        """Free slots for waiting sequences that outrank running ones (recompute preemption)."""
        free = min(len(self._free_slots), self.max_num_seqs - len(self.running))
        for seq in list(self.waiting):
            if free > 0:
                free -= 1
                continue
            victim = max(self.running, key=lambda s: s.rank, default=None)
            if victim is None or victim.request.priority <= seq.request.priority:
                return
            self._preempt(victim)

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        self._gate.release(seq.request_id)
        # Fold the generated tokens into the prompt: the runner sees a plain, longer prompt
        # (image placeholders keep their offsets) and prefills it again.
        prompt = seq.token_ids.copy()
        seq.request = msgspec.structs.replace(seq.request, prompt_token_ids=prompt)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _expire_deadlines(self) -> None:
        now = self._clock()
        for seq in [s for s in self.waiting if s.request.deadline is not None]:
            if now > seq.request.deadline:
                self._finish(seq, "abort", RequestError(408, "request deadline exceeded"))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        # The sampler masks stop and EOS ids until min_tokens, so a hit here is always final.
        params = seq.sampling
        assert params is not None
        if token in seq.stop_ids:
            return "stop"
        if not params.ignore_eos and token in self.facts.eos_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            return "length"
        return None

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: RequestError | None = None,
        output: RequestOutput | None = None,
    ) -> None:
        self._remove(seq)
        out = output or RequestOutput(seq.request_id, num_prompt_tokens=seq.num_prompt_tokens)
        out.finish_reason = reason  # type: ignore[assignment]
        out.error = error
        self._emit(seq.client, out)

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self._live[seq.request_id]
        self._gate.release(seq.request_id)

    def _free(self, seq: Sequence) -> None:
        self.running.remove(seq)
        assert seq.slot is not None
        self._free_slots.append(seq.slot)
        seq.slot = None

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.rank)


def _pooled_embedding(hidden: np.ndarray, seq: Sequence) -> np.ndarray:
    vec = np.asarray(hidden, dtype=np.float32)
    if seq.pooling is not None and seq.pooling.normalize:
        norm = float(np.linalg.norm(vec))
        if norm > 0.0:
            vec = vec / norm
    return vec
