"""Fixtures: a fake engine process plus a real ``python -m apiserver.server`` process on a
listening socket made here (as the launcher does), with the default model's tokenizer and
processor."""

from __future__ import annotations

import base64
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from apiserver.config import ServerConfig
from apiserver.launch.run_dir import engine_address, make_run_dir

ROOT = Path(__file__).resolve().parents[2]
FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
START_TIMEOUT_S = 120.0


@dataclass
class Stack:
    """One fake engine and one API server in front of it."""

    url: str
    engine: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    engine_log: Path
    server_log: Path
    api_key: str = "unused"
    cleanup: list[Any] = field(default_factory=list)
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, **kw: Any) -> openai.OpenAI:
        """One SDK client per key, closed by ``stop``: a client dropped unclosed leaves its
        pooled socket to the garbage collector, whose ResourceWarning then fails whichever
        test happens to be running."""
        kw.setdefault("api_key", self.api_key)
        key = repr(sorted(kw.items()))
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(
                base_url=f"{self.url}/v1", max_retries=0, timeout=30, **kw
            )
        return self.clients[key]

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.api_key}"}
        )

    def engine_lines(self) -> list[str]:
        return self.engine_log.read_text().splitlines()

    def wait_for_engine_line(self, pattern: str, timeout_s: float = 20.0) -> str:
        """Poll the engine's log until a line matches (no fixed sleeps)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.engine_lines():
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"engine never logged {pattern!r}: {self.engine_lines()[-5:]}")

    def stop(self) -> int | None:
        for sdk in self.clients.values():
            sdk.close()
        self.clients.clear()
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.engine.poll() is None:
            self.engine.kill()
        self.engine.wait()
        for fn in self.cleanup:
            fn()
        return self.server.returncode


def _log_file(path: Path) -> int:
    """A file descriptor for a child's stderr; the child keeps its own copy."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _fds_to_close.append(fd)
    return fd


_fds_to_close: list[int] = []


def start_stack(
    tmp: Path, model_dir: Path, *, step_s: float = 0.002, waiting: int = 0, **config: Any
) -> Stack:
    """Start a fake engine and an API server configured with ``config`` (ServerConfig fields)."""
    run_dir = make_run_dir()
    address = engine_address(run_dir)
    engine_log = tmp / "engine.log"
    engine_log.touch()
    engine = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_ENGINE),
            "--address",
            address,
            "--model",
            str(model_dir),
            "--log",
            str(engine_log),
            "--step-s",
            str(step_s),
            "--waiting",
            str(waiting),
        ],
        stderr=_log_file(tmp / "engine.err"),
    )
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    server_config = ServerConfig(**config)
    config_path = tmp / "server.json"
    config_path.write_bytes(msgspec.json.encode(server_config))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    ready_r, ready_w = os.pipe()
    server_log = tmp / "server.err"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FANIN_API_KEY", "PROMETHEUS_MULTIPROC_DIR")
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apiserver.server",
            "--config",
            str(config_path),
            "--index",
            "0",
            "--listen-fd",
            str(listener.fileno()),
            "--engine-address",
            address,
            "--metrics-dir",
            str(metrics_dir),
            "--ready-fd",
            str(ready_w),
            "--parent-pid",
            str(os.getpid()),
        ],
        pass_fds=(listener.fileno(), ready_w),
        cwd=ROOT,
        env=env,
        stderr=_log_file(server_log),
    )
    os.close(ready_w)
    listener.close()
    while _fds_to_close:
        os.close(_fds_to_close.pop())
    stack = Stack(
        f"http://127.0.0.1:{port}",
        engine,
        server,
        engine_log,
        server_log,
        api_key=config.get("api_key") or "unused",
        cleanup=[lambda: shutil.rmtree(run_dir, ignore_errors=True)],
    )
    readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT_S)
    got = os.read(ready_r, 1) if readable else b""
    os.close(ready_r)
    if got != b"1":
        stack.stop()
        raise RuntimeError(f"API server did not start:\n{server_log.read_text()[-3000:]}")
    return stack


@pytest.fixture(scope="module")
def stack_factory(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> Iterator[Any]:
    """Start stacks for one test module; all are stopped at its end."""
    stacks: list[Stack] = []

    def make(**kw: Any) -> Stack:
        stack = start_stack(tmp_path_factory.mktemp("stack"), default_model_dir, **kw)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of real photos (skimage), the allowed root for file:// URLs."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def main_stack(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, media_dir: Path
) -> Iterator[Stack]:
    """The stack most tests share: file:// allowed under ``media_dir``, private URLs refused,
    at most 2 images of at most 1 Mpixel each, 4 MiB bodies."""
    stack = start_stack(
        tmp_path_factory.mktemp("main"),
        default_model_dir,
        allowed_local_media_path=str(media_dir),
        max_images_per_request=2,
        max_image_pixels=1_000_000,
        max_request_body_bytes=4 << 20,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def data_url() -> Any:
    """``data_url(path)``: an image file as a base64 data URL."""

    def make(path: Path) -> str:
        kind = "png" if path.suffix == ".png" else "jpeg"
        return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()

    return make
