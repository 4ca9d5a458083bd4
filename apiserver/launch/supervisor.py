"""The launcher's event machinery: child processes watched through pidfds, ready pipes and
signals, all multiplexed on one selector, so the launcher sleeps until something happens
(a child exits, a server reports ready, a signal arrives, or a deadline passes) and never
polls on a timer.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

#: SIGHUP drains like SIGTERM: a closed terminal or a stray ``kill -HUP`` must not end the
#: launcher without a drain (nothing in fanin reloads in place).
WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FIRST_RESPAWN_DELAY_S = 0.25
MAX_RESPAWN_DELAY_S = 10.0


def respawn_delay(fast_failures: int) -> float:
    """Seconds to wait before respawning a process that crashed ``fast_failures`` times in a
    row right after starting: at once for an isolated crash, then doubling, capped, so that a
    crash loop (bad config, broken install) does not burn the CPU the healthy servers need."""
    if fast_failures <= 0:
        return 0.0
    return min(FIRST_RESPAWN_DELAY_S * 2.0 ** (fast_failures - 1), MAX_RESPAWN_DELAY_S)


@dataclass(eq=False)
class Child:
    """One process the launcher started (``popen`` is None for a forked one). ``ready_fd`` is
    the read end of the pipe the child writes one byte to once it serves; EOF on it (without
    the byte) means it died first."""

    name: str
    pid: int
    popen: subprocess.Popen[bytes] | None
    pidfd: int
    started: float
    ready_fd: int | None = None
    is_ready: bool = False
    exit_code: int | None = None

    @property
    def is_alive(self) -> bool:
        return self.exit_code is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` unless the child was already reaped (its pid may be reused)."""
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def reap(self) -> int:
        """Collect the exit status (the pidfd said it exited) and release the fds."""
        if self.exit_code is None:
            if self.popen is not None:
                self.exit_code = self.popen.wait()
            else:
                self.exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            os.close(self.pidfd)
            self.close_ready_fd()
        return self.exit_code

    def close_ready_fd(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


def spawn(
    name: str,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    with_ready_pipe: bool = False,
) -> Child:
    """Start ``cmd``. With ``with_ready_pipe`` a pipe's write end is passed to the child and
    ``{ready_fd}`` in ``cmd`` is replaced by its number."""
    ready_r: int | None = None
    fds = list(pass_fds)
    argv = list(cmd)
    if with_ready_pipe:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        fds.append(ready_w)
        argv = [a.replace("{ready_fd}", str(ready_w)) for a in argv]
    try:
        # A session of its own: a terminal's Ctrl-C reaches only the launcher, which then
        # drains the servers before it stops the engine (PDEATHSIG still ties them to us).
        popen = subprocess.Popen(
            argv, env=None if env is None else dict(env), pass_fds=fds, start_new_session=True
        )
    except BaseException:
        if ready_r is not None:
            os.close(ready_r)
        raise
    finally:
        if with_ready_pipe:
            # Our copy of the write end must go, or EOF never comes when the child dies.
            os.close(fds[-1])
    return Child(name, popen.pid, popen, os.pidfd_open(popen.pid), time.monotonic(), ready_r)


def fork(name: str, run: Callable[[int], int], in_child: Callable[[], None]) -> Child:
    """Fork a child that runs ``run(ready_w)`` (``ready_w``: its ready pipe's write end) and
    exits with the code it returns, like ``spawn`` without the exec: the child keeps what
    this process imported. ``in_child`` first releases what the child must not hold of this
    process (the launcher's selector and pidfds).

    The child gets its own session, as ``spawn``'s do, and the default handlers for
    ``WATCHED_SIGNALS`` with no wakeup fd: this process's handlers would write a signal sent
    to the child into the launcher's own wakeup socket, and the launcher would act on a
    SIGTERM it never got. Those signals stay blocked across the fork until the child has
    reset them. It never returns into the caller's frames (whose ``finally`` blocks would
    stop the launcher's children and remove its run dir): it leaves with ``os._exit``."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_r)
        os.close(ready_w)
        raise
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in WATCHED_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            in_child()
            code = run(ready_w)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(ready_w)  # the child's copy is the only one: EOF when it dies
    return Child(name, pid, None, os.pidfd_open(pid), time.monotonic(), ready_r)


class Events:
    """One selector for pidfds, ready pipes and signals (through ``signal.set_wakeup_fd``).

    Use as a context manager: it installs handlers for ``WATCHED_SIGNALS`` on entry and
    restores the previous ones on exit.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("signal", None))
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup_fd = -1

    def __enter__(self) -> Events:
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in WATCHED_SIGNALS:
            # The C-level handler writes the signal number to the wakeup socket; that byte is
            # the event, so the Python-level handler has nothing left to do.
            self._old_handlers[sig] = signal.signal(sig, _ignore_in_python)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._old_wakeup_fd)
        self.close_in_child()

    def close_in_child(self) -> None:
        """Release the selector and the wakeup socket: the end of ``__exit__``, and all of it
        in a forked child (whose handlers ``fork`` already reset), where the signal state the
        parent keeps must not be touched."""
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def watch(self, child: Child) -> None:
        """Wake for ``child``'s exit and its ready byte."""
        self._selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
        if child.ready_fd is not None:
            self._selector.register(child.ready_fd, selectors.EVENT_READ, ("ready", child))

    def watch_fd(self, fd: int, tag: str) -> None:
        """Wake when ``fd`` becomes readable; the event is ``(tag, None)``."""
        self._selector.register(fd, selectors.EVENT_READ, (tag, None))

    def unwatch_fd(self, fd: int) -> None:
        self._selector.unregister(fd)

    def unwatch(self, child: Child) -> None:
        for fd in (child.pidfd, child.ready_fd):
            if fd is not None and fd in self._selector.get_map():
                self._selector.unregister(fd)

    def wait(self, deadline: float | None) -> list[tuple[str, object]]:
        """Block until something happens or ``deadline`` (time.monotonic) passes.

        Returns events: ``("signal", signum)``, ``("exit", child)`` (already reaped),
        ``("ready", child)`` (ready byte read), ``("ready_eof", child)``, or custom tags.
        An empty list means the deadline passed.
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        events: list[tuple[str, object]] = []
        for key, _ in self._selector.select(timeout):
            tag, child = key.data
            if tag == "signal":
                events.extend(("signal", signum) for signum in self._drain_signals())
            elif tag == "exit":
                assert isinstance(child, Child)
                self.unwatch(child)
                child.reap()
                events.append(("exit", child))
            elif tag == "ready":
                assert isinstance(child, Child)
                if child.ready_fd is None:  # reaped by an exit event of this same batch
                    continue
                got = os.read(child.ready_fd, 64)
                self._selector.unregister(child.ready_fd)
                child.close_ready_fd()
                if got:
                    child.is_ready = True
                    events.append(("ready", child))
                else:
                    events.append(("ready_eof", child))
            else:
                events.append((tag, child))
        return events

    def _drain_signals(self) -> list[int]:
        signums: list[int] = []
        while True:
            try:
                data = self._wake_r.recv(64)
            except BlockingIOError:
                return signums
            if not data:
                return signums
            signums.extend(data)


def _ignore_in_python(signum: int, frame: FrameType | None) -> None:
    """Placeholder handler: the signal is consumed from the wakeup socket instead."""
