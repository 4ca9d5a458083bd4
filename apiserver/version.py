"""fanin's version as installed: one place for ``fanin --version`` and ``GET /version``."""

from __future__ import annotations

from importlib import metadata


def fanin_version() -> str:
    """The installed distribution's version; "unknown" when run from a checkout that was
    never installed (``/version`` must answer there too, not fail with a 500)."""
    try:
        return metadata.version("fanin")
    except metadata.PackageNotFoundError:
        return "unknown"
