"""Process hygiene shared by every fanin process: a name for ps/top, dying with the parent,
and telling the launcher that the process is ready.

It lives in ``ipc`` because both sides of the wire need it and may import nothing else shared.
"""

from __future__ import annotations

import ctypes
import os
import signal

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
