"""Fixtures of the model-side tests: the default model, its HF twin and its processor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ipc.messages import EngineRequest, MultiModalItem, PoolingParams, SamplingParams


@pytest.fixture(scope="session")
def hf_model(default_model_dir: Path) -> Any:
    """The default model loaded by HF (float32, eval): the reference for our runner."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        default_model_dir, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def processor(default_model_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(default_model_dir)


@pytest.fixture
def make_runner(default_model_dir: Path) -> Callable[..., Any]:
    """Build a runner over the default model (or ``model``), small KV cache by default."""
    from engine_core.model.runner_factory import load_runner
    from ipc.config import EngineConfig

    def make(model: Path | None = None, **overrides: Any) -> Any:
        fields: dict[str, Any] = {
            "max_model_len": 1024,
            "max_num_seqs": 8,
            "cpu_kv_cache_bytes": 64 << 20,
        }
        fields.update(overrides)
        return load_runner(EngineConfig(**fields), str(model or default_model_dir))

    return make


def image_request(
    request_id: str,
    encoded: Any,
    image_token_id: int,
    *,
    hashes: list[str] | None = None,
    pooling: bool = False,
) -> EngineRequest:
    """An EngineRequest from the processor's output for one prompt (batch of 1)."""
    ids = encoded["input_ids"][0].numpy().astype(np.int32)
    grids = encoded.get("image_grid_thw")
    items: list[MultiModalItem] = []
    if grids is not None:
        is_image = np.concatenate([[False], ids == image_token_id, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(is_image))
        starts, ends = edges[0::2], edges[1::2]
        row = 0
        for i, (grid, lo, hi) in enumerate(zip(grids.tolist(), starts, ends, strict=True)):
            patches = int(np.prod(grid))
            items.append(
                MultiModalItem(
                    content_hash=(hashes or [f"img-{request_id}-{i}"] * len(starts))[i],
                    modality="image",
                    grid_thw=tuple(grid),
                    offset=int(lo),
                    length=int(hi - lo),
                    pixel_values=encoded["pixel_values"][row : row + patches],
                )
            )
            row += patches
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=ids,
        mm_items=items,
        sampling=None if pooling else SamplingParams(max_tokens=16, temperature=0.0),
        pooling=PoolingParams(pooling="last") if pooling else None,
    )


@pytest.fixture(scope="session")
def encode(processor: Any) -> Callable[..., Any]:
    """Chat prompt (text, optional images) -> processor output with tensors."""

    def run(text: str, images: list[Any] | None = None) -> Any:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images or []]
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return processor(text=[prompt], images=images or None, return_tensors="pt")

    return run


def admit(runner: Any, request: EngineRequest, allow_priority: bool = False) -> str | None:
    """What the scheduler does with a new request, for tests that drive a runner directly:
    the engine's one validation, then the runner takes it. The 400 message, or None."""
    from engine_core.validation import validate_request

    error = validate_request(request, runner.facts, runner.has_image, allow_priority)
    if error is None:
        runner.admit(request)
    return error
