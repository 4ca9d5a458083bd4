"""Errors of the model side."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A checkpoint cannot be served: unreadable config or file, missing or misshapen tensor,
    or no room for even one KV slot. The message names the file / tensor / numbers."""
