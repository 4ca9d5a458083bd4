"""The load generator talks HTTP only: it loads nothing of the server side, and the server
side loads nothing of it (each checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import sys
{imports}
loaded = {{name.split(".")[0] for name in sys.modules}}
print(" ".join(sorted(loaded & {forbidden})))
"""


def _loaded(imports: str, forbidden: set[str]) -> str:
    code = CHECK.format(imports=imports, forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_bench_imports_no_server_code() -> None:
    imports = "import bench.cli, bench.sweep, bench.report_sweep, bench.static"
    assert _loaded(imports, {"apiserver", "engine_core", "ipc"}) == ""


def test_the_server_side_imports_no_bench_code() -> None:
    imports = (
        "import apiserver.launch.cli, apiserver.server, apiserver.launch.launcher, engine_core"
    )
    assert _loaded(imports, {"bench"}) == ""


def test_no_bench_module_shadows_the_standard_library() -> None:
    # bench/ also holds scripts run as `python bench/x.py`, which puts bench/ first on
    # sys.path: a bench/http.py there once hid the standard library's http from torch.
    names = {p.stem for p in Path(__file__).resolve().parents[2].joinpath("bench").glob("*.py")}
    assert names & set(sys.stdlib_module_names) == set()
