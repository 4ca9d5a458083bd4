"""The engine's ZeroMQ IO thread: the only owner of the ROUTER socket.

Decoding and encoding (and the socket syscalls) run here, off the busy loop. The thread answers
HELLO with READY itself, so a (re)connecting API server gets its READY even while a long step
runs, hands every other message to the busy loop through ``inbox``, sends what the busy loop
queues, and heartbeats each connected API server (an empty OutputBatch with the latest load)
whenever nothing else went to it for ``HEARTBEAT_S``.

Signals reach the busy loop through here too: ``signal_fd`` is the read end of
``signal.set_wakeup_fd``. A process-directed SIGTERM may be delivered to any thread (CUDA and
torch start many), and a Python handler runs only once the main thread wakes, which an idle loop
blocked on ``inbox`` never does; the wakeup fd is written whichever thread took the signal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from ipc import messages, transport
from ipc.codec import DecodeError, Decoder, Encoder

logger = logging.getLogger(__name__)

#: Longest silence towards a connected API server; they declare the engine dead after 5 s.
HEARTBEAT_S = 0.5
#: The longest the thread reads and prepares inbound messages before it sends what is queued
#: and heartbeats. Reading until the socket is empty starved the sends: on the GPU host a burst
#: of image requests (a pinned copy of each one's pixels in ``prepare``) kept the socket
#: readable for 5 s, no output or heartbeat left, and every API server declared the engine
#: dead and failed all it had in flight.
RECEIVE_SLICE_S = 0.02
#: How long closing the socket may wait for a final message (ENGINE_DEAD) to leave. A plain
#: shutdown does not wait: API servers are being stopped too.
FINAL_LINGER_MS = 2000


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from API server ``client`` (a routing identity) for the busy loop."""

    client: bytes
    msg: Any


@dataclass(frozen=True, slots=True)
class ClientGone:
    """Sending to ``client`` failed with EHOSTUNREACH: its socket is gone."""

    client: bytes


@dataclass(frozen=True, slots=True)
class IOFailed:
    """The IO thread itself crashed; the engine cannot talk to anyone any more."""

    reason: str


InboxEvent = Inbound | ClientGone | IOFailed


class EngineIO:
    """Owns the ROUTER in a daemon thread. ``send``/``set_load``/``close`` are for the busy loop;
    ``inbox`` is what it reads (requests, aborts, client departures, and SHUTDOWN for a signal
    read from ``signal_fd``)."""

    def __init__(
        self,
        address: str,
        ready: messages.Ready,
        signal_fd: int | None = None,
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        """``prepare``: applied here to every message for the busy loop before it is queued
        (work on a message that need not hold up a step, e.g. ``host.pin_pixels``)."""
        self.inbox: queue.SimpleQueue[InboxEvent] = queue.SimpleQueue()
        self._ready = ready
        self._prepare = prepare
        self._outbox: queue.SimpleQueue[tuple[bytes | None, msgspec.Struct] | None] = (
            queue.SimpleQueue()
        )
        self._load = messages.EngineLoad()
        self._ctx = zmq.Context()
        self._sock = transport.bind_engine_socket(self._ctx, address)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._signal_fd = signal_fd
        self._clients: dict[bytes, float] = {}  # identity -> monotonic time of the last send
        self._linger_ms = 0
        self._thread = threading.Thread(target=self._run, name="engine-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, client: bytes | None, msg: msgspec.Struct) -> None:
        """Queue ``msg`` for ``client``, or for every connected client when None."""
        self._outbox.put((client, msg))
        self._wake()

    def set_load(self, load: messages.EngineLoad) -> None:
        """Latest load snapshot, carried by heartbeats (a plain attribute swap)."""
        self._load = load

    def close(self, final: msgspec.Struct | None = None, timeout_s: float = 5.0) -> None:
        """Send what is queued, then ``final`` to every client, then close the socket."""
        if final is not None:
            self._linger_ms = FINAL_LINGER_MS
            self.send(None, final)
        self._outbox.put(None)
        self._wake()
        self._thread.join(timeout_s)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        encoder, decoder = Encoder(), Decoder(messages.TO_ENGINE)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._signal_fd is not None:
            poller.register(self._signal_fd, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(HEARTBEAT_S * 500))
                if self._sock in events:
                    self._receive_some(encoder, decoder)
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                if self._signal_fd in events:
                    self._forward_signals()
                if not self._send_all(encoder):
                    break
                self._heartbeat(encoder)
        except Exception as exc:  # never die silently: the busy loop must learn of it
            logger.exception("engine IO thread failed")
            self.inbox.put(IOFailed(f"IO thread failed: {exc!r}"))
        finally:
            self._sock.close(linger=self._linger_ms)
            self._ctx.term()

    def _forward_signals(self) -> None:
        assert self._signal_fd is not None
        with contextlib.suppress(BlockingIOError):
            for signum in os.read(self._signal_fd, 64):
                reason = f"signal {signal.Signals(signum).name}"
                self.inbox.put(Inbound(b"", messages.Shutdown(reason)))

    def _receive_some(self, encoder: Encoder, decoder: Decoder) -> None:
        """What the socket holds, for at most ``RECEIVE_SLICE_S``; the poll comes back at once
        for the rest."""
        deadline = time.monotonic() + RECEIVE_SLICE_S
        while time.monotonic() < deadline and self._sock.poll(0):
            client, frames = transport.recv_routed(self._sock)
            try:
                msg = decoder.decode(frames)
            except DecodeError as exc:
                logger.warning("dropped a malformed message from %r: %s", client, exc)
                continue
            if isinstance(msg, messages.Hello):
                # Abort first (in order with this client's later ADDs), then answer.
                self.inbox.put(Inbound(client, msg))
                self._deliver(encoder, client, self._ready)
            else:
                self._clients.setdefault(client, 0.0)
                if self._prepare is not None:
                    self._prepare(msg)
                self.inbox.put(Inbound(client, msg))

    def _send_all(self, encoder: Encoder) -> bool:
        """Send everything queued; False once the close sentinel is reached."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            client, msg = item
            for target in [client] if client is not None else list(self._clients):
                self._deliver(encoder, target, msg)

    def _heartbeat(self, encoder: Encoder) -> None:
        now = time.monotonic()
        for client, last in list(self._clients.items()):
            if now - last >= HEARTBEAT_S:
                self._deliver(encoder, client, messages.OutputBatch([], self._load))

    def _deliver(self, encoder: Encoder, client: bytes, msg: msgspec.Struct) -> None:
        try:
            transport.send(self._sock, encoder, msg, identity=client)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            if self._clients.pop(client, None) is not None or isinstance(msg, messages.Ready):
                # A client gone before its READY left too. INFO: the busy loop warns when a
                # client that left still had requests.
                logger.info("client %r disconnected", client)
                self.inbox.put(ClientGone(client))
            return
        self._clients[client] = time.monotonic()
