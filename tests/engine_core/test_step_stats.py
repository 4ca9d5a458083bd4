"""The busy loop's periodic line: rates over the time since the last line, none while idle."""

from __future__ import annotations

import numpy as np
import pytest

from engine_core.batch import Chunk, ImageRef
from engine_core.scheduler import ScheduledStep
from engine_core.step_stats import LOG_EVERY_S, StepStats
from ipc.messages import EngineRequest


def _chunk(n: int) -> Chunk:
    request = EngineRequest("r", np.zeros(8, dtype=np.int32))
    return Chunk(request, 0, 0, np.zeros(n, dtype=np.int32), wants_logits=True)


def test_rates_over_the_interval_and_silence_when_idle() -> None:
    stats = StepStats(since=0.0)
    step = ScheduledStep([_chunk(1), _chunk(1), _chunk(100)], [], [])
    for _ in range(20):
        stats.record(step, busy_s=0.005, wait_s=0.001)
    assert stats.maybe_log(3, 1, now=LOG_EVERY_S / 2) is None  # not due yet
    line = stats.maybe_log(3, 1, now=LOG_EVERY_S)
    assert line is not None
    per_s = 20 / LOG_EVERY_S
    assert line.startswith(f"{per_s:.0f} steps/s of 5.0 ms (1.0 ms waiting for the device)")
    assert f"prefill {100 * per_s:,.0f} tok/s, decode {2 * per_s:,.0f} tok/s" in line
    assert line.endswith("running 3, waiting 1")
    assert stats.steps == 0
    assert stats.maybe_log(0, 0, now=2 * LOG_EVERY_S) is None  # idle: no line


@pytest.mark.parametrize("images", [0, 3])
def test_images_per_second(images: int) -> None:
    stats = StepStats(since=0.0)
    request = EngineRequest("r", np.zeros(8, dtype=np.int32))
    stats.record(ScheduledStep([], [], [ImageRef(request, i) for i in range(images)]), 0.01, 0)
    line = stats.maybe_log(0, 0, now=LOG_EVERY_S)
    assert line is not None and f"{images / LOG_EVERY_S:.1f} images/s" in line
