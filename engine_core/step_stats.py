"""What the busy loop did, logged every ``LOG_EVERY_S`` while it works: steps per second and
their mean time, of which the host waited for the device, tokens scheduled (prefill and
decode) and images encoded per second, and the queue. vLLM's engines log such a line; ours
also says how much of a step the host spends waiting for the GPU versus doing its own work,
which is the first question when steps are slower than the model."""

from __future__ import annotations

import logging
import time

from engine_core.scheduler import ScheduledStep

logger = logging.getLogger(__name__)

#: Seconds between two log lines (none while the engine is idle).
LOG_EVERY_S = 10.0


class StepStats:
    def __init__(self, since: float | None = None) -> None:
        """``since``: when the first interval starts (``time.perf_counter()``; default: now)."""
        self._since = time.perf_counter() if since is None else since
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.busy_s = 0.0  # in ``Pipeline.advance``
        self.wait_s = 0.0  # of which waiting for a step's results on the device
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.images = 0

    def record(self, step: ScheduledStep, busy_s: float, wait_s: float) -> None:
        """One ``advance`` that queued ``step``."""
        self.steps += 1
        self.busy_s += busy_s
        self.wait_s += wait_s
        decodes = sum(1 for c in step.chunks if c.token_ids.size == 1)
        self.decode_tokens += decodes
        self.prefill_tokens += step.num_tokens - decodes
        self.images += len(step.encodes)

    def maybe_log(self, running: int, waiting: int, now: float | None = None) -> str | None:
        """Log (and return) the line for the time since the last one, when it is due."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._since
        if elapsed < LOG_EVERY_S:
            return None
        line = None
        if self.steps:
            per_step_ms = 1000 * self.busy_s / self.steps
            line = (
                f"{self.steps / elapsed:.0f} steps/s of {per_step_ms:.1f} ms "
                f"({1000 * self.wait_s / self.steps:.1f} ms waiting for the device), "
                f"prefill {self.prefill_tokens / elapsed:,.0f} tok/s, decode "
                f"{self.decode_tokens / elapsed:,.0f} tok/s, {self.images / elapsed:.1f} "
                f"images/s; running {running}, waiting {waiting}"
            )
            logger.info("%s", line)
        self._since = now
        self._reset()
        return line
