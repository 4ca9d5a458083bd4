"""Plumbing shared by the one-shot bench scripts: the model they run on, and their results
(JSON for machines, a markdown table for people, the table on stdout too)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def model_dir(model: Path | None) -> Iterator[Path]:
    """``model``, or else the default model built into a directory that lasts the run."""
    if model is not None:
        yield model
        return
    from apiserver.launch.default_model import build_model

    with tempfile.TemporaryDirectory() as work:
        yield build_model(Path(work) / "default")


def write_results(out: Path | None, name: str, rows: Any, table: str) -> None:
    """``out/name.json`` and ``out/name.md`` (when ``out`` is given), and the table printed."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
        (out / f"{name}.md").write_text(table)
    print(table, end="")
