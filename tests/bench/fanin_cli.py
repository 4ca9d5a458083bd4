"""Running the ``fanin`` command in the bench's end-to-end tests (a module with a name of its
own: every test folder has a ``conftest``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_fanin(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fanin ARGV...`` as a user runs it, from another directory than the repository."""
    return subprocess.run(
        [sys.executable, "-m", "apiserver.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
