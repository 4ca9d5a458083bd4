"""Running the ``fanin`` command in the bench's end-to-end tests (a module with a name of its
own: every test folder has a ``conftest``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_fanin(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fanin ARGV...`` as a user runs it, from another directory than the repository. Past
    ``timeout`` it gets SIGTERM first, so that a sweep still stops the server it runs."""
    command = [sys.executable, "-m", "apiserver.launch.cli", *argv]
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                child.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    return subprocess.CompletedProcess(command, child.returncode, out, err)
