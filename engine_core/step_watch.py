"""A step that does not come back: the engine loop's stack in the log, read safely.

The loop marks when its current step began (``begin``, one float store) and when it waits for
work (``idle``). A daemon thread looks every ``CHECK_S``; once a step has run past
``SLOW_STEP_S`` it logs the loop thread's Python stack, once per step. It reads the stack
with the GIL held (``ipc.lifecycle.thread_stack``), so a loop that runs on meanwhile cannot
free a frame under it: faulthandler's timed dump, used before, reads every thread's frames
without the GIL, and after a 3-s SIGSTOP of the engine (tests/hostile/test_stalls.py) it
dumped while the resumed loop ran and crashed the engine with SIGSEGV. The price: a loop that
holds the GIL through the whole stall (one long C call) is seen only once it lets go.

On the GPU host one step once took about 5 s while the IO thread sent nothing either, and the
API servers failed every request in flight; this is what says where such a step is spent.
"""

from __future__ import annotations

import logging
import threading
import time

from ipc.lifecycle import thread_stack

logger = logging.getLogger(__name__)

SLOW_STEP_S = 2.5
CHECK_S = 0.25
#: Frames of the loop's stack shown (innermost last).
STACK_FRAMES = 16


class StepWatch:
    """Watches the thread that calls ``start``; ``begin``/``idle`` from that thread."""

    def __init__(self, slow_s: float = SLOW_STEP_S) -> None:
        self.slow_s = slow_s
        self._began: float | None = None  # the current step's start; None while idle
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watch", daemon=True)

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)

    def begin(self) -> None:
        """A step starts (cheap: called for every step)."""
        self._began = time.monotonic()

    def idle(self) -> None:
        """The loop waits for work: not a slow step."""
        self._began = None

    def _watch(self) -> None:
        reported: float | None = None
        while not self._stop.wait(CHECK_S):
            began = self._began
            if began is None or began == reported:
                continue
            took = time.monotonic() - began
            if took < self.slow_s:
                continue
            stack = thread_stack(self._loop_thread, STACK_FRAMES)
            logger.warning("engine step running for %.1f s, in:\n%s", took, stack)
            reported = began
