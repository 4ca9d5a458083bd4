"""Greedy decoding through ModelRunner.execute is token-identical to HF generate (float32,
same weights): a text chat prompt, an image prompt, and a batch of concurrent mixed requests
sharing steps with chunked prefill (prompts and images spanning chunks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from conftest import admit, image_request
from PIL import Image

from bench.datasets import sharegpt_prompts
from engine_core.batch import Chunk
from ipc.messages import EngineRequest

NEW_TOKENS = 16


def hf_greedy(hf_model: Any, encoded: Any) -> list[int]:
    """HF generate, greedy; min_new_tokens masks EOS so both sides run the full length."""
    inputs = {k: v for k, v in encoded.items() if k != "attention_mask"}
    with torch.no_grad():
        out = hf_model.generate(
            **inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
    return out[0, encoded["input_ids"].shape[1] :].tolist()


def run_greedy(
    runner: Any, requests: list[EngineRequest], arrivals: list[int], chunk_size: int
) -> list[list[int]]:
    """A minimal scheduler: request i joins at step arrivals[i] in slot i; each step gives every
    running request at most ``chunk_size`` prompt tokens or one decode token, all in one
    execute call. EOS ids are masked, like HF's min_new_tokens."""
    for r in requests:
        assert admit(runner, r) is None
    eos = list(runner.facts.eos_token_ids)
    done = [0] * len(requests)  # tokens already in the KV cache
    out: list[list[int]] = [[] for _ in requests]
    step = 0
    while any(len(o) < NEW_TOKENS for o in out):
        chunks, owners = [], []
        for i, r in enumerate(requests):
            if arrivals[i] > step or len(out[i]) == NEW_TOKENS:
                continue
            prompt = r.prompt_token_ids
            if done[i] < prompt.size:
                n = min(chunk_size, prompt.size - done[i])
                tokens = prompt[done[i] : done[i] + n]
            else:
                tokens = np.asarray(out[i][-1:], dtype=np.int32)
            end = done[i] + tokens.size
            wants = end >= prompt.size
            chunks.append(Chunk(r, i, done[i], tokens, wants))
            if wants:
                owners.append(i)
            done[i] = end
        if chunks:
            logits = runner.execute(chunks).logits
            assert logits.dtype == torch.float32 and logits.shape[0] == len(owners)
            logits[:, eos] = -float("inf")
            for i, token in zip(owners, logits.argmax(-1).tolist(), strict=True):
                out[i].append(int(token))
        step += 1
    for r in requests:
        runner.release(r.request_id)
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sharegpt_prompts(6, min_chars=300, max_chars=1500)


def test_text_prompt_matches_hf(
    make_runner: Callable[..., Any], hf_model: Any, encode: Callable[..., Any]
) -> None:
    encoded = encode(sharegpt_prompts(1, min_chars=1200, max_chars=2000)[0])
    assert encoded["input_ids"].shape[1] > 200  # a few hundred tokens of real text
    request = image_request("text", encoded, hf_model.config.image_token_id)
    ours = run_greedy(make_runner(), [request], [0], chunk_size=4096)[0]
    assert ours == hf_greedy(hf_model, encoded)


def test_image_prompt_matches_hf(
    make_runner: Callable[..., Any], hf_model: Any, encode: Callable[..., Any]
) -> None:
    encoded = encode("Describe this photo.", [Image.fromarray(skimage.data.astronaut())])
    request = image_request("img", encoded, hf_model.config.image_token_id)
    assert request.mm_items and request.mm_items[0].length > 100
    ours = run_greedy(make_runner(), [request], [0], chunk_size=4096)[0]
    assert ours == hf_greedy(hf_model, encoded)


def test_concurrent_chunked_batch_matches_hf(
    make_runner: Callable[..., Any], hf_model: Any, encode: Callable[..., Any], texts: list[str]
) -> None:
    photos = [
        Image.fromarray(skimage.data.coffee()),
        Image.fromarray(skimage.data.chelsea()),
        Image.fromarray(skimage.data.rocket()),
    ]
    prompts = [encode(t) for t in texts[1:6]]
    prompts += [
        encode("What is in the cup?", photos[:1]),
        encode("Name the animal.", photos[1:2]),
        encode("Compare the two pictures.", photos[1:3]),
    ]
    image_id = hf_model.config.image_token_id
    requests = [image_request(f"r{i}", e, image_id) for i, e in enumerate(prompts)]
    assert len(requests[-1].mm_items) == 2
    # staggered arrivals: prefill chunks of late requests share steps with decodes of early ones
    arrivals = [0, 0, 3, 5, 9, 1, 4, 12]
    ours = run_greedy(make_runner(), requests, arrivals, chunk_size=13)
    theirs = [hf_greedy(hf_model, e) for e in prompts]
    assert ours == theirs
