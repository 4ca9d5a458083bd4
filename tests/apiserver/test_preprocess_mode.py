"""``--preprocess-mode``: ``pool`` renders on the render threads, ``inline`` on the event loop
itself (the one-process baseline that ``fanin bench sweep`` compares against). End to end, both
modes serve real requests in tests/bench/test_sweep.py."""

from __future__ import annotations

import asyncio
import threading

import pytest

from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.launch import cli
from apiserver.renderer import Renderer
from ipc.messages import Ready

READY = Ready(
    protocol_version=1,
    model="m",
    max_model_len=64,
    vocab_size=100,
    kv_capacity_tokens=64,
    max_num_seqs=1,
    supports_images=False,
    supports_embeddings=False,
    supports_generation=True,
)


def _thread_of_render(config: ServerConfig) -> str:
    renderer = Renderer(tokenizer=None, processor=None, ready=READY, config=config, num_workers=2)

    async def main() -> str:
        return await renderer.run(lambda: threading.current_thread().name)

    try:
        return asyncio.run(main())
    finally:
        renderer.close()


def test_pool_mode_renders_on_the_render_threads() -> None:
    assert _thread_of_render(ServerConfig()).startswith("render")


def test_inline_mode_renders_on_the_event_loop_thread() -> None:
    name = _thread_of_render(ServerConfig(preprocess_mode="inline"))
    assert name == threading.main_thread().name


def test_inline_mode_still_refuses_past_the_pending_limit() -> None:
    renderer = Renderer(None, None, READY, ServerConfig(preprocess_mode="inline"), 1)
    renderer._pending = renderer._config.max_pending_renders
    with pytest.raises(ApiError) as err:
        asyncio.run(renderer.run(int))
    assert err.value.status == 429


def test_flag_sets_the_mode_and_refuses_unknown_modes() -> None:
    args = cli.build_parser().parse_args(["serve", "--preprocess-mode", "inline"])
    server, _ = cli.configs_from_args(args, env={})
    assert server.preprocess_mode == "inline"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--preprocess-mode", "threads"])
