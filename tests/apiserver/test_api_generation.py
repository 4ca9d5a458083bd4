"""End to end through a real API-server process and the fake engine: the happy paths of
every endpoint, with the official openai client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(main_stack: Any) -> Any:
    return main_stack


def test_chat_text(stack: Any) -> None:
    client = stack.client()
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens > 5
    assert r.choices[0].message.content  # echoed prompt tokens, as text
    assert r.model == "default"


def test_chat_stream_with_usage(stack: Any) -> None:
    client = stack.client()
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    nonstream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "stream me"}], max_tokens=6
    )
    assert text == nonstream.choices[0].message.content


def test_completion_string_and_token_ids(stack: Any, tokenizer: Any) -> None:
    client = stack.client()
    ids = tokenizer.encode("the quick brown fox")
    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=len(ids))
    assert by_ids.choices[0].text == tokenizer.decode(ids)
    assert by_ids.usage.prompt_tokens == len(ids)
    by_text = client.completions.create(model="default", prompt="the quick brown fox", max_tokens=3)
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.completion_tokens == 3


def test_completion_stop_string_across_tokens_streaming(stack: Any, tokenizer: Any) -> None:
    client = stack.client()
    prompt = "alpha beta gamma delta epsilon"
    ids = tokenizer.encode(prompt)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "gamma" not in pieces  # the stop string spans several tokens
    stream = client.completions.create(
        model="default", prompt=ids, max_tokens=40, stop=["gamma"], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    assert text == "alpha beta "
    assert chunks[-1].choices[0].finish_reason == "stop"
    nonstream = client.completions.create(model="default", prompt=ids, max_tokens=40, stop="delta")
    assert nonstream.choices[0].text == "alpha beta gamma "
    assert nonstream.choices[0].finish_reason == "stop"
    stack.wait_for_engine_line(rf"ABORT {nonstream.id}$")  # the engine would go on


def test_utf8_multibyte_streaming(stack: Any, tokenizer: Any) -> None:
    text = "héllo wörld 日本語 🙂 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # characters span tokens
    stream = stack.client().completions.create(
        model="default", prompt=ids, max_tokens=len(ids), stream=True
    )
    deltas = [c.choices[0].text for c in stream]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_completion_logprobs(stack: Any, tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three")
    r = stack.client().completions.create(
        model="default", prompt=ids, max_tokens=len(ids), logprobs=1
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)


def test_chat_logprobs(stack: Any) -> None:
    r = stack.client().chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2


def test_chat_image_data_url_and_file(stack: Any, media_dir: Path, data_url: Any) -> None:
    client = stack.client()
    for url in (data_url(media_dir / "coffee.jpg"), f"file://{media_dir / 'astronaut.png'}"):
        r = client.chat.completions.create(
            model="default",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is in the picture"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            max_tokens=4,
        )
        assert r.usage.prompt_tokens > 100  # the image's placeholder tokens
        line = stack.wait_for_engine_line(rf"ADD {r.id} ")
        assert "torch.bfloat16" in line  # pixels cast to Ready.pixel_dtype


def test_same_image_same_hash(stack: Any, media_dir: Path, data_url: Any) -> None:
    client = stack.client()
    hashes = []
    for url in (data_url(media_dir / "astronaut.png"), f"file://{media_dir / 'astronaut.png'}"):
        r = client.chat.completions.create(
            model="default",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ],
            max_tokens=1,
        )
        line = stack.wait_for_engine_line(rf"ADD {r.id} ")
        hashes.append(line.split("images=[")[1].split(":")[0])
    assert hashes[0] == hashes[1]


def test_embeddings_float_and_base64(stack: Any) -> None:
    client = stack.client()
    floats = client.embeddings.create(
        model="default", input=["one sentence", "another one"], encoding_format="float"
    )
    assert [d.index for d in floats.data] == [0, 1]
    vec = np.array(floats.data[0].embedding)
    assert vec.shape == (8,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    # The openai client asks for base64 by default and decodes it itself.
    b64 = client.embeddings.create(model="default", input="one sentence")
    assert np.allclose(b64.data[0].embedding, vec, atol=1e-6)
    assert floats.usage.prompt_tokens > 0


def test_models_tokenize_detokenize(stack: Any, tokenizer: Any) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["default"]
    with stack.http() as http:
        tok = http.post("/tokenize", json={"prompt": "hello world"}).json()
        assert tok["tokens"] == tokenizer.encode("hello world")
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
        )
        assert chat.json()["tokens"] == list(expected)
        detok = http.post("/detokenize", json={"tokens": tok["tokens"]}).json()
        assert detok["prompt"] == "hello world"


def test_health_ready_version_metrics_headers(stack: Any) -> None:
    with stack.http() as http:
        health = http.get("/health", headers={"x-request-id": "my-req.1"})
        assert health.status_code == 200 and health.json()["engine"] == "alive"
        assert health.headers["x-fanin-server"] == "0"
        assert health.headers["x-request-id"] == "my-req.1"
        odd = http.get("/health", headers={"x-request-id": "bad id\twith junk"})
        assert odd.headers["x-request-id"] != "bad id\twith junk"
        assert http.get("/ready").status_code == 200
        assert http.get("/version").json()["version"]
        metrics = http.get("/metrics").text
        assert 'fanin_requests_total{endpoint="/health",status="200"}' in metrics
        assert "fanin_time_to_first_token_seconds_bucket" in metrics
        assert 'fanin_server_inflight{server="0"}' in metrics
