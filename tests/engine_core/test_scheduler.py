"""Scheduler unit tests against a fake runner that checks KV-slot bookkeeping.

``FakeRunner`` keeps, per slot, the tokens the scheduler wrote there (as a KV cache would) and
fails on any gap, on a slot shared by two requests, or on a chunk that touches an image not
encoded yet; its "model" is a deterministic function of the whole prefix, so a request's tokens
depend on nothing but its own history, which is what lets the tests compare a preempted run
with an undisturbed one. ``fail`` makes it fail one request's work the way the real runner
reports it (left out of the step, named in ``StepResult.failed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import pytest
import torch

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult, images_by_offset
from engine_core.pipeline import Pipeline
from engine_core.sampler import Sampler
from engine_core.scheduler import Scheduler
from engine_core.validation import validate_request
from ipc.config import EngineConfig
from ipc.messages import (
    EngineRequest,
    PoolingParams,
    RequestError,
    RequestOutput,
    SamplingParams,
)

VOCAB = 97
EOS = 96


def next_token(prefix: np.ndarray) -> int:
    """The fake model's favourite next token (never EOS)."""
    weights = np.arange(1, len(prefix) + 1, dtype=np.int64)
    return int((prefix.astype(np.int64) * weights).sum() * 31 + len(prefix)) % (VOCAB - 1)


class FakeRunner:
    """A deterministic stand-in for ModelRunner that validates what the scheduler asks."""

    def __init__(
        self,
        num_slots: int = 4,
        max_model_len: int = 256,
        eos: int = EOS,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.facts = RunnerFacts(
            model_dir="fake",
            max_model_len=max_model_len,
            vocab_size=VOCAB,
            eos_token_ids=(eos,),
            num_slots=num_slots,
            max_num_seqs=min(num_slots, max_num_seqs),
            max_num_batched_tokens=max_num_batched_tokens,
            supports_images=False,
            supports_embeddings=True,
            supports_generation=True,
            poolings=("last",),
            image_token_id=None,
        )
        self.device = torch.device("cpu")
        self.encoder_cache_bytes = 0
        self.kv: dict[int, list[int]] = {}
        self.owner: dict[int, str] = {}
        self.released: list[str] = []
        self.steps: list[list[Chunk]] = []
        self.encodes: list[list[ImageRef]] = []
        self.fed: dict[int, int] = {}  # slot -> the id last sampled for it (the "device" copy)
        self.eos_after: dict[str, int] = {}  # request id -> make EOS the favourite at this length
        self.encoded: dict[str, set[int]] = {}  # request id -> its images encoded so far
        self.fail: dict[str, RequestError] = {}  # request id -> the error its work fails with
        self.checks: list[str] = []  # request ids, one per admit

    def admit(self, request: EngineRequest) -> None:
        self.checks.append(request.request_id)
        if request.request_id.startswith("reject"):
            raise ValueError("fake says no")

    def has_image(self, content_hash: str) -> bool:
        return False

    def release(self, request_id: str) -> None:
        self.released.append(request_id)
        self.encoded.pop(request_id, None)
        self.fail.pop(request_id, None)
        for slot, owner in list(self.owner.items()):
            if owner == request_id:
                del self.owner[slot]

    def reset_encoder_cache(self) -> None:
        pass

    def feed(self, slots: list[int], token_ids: torch.Tensor) -> None:
        for slot, token in zip(slots, token_ids.tolist(), strict=True):
            self.fed[slot] = token

    def execute(
        self, chunks: list[Chunk], *, encodes: Sequence[ImageRef] = (), greedy: bool = False
    ) -> StepResult:
        self.steps.append(chunks)
        self.encodes.append(list(encodes))
        failed = {rid: e for rid, e in self.fail.items() if rid in _request_ids(chunks, encodes)}
        for ref in encodes:
            self.encoded.setdefault(ref.request.request_id, set()).add(ref.index)
        logits, pooled = [], {}
        for chunk in chunks:
            rid = chunk.request.request_id
            if rid in failed:
                continue
            n = len(chunk.token_ids)
            for i, item in enumerate(images_by_offset(chunk.request)):
                touched = item.offset < chunk.start + n and chunk.start < item.offset + item.length
                if touched and i not in self.encoded.get(rid, set()):
                    raise AssertionError(
                        f"{rid}: chunk at {chunk.start} touches unencoded image {i}"
                    )
            if self.owner.setdefault(chunk.slot, rid) != rid:
                raise AssertionError(
                    f"slot {chunk.slot} shared by {self.owner[chunk.slot]} and {rid}"
                )
            cache = self.kv.setdefault(chunk.slot, [])
            if chunk.start > len(cache):
                raise AssertionError(
                    f"gap in slot {chunk.slot}: start {chunk.start} > {len(cache)}"
                )
            del cache[chunk.start :]
            if chunk.feeds_sampled:
                assert len(chunk.token_ids) == 1
                cache.append(self.fed[chunk.slot])
            else:
                cache.extend(int(t) for t in chunk.token_ids)
            if chunk.wants_logits:
                row = torch.zeros(VOCAB)
                prefix = np.array(cache, dtype=np.int32)
                row[next_token(prefix)] = 10.0
                row[(next_token(prefix) + 1) % VOCAB] = 5.0
                if len(cache) == self.eos_after.get(rid, -1):
                    row[EOS] = 20.0
                logits.append(row)
            if chunk.wants_pooled:
                pooled[rid] = torch.full((8,), float(len(cache)))
        stacked = torch.stack(logits) if logits else torch.zeros(0, VOCAB)
        if not greedy:
            return StepResult(stacked, pooled=pooled, failed=failed)
        ids = stacked.argmax(dim=-1)
        self.feed(
            [c.slot for c in chunks if c.wants_logits and c.request.request_id not in failed], ids
        )
        return StepResult(None, ids, pooled, failed)


def _request_ids(chunks: list[Chunk], encodes: Sequence[ImageRef]) -> set[str]:
    return {c.request.request_id for c in chunks} | {r.request.request_id for r in encodes}


def _validate_all_but_images(
    request: EngineRequest, facts: RunnerFacts, has_image: Callable[[str], bool], priority: bool
) -> str | None:
    """The engine's validation, images left out: these tests' prompts carry no placeholder
    tokens (test_model_checks checks images against the real runner)."""
    text = msgspec.structs.replace(request, mm_items=[])
    return validate_request(text, facts, has_image, priority)


class Harness:
    """Scheduler + fake runner + real sampler, driven step by step through the real pipeline
    (one step in flight: a step's tokens are resolved during the next ``step``)."""

    def __init__(self, clock: list[float] | None = None, **config: object) -> None:
        runner_args = {k: config.pop(k) for k in ("num_slots", "max_model_len") if k in config}
        for k in ("max_num_seqs", "max_num_batched_tokens"):  # facts hold the effective figures
            if k in config:
                runner_args[k] = config[k]
        self.runner = FakeRunner(**runner_args)  # type: ignore[arg-type]
        self.config = EngineConfig(**config)  # type: ignore[arg-type]
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.clients: dict[str, bytes] = {}
        self.clock = clock or [time.time()]
        self.scheduler = Scheduler(
            self.config,
            self.runner.facts,
            self.runner,
            self._emit,
            lambda: self.clock[0],
            _validate_all_but_images,
        )
        self.pipeline = Pipeline(self.scheduler, self.runner, Sampler(0, torch.device("cpu")))

    def _emit(self, client: bytes, out: RequestOutput) -> None:
        self.clients[out.request_id] = client
        self.outputs.setdefault(out.request_id, []).append(out)

    def add(self, rid: str, prompt_len: int, client: bytes = b"c0", **kw: object) -> bool:
        prompt = (np.arange(prompt_len, dtype=np.int32) * 7 + len(rid)) % (VOCAB - 1)
        params = kw.pop("sampling", None)
        if params is None and "pooling" not in kw:
            params = SamplingParams(
                max_tokens=kw.pop("max_tokens", 4),  # type: ignore[arg-type]
                temperature=0.0,
                ignore_eos=kw.pop("ignore_eos", False),  # type: ignore[arg-type]
                stop_token_ids=kw.pop("stop_token_ids", []),  # type: ignore[arg-type]
                min_tokens=kw.pop("min_tokens", 0),  # type: ignore[arg-type]
            )
        request = EngineRequest(rid, prompt, sampling=params, **kw)  # type: ignore[arg-type]
        return self.scheduler.add(request, client)

    def step(self) -> list[Chunk]:
        """One pipeline advance; the chunks it queued (empty when it only resolved)."""
        before = len(self.runner.steps)
        self.pipeline.advance()
        return self.runner.steps[-1] if len(self.runner.steps) > before else []

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work() and not self.pipeline.is_busy:
                return
            self.step()
        raise AssertionError("scheduler did not drain")

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]

    def finish(self, rid: str) -> RequestOutput:
        last = self.outputs[rid][-1]
        assert last.finish_reason is not None, f"{rid} not finished"
        return last


def expected_tokens(prompt_len: int, rid: str, n: int) -> list[int]:
    """What a greedy request gets from the fake model when nothing interferes."""
    h = Harness()
    h.add(rid, prompt_len, max_tokens=n, ignore_eos=True)
    h.run()
    return h.tokens(rid)


def test_budget_respected_and_all_finish() -> None:
    h = Harness(max_num_batched_tokens=32, max_num_seqs=4, num_slots=4)
    lengths = [5, 40, 17, 90, 3, 33, 64, 8]
    for i, n in enumerate(lengths):
        h.add(f"r{i}", n, max_tokens=6, ignore_eos=True)
    h.run()
    assert all(sum(len(c.token_ids) for c in chunks) <= 32 for chunks in h.runner.steps)
    for i, n in enumerate(lengths):
        assert h.finish(f"r{i}").finish_reason == "length"
        assert h.tokens(f"r{i}") == expected_tokens(n, f"r{i}", 6)
    assert h.scheduler.stats()["num_free_slots"] == 4


def test_first_token_carries_queue_and_prefill_times() -> None:
    """The engine's part of TTFT, split: the wait for a first step (here: a whole step, the
    only slot being taken) and the time from it to the first token; later tokens carry none."""
    h = Harness(max_num_seqs=1, num_slots=1)
    h.add("a", 8, max_tokens=3, ignore_eos=True)
    h.add("b", 8, max_tokens=2, ignore_eos=True)
    h.run()
    for rid in ("a", "b"):
        first, *rest = [o for o in h.outputs[rid] if o.new_token_ids]
        assert first.queue_time is not None and first.prefill_time is not None
        assert first.queue_time >= 0 and first.prefill_time > 0
        assert all(o.queue_time is None and o.prefill_time is None for o in rest)
    first_b = next(o for o in h.outputs["b"] if o.new_token_ids)
    first_a = next(o for o in h.outputs["a"] if o.new_token_ids)
    assert first_b.queue_time is not None and first_a.queue_time is not None
    assert first_b.queue_time > first_a.queue_time  # b waited for a's slot


def test_chunked_prefill_splits_and_resumes() -> None:
    h = Harness(max_num_batched_tokens=32)
    h.add("long", 100, max_tokens=3, ignore_eos=True)
    h.run()
    prefill = [c for chunks in h.runner.steps for c in chunks][:4]
    assert [(c.start, len(c.token_ids), c.wants_logits) for c in prefill] == [
        (0, 32, False),
        (32, 32, False),
        (64, 32, False),
        (96, 4, True),
    ]
    assert h.tokens("long") == expected_tokens(100, "long", 3)


def test_without_chunked_prefill_a_prompt_runs_whole() -> None:
    h = Harness(max_num_batched_tokens=32, enable_chunked_prefill=False)
    h.add("short", 20, max_tokens=2, ignore_eos=True)
    h.add("huge", 50, max_tokens=2, ignore_eos=True)
    h.run()
    firsts = [c for chunks in h.runner.steps for c in chunks if c.start == 0]
    assert [(c.request.request_id, len(c.token_ids)) for c in firsts] == [
        ("short", 20),
        ("huge", 50),
    ]
    assert h.tokens("huge") == expected_tokens(50, "huge", 2)


def test_decodes_go_before_prefill_chunks() -> None:
    h = Harness(max_num_batched_tokens=16)
    h.add("a", 4, max_tokens=8, ignore_eos=True)
    h.step()
    h.add("b", 40, max_tokens=2, ignore_eos=True)
    chunks = h.step()
    assert [(c.request.request_id, len(c.token_ids)) for c in chunks] == [("a", 1), ("b", 15)]


def test_max_num_seqs() -> None:
    h = Harness(max_num_seqs=2, num_slots=4)
    for i in range(5):
        h.add(f"r{i}", 6, max_tokens=3, ignore_eos=True)
    running_counts = []
    while h.scheduler.has_work():
        h.step()
        running_counts.append(len(h.scheduler.running))
    assert max(running_counts) == 2
    assert all(h.finish(f"r{i}").finish_reason == "length" for i in range(5))


def test_fcfs_refuses_priority() -> None:
    h = Harness()
    assert not h.add("urgent", 4, priority=-1)
    error = h.outputs["urgent"][0].error
    assert error is not None and error.status == 400 and "scheduling-policy" in error.message
    assert h.add("plain", 4, priority=0)


def test_priority_then_arrival_order() -> None:
    h = Harness(
        max_num_seqs=1, num_slots=1, max_num_batched_tokens=64, scheduling_policy="priority"
    )
    h.add("late-low", 4, priority=5, arrival_time=1.0)
    h.add("early-low", 4, priority=5, arrival_time=0.5)
    h.add("high", 4, priority=-1, arrival_time=2.0)
    h.run()
    order = [c.request.request_id for chunks in h.runner.steps for c in chunks if c.start == 0]
    assert order == ["high", "early-low", "late-low"]


def test_preemption_by_recompute_keeps_tokens_right() -> None:
    h = Harness(
        max_num_seqs=1, num_slots=1, max_num_batched_tokens=64, scheduling_policy="priority"
    )
    h.add("low", 10, max_tokens=12, ignore_eos=True, priority=1)
    for _ in range(4):
        h.step()
    # Four tokens asked for, three back: the fourth is in flight.
    assert len(h.tokens("low")) == 3 and h.pipeline.is_busy
    h.add("urgent", 6, max_tokens=3, ignore_eos=True, priority=0)
    h.add("same", 6, max_tokens=3, ignore_eos=True, priority=1)  # equal priority: no preemption
    h.step()
    assert [s.request_id for s in h.scheduler.running] == ["urgent"]
    assert h.scheduler.stats()["num_preemptions"] == 1
    h.run()
    assert h.tokens("low") == expected_tokens(10, "low", 12)
    assert h.tokens("urgent") == expected_tokens(6, "urgent", 3)
    assert h.scheduler.stats()["num_preemptions"] == 1
    # Preempting waited for the fourth token: the recompute prefilled prompt + the 4 generated
    # tokens as one longer prompt.
    recompute = [c for chunks in h.runner.steps for c in chunks if c.request.request_id == "low"]
    refill = [c for c in recompute if c.start == 0][1]
    assert len(refill.token_ids) == 14 and len(refill.request.prompt_token_ids) == 14
    assert h.outputs["low"][-1].num_prompt_tokens == 10
    assert "low" in h.runner.released


def test_abort_frees_slot_and_client_abort_all() -> None:
    h = Harness(num_slots=3, max_num_seqs=3)
    h.add("a", 8, client=b"c0", max_tokens=50, ignore_eos=True)
    h.add("b", 8, client=b"c1", max_tokens=50, ignore_eos=True)
    h.add("c", 8, client=b"c1", max_tokens=50, ignore_eos=True)
    h.add("d", 8, client=b"c1", max_tokens=50, ignore_eos=True)  # waits: 3 slots
    h.step()
    h.step()
    assert h.scheduler.stats()["num_free_slots"] == 0
    assert h.scheduler.abort(["a", "unknown"]) == ["a"]
    assert sorted(h.scheduler.abort_client(b"c1")) == ["b", "c", "d"]
    stats = h.scheduler.stats()
    assert stats["num_free_slots"] == 3 and stats["num_running"] == stats["num_waiting"] == 0
    assert not h.scheduler.has_work()
    assert h.scheduler.load().kv_usage == 0.0
    assert sorted(h.runner.released) == ["a", "b", "c", "d"]


def test_finish_on_eos_stop_id_and_length() -> None:
    free = expected_tokens(9, "e", 8)
    h = Harness()
    h.runner.eos_after["e"] = 9 + 2  # EOS becomes the favourite as the 3rd token
    h.add("e", 9, max_tokens=8)
    h.add("stop", 9, max_tokens=8, stop_token_ids=[expected_tokens(9, "stop", 8)[1]])
    h.add("len", 9, max_tokens=5)
    h.run()
    assert h.tokens("e") == free[:2] + [EOS] and h.finish("e").finish_reason == "stop"
    assert h.tokens("stop") == expected_tokens(9, "stop", 2)
    assert h.finish("stop").finish_reason == "stop"
    assert len(h.tokens("len")) == 5 and h.finish("len").finish_reason == "length"


def test_ignore_eos_and_min_tokens() -> None:
    h = Harness()
    h.runner.eos_after["ign"] = 9 + 2
    h.runner.eos_after["min"] = 9 + 2
    h.add("ign", 9, max_tokens=6, ignore_eos=True)
    h.add("min", 9, max_tokens=6, min_tokens=4)
    h.run()
    assert len(h.tokens("ign")) == 6 and h.tokens("ign")[2] == EOS
    assert h.finish("ign").finish_reason == "length"
    # EOS was masked for the 3rd token: the runner-up came instead, and generation went on.
    assert EOS not in h.tokens("min")[:4] and len(h.tokens("min")) >= 4


def test_bad_requests_get_400_outputs() -> None:
    h = Harness(max_model_len=64)
    assert not h.add("toolong", 60, max_tokens=10)
    assert not h.add("empty", 0)
    assert not h.add("reject-me", 5)
    assert not h.add("both", 5, sampling=SamplingParams(), pooling=PoolingParams())
    assert not h.add("neither", 5, sampling=None, pooling=None)
    assert not h.add("minmax", 5, sampling=SamplingParams(max_tokens=2, min_tokens=3))
    bad_vocab = EngineRequest("vocab", np.array([1, VOCAB], np.int32), sampling=SamplingParams())
    assert not h.scheduler.add(bad_vocab, b"c0")
    scalar = EngineRequest("scalar", np.array(5, np.int32), sampling=SamplingParams())
    assert not h.scheduler.add(scalar, b"c0")
    messages = {rid: outs[-1] for rid, outs in h.outputs.items()}
    assert set(messages) == {
        "toolong",
        "empty",
        "reject-me",
        "both",
        "neither",
        "minmax",
        "vocab",
        "scalar",
    }
    for out in messages.values():
        assert out.finish_reason == "error" and out.error is not None and out.error.status == 400
    assert "60" in messages["toolong"].error.message and "64" in messages["toolong"].error.message
    assert messages["reject-me"].error.message == "invalid request: fake says no"
    assert str(VOCAB) in messages["vocab"].error.message
    assert not h.scheduler.has_work()


def test_duplicate_live_request_id_is_refused() -> None:
    h = Harness()
    assert h.add("dup", 5, max_tokens=3)
    assert not h.add("dup", 5, max_tokens=3)
    assert h.outputs["dup"][0].error is not None
    h.run()
    assert h.finish("dup").finish_reason == "length"


def test_deadline_expires_while_waiting() -> None:
    clock = [1000.0]
    h = Harness(clock=clock, max_num_seqs=1, num_slots=1)
    h.add("busy", 5, max_tokens=20, ignore_eos=True)
    h.add("patient", 5, max_tokens=2, deadline=1100.0)
    h.add("hurried", 5, max_tokens=2, deadline=1001.0)
    h.step()
    clock[0] = 1002.0
    h.step()
    out = h.finish("hurried")
    assert out.finish_reason == "abort" and out.error is not None and out.error.status == 408
    assert out.error.message == "request deadline exceeded"
    h.run()
    assert h.finish("patient").finish_reason == "length"


def test_pooling_prefilled_in_one_chunk_even_over_budget() -> None:
    h = Harness(max_num_batched_tokens=16)
    h.add("gen", 30, max_tokens=3, ignore_eos=True)
    h.add("small", 10, pooling=PoolingParams(normalize=False))
    h.add("big", 40, pooling=PoolingParams(normalize=True))
    h.run()
    pooled = [c for chunks in h.runner.steps for c in chunks if c.wants_pooled]
    assert [(c.request.request_id, c.start, len(c.token_ids)) for c in pooled] == [
        ("small", 0, 10),
        ("big", 0, 40),
    ]
    small, big = h.finish("small"), h.finish("big")
    assert small.finish_reason == big.finish_reason == "stop"
    assert small.embedding is not None and small.embedding.dtype == np.float32
    np.testing.assert_allclose(small.embedding, np.full(8, 10.0))
    assert big.embedding is not None
    np.testing.assert_allclose(np.linalg.norm(big.embedding), 1.0, rtol=1e-6)
    assert h.tokens("gen") == expected_tokens(30, "gen", 3)


def test_load_snapshot() -> None:
    h = Harness(num_slots=4, max_num_seqs=2)
    for i in range(3):
        h.add(f"r{i}", 5, max_tokens=5, ignore_eos=True)
    h.step()
    h.runner.encoder_cache_bytes = 4096
    load = h.scheduler.load()
    assert (load.num_running, load.num_waiting, load.kv_usage) == (2, 1, 0.5)
    assert load.encoder_cache_bytes == 4096


@pytest.mark.parametrize("n", [1, 2])
def test_outputs_stream_one_token_per_step(n: int) -> None:
    h = Harness()
    h.add("s", 5, max_tokens=3 * n, ignore_eos=True)
    h.run()
    assert [len(o.new_token_ids) for o in h.outputs["s"]] == [1] * (3 * n)
    assert all(o.num_prompt_tokens == 5 for o in h.outputs["s"])
