"""The loop-lag monitor: lag recorded per tick, and a callback that holds the loop logged
with the stack that held it (the monitor's thread sees it while the loop is still stuck)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from apiserver import metrics
from apiserver.loop_lag import SLOW_S, TICK_S, LoopLagMonitor


def _hog_the_loop() -> None:
    time.sleep(SLOW_S * 4)  # CPU work on the loop, as a bad callback would do


def test_a_blocked_loop_is_measured_and_its_culprit_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    histogram = metrics.LOOP_LAG_HISTOGRAM.labels("7")

    async def scenario() -> float:
        monitor = LoopLagMonitor(7)
        monitor.start()
        try:
            await asyncio.sleep(TICK_S * 5)  # a few on-time ticks
            _hog_the_loop()
            await asyncio.sleep(TICK_S * 5)  # the late tick runs, then normal ones again
            return float(metrics.LOOP_LAG.labels("7")._value.get())
        finally:
            monitor.stop()

    before = _count(histogram)
    with caplog.at_level(logging.WARNING, logger="apiserver.loop_lag"):
        latest = asyncio.run(scenario())
    blocked = [r.getMessage() for r in caplog.records]
    assert any("blocked for more than" in m and "_hog_the_loop" in m for m in blocked), blocked
    assert any(m.startswith("event loop was blocked for") for m in blocked), blocked
    stall = [m for m in blocked if m.startswith("event loop was blocked for")][0]
    assert float(stall.split()[5]) >= SLOW_S * 1000  # "... blocked for N ms"
    assert _count(histogram) - before >= 5
    assert latest < SLOW_S  # the latest tick after the stall was on time again


def _count(histogram: object) -> float:
    samples = histogram.collect()[0].samples  # type: ignore[attr-defined]
    return next(s.value for s in samples if s.name.endswith("_count"))
