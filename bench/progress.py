"""A progress line on stderr while a run goes: phase, requests done of the most that may be
sent, time, completions per second, failures. Redrawn in place on a terminal; elsewhere (a
log file) printed as a plain line every 10 s."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24


class Progress:
    """Call ``update`` as often as convenient; it draws at most 4 times a second."""

    def __init__(self, total: int, seconds: float, enabled: bool, stream: TextIO | None = None):
        self._total = total
        self._seconds = seconds
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._is_tty = self._stream.isatty()
        self._interval = 0.25 if self._is_tty else 10.0
        self._start = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def update(self, phase: str, done: int, failed: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self._enabled or (not force and now - self._last < self._interval):
            return
        self._last = now
        elapsed = now - self._start
        fraction = min(1.0, max(done / self._total, elapsed / self._seconds))
        filled = round(fraction * _WIDTH)
        bar = "#" * filled + "-" * (_WIDTH - filled)
        rate = done / elapsed if elapsed > 0 else 0.0
        line = (
            f"{phase:>8} [{bar}] {done}/{self._total} req {elapsed:6.1f}/{self._seconds:.0f} s "
            f"{rate:7.1f} req/s  failed {failed}"
        )
        if self._is_tty:
            self._stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._enabled and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
