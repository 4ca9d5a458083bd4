"""The API server's side of the engine socket: a set of engines (one today) behind one
``EngineClient``, which hands each request a :class:`RequestStream` and routes the engine's
outputs to it.

The engine is lost three ways, whichever comes first: an ENGINE_DEAD message (for good: the
engine exits and the launcher stops everything), the DEALER's socket monitor reporting the
connection closed, or silence, as judged by the watchdog thread (``apiserver.watchdog``). Then
every in-flight request fails at once with a 503 and new ones get 503 too. A lost connection
is not given up: the client says HELLO again every ``HELLO_RETRY_S`` until the engine answers
READY (which also makes the engine abort what it still runs for this server), and serves again
from there. A READY that differs from the first one means the engine was replaced under this
server, whose tokenizer and limits may no longer match: that, and a reader that fails, is fatal
(``on_fatal``): the server then exits and the launcher starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from apiserver import metrics
from apiserver.errors import engine_unavailable
from apiserver.request_stream import Deadline, RequestStream
from apiserver.watchdog import Watchdog, Watched
from ipc import messages
from ipc.codec import DecodeError, Decoder, Encoder
from ipc.messages import AbortRequests, EngineLoad, EngineRequest, Hello, Ready, RequestOutput
from ipc.transport import ahandshake, asend, connect_client_socket

log = logging.getLogger(__name__)

#: How often a lost connection says HELLO again.
HELLO_RETRY_S = 1.0


class _Engine:
    """One engine connection: its socket, its last load snapshot, when it last spoke."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.load = EngineLoad()
        self.load_at = self.last_seen = time.monotonic()
        self.is_up = True
        self.num_outstanding = 0
        #: Set while a re-handshake waits for the engine's READY.
        self.ready_waiter: asyncio.Future[Ready] | None = None


class EngineClient:
    """Sends requests to the least loaded engine and routes their outputs back."""

    def __init__(
        self,
        address: str,
        index: int,
        heartbeat_timeout_s: float,
        on_fatal: Callable[[str], None],
    ) -> None:
        self._address = address
        self._index = index
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._on_fatal = on_fatal
        self._ctx = zmq.asyncio.Context()
        self._encoder = Encoder()
        self._decoder = Decoder(messages.FROM_ENGINE)
        self._engines: list[_Engine] = []
        self._streams: dict[str, tuple[RequestStream, _Engine]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sends: set[asyncio.Task[Any]] = set()
        self._watchdog: Watchdog | None = None
        self._is_permanent = False
        self.dead_reason: str | None = None
        self.ready: Ready | None = None

    async def start(self, timeout_s: float) -> Ready:
        """Connect, HELLO/READY, start the reader and the watchdog. Raises TimeoutError or
        ``ipc.transport.HandshakeError``."""
        sock = connect_client_socket(self._ctx, self._address, self._index)
        engine = _Engine(sock)
        self.ready = await ahandshake(sock, self._encoder, self._decoder, self._hello(), timeout_s)
        engine.last_seen = time.monotonic()
        self._engines.append(engine)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._spawn(self._read(engine))
        self._spawn(self._watch_socket(engine, monitor))
        loop = asyncio.get_running_loop()
        self._watchdog = Watchdog(loop, self._engines, self._heartbeat_timeout_s, self._silent)
        self._watchdog.start()
        return self.ready

    @property
    def is_alive(self) -> bool:
        return self.ready is not None and self.dead_reason is None

    @property
    def load_snapshot(self) -> tuple[EngineLoad, float]:
        """The load snapshot of the least loaded engine (what admission control compares)
        and when it arrived (``time.monotonic()``)."""
        if not self._engines:
            return EngineLoad(), time.monotonic()
        engine = min(self._engines, key=lambda e: e.load.num_waiting)
        return engine.load, engine.load_at

    @property
    def num_streams(self) -> int:
        """Requests of this server in the engine now."""
        return len(self._streams)

    def stream(self, request: EngineRequest, deadline: Deadline) -> RequestStream:
        """The request's stream: entering it sends the request, leaving it ends it."""
        return RequestStream(self, request, deadline)

    async def open_stream(self, stream: RequestStream) -> None:
        if self.dead_reason is not None or not self._engines:
            raise engine_unavailable(self.dead_reason or "not connected")
        engine = min(self._engines, key=lambda e: e.load.num_waiting + e.num_outstanding)
        self._streams[stream.request_id] = (stream, engine)
        engine.num_outstanding += 1
        await asend(engine.sock, self._encoder, stream.request)

    def close_stream(self, stream: RequestStream) -> None:
        entry = self._streams.pop(stream.request_id, None)
        if entry is None:  # finished, or failed with the engine
            return
        entry[1].num_outstanding -= 1
        if not stream.is_engine_done:
            self._send_abort(entry[1], [stream.request_id])

    def abort_all(self) -> None:
        """Stop every request of this server in the engine (shutdown)."""
        by_engine: dict[int, tuple[_Engine, list[str]]] = {}
        for rid, (stream, engine) in list(self._streams.items()):
            stream.fail(engine_unavailable("the server is shutting down"))
            by_engine.setdefault(id(engine), (engine, []))[1].append(rid)
        self._streams.clear()
        for engine, ids in by_engine.values():
            engine.num_outstanding = 0
            self._send_abort(engine, ids)

    async def close(self) -> None:
        """Flush pending aborts (briefly), then stop the tasks and close the sockets."""
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._sends:
            await asyncio.wait(self._sends, timeout=1.0)
        for task in [*self._tasks, *self._sends]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._sends, return_exceptions=True)
        for engine in self._engines:
            engine.sock.disable_monitor()
            engine.sock.close(linger=0)
        self._ctx.term()

    def _hello(self) -> Hello:
        return Hello(client_index=self._index, pid=os.getpid())

    def _send_abort(self, engine: _Engine, request_ids: list[str]) -> None:
        # Safe from a cancelled task or a ``finally``: the send runs in its own task. While the
        # engine is lost there is nothing to send: the next HELLO aborts everything.
        if self.dead_reason is None:
            self._spawn(asend(engine.sock, self._encoder, AbortRequests(request_ids)), self._sends)

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        group = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    async def _read(self, engine: _Engine) -> None:
        try:
            while True:
                frames = await engine.sock.recv_multipart(copy=False)
                engine.last_seen = time.monotonic()
                try:
                    msg = self._decoder.decode(frames)
                except DecodeError as exc:
                    log.error("dropping malformed message from the engine: %s", exc)
                    continue
                if isinstance(msg, messages.OutputBatch):
                    engine.load, engine.load_at = msg.load, engine.last_seen
                    metrics.ENGINE_RUNNING.set(msg.load.num_running)
                    metrics.ENGINE_WAITING.set(msg.load.num_waiting)
                    metrics.ENGINE_KV_USAGE.set(msg.load.kv_usage)
                    metrics.ENGINE_ENCODER_CACHE.set(msg.load.encoder_cache_bytes)
                    for out in msg.outputs:
                        self._route(out)
                elif isinstance(msg, Ready):
                    if engine.ready_waiter is not None and not engine.ready_waiter.done():
                        engine.ready_waiter.set_result(msg)
                elif isinstance(msg, messages.EngineDead):
                    self._lose(engine, f"engine reported a fatal error: {msg.reason}", False)
        except Exception as exc:  # a reader that cannot read leaves nothing to recover with
            log.exception("reading from the engine failed")
            self._on_fatal(f"reading from the engine failed: {exc!r}")

    def _route(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:  # finished or aborted here already
            return
        entry[0].deliver(out)
        if out.finish_reason is not None:
            del self._streams[out.request_id]
            entry[1].num_outstanding -= 1

    async def _watch_socket(self, engine: _Engine, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._lose(engine, "engine connection closed", True)
        finally:
            monitor.close(linger=0)

    def _silent(self, engine: Watched, seconds: float) -> None:
        """The watchdog's verdict, carried out on the loop."""
        assert isinstance(engine, _Engine)
        if engine.is_up:
            self._lose(engine, f"no message from the engine for {seconds:.1f} s", True)

    def _lose(self, engine: _Engine, reason: str, recoverable: bool) -> None:
        """Fail every in-flight request now and refuse new ones; then reconnect unless the
        engine said it is dead."""
        if not recoverable:
            self._is_permanent = True
        if not engine.is_up:  # lost already; a fatal reason still replaces a passing one
            if not recoverable:
                self.dead_reason = reason
            return
        engine.is_up = False
        self.dead_reason = reason
        log.error("engine is unavailable: %s", reason)
        error = engine_unavailable(reason)
        for stream, _ in self._streams.values():
            stream.fail(error)
        self._streams.clear()
        engine.num_outstanding = 0
        if not self._is_permanent:
            self._spawn(self._reconnect(engine))

    async def _reconnect(self, engine: _Engine) -> None:
        """HELLO until READY; serve again if it is the READY this server started with."""
        loop = asyncio.get_running_loop()
        send: asyncio.Task[Any] | None = None
        while not self._is_permanent:
            engine.ready_waiter = loop.create_future()
            if send is None or send.done():  # a socket without a peer holds the last one
                send = self._spawn(asend(engine.sock, self._encoder, self._hello()), self._sends)
            await asyncio.wait({engine.ready_waiter}, timeout=HELLO_RETRY_S)
            if not engine.ready_waiter.done():
                continue
            ready = engine.ready_waiter.result()
            engine.ready_waiter = None
            if ready != self.ready:
                self._on_fatal(f"the engine changed under this server: {ready} != {self.ready}")
                return
            if self._is_permanent:
                return
            engine.last_seen = time.monotonic()
            engine.is_up = True
            self.dead_reason = None
            log.warning("engine is reachable again; serving")
            return
        engine.ready_waiter = None
