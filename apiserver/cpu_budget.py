"""The machine's cores as a budget: how many this process may use (CPU affinity and the cgroup
CPU quota), how many API servers ``--api-server-count auto`` starts, and each server's share of
threads (render workers, torch intra-op/inter-op, OpenMP, MKL, OpenBLAS, tokenizers).

Why: every library sizes its thread pool from the machine's core count by default, so N API
servers on C cores start N * C math threads each and fight over the cores (NOTES.md, 16-core
host: 8 servers fell from 239 to 142 req/s, 12 servers from 191 to 24, until
``OMP_NUM_THREADS=1`` was set by hand).

The rule for ``auto`` (``plan``): leave ``ENGINE_CORES`` to the engine core (its busy loop and
its IO thread each keep about one core busy on a GPU host), then start one API server per
``CORES_PER_SERVER`` of the cores left, at most ``AUTO_MAX_SERVERS``. Two cores per server,
because a server has one GIL-bound thread (HTTP, JSON, base64, the event loop) plus render
threads that release the GIL while they decode and resize images; on the 16-core host 8
servers x 2 threads gave 239 req/s where 12 x 1 gave 191 and 14 x 1 141 (NOTES.md). Each
server then runs ``round(share)`` render workers but at least ``MIN_RENDER_WORKERS`` (where
the machine has that many cores): a render holds the GIL for part of its time (PIL to tensor,
HF's Python glue), so a lone render thread leaves its core idle then, and a second one fills
it; with 14 servers x 1 worker the default model gave 248 req/s against 275 for 8 x 2
(bench/results/scaleout.md). Its math libraries get ``share // render workers`` threads (1 in
practice: parallelism across requests beats parallelism inside one small op).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from apiserver.config import ServerConfig

#: Cores left to the engine core when ``--engine-cpu-cores auto``.
ENGINE_CORES = 2
#: ``--api-server-count auto``: one server per this many cores left after the engine's.
CORES_PER_SERVER = 2
#: ``auto`` never starts more servers than this (each holds a tokenizer, a processor and torch:
#: a few hundred MB of memory).
AUTO_MAX_SERVERS = 32
#: More servers than this per usable core is refused: they would only share the cores.
MAX_SERVERS_PER_CORE = 4
#: ``--renderer-num-workers auto`` gives a server at least this many (see above).
MIN_RENDER_WORKERS = 2
#: The most render workers or math threads one server gets, whatever it asks for.
MAX_THREADS = 64

#: Environment variables that math libraries read once, when they are loaded (an API server,
#: forked from a launcher that loaded them on one thread, ``launch.preload``, sizes torch's
#: pools with ``apply_torch_threads`` instead), or when they first run work (rayon: the
#: tokenizers library's pool).
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "RAYON_NUM_THREADS",
)
TOKENIZERS_ENV_VAR = "TOKENIZERS_PARALLELISM"

_MAX_FILE_BYTES = 1 << 20
#: Reads the CPU quota (in CPUs) of one cgroup directory; None when it sets none.
_QuotaReader = Callable[[Path], "float | None"]


class BudgetError(ValueError):
    """The CPU flags ask for something this machine cannot give; the message names the flag."""


@dataclass(frozen=True, slots=True)
class CpuShare:
    """The plan for one ``fanin serve``: what each API server runs with."""

    cores: int  # usable by this process: affinity, capped by the cgroup quota
    engine_cores: int  # kept out of the API servers' share
    api_server_count: int
    render_workers: int  # per API server
    threads: int  # per API server: torch intra-op and inter-op, OpenMP, MKL, OpenBLAS, rayon
    notes: tuple[str, ...] = ()  # corrections and warnings, for the launcher's log

    def describe(self) -> str:
        return (
            f"{self.cores} usable core(s), {self.engine_cores} left to the engine core; "
            f"{self.api_server_count} API server(s), each with {self.render_workers} render "
            f"worker(s) and {self.threads} math thread(s)"
        )


def usable_cores(root: str = "/") -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup CPU quota
    (rounded up: a quota of 1.5 CPUs keeps 2 threads busy part of the time)."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def cgroup_cpu_quota(root: str = "/") -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and its ancestors, cgroup v2 or v1;
    None when there is none. ``root`` prefixes every path (tests point it at a fake tree)."""
    base = Path(root)
    cgroups = _read(base / "proc/self/cgroup")
    mounts = _read(base / "proc/self/mountinfo")
    if cgroups is None or mounts is None:
        return None
    limits = [
        limit
        for directory, reader in _cgroup_dirs(base, cgroups, mounts)
        if (limit := reader(directory)) is not None
    ]
    return min(limits, default=None)


def _cgroup_dirs(base: Path, cgroups: str, mounts: str) -> list[tuple[Path, _QuotaReader]]:
    """(directory, reader) for the CPU cgroup of this process and each of its ancestors up to
    the controller's mount point, for the v2 hierarchy and the v1 ``cpu`` controller."""
    paths: dict[str, str] = {}  # "v2" or "v1" -> this process's cgroup path
    for line in cgroups.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    found: list[tuple[Path, _QuotaReader]] = []
    for line in mounts.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        dash = fields.index("-")
        if dash + 3 > len(fields):
            continue
        mount_root, mount_point = fields[3], fields[4]
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup2" and "v2" in paths:
            version, reader = "v2", _read_v2
        elif fstype == "cgroup" and "cpu" in options and "v1" in paths:
            version, reader = "v1", _read_v1
        else:
            continue
        top = base / mount_point.lstrip("/")
        inner = _relative(paths[version], mount_root)
        here = top / inner if inner is not None and (top / inner).is_dir() else top
        while True:
            found.append((here, reader))
            if here == top or top not in here.parents:
                break
            here = here.parent
    return found


def _relative(path: str, mount_root: str) -> str | None:
    """``path`` below the mount's root, or None when it lies outside (a container that sees its
    host's cgroup path: then the mount point itself is this process's cgroup)."""
    if mount_root == "/":
        return path.lstrip("/")
    if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root) :].lstrip("/")
    return None


def _read_v2(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _ratio(parts[0], parts[1])


def _read_v1(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def plan(config: ServerConfig, cores: int) -> CpuShare:
    """Resolve the CPU flags of ``config`` against ``cores`` usable cores. Raises BudgetError
    for a request that cannot make sense; milder excesses are corrected, with a note."""
    notes: list[str] = []
    engine = _engine_cores(config.engine_cpu_cores, cores)
    frontend = cores - engine
    count = _server_count(config.api_server_count, cores, frontend, notes)
    share = frontend / count
    workers = _threads(config.renderer_num_workers, "--renderer-num-workers", cores, notes)
    if workers is None:
        workers = min(max(min(MIN_RENDER_WORKERS, cores), round(share)), MAX_THREADS)
    threads = _threads(config.api_server_threads, "--api-server-threads", cores, notes)
    if threads is None:
        threads = min(max(1, math.floor(share / workers)), MAX_THREADS)
    return CpuShare(cores, engine, count, workers, threads, tuple(notes))


def _engine_cores(asked: int | str, cores: int) -> int:
    if not isinstance(asked, int):
        return min(ENGINE_CORES, cores - 1)
    if asked >= cores:
        raise BudgetError(
            f"--engine-cpu-cores {asked} leaves none of the {cores} usable core(s) to the API "
            f"servers; pick at most {cores - 1}"
        )
    return asked


def _server_count(asked: int | str, cores: int, frontend: int, notes: list[str]) -> int:
    if not isinstance(asked, int):
        return max(1, min(frontend // CORES_PER_SERVER, AUTO_MAX_SERVERS))
    most = max(8, MAX_SERVERS_PER_CORE * cores)
    if asked > most:
        raise BudgetError(
            f"--api-server-count {asked} is more than {MAX_SERVERS_PER_CORE} per usable core "
            f"({cores} usable); at most {most} make sense, or auto"
        )
    if asked > frontend:
        notes.append(
            f"--api-server-count {asked} exceeds the {frontend} core(s) left for API servers: "
            "they will share cores"
        )
    return asked


def _threads(asked: int | str, flag: str, cores: int, notes: list[str]) -> int | None:
    """An explicit thread count, capped at the usable cores (more threads than cores in one
    process only adds switching); None for ``auto``."""
    if not isinstance(asked, int):
        return None
    cap = min(cores, MAX_THREADS)
    if asked > cap:
        notes.append(f"{flag} {asked} is more than the {cores} usable core(s): using {cap}")
        return cap
    return asked


def thread_environment(
    threads: int, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(variables to set for a process of ``threads`` math threads, variables the user
    already set and that are kept). A variable set in fanin's own environment is an explicit
    choice and wins over the budget."""
    wanted = {name: str(threads) for name in THREAD_ENV_VARS}
    wanted[TOKENIZERS_ENV_VAR] = "true" if threads > 1 else "false"
    kept = {k: environ[k] for k in wanted if k in environ}
    return {k: v for k, v in wanted.items() if k not in kept}, kept


def apply_environment(share: CpuShare, environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set the math libraries' thread variables in ``environ`` (before any of them runs
    work); returns the ones kept from the user's environment."""
    updates, kept = thread_environment(share.threads, environ)
    environ.update(updates)
    return kept


def apply_torch_threads(share: CpuShare) -> None:
    """Size torch's intra-op and inter-op pools. Call once, at start-up: torch refuses to
    resize its inter-op pool after it ran parallel work."""
    import torch

    torch.set_num_threads(share.threads)
    torch.set_num_interop_threads(share.threads)
