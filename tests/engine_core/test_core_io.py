"""The busy loop and the IO thread together, in-process, over a real ROUTER/DEALER pair on
ipc:// (the model is the scheduler tests' FakeRunner, so this runs in a second)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from dealer import Client
from test_scheduler import FakeRunner, expected_tokens

from apiserver.launch.run_dir import engine_address
from engine_core.__main__ import ready_message
from engine_core.batch import Chunk, StepResult
from engine_core.core import EngineCore, EngineFailed
from engine_core.io_thread import EngineIO
from engine_core.pipeline import Pipeline
from engine_core.sampler import Sampler
from ipc import messages
from ipc.config import EngineConfig

POLL_MS = 10_000
#: A generation that cannot finish while a test runs: only an abort ends it.
LONG = 1_000_000


class Engine:
    """EngineCore + EngineIO on a FakeRunner, the loop in a thread."""

    def __init__(
        self, run_dir: Path, runner: FakeRunner, prepare: Callable[[Any], None] | None = None
    ) -> None:
        self.address = engine_address(str(run_dir))
        self.config = EngineConfig()
        ready = ready_message(self.config, runner.facts)
        self.io = EngineIO(self.address, ready, prepare=prepare)
        self.core = EngineCore(self.config, runner, Sampler(0, runner.device), self.io)  # type: ignore[arg-type]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.io.start()
        self.thread.start()

    def _run(self) -> None:
        try:
            self.core.run()
        except BaseException as exc:
            self.error = exc
            self.io.close(messages.EngineDead(f"engine core failed: {exc!r}"))
        else:
            self.io.close()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def engine(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[Engine]:
    eng = Engine(tmp_path, FakeRunner(num_slots=4, max_model_len=2 * LONG))
    yield eng
    _stop(eng, ctx)


def _stop(eng: Engine, ctx: zmq.Context[Any]) -> None:
    if eng.thread.is_alive():
        closer = Client(ctx, eng.address, 99, POLL_MS)
        closer.send(messages.Shutdown("test over"))
        closer.close(linger_ms=5000)  # let the SHUTDOWN leave before the socket goes
        eng.thread.join(10)
        assert not eng.thread.is_alive()


def request(rid: str, prompt_len: int, max_tokens: int = 4, **kw: Any) -> messages.EngineRequest:
    prompt = (np.arange(prompt_len, dtype=np.int32) * 7 + len(rid)) % 96
    params = messages.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return messages.EngineRequest(rid, prompt, sampling=params, **kw)


def test_handshake_outputs_and_utilities(engine: Engine, ctx: zmq.Context[Any]) -> None:
    client = Client(ctx, engine.address, 0, POLL_MS)
    ready = client.hello()
    assert (ready.vocab_size, ready.max_num_seqs, ready.kv_capacity_tokens) == (97, 4, 8 * LONG)
    assert ready.pixel_dtype == "float32" and ready.eos_token_ids == [96]
    for i, n in enumerate([5, 30, 11]):
        client.send(request(f"r{i}", n, max_tokens=5))
    got = client.collect({"r0", "r1", "r2"})
    for i, n in enumerate([5, 30, 11]):
        tokens = [t for o in got[f"r{i}"] for t in o.new_token_ids]
        assert tokens == expected_tokens(n, f"r{i}", 5)
        assert got[f"r{i}"][-1].finish_reason == "length"
    assert client.utility("ping") == {"pong": True}
    assert client.utility("stats")["num_free_slots"] == 4
    assert client.utility("reset_encoder_cache") == {}
    client.close()


def test_prepare_runs_in_the_io_thread_first(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    """``prepare`` (the engine pins image pixels there) sees every message for the busy loop,
    on the IO thread, before the loop does; HELLO, which the IO thread answers, it does not."""
    seen: list[tuple[str, str]] = []

    def prepare(msg: Any) -> None:
        seen.append((type(msg).__name__, threading.current_thread().name))

    eng = Engine(tmp_path, FakeRunner(num_slots=4), prepare)
    try:
        client = Client(ctx, eng.address, 0, POLL_MS)
        client.hello()
        client.send(request("p", 6, max_tokens=2))
        got = client.collect({"p"})
        assert [t for o in got["p"] for t in o.new_token_ids] == expected_tokens(6, "p", 2)
        assert ("EngineRequest", "engine-io") in seen
        assert all(name == "engine-io" for _, name in seen)
        assert not any(kind == "Hello" for kind, _ in seen)
        client.close()
    finally:
        _stop(eng, ctx)


def test_outputs_leave_while_a_burst_of_requests_is_prepared(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    """A burst that keeps the socket readable for seconds (each message's ``prepare`` slow, as
    pinning a photo's pixels can be) must not hold back outputs and heartbeats: the IO thread
    reads for at most RECEIVE_SLICE_S before it sends. Reading until the socket was empty,
    the first output left only after the whole burst was prepared."""
    prepared: list[str] = []

    def slow_prepare(msg: Any) -> None:
        time.sleep(0.05)
        prepared.append(msg.request_id)

    eng = Engine(tmp_path, FakeRunner(num_slots=4), slow_prepare)
    try:
        client = Client(ctx, eng.address, 0, POLL_MS)
        client.hello()
        burst = [f"b{i}" for i in range(40)]
        for rid in burst:
            client.send(request(rid, 5, max_tokens=1))
        while not (msg := client.recv()).outputs:
            pass
        assert len(prepared) <= len(burst) // 2, f"first output after {len(prepared)} prepares"
        got = client.collect(set(burst) - {o.request_id for o in msg.outputs})
        assert all(got[rid][-1].finish_reason == "length" for rid in got)
        client.close()
    finally:
        _stop(eng, ctx)


def test_corrupt_frames_and_bad_requests_do_not_kill(engine: Engine, ctx: zmq.Context[Any]) -> None:
    client = Client(ctx, engine.address, 0, POLL_MS)
    client.hello()
    client.sock.send_multipart([b"\x03", b"\xc1garbage"])
    client.sock.send_multipart([b"\x7f"])
    client.send(
        messages.EngineRequest(
            "bad", np.array([1, 500], np.int32), sampling=messages.SamplingParams()
        )
    )
    client.send(request("good", 6))
    got = client.collect({"bad", "good"})
    assert got["bad"][-1].finish_reason == "error" and got["bad"][-1].error.status == 400  # type: ignore[union-attr]
    assert got["good"][-1].finish_reason == "length"
    assert client.utility("ping") == {"pong": True}
    client.close()


def test_idle_heartbeat_carries_load(engine: Engine, ctx: zmq.Context[Any]) -> None:
    client = Client(ctx, engine.address, 0, POLL_MS)
    client.hello()
    msg = client.recv()
    assert isinstance(msg, messages.OutputBatch) and msg.outputs == []
    assert msg.load == messages.EngineLoad(0, 0, 0.0)
    client.close()


def test_hello_again_aborts_the_old_requests(engine: Engine, ctx: zmq.Context[Any]) -> None:
    old = Client(ctx, engine.address, 3, POLL_MS)
    old.hello()
    old.send(request("long", 5, max_tokens=LONG))
    old.wait_stats(lambda s: s["num_running"] == 1)
    old.close()
    new = Client(ctx, engine.address, 3, POLL_MS)
    new.hello()
    new.wait_stats(lambda s: s["num_running"] == 0)
    assert new.utility("stats")["num_free_slots"] == 4
    new.close()


def test_gone_client_gets_its_requests_aborted(engine: Engine, ctx: zmq.Context[Any]) -> None:
    watcher = Client(ctx, engine.address, 1, POLL_MS)
    watcher.hello()
    doomed = Client(ctx, engine.address, 2, POLL_MS)
    doomed.hello()
    doomed.send(request("orphan", 5, max_tokens=LONG))
    watcher.wait_stats(lambda s: s["num_running"] == 1)
    doomed.close()  # its next output hits EHOSTUNREACH
    watcher.wait_stats(lambda s: s["num_running"] == 0)
    watcher.close()


def test_shutdown_stops_the_loop(engine: Engine, ctx: zmq.Context[Any]) -> None:
    client = Client(ctx, engine.address, 0, POLL_MS)
    client.hello()
    client.send(messages.Shutdown("bye"))
    engine.thread.join(10)
    assert not engine.thread.is_alive() and engine.error is None
    client.close()


class BrokenRunner(FakeRunner):
    def execute(self, chunks: list[Chunk], **_: Any) -> StepResult:
        raise RuntimeError("GPU on fire")


def test_fatal_error_sends_engine_dead(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    eng = Engine(tmp_path, BrokenRunner())
    client = Client(ctx, eng.address, 0, POLL_MS)
    client.hello()
    client.send(request("doomed", 5))
    while not isinstance(msg := client.recv(), messages.EngineDead):
        pass
    assert "GPU on fire" in msg.reason
    eng.thread.join(10)
    assert isinstance(eng.error, RuntimeError) and not isinstance(eng.error, EngineFailed)
    client.close()


def test_a_step_that_cannot_be_scheduled_is_logged_not_spun_on(
    tmp_path: Path,
    ctx: zmq.Context[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[float] = []

    def stuck(self: Pipeline) -> bool:
        calls.append(time.monotonic())
        return False  # as if the scheduler had found nothing to run

    monkeypatch.setattr(Pipeline, "advance", stuck)
    eng = Engine(tmp_path, FakeRunner())
    client = Client(ctx, eng.address, 0, POLL_MS)
    client.hello()
    with caplog.at_level(logging.ERROR):
        client.send(request("never", 5))
        client.wait_stats(lambda s: s["num_waiting"] == 1)
        time.sleep(2.5)
        client.send(messages.Shutdown("test over"))
        eng.thread.join(10)
    # One look per event or per STALL_WAIT_S, not a busy spin.
    assert 2 <= len(calls) < 12 and not eng.thread.is_alive()
    assert "no step could be scheduled" in caplog.text and "'num_waiting': 1" in caplog.text
    client.close()


class SlowOnce(FakeRunner):
    """A runner whose first step takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(num_slots=4, max_model_len=2 * LONG)
        self._sleep = seconds

    def execute(self, chunks: list[Chunk], **kw: Any) -> StepResult:
        time.sleep(self._sleep)
        self._sleep = 0.0
        return super().execute(chunks, **kw)


def test_a_slow_step_logs_the_loops_stack_once(
    tmp_path: Path, ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    eng = Engine(tmp_path, SlowOnce(1.0))
    eng.core.watch.slow_s = 0.3
    caplog.set_level(logging.WARNING, logger="engine_core.step_watch")
    try:
        client = Client(ctx, eng.address, 0, POLL_MS)
        client.hello()
        time.sleep(1.0)  # idle: waiting for work is not a slow step
        assert not caplog.records
        client.send(request("r0", 5, max_tokens=3))
        got = client.collect({"r0"})
        assert [t for o in got["r0"] for t in o.new_token_ids] == expected_tokens(5, "r0", 3)
        time.sleep(0.5)  # the fast steps after it log nothing
        client.close()
    finally:
        _stop(eng, ctx)
    (record,) = caplog.records
    text = record.getMessage()
    assert text.startswith("engine step running for") and "in execute" in text, text
    assert "in advance" in text  # the step's own frames, innermost last
