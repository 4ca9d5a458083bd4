"""Helpers for end-to-end tests: a real `fanin serve` on loopback, started as a subprocess
under a NOTIFY_SOCKET of the test's own (READY=1 is the readiness event), torn down with its
whole process tree; process-tree inspection through /proc; real test inputs."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

START_TIMEOUT_S = 240.0
#: --served-model-name of the shared test server.
SERVED_NAME = "fanin-e2e"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fanin_command() -> list[str]:
    """The installed ``fanin`` console script when there is one, else the same entry point."""
    script = Path(sys.executable).with_name("fanin")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "apiserver.launch.cli"]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc; zombies are left out)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents.setdefault(int(ppid), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (pidfds, no sleeping) until every pid is gone; returns those still alive."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                sel.select(max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
    return [pid for pid in pids if is_alive(pid)]


@dataclass
class Fanin:
    """One running `fanin serve`."""

    proc: subprocess.Popen[bytes]
    port: int
    notify: socket.socket
    log_path: Path
    notices: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: object) -> openai.OpenAI:
        """An official OpenAI client; no retries, so every failure is counted."""
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_notice(self, key: str, timeout: float) -> str:
        """The next sd_notify datagram holding ``key``; fails if fanin exits first."""
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.notify, selectors.EVENT_READ, "notify")
                sel.register(pidfd, selectors.EVENT_READ, "exit")
                while True:
                    for known in self.notices:
                        if key in known.split("\n"):
                            self.notices.remove(known)
                            return known
                    events = sel.select(max(0.0, deadline - time.monotonic()))
                    if not events:
                        raise AssertionError(f"no {key} in {timeout} s; log:\n{self.log()[-4000:]}")
                    for ev, _ in events:
                        if ev.data == "notify":
                            self.notices.append(self.notify.recv(4096).decode())
                        elif not any(e.data == "notify" for e, _ in events):
                            raise AssertionError(
                                f"fanin exited ({self.proc.wait()}) before {key}; "
                                f"log:\n{self.log()[-4000:]}"
                            )
        finally:
            os.close(pidfd)

    def server_pid(self, index: int) -> int | None:
        """Pid of API server ``index`` (by its process title or its command line)."""
        for pid in descendants(self.proc.pid):
            line = cmdline(pid)
            if f"fanin-api-server-{index}" in line or (
                "apiserver.server" in line and f"--index {index} " in line
            ):
                return pid
        return None

    def engine_pid(self) -> int | None:
        for pid in descendants(self.proc.pid):
            line = cmdline(pid)
            if "fanin-engine-core" in line or "-m engine_core" in line:
                return pid
        return None

    def kill_tree(self) -> None:
        """SIGKILL fanin and everything below it (teardown; nothing may outlive a test)."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.notify.close()
        wait_gone(pids, 10.0)


def start_fanin(
    tmp_path: Path,
    model: Path | None,
    *flags: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    cpus: set[int] | None = None,
) -> Fanin:
    """Start `fanin serve` on loopback (``port``, or a free one; on the CPUs ``cpus`` only, if
    given) and wait for its READY=1."""
    fanin = launch_fanin(tmp_path, model, *flags, env=env, port=port, cpus=cpus)
    try:
        fanin.wait_notice("READY=1", START_TIMEOUT_S)
    except BaseException:
        fanin.kill_tree()
        raise
    return fanin


def launch_fanin(
    tmp_path: Path,
    model: Path | None,
    *flags: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    cpus: set[int] | None = None,
) -> Fanin:
    """``start_fanin`` without the wait."""
    port = port or free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / f"notify-{port}.sock"
    notify_path.unlink(missing_ok=True)  # left by an earlier instance on the same port
    notify.bind(str(notify_path))
    log_path = tmp_path / f"fanin-{port}.log"
    argv = [*fanin_command(), "serve", *([str(model)] if model else [])]
    argv += ["--host", "127.0.0.1", "--port", str(port), *flags]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "NOTIFY_SOCKET": str(notify_path)},
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
    return Fanin(proc, port, notify, log_path)


def get(fanin: Fanin, path: str) -> httpx.Response:
    """One request on a fresh connection (so the kernel picks the accepting server anew)."""
    with httpx.Client(base_url=fanin.base_url, timeout=30) as http:
        return http.get(path, headers={"connection": "close"})


def image_data_url(name: str = "chelsea", size: int = 224) -> str:
    """A real photo from scikit-image as a JPEG data URL."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
