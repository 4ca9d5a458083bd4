"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: every model they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model (tiny random Qwen2-VL), built once per test session. Read-only:
    tests that modify a model folder must copy it first (``shutil.copytree``)."""
    # Imported here so that tests which never need a model do not pay for torch/transformers.
    from apiserver.launch.default_model import build_model

    return build_model(tmp_path_factory.mktemp("models") / "default")
