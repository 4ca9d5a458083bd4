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

Images: besides tokens, each step has an encoder budget in patches (``EncoderPlan``): a chunk
stops before an image the budget cannot take, and what is left encodes the next images of
prefilling and waiting requests ahead of their chunks.

One step may be in flight while the next is scheduled (``engine_core.pipeline``): scheduling
counts the tokens it asks for as computed at once, and a decode whose input token is still on
the device is fed from there (``Chunk.feeds_sampled``). ``update`` resolves a step later; a
request that finished or was aborted meanwhile has its late results dropped. Preemption folds
known tokens into the prompt, so it waits until nothing is in flight (``needs_sync``).

Pure Python over ``Sequence`` records: the runner is only asked to take (``admit``) and to
forget (``release``) requests and whether an image is cached, so the scheduler is testable
without a model.
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

from engine_core.batch import Chunk, ImageRef, RunnerFacts
from engine_core.encoder_plan import EncoderPlan, encoder_budget_error
from engine_core.sequence import Sequence, SequenceStatus
from engine_core.validation import validate_request
from ipc.config import EngineConfig
from ipc.messages import EngineLoad, EngineRequest, RequestError, RequestOutput, TokenLogprobs

logger = logging.getLogger(__name__)


Validator = Callable[[EngineRequest, RunnerFacts, Callable[[str], bool], bool], "str | None"]


class RequestGate(Protocol):
    """The runner calls the scheduler needs (``ModelRunner`` provides them)."""

    def admit(self, request: EngineRequest) -> None: ...

    def has_image(self, content_hash: str) -> bool: ...

    def release(self, request_id: str) -> None: ...

    @property
    def encoder_cache_bytes(self) -> int: ...


@dataclass(slots=True)
class ScheduledStep:
    """One step's work: ``chunks[i]`` belongs to ``seqs[i]``; ``encodes`` are the images the
    step encodes (those its chunks touch first, then some ahead of their chunks)."""

    chunks: list[Chunk]
    seqs: list[Sequence]
    encodes: list[ImageRef]

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
        validate: Validator = validate_request,
    ) -> None:
        """``validate``: the engine's admission check (a stand-in runner's tests narrow it)."""
        self.facts = facts
        self._validate = validate
        self.max_num_seqs = facts.max_num_seqs
        self.max_num_batched_tokens = facts.max_num_batched_tokens
        self.max_num_encoder_patches = config.max_num_encoder_patches
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
        if request.request_id in self._live:
            message: str | None = f"request id {request.request_id!r} is already running"
        else:
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

    def needs_sync(self) -> bool:
        """True when the next ``schedule`` would preempt: it must not while a step is in
        flight (a victim's tokens are folded into its prompt, and they must all be known)."""
        return bool(self._preemption_victims())

    def schedule(self) -> ScheduledStep:
        """Pick this step's chunks and images. Expired waiting requests are finished here."""
        self._expire_deadlines()
        for victim in self._preemption_victims():
            self._preempt(victim)
        step = ScheduledStep([], [], [])
        plan = EncoderPlan(self.max_num_encoder_patches, self.max_num_batched_tokens)
        budget = self.max_num_batched_tokens
        # Decodes first (one token each, latency-critical), then chunks of running prefills.
        for seq in sorted(self.running, key=lambda s: s.is_prefill):
            if budget == 0:
                break
            if seq.is_done_asking:
                continue  # its last token is in flight
            n = plan.fit(seq, seq.num_computed, min(seq.num_pending, budget))
            if n > 0:
                budget -= self._add_chunk(step, seq, n)
        while self.waiting and budget > 0 and self._has_free_slot():
            seq = self.waiting[0]
            take = self._admission_size(seq, budget)
            if take == 0:
                break
            if seq.needs_check:  # preempted: the runner forgot it; validate it again
                if message := self._check(seq.request):
                    self._finish(seq, "error", RequestError(400, message))
                    continue
                seq.needs_check = False
            fitted = plan.fit(seq, 0, take)
            if fitted < take and not self._may_split(seq):
                fitted = 0
            if fitted == 0:
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            if seq.scheduled_at is None:
                seq.scheduled_at = time.perf_counter()
            self.running.append(seq)
            self.num_admitted += 1
            budget -= self._add_chunk(step, seq, fitted)
        plan.encode_ahead([*(s for s in self.running if s.is_prefill), *self.waiting])
        step.encodes = plan.refs
        return step

    def update(
        self,
        step: ScheduledStep,
        sampled: list[int],
        logprobs: list[TokenLogprobs | None],
        pooled: dict[str, np.ndarray],
        failed: dict[str, RequestError] | None = None,
    ) -> None:
        """Resolve one executed step and emit its deltas: ``sampled[i]`` and ``logprobs[i]``
        belong to the i-th chunk that wanted logits and did not fail, ``pooled`` maps request
        id -> embedding, ``failed`` request id -> the error its request ends with. Results of
        requests that ended since the step was scheduled are dropped."""
        failed = failed or {}
        draws = iter(zip(sampled, logprobs, strict=True))
        for chunk, seq in zip(step.chunks, step.seqs, strict=True):
            error = failed.get(seq.request_id)
            draw = next(draws) if chunk.wants_logits and error is None else None
            if seq.status is SequenceStatus.FINISHED:
                continue
            if chunk.wants_logits:
                seq.num_inflight -= 1
            if error is not None:
                self._finish(seq, "error", error)
                continue
            out = RequestOutput(seq.request_id, num_prompt_tokens=seq.num_prompt_tokens)
            if chunk.wants_pooled:
                out.embedding = _pooled_embedding(pooled[seq.request_id], seq)
                self._finish(seq, "stop", output=out)
            elif draw is not None:
                token, token_logprobs = draw
                seq.append_token(token)
                out.new_token_ids = [token]
                if seq.num_output_tokens == 1 and seq.scheduled_at is not None:
                    out.queue_time = seq.scheduled_at - seq.added_at
                    out.prefill_time = time.perf_counter() - seq.scheduled_at
                out.logprobs = None if token_logprobs is None else [token_logprobs]
                reason = self._finish_reason(seq, token)
                if reason is None:
                    self._emit(seq.client, out)
                else:
                    self._finish(seq, reason, output=out)
        # Requests that failed without a chunk in the step (an image encoded ahead).
        for request_id, error in failed.items():
            seq = self._live.get(request_id)
            if seq is not None:
                self._finish(seq, "error", error)

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
            encoder_cache_bytes=self._gate.encoder_cache_bytes,
        )

    def stats(self) -> dict[str, int]:
        """Counts for the ``stats`` utility call."""
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_slots": self.facts.num_slots,
            "num_free_slots": len(self._free_slots),
            "kv_capacity_tokens": self.facts.kv_capacity_tokens,
            "kv_used_tokens": sum(s.num_computed for s in self.running),
            "num_preemptions": self.num_preemptions,
        }

    def _check(self, request: EngineRequest) -> str | None:
        """Validate ``request`` and have the runner take it; the 400 message if either fails."""
        message = self._validate(
            request, self.facts, self._gate.has_image, self.allow_priority
        ) or encoder_budget_error(request, self.max_num_encoder_patches)
        if message is not None:
            return message
        try:
            self._gate.admit(request)
        except Exception as exc:  # a request the runner chokes on fails alone
            logger.exception("admitting %s failed", request.request_id)
            return f"invalid request: {exc}"
        return None

    def _has_free_slot(self) -> bool:
        return bool(self._free_slots) and len(self.running) < self.max_num_seqs

    def _admission_size(self, seq: Sequence, budget: int) -> int:
        """Tokens of a waiting sequence's prompt to run now (0: not this step). A prompt that
        must run whole (pooling, or chunking off) but exceeds even an empty step's budget runs
        over budget, as the last admission of its step, rather than never."""
        need = seq.num_pending
        if need <= budget:
            return need
        if self._may_split(seq):
            return budget
        if need > self.max_num_batched_tokens:
            return need
        return 0

    def _may_split(self, seq: Sequence) -> bool:
        return seq.pooling is None and self.enable_chunked_prefill

    def _add_chunk(self, step: ScheduledStep, seq: Sequence, n: int) -> int:
        """Schedule ``n`` tokens of ``seq``: they count as computed from now on."""
        assert seq.slot is not None
        start = seq.num_computed
        ends_prompt = n == seq.num_pending
        chunk = Chunk(
            request=seq.request,
            slot=seq.slot,
            start=start,
            token_ids=seq.chunk_tokens(start, n),
            wants_logits=ends_prompt and seq.sampling is not None,
            wants_pooled=ends_prompt and seq.pooling is not None,
            feeds_sampled=start >= seq.num_tokens,
        )
        seq.num_computed += n
        if chunk.wants_logits:
            seq.num_inflight += 1
        step.chunks.append(chunk)
        step.seqs.append(seq)
        return n

    def _preemption_victims(self) -> list[Sequence]:
        """Running sequences to preempt (recompute) for waiting ones that outrank them."""
        free = min(len(self._free_slots), self.max_num_seqs - len(self.running))
        candidates = sorted(self.running, key=lambda s: s.rank, reverse=True)
        victims: list[Sequence] = []
        for seq in self.waiting:
            if free > 0:
                free -= 1
                continue
            if not candidates or candidates[0].request.priority <= seq.request.priority:
                break
            victims.append(candidates.pop(0))
        return victims

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        self._gate.release(seq.request_id)
        # Fold the generated tokens into the prompt: the runner sees a plain, longer prompt
        # (image placeholders keep their offsets) and prefills it again.
        prompt = seq.token_ids.copy()
        seq.request = msgspec.structs.replace(seq.request, prompt_token_ids=prompt)
        seq.num_computed = 0
        seq.num_encoded_images = 0  # the runner forgot them with the request's state
        seq.needs_check = True
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
