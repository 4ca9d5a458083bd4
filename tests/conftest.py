"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Lines of a server's log shown under a failed test that used it.
LOG_TAIL_LINES = 60

# Tests never touch the network: every model they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """A failed test shows the tail of the log of every server it used (any fixture with a
    ``log_path``): on CI that log is gone with the run, and it alone says why a server
    stopped answering (which process died, with what exit code)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        path = getattr(value, "log_path", None)
        if isinstance(path, Path) and path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"log of fixture {name!r} ({path.name})", "\n".join(tail)))


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model (tiny random Qwen2-VL), built once per test session. Read-only:
    tests that modify a model folder must copy it first (``shutil.copytree``)."""
    # Imported here so that tests which never need a model do not pay for torch/transformers.
    from apiserver.launch.default_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "default")
