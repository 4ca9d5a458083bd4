"""The cached default model: where it lives, and building or repairing it on first use."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from apiserver.launch.default_model.manifest import manifest_problem

# Bump when the built model changes, so old caches are left alone instead of being reused.
DEFAULT_MODEL_NAME = "default-v1"

logger = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """Where the default model is cached.

    ``$FANIN_CACHE_DIR/models/default-vN`` if FANIN_CACHE_DIR is set, else under
    ``$XDG_CACHE_HOME/fanin`` (``~/.cache/fanin`` when XDG_CACHE_HOME is unset or empty).
    """
    root = os.environ.get("FANIN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "fanin")
    return Path(root).expanduser().absolute() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Return the cached default model, building it if it is missing, incomplete or corrupt.

    Every file is checked against the build's manifest. Concurrent callers (several processes)
    serialise on an ``flock`` beside the model, so exactly one of them builds.
    """
    model_dir = default_model_dir()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = model_dir.with_name(model_dir.name + ".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        problem = manifest_problem(model_dir)
        if problem is not None:
            logger.info("building the default model in %s (%s)", model_dir, problem)
            # Builds a killed process left behind; nobody else builds here while we hold the lock.
            for stale in model_dir.parent.glob(f".{model_dir.name}.*"):
                shutil.rmtree(stale, ignore_errors=True)
            from apiserver.launch.default_model.build import build_model  # torch, transformers

            build_model(model_dir, overwrite=True)
    return model_dir
