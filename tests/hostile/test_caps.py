"""Family 3: client-controlled sizes (routes, protocol, detokenizer, embeddings, the engine's
stop-id set): each past its cap is a 400 naming the limit, before any response starts (with
stream=true too); at the cap, the request is served without slowing the server down."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hostile_kit import HealthProbe, assert_error, assert_served

pytestmark = pytest.mark.slow

TARGETS = ["fake_url", "real_url"]
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": "default", "prompt": "one two three", "max_tokens": 2}


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.post(path, json=body)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stream", [False, True])
def test_sizes_past_their_caps_are_400_naming_the_limit(
    target: str, stream: bool, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(target)
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("/v1/completions", {"stop": [f"s{i}" for i in range(33)]}, "stop", "32"),
        ("/v1/chat/completions", {"stop": "x" * 1025}, "stop", "1024"),
        ("/v1/completions", {"stop_token_ids": list(range(1025))}, "stop_token_ids", "1024"),
        ("/v1/completions", {"stop_token_ids": [3, 1 << 40]}, "stop_token_ids", "vocabulary"),
        ("/v1/completions", {"logprobs": 21}, "logprobs", "20"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ("/v1/chat/completions", {"priority": -(1 << 63)}, "priority", "scheduling-policy"),
        ("/v1/completions", {"min_tokens": 5}, "min_tokens", "max_tokens (2)"),
        (
            "/v1/chat/completions",
            {"max_tokens": None, "max_completion_tokens": 3, "min_tokens": 9},
            "min_tokens",
            "max_completion_tokens (3)",
        ),
    ]
    with HealthProbe(url) as probe:
        for path, extra, param, limit in cases:
            base = CHAT if "chat" in path else TEXT
            body = {**base, **extra, "stream": stream}
            error = assert_error(_post(url, path, body), 400, limit)
            assert error["param"].startswith(param), (extra, error)
        if not stream:
            options = {**TEXT, "stream_options": {"include_usage": True}}
            error = assert_error(_post(url, "/v1/completions", options), 400, "stream")
            assert error["param"] == "stream_options"
    probe.check(min_samples=1)
    assert_served(url)


def test_stop_strings_at_the_cap_cost_the_loop_little(fake_url: str) -> None:
    """Four concurrent streams, each with 32 stop strings of 1,024 characters that never match
    (the stop check ran per token over every prefix of every stop: seconds of loop time)."""
    stops = [f"{i:02d}" + "q" * 1022 for i in range(32)]
    body = {**TEXT, "prompt": "one two three four", "max_tokens": 300, "stop": stops}

    def one(_: int) -> dict[str, Any]:
        with httpx.Client(base_url=fake_url, timeout=60) as http:
            response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with HealthProbe(fake_url) as probe, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    probe.check()
    assert_served(fake_url)


def test_many_stop_token_ids_do_not_slow_others(real_url: str) -> None:
    """1,024 stop token ids (the cap) on one request; another request meanwhile is served."""
    vocab = 8192
    many = {**TEXT, "max_tokens": 64, "stop_token_ids": list(range(vocab - 1024, vocab))}
    with HealthProbe(real_url, mode="fresh") as probe, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, real_url, "/v1/completions", many)
        assert_served(real_url)
        assert pending.result(timeout=60).status_code == 200
    probe.check(min_samples=3)


@pytest.mark.parametrize("target", TARGETS)
def test_embedding_inputs_are_capped_and_batched(
    target: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(target)
    base = {"model": "default"}
    with HealthProbe(url) as probe:
        error = assert_error(
            _post(url, "/v1/embeddings", {**base, "input": ["a"] * 2049}), 400, "2048"
        )
        assert error["param"] == "input"
        over = {**base, "input": [[5] * 150] * 2001}  # 300,150 tokens of token lists
        error = assert_error(_post(url, "/v1/embeddings", over), 400, "300000")
        assert error["param"] == "input"
        bad = {**base, "input": [[5, 1 << 40]]}
        assert assert_error(_post(url, "/v1/embeddings", bad), 400)["param"] == "input"
        # More string inputs than the render queue holds: once 429 for ever, now batched.
        texts = [f"sentence number {i}" for i in range(200)]
        start = time.monotonic()
        served = _post(url, "/v1/embeddings", {**base, "input": texts})
        assert served.status_code == 200, served.text[:300]
        data = served.json()["data"]
        assert [d["index"] for d in data] == list(range(200))
        assert time.monotonic() - start < 60
    probe.check()
    assert_served(url)
