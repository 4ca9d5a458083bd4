"""Realistic wire messages of every kind, and a deep equality that understands arrays."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import numpy as np
import skimage.data
import torch

from ipc import messages as m

# Qwen2-VL patch layout: 3 channels x 2 frames (temporal patch) x 14 x 14 = 1176 values/patch.
PATCH = 14
PATCH_DIM = 3 * 2 * PATCH * PATCH
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@functools.cache
def astronaut_patches(side: int = 112) -> torch.Tensor:
    """(num_patches, 1176) float32 normalized patches of a crop of the astronaut photo, laid
    out the way the Qwen2-VL image processor lays them out (without the merge reordering)."""
    n = side // PATCH
    img = skimage.data.astronaut()[:side, :side].astype(np.float32) / 255.0
    img = (img - _MEAN) / _STD  # (H, W, 3)
    chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    patches = chw.reshape(3, n, PATCH, n, PATCH).permute(1, 3, 0, 2, 4).reshape(n * n, 1, -1)
    return patches.expand(-1, 2, -1).reshape(n * n, PATCH_DIM).contiguous()


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    """``n`` int32 token ids, built the way the API server builds them."""
    rng = np.random.default_rng(seed)
    return np.asarray(rng.integers(0, 151_643, n).tolist(), dtype=np.int32)


def image_request(pixels: torch.Tensor | None, request_id: str = "chatcmpl-img") -> m.EngineRequest:
    """An ADD carrying one image (or a cached one when ``pixels`` is None)."""
    grid = (1, 8, 8)
    item = m.MultiModalItem("sha256:9f2c", "image", grid, offset=5, length=16, pixel_values=pixels)
    return m.EngineRequest(
        request_id=request_id,
        prompt_token_ids=token_ids(40),
        mm_items=[item],
        sampling=m.SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=7),
        arrival_time=1_763_790_000.25,
    )


def output_batch(n: int) -> m.OutputBatch:
    """An OUTPUTS of ``n`` requests with one new token each (a typical decode step)."""
    outs = [m.RequestOutput(f"cmpl-{i}", new_token_ids=[1000 + i]) for i in range(n)]
    return m.OutputBatch(outs, m.EngineLoad(num_running=n, num_waiting=3, kv_usage=0.42))


def all_kinds() -> list[msgspec.Struct]:
    """At least one realistic message of every kind, several for the rich ones."""
    pixels = astronaut_patches()
    return [
        m.Hello(client_index=3, pid=4242),
        m.Ready(
            protocol_version=m.PROTOCOL_VERSION,
            model="Qwen/Qwen2-VL-2B-Instruct",
            max_model_len=32768,
            vocab_size=151_936,
            kv_capacity_tokens=250_000,
            max_num_seqs=256,
            supports_images=True,
            supports_embeddings=False,
            supports_generation=True,
            eos_token_ids=[151_645, 151_643],
            engine_pid=99,
            pixel_dtype="uint8",
            image_token_id=151_655,
            uint8_one_frame=True,
        ),
        m.EngineRequest("chatcmpl-1", token_ids(1000), sampling=m.SamplingParams(max_tokens=1)),
        m.EngineRequest(
            "embd-1", token_ids(7), pooling=m.PoolingParams("mean"), priority=-1, deadline=5.5
        ),
        image_request(pixels),
        image_request(pixels.to(torch.bfloat16)),
        image_request(None),
        m.AbortRequests(["chatcmpl-1", "embd-1", "ünïcode-id"]),
        m.UtilityCall(call_id=12, op="stats"),
        m.UtilityResult(call_id=12, result={"num_running": 3, "kv_usage": 0.5, "model": "x"}),
        m.UtilityResult(call_id=13, error="unknown op"),
        output_batch(4),
        m.OutputBatch(
            [
                m.RequestOutput(
                    "embd-1",
                    finish_reason="stop",
                    num_prompt_tokens=7,
                    embedding=np.linspace(-1, 1, 384, dtype=np.float32),
                ),
                m.RequestOutput(
                    "chatcmpl-1",
                    new_token_ids=[11],
                    finish_reason="length",
                    num_prompt_tokens=1000,
                    num_cached_tokens=512,
                    logprobs=[m.TokenLogprobs(-0.1, [11, 12], [-0.1, -2.5])],
                ),
                m.RequestOutput(
                    "bad-1", finish_reason="error", error=m.RequestError(400, "prompt too long")
                ),
            ]
        ),
        m.EngineDead("CUDA error: an illegal memory access was encountered"),
        m.Shutdown("SIGTERM"),
        m.Shutdown(),
    ]


def assert_same(a: Any, b: Any, path: str = "$") -> None:
    """Deep equality where arrays compare by dtype, shape and bytes (and keep their type)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.cpu(), b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b), path
    elif isinstance(a, msgspec.Struct):
        for field in a.__struct_fields__:
            assert_same(getattr(a, field), getattr(b, field), f"{path}.{field}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
