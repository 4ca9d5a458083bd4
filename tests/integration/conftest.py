"""Fixtures of the end-to-end tests (helpers live in fanin_proc.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fanin_proc import SERVED_NAME, Fanin, start_fanin


@pytest.fixture(scope="module")
def fanin(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fanin]:
    """A shared `fanin serve MODEL --api-server-count 2` for tests that leave it healthy."""
    running = start_fanin(
        tmp_path_factory.mktemp("fanin"),
        default_model_dir,
        *("--api-server-count", "2", "--served-model-name", SERVED_NAME),
    )
    yield running
    running.kill_tree()
