"""The default model (a tiny random Qwen2-VL built locally) and checks for any model folder."""

from __future__ import annotations

from typing import Any

from apiserver.launch.default_model.cache import default_model_dir, ensure_default_model
from apiserver.launch.default_model.checks import ModelDirError, check_model_dir

__all__ = [
    "ModelDirError",
    "build_model",
    "check_model_dir",
    "default_model_dir",
    "ensure_default_model",
]


def __getattr__(name: str) -> Any:
    # Building needs torch and transformers (seconds to import); serving a model that is
    # already built does not, so the launcher never pays for them.
    if name == "build_model":
        from apiserver.launch.default_model.build import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
