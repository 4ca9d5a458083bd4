"""`fanin serve --preprocess-mode process` with the real engine and the default model: image
chats render on worker processes of each API server and answer exactly as the render threads
do (greedy); a killed render worker takes its API server down and the launcher brings up a
fresh one, with workers of its own, that serves again. The protocol's own cases (concurrent,
cancelled, failed and killed renders) are in tests/apiserver/test_render_workers.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fanin_proc import Fanin, cmdline, descendants, image_data_url, start_fanin

from bench.datasets import sharegpt_prompts

pytestmark = pytest.mark.slow

_FLAGS = ("--api-server-count", "1", "--renderer-num-workers", "2")


def _image_chat(fanin: Fanin) -> Any:
    client = fanin.client()
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url("astronaut", 320)}},
                    {"type": "text", "text": sharegpt_prompts(1, max_chars=200)[0]},
                ],
            }
        ],
        max_tokens=12,
        temperature=0,
    )


def _render_workers(fanin: Fanin) -> list[int]:
    pid = fanin.server_pid(0)
    assert pid is not None
    return [p for p in descendants(pid) if "fanin-render-0." in cmdline(p)]


def test_process_mode_answers_as_threads_and_survives_a_killed_worker(
    default_model_dir: Path, tmp_path: Path
) -> None:
    threads = start_fanin(tmp_path, default_model_dir, *_FLAGS)
    try:
        want = _image_chat(threads)
    finally:
        threads.kill_tree()
    fanin = start_fanin(tmp_path, default_model_dir, *_FLAGS, "--preprocess-mode", "process")
    try:
        got = _image_chat(fanin)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage is not None and want.usage is not None
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        workers = _render_workers(fanin)
        assert len(workers) == 2, [cmdline(p) for p in workers]

        server = fanin.server_pid(0)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while fanin.server_pid(0) in (None, server):  # the server exits, the launcher respawns
            assert time.monotonic() < deadline, "the API server outlived its render worker"
            time.sleep(0.1)
        while True:
            try:
                again = _image_chat(fanin)
                break
            except Exception:  # the new server is still starting
                assert time.monotonic() < deadline, "the respawned server never served"
                time.sleep(0.2)
        assert again.choices[0].message.content == want.choices[0].message.content
        assert len(_render_workers(fanin)) == 2
    finally:
        fanin.kill_tree()
