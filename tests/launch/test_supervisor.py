"""The launcher's process events (readiness pipes, exits, signals) and its respawn back-off."""

from __future__ import annotations

import os
import signal
import sys
import time

from apiserver.launch.supervisor import (
    MAX_RESPAWN_DELAY_S,
    WATCHED_SIGNALS,
    Events,
    fork,
    respawn_delay,
    spawn,
)


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


def test_a_forked_child_has_its_own_signals_and_is_reaped_with_its_code() -> None:
    """A forked child starts with default handlers and no wakeup fd: a signal sent to it
    must not reach the parent's wakeup socket (the launcher would take it for its own)."""

    def run(ready_fd: int) -> int:
        assert signal.set_wakeup_fd(-1) == -1
        assert all(signal.getsignal(sig) is signal.SIG_DFL for sig in WATCHED_SIGNALS)
        assert os.getsid(0) == os.getpid()
        os.write(ready_fd, b"x")
        signal.pause()  # until the parent's SIGTERM ends it, by the default action
        return 3

    released: list[bool] = []
    with Events() as events:
        child = fork("f", run, lambda: released.append(True))
        events.watch(child)
        seen: list[object] = []
        while not child.is_ready and child.is_alive:
            seen += [tag for tag, _ in events.wait(time.monotonic() + 30)]
        assert child.is_ready, child.exit_code  # its checks passed
        child.signal(signal.SIGTERM)
        while child.is_alive:
            seen += [tag for tag, _ in events.wait(time.monotonic() + 30)]
        assert "signal" not in seen
        assert child.exit_code == -signal.SIGTERM
        assert released == []  # in_child ran in the child, not here
        failing = fork("g", lambda ready_fd: 5, lambda: None)
        events.watch(failing)
        while failing.is_alive:
            events.wait(time.monotonic() + 30)
        assert failing.exit_code == 5 and not failing.is_ready
