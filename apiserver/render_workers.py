"""Render worker processes (``--preprocess-mode process``): the image path of preprocessing
(chat template, tokenizer, image decode, the model's image processor) in processes of its own,
so that the API server's event loop never waits for a render thread to let go of the GIL.

Why: the image processor runs Python between its native ops, and a render thread in the
server's process holds the GIL meanwhile, so every event-loop callback (accept, read, write)
can wait behind one. On the GPU host at 2x overload with 4 servers, /health p99 was 76-120 ms
with render threads and 7.5-17.3 ms with render workers (bench/results/overload.md).

How: ``RenderWorkers.fork`` runs in the API server's ``main`` before the server starts any
thread (a child forked while other threads hold locks can deadlock on them), so each worker is
a one-thread copy of a process that already imported torch and transformers (the launcher
preloads them). A worker waits on its end of a socketpair for the engine's ``Ready`` (known
only once the engine answers), loads the tokenizer and processor, then renders one chat at a
time. Messages are pickles (protocol 5) with tensors and arrays as out-of-band buffers: a
photo's patches cross the socket as one kernel copy each way and none in Python. Each worker
has an IO thread in the server that does its exchanges (blocking reads, the GIL let go in
each) and takes the next chat from a queue all of them share as soon as it has read a reply.
Both ends are this server's own processes, so unpickling their messages is safe.

A worker ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C and systemd's stop signal
reach the whole process group, and the server keeps rendering while it drains); it exits when
its socket closes, or with the server (``die_with_parent``). A worker that dies mid-render
fails that request; the server then exits for the launcher to start a fresh one, since forking
a new worker from a running server is what the early fork avoids.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch

from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from ipc import codec
from ipc.lifecycle import die_with_parent, name_process

log = logging.getLogger(__name__)

#: A message: the length of all that follows this header, its pickle's length and the number
#: of out-of-band buffers; then one length per buffer, the pickle, and the buffers, each at an
#: offset from the header's end that is a multiple of ``_ALIGN`` (tensors are views of them).
#: All of it after the header is read in one call, and sent in one with the header: each
#: blocking call costs the IO thread a GIL round trip, up to the switch interval on a busy
#: server (bench/worker_hop.py).
_HEADER = struct.Struct("<QQI")
_LENGTH = struct.Struct("<Q")
_ALIGN = 64
#: Render workers yield the cores to everything else of the host: under contention, the
#: engine core's step loop and the servers' event loops (latency) go before image processing
#: (throughput). On Linux they run under SCHED_IDLE, which a waking task of any other policy
#: preempts at once; at a nice level (niced +5, a weight a third of nice 0's) the scheduler
#: may first let the running worker finish its slice, milliseconds of every /health probe's
#: wait on a saturated host. Elsewhere they run this much nicer than the server. Safe for
#: processes, unlike render threads, which held the loop's GIL while descheduled
#: (bench/results/overload.md). On the GPU host at 8 servers, with 16 workers at nice 0 the
#: engine's first step took 51 ms (29 with render threads) and the sweep did 282 req/s
#: against 391 (bench/results/scaleout.md).
RENDER_NICE = 5


def yield_cores() -> None:
    """Put this process (single-threaded yet: threads started later inherit it) below every
    other of the host in the scheduler's order."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a sandbox that forbids it
        os.nice(RENDER_NICE)


class _Pickler(pickle.Pickler):
    """Tensors as the engine wire's (dtype, shape, raw bytes), the bytes out of band: torch's
    own reduction copies them."""

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        name, shape, raw = codec.tensor_bytes(obj)
        return codec.tensor_from_bytes, (name, shape, pickle.PickleBuffer(raw))


def _layout(body: int, sizes: list[int]) -> tuple[int, list[int]]:
    """The buffers' offsets after the lengths and the pickle, and where the message ends."""
    at = _LENGTH.size * len(sizes) + body
    offsets = []
    for n in sizes:
        at += -at % _ALIGN
        offsets.append(at)
        at += n
    return at, offsets


def _dumps(obj: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    body = io.BytesIO()
    _Pickler(body, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    sizes = [r.nbytes for r in raws]
    total, offsets = _layout(body.tell(), sizes)
    head = _HEADER.pack(total, body.tell(), len(raws)) + b"".join(_LENGTH.pack(n) for n in sizes)
    parts: list[bytes | memoryview] = [head, body.getbuffer()]
    end = _LENGTH.size * len(sizes) + body.tell()
    for raw, at in zip(raws, offsets, strict=True):
        parts += [bytes(at - end), raw] if at > end else [raw]
        end = at + raw.nbytes
    return parts


class WorkerLost(ConnectionError):
    """A render worker's socket closed: the worker died."""


def _died() -> ApiError:
    return ApiError(503, "a preprocessing worker died; retry", headers={"Retry-After": "1"})


# --- both sides: blocking reads and writes ------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    # MSG_WAITALL: the kernel fills the whole buffer before the call returns, so a photo's
    # patches (MBs through a ~200 KB socket buffer) cost the reading thread one GIL round trip,
    # not one per ~200 KB read; on a busy server each of those waited for the loop thread to
    # let go of the GIL (up to the switch interval). The loop below is for the short counts a
    # signal can still cause. bench/worker_hop.py: 3.5-5.5x the rate beside a busy loop.
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if k == 0:
            raise WorkerLost("socket closed")
        got += k
    return buf


def _recv(sock: socket.socket) -> Any:
    total, body, count = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    data = memoryview(_recv_exact(sock, total))
    sizes = [_LENGTH.unpack_from(data, _LENGTH.size * i)[0] for i in range(count)]
    start = _LENGTH.size * count
    _, offsets = _layout(body, sizes)
    buffers = [data[at : at + n] for at, n in zip(offsets, sizes, strict=True)]
    return pickle.loads(data[start : start + body], buffers=buffers)


def _send(sock: socket.socket, obj: Any) -> None:
    views = [memoryview(part) for part in _dumps(obj)]
    while views:  # one call, unless a signal or a full buffer cuts it short
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if views:
            views[0] = views[0][sent:]


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # not cancelled meanwhile
        future.set_result(result)


def _exchange(sock: socket.socket, message: Any) -> Any:
    """The server's side of one request to a worker (on its IO thread): send, read the reply."""
    _send(sock, message)
    return _recv(sock)


def _serve(sock: socket.socket, config: ServerConfig) -> None:
    """Render until the server closes the socket. Replies: ("ok", result, seconds) or
    ("error", (status, message, param, code, headers), seconds)."""
    from apiserver.launch.preload import freeze_heap
    from apiserver.renderer import Renderer

    renderer: Renderer | None = None
    while True:
        try:
            op, args = _recv(sock)
        except WorkerLost:
            return
        started = time.perf_counter()
        try:
            if op == "load":
                renderer = Renderer.load(args.model, args, config, 1)
                freeze_heap()
                result = None
            else:
                assert renderer is not None, "chat before load"
                result = renderer.chat_blocking(*args)
            reply: tuple[str, Any, float] = ("ok", result, time.perf_counter() - started)
        except ApiError as exc:
            error = (exc.status, exc.message, exc.param, exc.code, exc.headers)
            reply = ("error", error, time.perf_counter() - started)
        except Exception as exc:  # a bug or a native library's error: this request's 500
            log.exception("render worker: %s failed", op)
            error = (500, f"preprocessing failed: {exc!r}", None, None, {})
            reply = ("error", error, time.perf_counter() - started)
        try:
            _send(sock, reply)
        except OSError:  # the server closed its end mid-render: it is shutting down
            return


def _worker_main(sock: socket.socket, config: ServerConfig, parent: int, title: str) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent, signal.SIGKILL)  # SIGTERM is ignored
    name_process(title)
    yield_cores()
    _serve(sock, config)
    # The renderer's module made the server's metrics here too (zeros: a worker observes
    # none; the server does, from its replies); in multiprocess mode, drop this pid's files.
    from apiserver import metrics

    metrics.mark_dead(os.getpid())


# --- the server's side ----------------------------------------------------------------------


class _Chat:
    """One chat for the workers: queued by the event loop, taken by the first free IO thread."""

    __slots__ = ("message", "future", "queued_at", "abandoned")

    def __init__(self, message: Any, future: asyncio.Future[Any]) -> None:
        self.message = message
        self.future = future
        self.queued_at = time.perf_counter()
        #: Its request was cancelled before a worker took it: no worker renders it.
        self.abandoned = False


class RenderWorkers:
    """The render worker processes of one API server, one chat at a time each."""

    def __init__(self, socks: list[socket.socket], pids: list[int]) -> None:
        self._socks = socks
        self.pids = pids
        self._lost: Callable[[str], None] | None = None
        self._dead = False  # a worker died: the server is on its way out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfds: dict[int, int] = {}  # worker pid -> its pidfd, readable once it exits
        # One IO thread a worker does its exchanges: blocking reads and writes, the GIL let go
        # in each, so a photo's patches (MBs, ~200 KB a read) cross at the kernel's pace. On
        # the event loop each read waited for a loop iteration, ~20 of them a photo under
        # load, and the workers sat idle two thirds of the time (bench/results/overload.md).
        # A thread takes the next chat from this queue as soon as it has read a reply: a
        # worker handed back through the loop waited for its iterations as well, a few
        # milliseconds each on a busy server, before the next chat could reach it.
        self._chats: queue.SimpleQueue[_Chat | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @classmethod
    def fork(
        cls, count: int, config: ServerConfig, title: str, close_in_child: Iterable[int]
    ) -> RenderWorkers:
        """Fork ``count`` workers now (before any thread starts), named ``{title}.{i}`` in ps.
        ``close_in_child``: the server's descriptors a worker must not hold (its listening
        socket: a worker holding it would keep the port open after the server died)."""
        close = list(close_in_child)
        socks: list[socket.socket] = []
        pids: list[int] = []
        parent = os.getpid()
        for i in range(count):
            ours, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker; it never returns into the server's code
                status = 1
                try:
                    ours.close()
                    for s in socks:
                        s.close()
                    for fd in close:
                        os.close(fd)
                    _worker_main(theirs, config, parent, f"{title}.{i}")
                    status = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(status)
            theirs.close()
            socks.append(ours)
            pids.append(pid)
        return cls(socks, pids)

    async def start(self, ready: Any, on_lost: Callable[[str], None]) -> None:
        """Load every worker's tokenizer and processor for the engine's ``ready``; ``on_lost``
        is called once a worker has died."""
        self._lost = on_lost
        self._loop = loop = asyncio.get_running_loop()
        for pid in self.pids:  # an idle worker's death is noticed too, not only a busy one's
            self._pidfds[pid] = fd = os.pidfd_open(pid)
            loop.add_reader(fd, self._exited, pid)
        loads = []
        for i, sock in enumerate(self._socks):
            load = _Chat(("load", ready), loop.create_future())
            loads.append(load.future)
            thread = threading.Thread(
                target=self._io, args=(sock, load), name=f"render-io_{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        for (status, detail, _), _ in await asyncio.gather(*loads):
            if status != "ok":
                raise RuntimeError(f"a render worker could not load the model: {detail[1]}")

    async def chat(self, *args: Any) -> tuple[Any, float, float]:
        """``Renderer.chat_blocking(*args)`` on the first free worker: (its result, seconds
        waited for a worker, seconds it rendered). Its ApiError is raised here."""
        assert self._loop is not None, "start() first"
        if self._dead:
            raise _died()
        job = _Chat(("chat", args), self._loop.create_future())
        self._chats.put(job)
        try:
            reply, waited = await job.future
        except asyncio.CancelledError:
            # Not rendered unless a worker has it already; one that has reads the reply
            # anyway (the next chat would read it otherwise) and drops it.
            job.abandoned = True
            raise
        except (WorkerLost, OSError):
            raise _died() from None
        status, detail, took = reply
        if status != "ok":
            raise ApiError(detail[0], detail[1], param=detail[2], code=detail[3], headers=detail[4])
        return detail, waited, took

    def _io(self, sock: socket.socket, job: _Chat | None) -> None:
        """One worker's IO thread: its load (``job``), then chats until the close or the
        worker's death."""
        while job is not None:
            if not job.abandoned:
                taken = time.perf_counter()
                try:
                    reply = _exchange(sock, job.message)
                except (WorkerLost, OSError) as exc:
                    self._on_loop(self._failed, job, exc)
                    return
                self._on_loop(_resolve, job.future, (reply, taken - job.queued_at))
            job = self._chats.get()

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _failed(self, job: _Chat, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
        self._die(f"a render worker died ({exc!r})")

    def _exited(self, pid: int) -> None:
        self._unwatch(pid)  # a pidfd stays readable: left watched, it would spin the loop
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it
        self._die(f"render worker {pid} exited")

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)

    def _die(self, reason: str) -> None:
        if not self._dead and self._lost is not None:
            self._lost(reason)
        self._dead = True

    def close(self) -> None:
        """Close the sockets: each worker exits when it sees its own close. Shut down first:
        that also wakes an IO thread blocked on a reply, which close alone would not."""
        self._dead = True  # what fails from here on is the close, not a worker's death
        for pid in list(self._pidfds):
            self._unwatch(pid)
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        # Chats no thread took fail here (a thread that takes one first fails it itself);
        # then one stop for each thread that is still waiting.
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._chats.get_nowait()
                if job is not None and not job.future.done():
                    job.future.set_exception(WorkerLost("closed"))
        for _ in self._threads:
            self._chats.put(None)
