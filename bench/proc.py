"""Processes through Linux's /proc: a server's process tree, the CPU time it used, the process
that listens on a port, and waiting until pids are gone.

CPU time is ``utime + stime`` of every process of the tree plus ``cutime + cstime`` (children
already waited for), so that a process that exits and is reaped during a window still counts;
its whole life is then counted, which overstates a window only when a process dies in it.
"""

from __future__ import annotations

import os
import selectors
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 on); None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (zombies left out)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def session_members(sessions: set[int]) -> list[int]:
    """Live processes (zombies left out) whose session id is one of ``sessions``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) in sessions:
                members.append(int(entry))
    return members


def is_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def process_name(pid: int) -> str:
    """The first word of the command line (the title a process set for itself, e.g.
    ``fanin-api-server-3``), else the kernel's short name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if argv and argv[0]:
        word = argv[0].decode(errors="replace").split()[0]
        return os.path.basename(word)
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of a process tree at one moment, per process name and in all."""

    at: float
    by_name: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_name.values())


def tree_cpu(root: int) -> CpuSample:
    """CPU seconds used so far by ``root`` and everything below it."""
    by_name: dict[str, float] = {}
    for pid in (root, *descendants(root)):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        seconds = sum(int(v) for v in fields[11:15]) / _TICK  # utime stime cutime cstime
        name = process_name(pid)
        by_name[name] = by_name.get(name, 0.0) + seconds
    return CpuSample(time.perf_counter(), by_name)


def self_cpu() -> CpuSample:
    """CPU seconds of this process (all its threads; not its children)."""
    t = os.times()
    return CpuSample(time.perf_counter(), {"bench": t.user + t.system})


def cores_busy(start: CpuSample, end: CpuSample) -> tuple[float, dict[str, float]]:
    """Average cores kept busy between two samples, in all and per process name."""
    window = end.at - start.at
    if window <= 0:
        return 0.0, {}
    per = {k: (v - start.by_name.get(k, 0.0)) / window for k, v in end.by_name.items()}
    return (end.total - start.total) / window, per


def _ancestry(pid: int) -> list[int]:
    """``pid``, its parent, and so on up to init."""
    chain = [pid]
    while (fields := _stat_fields(chain[-1])) is not None and int(fields[1]) > 0:
        chain.append(int(fields[1]))
    return chain


def listener_pid(port: int) -> int | None:
    """The nearest common ancestor of the processes that hold a listening TCP socket on
    ``port`` (for a fanin server: the launcher, whose socket its API servers inherit); None
    when there is none or their sockets cannot be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    holders = []
    for entry in os.listdir("/proc") if inodes else []:
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                holders.append(int(entry))
        except OSError:
            continue
    if not holders:
        return None
    common = _ancestry(holders[0])
    for pid in holders[1:]:
        chain = set(_ancestry(pid))
        common = [p for p in common if p in chain]
    return common[0] if common else None


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, all in one selector) until every pid has exited or ``timeout`` has
    passed; returns those still alive."""
    deadline = time.monotonic() + timeout
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:
            continue  # gone already
    try:
        with selectors.DefaultSelector() as waiting:
            for fd in fds:
                waiting.register(fd, selectors.EVENT_READ)
            while waiting.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in waiting.select(left):
                    waiting.unregister(key.fd)
    finally:
        for fd in fds:
            os.close(fd)
    return [pid for pid in pids if is_alive(pid)]
