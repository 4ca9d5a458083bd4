"""The engine client against a stand-in engine in the test (a real ROUTER on a real ipc://
socket, speaking the real wire protocol): request streams (the abort on every way out,
cancellation racing an output, deadlines, error mapping) and the watchdog (silence, recovery by
re-handshake, a stalled loop that is not the engine's fault, a changed engine, a stuck loop)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from apiserver.engine_client import EngineClient
from apiserver.errors import ApiError
from apiserver.launch.run_dir import engine_address, make_run_dir
from apiserver.request_stream import Deadline
from ipc import messages, transport
from ipc.codec import Decoder, Encoder

ROOT = Path(__file__).resolve().parents[2]


def _ready(pid: int = 4242) -> messages.Ready:
    return messages.Ready(
        protocol_version=messages.PROTOCOL_VERSION,
        model="stand-in",
        max_model_len=64,
        vocab_size=100,
        kv_capacity_tokens=256,
        max_num_seqs=4,
        supports_images=False,
        supports_embeddings=True,
        supports_generation=True,
        engine_pid=pid,
    )


class Engine:
    """A ROUTER that answers HELLO with READY, records what it receives, and heartbeats
    every 0.1 s while ``beating``."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(address)
        self.encoder, self.decoder = Encoder(), Decoder(messages.TO_ENGINE)
        self.ready = _ready()
        self.received: list[Any] = []
        self.client: bytes | None = None
        self.beating = True
        self.answering = True
        self._tasks = [asyncio.ensure_future(self._serve()), asyncio.ensure_future(self._beat())]

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart(copy=False)
            msg = self.decoder.decode(frames)
            self.received.append(msg)
            self.client = identity.bytes
            if isinstance(msg, messages.Hello) and self.answering:
                await self.send(self.ready)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.beating and self.client is not None:
                await self.send(messages.OutputBatch([]))

    async def send(self, msg: Any) -> None:
        assert self.client is not None
        await transport.asend(self.sock, self.encoder, msg, identity=self.client)

    async def wait_for(self, kind: type, request_id: str | None = None) -> Any:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for msg in self.received:
                if isinstance(msg, kind) and (request_id is None or _names(msg, request_id)):
                    return msg
            await asyncio.sleep(0.005)
        raise AssertionError(f"the engine never got {kind.__name__} {request_id or ''}")

    def count(self, kind: type) -> int:
        return sum(isinstance(m, kind) for m in self.received)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()


def _names(msg: Any, request_id: str) -> bool:
    if isinstance(msg, messages.AbortRequests):
        return request_id in msg.request_ids
    return getattr(msg, "request_id", None) == request_id


def _request(rid: str) -> messages.EngineRequest:
    return messages.EngineRequest(
        request_id=rid,
        prompt_token_ids=np.arange(1, 5, dtype=np.int32),
        sampling=messages.SamplingParams(max_tokens=8),
    )


class Harness:
    def __init__(self, engine: Engine, client: EngineClient, fatal: list[str]) -> None:
        self.engine, self.client, self.fatal = engine, client, fatal


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _consume(client: EngineClient, rid: str, got: list[messages.RequestOutput]) -> None:
    async with client.stream(_request(rid), Deadline.after(30)) as outputs:
        async for out in outputs:
            got.append(out)


async def _start(h: Harness, rid: str) -> tuple[asyncio.Future[None], list[Any]]:
    """A request consumed in a task of its own, once the engine has it."""
    got: list[messages.RequestOutput] = []
    task = asyncio.ensure_future(_consume(h.client, rid, got))
    await h.engine.wait_for(messages.EngineRequest, rid)
    return task, got


def test_cancel_racing_an_output_still_aborts(tmp_path: Path) -> None:
    """The output and the cancellation land in the same loop turn (the reader routes an
    output, then the client's disconnect cancels the handler): the request must be aborted
    every time, which asyncio.wait_for on Python 3.10/3.11 failed to guarantee."""

    async def main() -> None:
        async with _harness(tmp_path) as h:
            for i in range(40):
                rid = f"race-{i}"
                task, _ = await _start(h, rid)
                h.client._route(messages.RequestOutput(rid, [7]))
                if i % 2:  # both orders within the turn
                    task.cancel()
                else:
                    asyncio.get_running_loop().call_soon(task.cancel)
                    h.client._route(messages.RequestOutput(rid, [8]))
                with pytest.raises(asyncio.CancelledError):
                    await task
                await h.engine.wait_for(messages.AbortRequests, rid)
            assert h.engine.count(messages.AbortRequests) == 40

    run(main())


def test_finished_request_sends_no_abort(tmp_path: Path) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            task, _ = await _start(h, "done")
            h.client._route(messages.RequestOutput("done", [1], finish_reason="length"))
            task.cancel()  # the engine already finished it: nothing to abort
            with pytest.raises(asyncio.CancelledError):
                await task
            task, full = await _start(h, "full")
            await h.engine.send(
                messages.OutputBatch([messages.RequestOutput("full", [2], finish_reason="stop")])
            )
            await asyncio.wait_for(task, 10)
            assert [o.new_token_ids for o in full] == [[2]]
            await asyncio.sleep(0.2)
            assert h.engine.count(messages.AbortRequests) == 0

    run(main())


def test_leaving_early_aborts_and_errors_map(tmp_path: Path) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            async with h.client.stream(_request("early"), Deadline.after(30)) as outputs:
                await h.engine.send(messages.OutputBatch([messages.RequestOutput("early", [3])]))
                async for _ in outputs:
                    break  # a stop string: the engine would go on
            await h.engine.wait_for(messages.AbortRequests, "early")

            with pytest.raises(ApiError) as exc:
                async with h.client.stream(_request("slow"), Deadline.after(0.2)) as outputs:
                    async for _ in outputs:
                        pass
            assert exc.value.status == 408
            await h.engine.wait_for(messages.AbortRequests, "slow")

            for out, status in (
                (
                    messages.RequestOutput(
                        "bad", finish_reason="error", error=messages.RequestError(400, "no")
                    ),
                    400,
                ),
                (messages.RequestOutput("bad", finish_reason="abort"), 503),
            ):
                with pytest.raises(ApiError) as exc:
                    async with h.client.stream(_request("bad"), Deadline.after(30)) as outputs:
                        await h.engine.send(messages.OutputBatch([out]))
                        async for _ in outputs:
                            pass
                assert exc.value.status == status
            assert h.engine.count(messages.AbortRequests) == 2  # only "early" and "slow"

    run(main())


def test_silence_fails_requests_then_reconnects(tmp_path: Path) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            task, _ = await _start(h, "inflight")
            h.engine.beating = h.engine.answering = False
            with pytest.raises(ApiError) as exc:
                await asyncio.wait_for(task, 10)
            assert exc.value.status == 503 and "no message from the engine" in exc.value.message
            assert not h.client.is_alive
            with pytest.raises(ApiError):
                async with h.client.stream(_request("refused"), Deadline.after(30)):
                    pass
            hellos = h.engine.count(messages.Hello)
            h.engine.beating = h.engine.answering = True
            await _until(lambda: h.client.is_alive)
            assert h.engine.count(messages.Hello) > hellos  # a re-handshake, not just beats
            task, _ = await _start(h, "after")
            await h.engine.send(
                messages.OutputBatch([messages.RequestOutput("after", [4], finish_reason="stop")])
            )
            await asyncio.wait_for(task, 10)
            assert not h.fatal

    run(main())


def test_stalled_loop_is_not_a_silent_engine(tmp_path: Path) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            time.sleep(2.5)  # the loop itself stops, 2.5x the heartbeat timeout
            await asyncio.sleep(0.6)
            assert h.client.is_alive, h.client.dead_reason

    run(main())


def test_a_changed_engine_is_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        async with _harness(tmp_path) as h:
            h.engine.beating = h.engine.answering = False
            await _until(lambda: not h.client.is_alive)
            h.engine.ready = _ready(pid=9999)  # another engine answers
            h.engine.answering = True
            await _until(lambda: bool(h.fatal))
            assert "changed" in h.fatal[0]
            assert not h.client.is_alive

    run(main())


def test_stuck_loop_exits_the_process() -> None:
    script = textwrap.dedent(
        """
        import asyncio, time
        from apiserver import watchdog
        watchdog.LOOP_STALL_EXIT_S = 1.0

        async def main():
            watchdog.Watchdog(asyncio.get_running_loop(), [], 5.0, print).start()
            await asyncio.sleep(0.3)
            time.sleep(30)  # stuck for good

        asyncio.run(main())
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"event loop stuck" in proc.stderr
    assert time.monotonic() - start < 20


@contextlib.asynccontextmanager
async def _harness(tmp_path: Path) -> AsyncIterator[Harness]:
    run_dir = make_run_dir()
    address = engine_address(run_dir)
    engine = Engine(address)
    fatal: list[str] = []
    client = EngineClient(address, 0, heartbeat_timeout_s=1.0, on_fatal=fatal.append)
    try:
        await client.start(10.0)
        yield Harness(engine, client, fatal)
    finally:
        await client.close()
        await engine.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)
