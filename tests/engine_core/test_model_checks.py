"""The engine's validation (``engine_core.validation``) rejects every bad request with a
message; the encoder cache serves repeated images without pixels and evicts by its byte
budget; pooled hidden states match HF's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import skimage.data
import torch
from conftest import admit, image_request
from PIL import Image

from engine_core.batch import Chunk
from engine_core.model.encoder_cache import EncoderCache
from engine_core.validation import validate_request
from ipc.messages import EngineRequest, PoolingParams, SamplingParams


@pytest.fixture(scope="module")
def coffee(encode: Callable[..., Any], hf_model: Any) -> EngineRequest:
    image = Image.fromarray(skimage.data.coffee()).resize((224, 168))
    return image_request(
        "c", encode("What is this?", [image]), hf_model.config.image_token_id, hashes=["coffee"]
    )


@pytest.fixture
def runner(make_runner: Callable[..., Any]) -> Any:
    return make_runner()


def _with(request: EngineRequest, **changes: Any) -> EngineRequest:
    return msgspec.structs.replace(request, **changes)


def _item(request: EngineRequest, **changes: Any) -> EngineRequest:
    return _with(request, mm_items=[msgspec.structs.replace(request.mm_items[0], **changes)])


def _text(ids: Any, **kw: Any) -> EngineRequest:
    return EngineRequest(
        request_id="t", prompt_token_ids=ids, sampling=kw.pop("sampling", SamplingParams()), **kw
    )


def test_token_checks(runner: Any) -> None:
    vocab = runner.facts.vocab_size
    ok = np.arange(10, dtype=np.int32)
    assert admit(runner, _text(ok)) is None
    cases = {
        "outside the vocabulary": _text(np.array([1, vocab], dtype=np.int32)),
        "outside the vocabulary ": _text(np.array([-1, 3], dtype=np.int32)),
        "1-D int32": _text(ok.astype(np.float32)),
        "1-D int32 ": _text(ok.reshape(2, 5)),
        "empty": _text(np.zeros(0, dtype=np.int32)),
        "max_model_len": _text(np.ones(runner.facts.max_model_len, dtype=np.int32)),
        "exactly one": _text(ok, pooling=PoolingParams()),
        "exactly one ": _text(ok, sampling=None),
        "pooling 'cls'": _text(ok, sampling=None, pooling=PoolingParams(pooling="cls")),
    }
    for needle, request in cases.items():
        error = admit(runner, request)
        assert error is not None and needle.strip() in error, (needle, error)


def test_image_checks(runner: Any, coffee: EngineRequest) -> None:
    assert admit(runner, coffee) is None
    item = coffee.mm_items[0]
    ids = coffee.prompt_token_ids
    t, h, w = item.grid_thw
    shifted = ids.copy()
    shifted[item.offset - 1] = ids[item.offset]  # a stray placeholder before the span
    cases = {
        "disagree with grid": _item(coffee, pixel_values=item.pixel_values[:-1]),
        "outside the prompt": _item(coffee, offset=ids.size - item.length + 1),
        "not all image tokens": _item(coffee, offset=item.offset - 1),
        "needs": _item(coffee, grid_thw=(t, h + 2, w)),
        "invalid": _item(coffee, grid_thw=(t, h + 1, w)),
        "unknown image hash": _item(coffee, pixel_values=None),
        "belong to no image": _with(coffee, prompt_token_ids=shifted),
        "overlap": _with(coffee, mm_items=[item, item]),
    }
    for needle, request in cases.items():
        error = admit(runner, request)
        assert error is not None and needle in error, (needle, error)


def test_images_to_a_text_only_model(
    make_runner: Callable[..., Any], tmp_path: Path, coffee: EngineRequest
) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=9000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(tmp_path / "q")
    error = admit(make_runner(tmp_path / "q"), coffee)
    assert error is not None and "does not accept images" in error


def _prefill_logits(runner: Any, request: EngineRequest) -> torch.Tensor:
    ids = request.prompt_token_ids
    return runner.execute([Chunk(request, 0, 0, ids, True)]).logits[0]


def test_cached_image_needs_no_pixels(runner: Any, coffee: EngineRequest) -> None:
    calls = []
    encode = runner.vision.encode
    runner.vision.encode = lambda *a: calls.append(1) or encode(*a)
    assert admit(runner, coffee) is None
    first = _prefill_logits(runner, coffee)
    runner.release(coffee.request_id)
    again = _with(_item(coffee, pixel_values=None), request_id="again")
    assert admit(runner, again) is None
    assert torch.equal(_prefill_logits(runner, again), first)
    assert len(calls) == 1
    runner.reset_encoder_cache()  # "again" still holds its entry: it survives the reset
    assert "coffee" in runner.encoder_cache
    runner.release("again")
    runner.reset_encoder_cache()
    assert (
        admit(runner, _with(again, request_id="late"))
        == "unknown image hash 'coffee' (send the pixels)"
    )


def test_encoder_cache_evicts_by_budget(
    make_runner: Callable[..., Any], coffee: EngineRequest
) -> None:
    hidden = 128
    one_image = coffee.mm_items[0].length * hidden * 4
    runner = make_runner(encoder_cache_bytes=one_image)
    for name in ("a", "b"):
        request = _with(_item(coffee, content_hash=name), request_id=name)
        assert admit(runner, request) is None
        _prefill_logits(runner, request)
        runner.release(name)
    assert "b" in runner.encoder_cache and "a" not in runner.encoder_cache
    error = admit(runner, _with(_item(coffee, content_hash="a", pixel_values=None)))
    assert error is not None and "unknown image hash" in error


def test_pinned_entries_survive_eviction() -> None:
    cache = EncoderCache(budget_bytes=400)
    cache.put("a", torch.zeros(100), "r1")  # 400 bytes, pinned by r1
    cache.put("b", torch.zeros(100), "r2")
    assert "a" in cache and "b" in cache and cache.total_bytes == 800
    cache.release("a", "r1")  # unpinned and over budget: the oldest goes
    assert "a" not in cache and "b" in cache
    cache.release("b", "r2")
    assert "b" in cache and cache.total_bytes == 400
    assert cache.acquire("missing", "r3") is None


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_hidden_states_match_hf(
    runner: Any, hf_model: Any, coffee: EngineRequest, pooling: str
) -> None:
    request = _with(coffee, request_id="p", sampling=None, pooling=PoolingParams(pooling=pooling))
    assert admit(runner, request) is None
    ids = request.prompt_token_ids
    result = runner.execute([Chunk(request, 0, 0, ids, False, wants_pooled=True)])
    assert result.logits.shape[0] == 0
    item = coffee.mm_items[0]
    with torch.no_grad():
        hidden = hf_model.model(
            input_ids=torch.from_numpy(ids[None].astype(np.int64)),
            pixel_values=item.pixel_values,
            image_grid_thw=torch.tensor([item.grid_thw]),
            mm_token_type_ids=torch.from_numpy(
                (ids == hf_model.config.image_token_id)[None].astype(np.int64)
            ),
        ).last_hidden_state[0]
    expected = hidden[-1] if pooling == "last" else hidden.mean(0)
    np.testing.assert_allclose(result.pooled["p"], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_state_is_rebuilt_after_a_release(
    make_runner: Callable[..., Any], coffee: EngineRequest
) -> None:
    """A preempted request is released and prefilled again without being admitted again: its
    state comes back from the request (pixels, or a still-cached encoder output); without
    either, that request alone fails."""
    runner = make_runner(encoder_cache_bytes=0)
    assert admit(runner, coffee) is None
    first = _prefill_logits(runner, coffee)
    runner.release(coffee.request_id)
    assert torch.equal(_prefill_logits(runner, coffee), first)  # pixels still in the request
    runner.release(coffee.request_id)
    assert "coffee" not in runner.encoder_cache  # budget 0: nothing unpinned is kept
    gone = _item(coffee, pixel_values=None)
    result = runner.execute([Chunk(gone, 0, 0, gone.prompt_token_ids, True)])
    assert result.logits is not None and result.logits.shape[0] == 0
    error = result.failed[gone.request_id]
    assert error.status == 503 and "evicted" in error.message


def test_kind_checks_for_models_without_embeddings_or_generation(runner: Any) -> None:
    ids = np.arange(4, dtype=np.int32)
    pooling = EngineRequest("e", ids, pooling=PoolingParams(pooling="mean"))

    def check(request: EngineRequest, **facts: Any) -> str:
        changed = dataclasses.replace(runner.facts, **facts)
        return validate_request(request, changed, runner.has_image) or ""

    assert check(pooling) == ""
    assert "does not support embeddings" in check(pooling, supports_embeddings=False)
    assert "cannot generate" in check(_text(ids), supports_generation=False)
    assert "not supported by this model" in check(pooling, poolings=("cls",))
