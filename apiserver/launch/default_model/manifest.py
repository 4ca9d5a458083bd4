"""The manifest (``fanin-model.json``) that lets a built model folder prove it is intact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "fanin-model.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: Path) -> None:
    """Record the sha256 of every file in ``model_dir`` (written last, after all the files)."""
    files = {
        p.relative_to(model_dir).as_posix(): _sha256(p)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    text = json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2, sort_keys=True)
    (model_dir / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def manifest_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` does not match its manifest, or None when every file checks out."""
    path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["format"] != FORMAT_VERSION or not isinstance(files, dict) or not files:
            return f"{path}: unsupported manifest"
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable ({e})"
    for name, expected in files.items():
        file = model_dir / name
        if not file.is_file():
            return f"{file}: missing"
        if _sha256(file) != expected:
            return f"{file}: sha256 does not match the manifest"
    return None
