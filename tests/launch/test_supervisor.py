"""The launcher's process events (readiness pipes, exits, signals) and its respawn back-off."""

from __future__ import annotations

import os
import signal
import sys

from apiserver.launch.supervisor import MAX_RESPAWN_DELAY_S, Events, respawn_delay, spawn


def test_events_report_ready_exit_and_signals() -> None:
    script = "import os, sys; os.write(int(sys.argv[1]), b'x'); sys.exit(7)"
    with Events() as events:
        child = spawn("t", [sys.executable, "-c", script, "{ready_fd}"], with_ready_pipe=True)
        events.watch(child)
        seen: list[str] = []
        while child.is_alive or "ready" not in seen:
            seen += [tag for tag, obj in events.wait(None) if obj is child]
        assert "ready" in seen and child.exit_code == 7
        silent = spawn("s", [sys.executable, "-c", "pass", "{ready_fd}"], with_ready_pipe=True)
        events.watch(silent)
        while silent.is_alive:
            seen += [tag for tag, obj in events.wait(None) if obj is silent]
        assert not silent.is_ready
        os.kill(os.getpid(), signal.SIGTERM)
        assert ("signal", signal.SIGTERM) in events.wait(None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_respawn_delay_backs_off_on_crash_loops_only() -> None:
    delays = [respawn_delay(n) for n in range(10)]
    assert delays[0] == 0.0 and 0 < delays[1] < delays[2] < delays[3]
    assert max(delays) == MAX_RESPAWN_DELAY_S
