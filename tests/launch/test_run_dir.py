"""The launcher's run dir: private, locked for the launcher's life, and removed by the next
launcher when a SIGKILL left it behind (real processes hold the locks here)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from apiserver.launch.run_dir import (
    LOCK_NAME,
    RunDir,
    engine_address,
    make_run_dir,
    remove_stale_run_dirs,
)

# Makes a run dir, prints its path, then holds it until stdin closes; never calls remove().
HOLDER = "from apiserver.launch.run_dir import RunDir; print(RunDir().path, flush=True); input()"


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(parent)},
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_run_dir_is_private_locked_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_dir = RunDir()
    path = Path(run_dir.path)
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert sorted(os.listdir(path)) == [LOCK_NAME]
    assert (path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert remove_stale_run_dirs(str(tmp_path)) == []  # ours, alive
    run_dir.remove()
    assert not path.exists()


def test_next_launcher_removes_only_run_dirs_whose_launcher_is_gone(tmp_path: Path) -> None:
    killed, killed_dir = _holder(tmp_path)
    exited, exited_dir = _holder(tmp_path)
    alive, alive_dir = _holder(tmp_path)
    try:
        (killed_dir / "engine.sock").touch()
        (killed_dir / "metrics").mkdir()
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
        exited.communicate("\n")  # a crash without cleanup, but an exit all the same
        unlocked = tmp_path / "fanin-no-lock"  # not a launcher's (or made before the lock)
        unlocked.mkdir(mode=0o700)
        (tmp_path / "fanin-a-file").touch()

        removed = remove_stale_run_dirs(str(tmp_path))

        assert sorted(removed) == sorted([str(killed_dir), str(exited_dir)])
        assert not killed_dir.exists() and not exited_dir.exists()
        assert alive_dir.is_dir() and (alive_dir / LOCK_NAME).exists() and unlocked.is_dir()
        assert (tmp_path / "fanin-a-file").exists()
    finally:
        for proc in (killed, exited, alive):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_run_dir_is_private() -> None:
    path = make_run_dir()
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert engine_address(path) == f"ipc://{path}/engine.sock"
    finally:
        os.rmdir(path)


def test_engine_address_refuses_long_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="AF_UNIX"):
        engine_address(str(tmp_path / ("d" * 120)))
