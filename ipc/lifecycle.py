"""Process hygiene shared by every fanin process: a name for ps/top, dying with the parent,
telling the launcher that the process is ready, and a stalled thread's stack for the log.

It lives in ``ipc`` because both sides of the wire need it and may import nothing else shared.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback

import setproctitle

_PR_SET_PDEATHSIG = 1


def name_process(title: str) -> None:
    """Show ``title`` in ps (command line) and top (comm, first 15 bytes)."""
    setproctitle.setproctitle(title)


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, so that a SIGKILLed
    launcher leaves no orphan behind. Call it first thing in the child's main with the pid the
    parent passed down; if the parent is already gone by then, signal ourselves at once (a
    parent check by pid, not ``ppid == 1``: the launcher may itself be pid 1 in a container)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def signal_ready(fd: int | None) -> None:
    """Write the launcher's ready byte to ``fd`` (``--ready-fd``) and close it; None: started
    without a launcher."""
    if fd is not None:
        os.write(fd, b"1")
        os.close(fd)


def thread_stack(thread_id: int, frames: int) -> str:
    """The innermost ``frames`` frames of another thread's Python stack, read with the GIL
    held (``sys._current_frames``), so the thread running on meanwhile cannot free a frame
    under the reader, as it can under faulthandler's GIL-less dump."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "  (thread not found)"
    return "".join(traceback.format_stack(frame, limit=frames)).rstrip()
