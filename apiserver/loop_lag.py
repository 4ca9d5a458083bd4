"""How late this API server's event loop runs, and what held it when it ran late.

A callback re-arms itself every ``TICK_S`` on the loop; the delay between when it was due and
when it ran is the loop's lag (``fanin_event_loop_lag_seconds``: the latest value, and a
histogram of every tick). A plain thread, which the loop cannot block, checks the ticks: once
the loop has been silent for more than ``SLOW_S`` it logs the loop thread's Python stack, so
the log names the code that held the loop, not just the fact that something did. When the
loop comes back, one more line gives how long the stall lasted.

Cost: one timer callback every 20 ms on the loop (a few microseconds each), and a thread that
wakes every 10 ms to compare two floats.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from apiserver import metrics
from ipc.lifecycle import thread_stack

log = logging.getLogger(__name__)

TICK_S = 0.02
#: A callback that holds the loop longer than this gets its stack logged.
SLOW_S = 0.05
#: Frames of the loop thread's stack shown in the log line (innermost last).
STACK_FRAMES = 12


class LoopLagMonitor:
    """Started on the loop it watches (``start``), stopped from anywhere (``stop``)."""

    def __init__(self, server_index: int) -> None:
        self._label = str(server_index)
        self._due = 0.0
        self._last_tick = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-lag", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._due = self._last_tick = time.monotonic()
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread.is_alive():
            self._thread.join(1.0)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._due)
        metrics.LOOP_LAG.labels(self._label).set(lag)
        metrics.LOOP_LAG_HISTOGRAM.labels(self._label).observe(lag)
        self._last_tick = now
        self._due = now + TICK_S
        assert self._loop is not None
        self._handle = self._loop.call_at(self._loop.time() + TICK_S, self._tick)

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(TICK_S / 2):
            last = self._last_tick
            silent = time.monotonic() - last - TICK_S
            if stalled_since is None and silent > SLOW_S:
                stalled_since = last + TICK_S
                log.warning(
                    "event loop blocked for more than %.0f ms, in:\n%s",
                    silent * 1000,
                    thread_stack(self._loop_thread_id, STACK_FRAMES),
                )
            elif stalled_since is not None and silent <= SLOW_S:
                log.warning("event loop was blocked for %.0f ms", (last - stalled_since) * 1000)
                stalled_since = None
