"""One ``fanin serve`` for a sweep: started as ``python -m apiserver.launch.cli serve`` (that works
installed or from a source tree on PYTHONPATH), ready once its launcher says READY=1 (the
systemd notification, sent when every API server is ready), stopped with SIGTERM, and checked
to leave no process behind.

Not ``/ready`` answering 200: that is one API server's word. At 14 servers on the GPU host one
server answered while another had died at start, the launcher gave up a moment later, and the
sweep measured a closed port.

The server runs in its own session so that a Ctrl-C at the terminal reaches only the bench,
which then stops the server itself. Its stdout and stderr go to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.target import Target, parse_target

_READY_POLL_S = 0.25
_AFTER_LAUNCHER_S = 10.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The launcher's phrase for an API server that died and is started again (the bench loads no
#: server code; tests/integration/test_serve_spread.py checks the phrase against a real log).
RESPAWN_NOTICE = "; respawning in "


def respawns_in(log_path: Path, offset: int = 0) -> list[str]:
    """The launcher's lines, past byte ``offset`` of its log, about an API server that died and
    is started again (a server dying under load shows in a sweep only this way: the launcher
    and the other servers go on)."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if RESPAWN_NOTICE in line]


@dataclass(frozen=True)
class StopReport:
    """How a server went away: ``clean`` when it exited on SIGTERM in time and left nothing."""

    exit_code: int | None
    killed: list[str]
    seconds: float

    @property
    def clean(self) -> bool:
        return not self.killed and self.exit_code == 0


class ServedFanin:
    """A ``fanin serve`` process tree on 127.0.0.1."""

    def __init__(self, argv: list[str], port: int, log_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.log_path = log_path
        self.target: Target = parse_target(f"http://127.0.0.1:{port}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # A short path of its own: an AF_UNIX path holds at most 107 bytes.
        self._notify_dir = tempfile.mkdtemp(prefix="fanin-bench-")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(os.path.join(self._notify_dir, "notify"))
        self._notify.setblocking(False)
        env = {**env, "NOTIFY_SOCKET": self._notify.getsockname()}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    @classmethod
    def start(
        cls,
        model: str | None,
        flags: list[str],
        log_path: Path,
        env_overrides: dict[str, str] | None = None,
    ) -> ServedFanin:
        """Start ``fanin serve [model] --host 127.0.0.1 --port P *flags``."""
        port = free_port()
        argv = [sys.executable, "-m", "apiserver.launch.cli", "serve", *([model] if model else [])]
        argv += ["--host", "127.0.0.1", "--port", str(port), *flags]
        return cls(argv, port, log_path, {**os.environ, **(env_overrides or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, timeout: float) -> str | None:
        """Wait for the launcher's READY=1. None when ready, else why not (exited, timed
        out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                return f"exited with code {code} before it was ready"
            while True:
                try:
                    notice = self._notify.recv(4096)
                except BlockingIOError:
                    break
                if b"READY=1" in notice.split(b"\n"):
                    return None
            await asyncio.sleep(_READY_POLL_S)
        return f"not ready after {timeout:g} s"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float) -> StopReport:
        """SIGTERM and wait; what is still alive after ``timeout`` (the launcher) or shortly
        after the launcher exits (its children) is SIGKILLed and named in the report."""
        start = time.monotonic()
        tree = proc.descendants(self.pid)
        names = {pid: proc.process_name(pid) for pid in tree}
        killed: list[str] = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed.append("fanin-launcher")
                self._kill([self.pid])
                self.proc.wait()
        left = proc.wait_gone(tree, _AFTER_LAUNCHER_S)
        # A process the snapshot missed (started during shutdown) is still in the session of
        # the launcher or of one of its children (fanin gives each child a session of its own).
        left += [p for p in proc.session_members({self.pid, *tree}) if p not in left]
        if left:
            killed += [names.get(pid) or proc.process_name(pid) for pid in left]
            self._kill(left)
            proc.wait_gone(left, _AFTER_LAUNCHER_S)
        self._notify.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)
        return StopReport(self.proc.returncode, killed, time.monotonic() - start)

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
