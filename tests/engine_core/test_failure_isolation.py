"""A failure inside one request's work (the vision tower raising, or running out of memory, on
one image) fails that request alone: the real runner on the default model with real photos,
then the real engine loop over real sockets. The failure is injected at the vision tower's
call, the only thing not real here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import skimage.data
import torch
import zmq
from conftest import admit, image_request
from dealer import Client
from PIL import Image
from test_core_io import Engine

from engine_core.batch import Chunk
from ipc import messages

PHOTOS = {
    "coffee": (skimage.data.coffee, (224, 168)),
    "chelsea": (skimage.data.chelsea, (196, 140)),
    "rocket": (skimage.data.rocket, (140, 252)),  # the culprit: its grid is its own
}


@pytest.fixture(scope="module")
def photo_requests(encode: Callable[..., Any], hf_model: Any) -> dict[str, messages.EngineRequest]:
    out = {}
    for name, (load, size) in PHOTOS.items():
        encoded = encode(f"What is in the {name} picture?", [Image.fromarray(load()).resize(size)])
        out[name] = image_request(name, encoded, hf_model.config.image_token_id, hashes=[name])
    return out


class Injected:
    """Wraps ``VisionEncoder.encode``: raises ``error`` for any call holding ``grid``."""

    def __init__(self, runner: Any, grid: tuple[int, int, int], error: RuntimeError) -> None:
        self.real = runner.vision.encode
        self.grid, self.error = grid, error
        self.calls: list[int] = []
        runner.vision.encode = self

    def __call__(self, images: list[Any]) -> list[torch.Tensor]:
        self.calls.append(len(images))
        if any(grid == self.grid for _, grid in images):
            raise self.error
        return self.real(images)


def _prefill(runner: Any, requests: list[messages.EngineRequest]) -> Any:
    chunks = [Chunk(r, i, 0, r.prompt_token_ids, True) for i, r in enumerate(requests)]
    return runner.execute(chunks)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (torch.OutOfMemoryError("CUDA out of memory (injected)"), 413),
        (RuntimeError("vision tower broke (injected)"), 500),
    ],
)
def test_runner_fails_only_the_request_of_the_failing_image(
    make_runner: Callable[..., Any],
    photo_requests: dict[str, messages.EngineRequest],
    error: RuntimeError,
    status: int,
) -> None:
    requests = list(photo_requests.values())
    clean = make_runner()
    for r in requests:
        assert admit(clean, r) is None
    expected = _prefill(clean, requests).logits
    runner = make_runner()
    for r in requests:
        assert admit(runner, r) is None
    injected = Injected(runner, photo_requests["rocket"].mm_items[0].grid_thw, error)
    result = _prefill(runner, requests)
    assert injected.calls == [3, 1, 1, 1]  # all three in one call, then each alone
    assert set(result.failed) == {"rocket"} and result.failed["rocket"].status == status
    assert result.logits is not None and result.logits.shape[0] == 2
    torch.testing.assert_close(result.logits, expected[:2])
    # The culprit is left out of later steps too, until it is released.
    again = runner.execute(
        [Chunk(photo_requests["rocket"], 2, 0, requests[2].prompt_token_ids, True)]
    )
    assert set(again.failed) == {"rocket"} and injected.calls == [3, 1, 1, 1]
    for r in requests:
        runner.release(r.request_id)
    assert "rocket" not in runner.encoder_cache and "coffee" in runner.encoder_cache
    assert runner.encoder_cache.num_pinned == 0


@pytest.fixture
def real_engine(
    tmp_path: Path, make_runner: Callable[..., Any], ctx: zmq.Context[Any]
) -> Iterator[tuple[Engine, Any]]:
    runner = make_runner(max_num_seqs=6)
    eng = Engine(tmp_path, runner)
    yield eng, runner
    if eng.thread.is_alive():
        closer = Client(ctx, eng.address, 99, 60_000)
        closer.send(messages.Shutdown("test over"))
        closer.close(linger_ms=5000)
        eng.thread.join(30)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_engine_serves_everyone_else_when_one_image_runs_out_of_memory(
    real_engine: tuple[Engine, Any],
    ctx: zmq.Context[Any],
    photo_requests: dict[str, messages.EngineRequest],
) -> None:
    engine, runner = real_engine
    grid = photo_requests["rocket"].mm_items[0].grid_thw
    Injected(runner, grid, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    client = Client(ctx, engine.address, 0, 60_000)
    client.hello()
    params = messages.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for r in photo_requests.values():
        client.send(msgspec.structs.replace(r, sampling=params))
    text = messages.EngineRequest("text", np.arange(10, 40, dtype=np.int32), sampling=params)
    client.send(text)
    got = client.collect({*photo_requests, "text"})
    bad = got["rocket"][-1]
    assert bad.finish_reason == "error" and bad.error is not None and bad.error.status == 413
    assert "does not fit" in bad.error.message
    for rid in ("coffee", "chelsea", "text"):
        assert got[rid][-1].error is None, (rid, got[rid][-1].error)
        assert got[rid][-1].finish_reason == "length" and got[rid][-1].error is None
        assert sum(len(o.new_token_ids) for o in got[rid]) == 6
    stats = client.utility("stats")
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_slots"] == stats["num_slots"]
    assert runner.encoder_cache.num_pinned == 0
    assert engine.thread.is_alive() and engine.error is None
    client.close()
