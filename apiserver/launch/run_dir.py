"""The launcher's private run directory (engine socket, configs, metrics files) and the removal
of those a SIGKILLed launcher left behind.

The launcher removes its run dir on every exit it lives through; after a SIGKILL (OOM killer,
``kill -9``) nothing can, so each new launcher removes the stale ones before it makes its own.
"Stale" is decided by a lock, not by a pid: the launcher holds an ``flock`` on its run dir's
lock file for its whole life and the kernel drops it when the process dies, however it dies.
A pid could have been reused, or belong to another pid namespace sharing the same temp dir.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import tempfile

logger = logging.getLogger("fanin.launcher")

PREFIX = "fanin-"
#: sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH_BYTES = 107
#: Present only once locked (it is locked under another name, then renamed), holding the pid.
LOCK_NAME = "launcher.lock"


def make_run_dir(prefix: str = PREFIX) -> str:
    """A fresh private directory (mode 0700, owned by us) for this instance's sockets."""
    path = tempfile.mkdtemp(prefix=prefix)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid != os.getuid():
        raise PermissionError(f"run dir {path} is not private (mode {st.st_mode:o})")
    return path


def engine_address(run_dir: str) -> str:
    """The ``ipc://`` address of the engine socket inside ``run_dir``."""
    path = os.path.join(os.path.abspath(run_dir), "engine.sock")
    if len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
        raise ValueError(
            f"socket path {path!r} exceeds the {MAX_IPC_PATH_BYTES}-byte AF_UNIX limit; "
            "use a shorter run dir (e.g. set TMPDIR)"
        )
    return f"ipc://{path}"


class RunDir:
    """A fresh private run dir, locked until ``remove()``."""

    def __init__(self) -> None:
        self.path = make_run_dir()
        try:
            temp = os.path.join(self.path, LOCK_NAME + ".new")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._lock_fd = os.open(temp, flags, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            os.write(self._lock_fd, b"%d\n" % os.getpid())
            os.rename(temp, os.path.join(self.path, LOCK_NAME))
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def remove_stale_run_dirs(parent: str | None = None) -> list[str]:
    """Remove the run dirs in ``parent`` (default: the temp dir) whose launcher is gone; return
    their paths. Only our own dirs with a lock file nobody holds are touched."""
    parent = tempfile.gettempdir() if parent is None else parent
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # not a run dir of ours, or another launcher removed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the dir we locked, not one that another new launcher removed meanwhile.
            if os.stat(os.path.join(path, LOCK_NAME)).st_ino != os.fstat(fd).st_ino:
                continue
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # its launcher is alive (or another one is removing it right now)
            continue
        finally:
            os.close(fd)
        logger.info("removed stale run dir %s (its launcher was killed)", path)
        removed.append(path)
    return removed
