"""The API server's watchdog: a thread that judges, off the event loop, whether the engine has
gone silent and whether the loop itself is stuck.

Engine silence. The engine's IO thread sends something at least every 0.5 s, and the engine
client's reader stamps ``last_seen`` on every message. Silence is the engine's fault only if
the loop was running to hear it: a stalled loop (a burst of work, or this whole process stopped
with SIGSTOP) leaves heartbeats unread in the socket, and a watchdog on that loop would wake
after the stall, see old stamps and fail a healthy engine. So a loop tick stamps
``loop_seen`` every ``TICK_S``; after a gap of more than ``STALL_GAP_S`` it restarts the clock
(``heard_since``). The engine is declared silent after ``timeout_s`` of a running loop without
a message, and only while the loop runs (the verdict is carried out on it).

Loop stall. A loop that misses every tick for ``LOOP_STALL_EXIT_S`` of this thread's own
running time is stuck for good (a deadlock, C code that never returns); nothing on the loop can
recover it, so the thread ends the process and the launcher starts a new one. The thread counts
its wake-ups instead of reading the clock, so that a SIGSTOP of the process, which stops the
thread as well, is not taken for a stuck loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

TICK_S = 0.25
STALL_GAP_S = 1.0
LOOP_STALL_EXIT_S = 30.0
#: Exit status of a server whose loop stopped running.
EXIT_LOOP_STALLED = 3


class Watched(Protocol):
    """What the watchdog reads of one engine connection, from its thread (plain attributes)."""

    last_seen: float  # time.monotonic() of the engine's last message
    is_up: bool  # False while the connection is lost (no verdict then)


class Watchdog:
    """Calls ``on_silent(engine, seconds)`` on the loop when a watched engine went silent."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engines: Sequence[Watched],
        timeout_s: float,
        on_silent: Callable[[Watched, float], None],
    ) -> None:
        self._loop = loop
        self._engines = engines
        self._timeout_s = timeout_s
        self._on_silent = on_silent
        self._loop_seen = self._heard_since = time.monotonic()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watchdog", daemon=True)

    def start(self) -> None:
        """Start the loop tick (call on the loop) and the thread."""
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._thread.is_alive():
            self._thread.join(2 * TICK_S)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._loop_seen > STALL_GAP_S:
            self._heard_since = now
        self._loop_seen = now
        self._tick_handle = self._loop.call_later(TICK_S, self._tick)

    def _run(self) -> None:
        missed, seen = 0, self._loop_seen
        while not self._stop.wait(TICK_S):
            missed = missed + 1 if self._loop_seen == seen else 0
            seen = self._loop_seen
            if missed * TICK_S >= LOOP_STALL_EXIT_S:
                _exit_stalled(missed * TICK_S)
            now = time.monotonic()
            if now - seen > STALL_GAP_S:
                continue  # the loop is not running: it could not have heard the engine
            for engine in self._engines:
                silent = now - max(engine.last_seen, self._heard_since)
                if engine.is_up and silent > self._timeout_s:
                    try:
                        self._loop.call_soon_threadsafe(
                            self._on_silent, engine, now - engine.last_seen
                        )
                    except RuntimeError:  # the loop closed: the server is going away
                        return


def _exit_stalled(seconds: float) -> None:
    # No logging: the stuck loop may hold the logging lock. One write, then out.
    message = f"api server: event loop stuck for {seconds:.0f} s; exiting to be respawned\n"
    os.write(2, message.encode())
    os._exit(EXIT_LOOP_STALLED)
