"""Runs a test script under Triton's interpreter (``TRITON_INTERPRET=1``), in a process of
its own: the variable is read when Triton is imported, so it cannot be set in this one."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(script: str) -> None:
    """Run ``script``; it must exit 0 and print ``ok`` last."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
