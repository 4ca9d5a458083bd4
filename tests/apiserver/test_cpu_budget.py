"""The CPU budget: cores from affinity and cgroup quotas (v1 and v2, read from file trees laid
out as the kernel shows them), the plan for each API server, and the thread environment
applied before torch loads (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apiserver import cpu_budget
from apiserver.config import ServerConfig
from apiserver.cpu_budget import BudgetError, CpuShare, cgroup_cpu_quota, plan, usable_cores

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _mount(mount_id: int, root: str, point: str, fstype: str, options: str) -> str:
    return f"{mount_id} 23 0:{mount_id} {root} {point} rw,relatime - {fstype} {fstype} {options}\n"


V2_MOUNT = _mount(29, "/", "/sys/fs/cgroup", "cgroup2", "rw,nsdelegate")


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/kubepods/pod1"
    root = _tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
            "proc/self/mountinfo": V2_MOUNT,
            f"{base}/ctr/cpu.max": "max 100000\n",
            f"{base}/cpu.max": "250000 100000\n",
            "sys/fs/cgroup/kubepods/cpu.max": "400000 100000\n",
        },
    )
    assert cgroup_cpu_quota(str(root)) == 2.5


def test_cgroup_v2_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "proc/self/cgroup": "0::/\n",
            "proc/self/mountinfo": V2_MOUNT,
            "sys/fs/cgroup/cpu.max": "150000 100000\n",
        },
    )
    assert cgroup_cpu_quota(str(root)) == 1.5


def test_cgroup_v1_cpu_controller_and_unlimited(tmp_path: Path) -> None:
    files = {
        "proc/self/cgroup": "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        "proc/self/mountinfo": _mount(40, "/", "/sys/fs/cgroup/memory", "cgroup", "rw,memory")
        + _mount(41, "/", "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    assert cgroup_cpu_quota(str(_tree(tmp_path / "limited", files))) == 3.0
    files["sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us"] = "-1\n"
    assert cgroup_cpu_quota(str(_tree(tmp_path / "unlimited", files))) is None


def test_cgroup_v1_container_that_sees_its_host_path(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    # container's own cgroup is mounted at the mount point (mount root = that path).
    root = _tree(
        tmp_path,
        {
            "proc/self/cgroup": "3:cpu:/docker/abc\n",
            "proc/self/mountinfo": _mount(
                41, "/docker/abc", "/sys/fs/cgroup/cpu", "cgroup", "rw,cpu"
            ),
            "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000\n",
            "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(str(root)) == 0.5
    assert usable_cores(str(root)) == 1  # rounded up, never 0


def test_no_cgroup_files_means_no_quota_and_affinity_counts(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(str(tmp_path)) is None
    assert usable_cores(str(tmp_path)) == len(os.sched_getaffinity(0))
    # This machine itself, cgroup files and all.
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def _plan(cores: int, **flags: object) -> CpuShare:
    return plan(ServerConfig(**flags), cores)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cores", "flags", "expected"),
    [
        # auto everywhere: 2 cores to the engine, one server per 2 of the rest.
        (16, {}, (2, 7, 2, 1)),
        # at least two render workers, where there are two cores
        (2, {}, (1, 1, 2, 1)),
        (1, {}, (0, 1, 1, 1)),
        (200, {}, (2, 32, 6, 1)),
        # one process with threads: every core left becomes a render worker.
        (16, {"api_server_count": 1}, (2, 1, 14, 1)),
        # fewer workers than the share: the math libraries get the rest.
        (16, {"api_server_count": 1, "renderer_num_workers": 2}, (2, 1, 2, 7)),
        (16, {"api_server_count": 14}, (2, 14, 2, 1)),
        (16, {"engine_cpu_cores": 0, "api_server_count": 4}, (0, 4, 4, 1)),
        (16, {"api_server_threads": 3}, (2, 7, 2, 3)),
    ],
)
def test_plan(cores: int, flags: dict[str, object], expected: tuple[int, ...]) -> None:
    share = _plan(cores, **flags)
    assert (share.engine_cores, share.api_server_count, share.render_workers, share.threads) == (
        expected
    )
    assert share.notes == ()
    assert share.cores == cores


def test_plan_notes_what_it_corrects_or_cannot_help() -> None:
    share = _plan(2, api_server_count=6, renderer_num_workers=64, api_server_threads=8)
    assert (share.api_server_count, share.render_workers, share.threads) == (6, 2, 2)
    assert len(share.notes) == 3
    assert "--api-server-count 6 exceeds the 1 core(s)" in share.notes[0]
    assert "--renderer-num-workers 64 is more than the 2 usable core(s): using 2" in share.notes[1]
    assert "--api-server-threads 8" in share.notes[2]


@pytest.mark.parametrize(
    ("cores", "flags", "message"),
    [
        (2, {"api_server_count": 9}, "--api-server-count 9 is more than 4 per usable core"),
        (16, {"api_server_count": 65}, "at most 64 make sense"),
        (2, {"engine_cpu_cores": 2}, "--engine-cpu-cores 2 leaves none of the 2 usable"),
        (1, {"engine_cpu_cores": 1}, "pick at most 0"),
    ],
)
def test_plan_refuses_what_makes_no_sense(
    cores: int, flags: dict[str, object], message: str
) -> None:
    with pytest.raises(BudgetError, match=message):
        _plan(cores, **flags)


def test_thread_environment_keeps_what_the_user_set() -> None:
    share = _plan(16, api_server_threads=3)
    updates, kept = cpu_budget.thread_environment(
        share.threads, {"OMP_NUM_THREADS": "5", "PATH": "/x"}
    )
    assert kept == {"OMP_NUM_THREADS": "5"}
    assert updates == {
        "MKL_NUM_THREADS": "3",
        "OPENBLAS_NUM_THREADS": "3",
        "RAYON_NUM_THREADS": "3",
        "TOKENIZERS_PARALLELISM": "true",
    }
    updates, _ = cpu_budget.thread_environment(_plan(2).threads, {})
    assert updates["OMP_NUM_THREADS"] == "1" and updates["TOKENIZERS_PARALLELISM"] == "false"


_CHILD = """
import json, os, sys
from apiserver import cpu_budget
from apiserver.config import ServerConfig
share = cpu_budget.plan(ServerConfig(**json.loads(sys.argv[1])), int(sys.argv[2]))
kept = cpu_budget.apply_environment(share, os.environ)
cpu_budget.apply_torch_threads(share)
import torch
x = torch.randn(512, 512)
x @ x  # parallel work: the pools exist now
print(json.dumps({
    "torch": torch.get_num_threads(),
    "interop": torch.get_num_interop_threads(),
    "omp": os.environ["OMP_NUM_THREADS"],
    "tokenizers": os.environ["TOKENIZERS_PARALLELISM"],
    "kept": kept,
}))
"""


def _child(flags: dict[str, object], cores: int, env: dict[str, str]) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in cpu_budget.THREAD_ENV_VARS}
    clean.pop(cpu_budget.TOKENIZERS_ENV_VAR, None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(flags), str(cores)],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_a_fresh_process_runs_torch_on_its_share() -> None:
    got = _child({"api_server_count": 4}, 4, {})  # 4 cores: 2 to the engine, 0.5 each
    assert (got["torch"], got["interop"], got["omp"], got["tokenizers"]) == (1, 1, "1", "false")
    assert got["kept"] == {}
    got = _child({"api_server_count": 1, "renderer_num_workers": 1}, 4, {})
    assert (got["torch"], got["interop"], got["omp"], got["tokenizers"]) == (2, 2, "2", "true")


def test_a_user_set_omp_num_threads_is_kept_but_torch_follows_the_flag() -> None:
    got = _child({"api_server_threads": 1}, 2, {"OMP_NUM_THREADS": "2"})
    assert got["omp"] == "2" and got["kept"] == {"OMP_NUM_THREADS": "2"}
    assert got["torch"] == 1  # torch.set_num_threads is fanin's own call


def test_the_api_server_module_does_not_import_torch_before_its_budget() -> None:
    """server.py sets the thread variables first thing in main; torch must not be loaded by
    then, or OpenMP would already have sized its pool from every core."""
    code = "import sys, apiserver.server; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
