"""Fixtures of the bench's tests: a real `fanin serve` of the default model on loopback,
started and stopped by the bench's own sweep code (bench/serve.py), which must stop it
cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.serve import ServedFanin

START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def fanin_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedFanin]:
    """`fanin serve MODEL --api-server-count 2`, allowed to fetch images from 127.0.0.1 (the
    bench's own image server)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    flags = ["--api-server-count", "2", "--allow-private-media-urls", "--max-num-seqs", "16"]
    server = ServedFanin.start(str(default_model_dir), flags, log)
    try:
        problem = asyncio.run(server.wait_ready(START_TIMEOUT_S))
        assert problem is None, f"{problem}\n{server.log_tail(40)}"
        yield server
    finally:
        report = server.stop(60.0)
    assert report.clean, f"{report}\n{server.log_tail(40)}"
