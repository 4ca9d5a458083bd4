"""The API server's side of the engine socket: a set of engines (one today) behind one
``EngineClient``, a per-request output queue, and engine-death detection.

Death is noticed three ways, whichever comes first: an ENGINE_DEAD message, the DEALER's
socket monitor reporting the connection closed (immediate when the engine process dies), or
no message at all for ``HEARTBEAT_TIMEOUT_S`` (the engine's IO thread heartbeats every 0.5 s
of silence). Then every in-flight request fails at once with a 503 and new ones are refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from apiserver import metrics
from apiserver.errors import ApiError, engine_unavailable
from ipc import messages
from ipc.codec import DecodeError, Decoder, Encoder
from ipc.messages import AbortRequests, EngineLoad, EngineRequest, Hello, Ready, RequestOutput
from ipc.transport import ahandshake, asend, connect_client_socket

log = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT_S = 5.0

#: What a request's queue yields: engine outputs, or the error that ends the request.
Output = RequestOutput | ApiError


class _Engine:
    """One engine connection: its socket, its last load snapshot, when it last spoke."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.load = EngineLoad()
        self.last_seen = time.monotonic()
        self.num_outstanding = 0


class EngineClient:
    """Sends requests to the least loaded engine and routes their outputs back."""

    def __init__(self, address: str, index: int) -> None:
        self._address = address
        self._index = index
        self._ctx = zmq.asyncio.Context()
        self._encoder = Encoder()
        self._decoder = Decoder(messages.FROM_ENGINE)
        self._engines: list[_Engine] = []
        self._queues: dict[str, tuple[asyncio.Queue[Output], _Engine]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sends: set[asyncio.Task[Any]] = set()
        self.dead_reason: str | None = None
        self.ready: Ready | None = None

    async def start(self, timeout_s: float) -> Ready:
        """Connect, HELLO/READY, start the reader and watchdogs. Raises TimeoutError or
        ``ipc.transport.HandshakeError``."""
        sock = connect_client_socket(self._ctx, self._address, self._index)
        engine = _Engine(sock)
        hello = Hello(client_index=self._index, pid=os.getpid())
        self.ready = await ahandshake(sock, self._encoder, self._decoder, hello, timeout_s)
        engine.last_seen = time.monotonic()
        self._engines.append(engine)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        for coro in (
            self._read(engine),
            self._watch_socket(engine, monitor),
            self._watchdog(engine),
        ):
            self._spawn(coro)
        return self.ready

    @property
    def is_alive(self) -> bool:
        return self.ready is not None and self.dead_reason is None

    @property
    def load(self) -> EngineLoad:
        """The load snapshot of the least loaded engine (what admission control compares)."""
        if not self._engines:
            return EngineLoad()
        return min((e.load for e in self._engines), key=lambda x: x.num_waiting)

    async def add(self, request: EngineRequest) -> asyncio.Queue[Output]:
        """Send one request; its outputs arrive on the returned queue."""
        if self.dead_reason is not None or not self._engines:
            raise engine_unavailable(self.dead_reason or "not connected")
        engine = min(self._engines, key=lambda e: e.load.num_waiting + e.num_outstanding)
        queue: asyncio.Queue[Output] = asyncio.Queue()
        self._queues[request.request_id] = (queue, engine)
        engine.num_outstanding += 1
        try:
            await asend(engine.sock, self._encoder, request)
        except BaseException:
            # Not encoded, or cancelled mid-send: forget it (its caller never gets the queue to
            # abort it later), and abort it in case its frames left anyway.
            self.abort([request.request_id])
            raise
        return queue

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests in the engine (frees their KV). Safe to call from a cancelled
        task or a ``finally``: the send runs in its own task."""
        by_engine: dict[int, list[str]] = {}
        for rid in request_ids:
            entry = self._queues.pop(rid, None)
            if entry is not None:
                entry[1].num_outstanding -= 1
                by_engine.setdefault(self._engines.index(entry[1]), []).append(rid)
        if self.dead_reason is None:
            for i, ids in by_engine.items():
                sock = self._engines[i].sock
                self._spawn(asend(sock, self._encoder, AbortRequests(ids)), self._sends)

    def abort_all(self) -> None:
        self.abort(list(self._queues))

    async def close(self) -> None:
        """Flush pending aborts (briefly), then stop the tasks and close the sockets."""
        if self._sends:
            await asyncio.wait(self._sends, timeout=1.0)
        for task in [*self._tasks, *self._sends]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)
        for engine in self._engines:
            engine.sock.disable_monitor()
            engine.sock.close(linger=0)
        self._ctx.term()

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[Any]] | None = None) -> None:
        group = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        group.add(task)
        task.add_done_callback(group.discard)

    async def _read(self, engine: _Engine) -> None:
        while True:
            frames = await engine.sock.recv_multipart(copy=False)
            engine.last_seen = time.monotonic()
            try:
                msg = self._decoder.decode(frames)
            except DecodeError as exc:
                log.error("dropping malformed message from the engine: %s", exc)
                continue
            if isinstance(msg, messages.OutputBatch):
                engine.load = msg.load
                metrics.ENGINE_RUNNING.set(msg.load.num_running)
                metrics.ENGINE_WAITING.set(msg.load.num_waiting)
                for out in msg.outputs:
                    self._route(out)
            elif isinstance(msg, messages.EngineDead):
                self._fail(f"engine reported a fatal error: {msg.reason}")
                return

    def _route(self, out: RequestOutput) -> None:
        entry = self._queues.get(out.request_id)
        if entry is None:  # finished or aborted here already
            return
        entry[0].put_nowait(out)
        if out.finish_reason is not None:
            del self._queues[out.request_id]
            entry[1].num_outstanding -= 1

    async def _watch_socket(self, engine: _Engine, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._fail("engine connection closed")
                    return
        finally:
            monitor.close(linger=0)

    async def _watchdog(self, engine: _Engine) -> None:
        while self.dead_reason is None:
            silent = time.monotonic() - engine.last_seen
            if silent > HEARTBEAT_TIMEOUT_S:
                self._fail(f"no message from the engine for {silent:.1f} s")
                return
            await asyncio.sleep(1.0)

    def _fail(self, reason: str) -> None:
        """Fail every in-flight request now; refuse new ones from here on."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        log.error("engine is unavailable: %s", reason)
        error = engine_unavailable(reason)
        for queue, _ in self._queues.values():
            queue.put_nowait(error)
        self._queues.clear()
