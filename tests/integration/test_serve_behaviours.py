"""API behaviours that tests/apiserver checks against the stand-in engine, checked again
against a real `fanin serve` (real engine core, default model, 2 API servers): stop strings,
streaming, logprobs, seeds, vLLM sampling extras, token-id prompts, every kind of bad input,
aborts on disconnect and timeout, admission 429, /tokenize and /metrics.

Two servers are shared by the whole module: ``main`` (file:// images under a media folder, at
most 2 images of at most 1 Mpixel) and ``guarded`` (an API key, one request in flight per API
server, 3 s request timeout). That a request was aborted in the engine is read from the
``fanin_engine_running`` gauge (the engine's own count of running sequences, carried by every
output batch and heartbeat); each such test first checks that the request would have run far
longer than the wait, so only an abort can pass it.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fanin_proc import SERVED_NAME, Fanin, image_data_url, start_fanin
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.datasets import sharegpt_prompts

pytestmark = pytest.mark.slow

KEY = "behaviours-key"
#: Tokens of a request that only an abort ends early (the model's 8192-token context).
LONG_TOKENS = 8000
LONG = {"ignore_eos": True}
MAX_IMAGES = 2


# --- servers and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos (scikit-image), the allowed root of file:// image URLs."""
    from skimage import data

    root = tmp_path_factory.mktemp("media")
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(data.coffee()).save(root / "coffee.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def main(
    default_model_dir: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fanin]:
    running = start_fanin(
        tmp_path_factory.mktemp("main"),
        default_model_dir,
        *("--api-server-count", "2", "--served-model-name", SERVED_NAME),
        *("--allowed-local-media-path", str(media_dir)),
        *("--max-images-per-request", str(MAX_IMAGES), "--max-image-pixels", "1000000"),
    )
    yield running
    running.kill_tree()


@pytest.fixture(scope="module")
def guarded(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fanin]:
    running = start_fanin(
        tmp_path_factory.mktemp("guarded"),
        default_model_dir,
        *("--api-server-count", "2", "--served-model-name", SERVED_NAME, "--api-key", KEY),
        *("--max-inflight-requests", "1", "--request-timeout", "3"),
    )
    yield running
    running.kill_tree()


_CLIENTS: dict[tuple[str, str], openai.OpenAI] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()


def _client(fanin: Fanin, key: str = "unused") -> openai.OpenAI:
    """The official client (no retries: every failure counts), one per server and key."""
    if (fanin.base_url, key) not in _CLIENTS:
        _CLIENTS[fanin.base_url, key] = openai.OpenAI(
            base_url=fanin.base_url + "/v1", api_key=key, max_retries=0, timeout=60
        )
    return _CLIENTS[fanin.base_url, key]


def _fresh(fanin: Fanin, key: str | None = None) -> httpx.Client:
    """A client whose every request goes on a new connection (any API server may take it)."""
    headers = {"connection": "close"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=fanin.base_url, headers=headers, timeout=60)


def _metrics(fanin: Fanin, key: str | None = None) -> list[tuple[str, dict[str, str], float]]:
    with _fresh(fanin, key) as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def _sample(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples that carry ``labels``."""
    return sum(
        v for n, got, v in samples if n == name and all(got.get(k) == x for k, x in labels.items())
    )


def _engine_running(fanin: Fanin, key: str | None = None) -> float:
    return _sample(_metrics(fanin, key), "fanin_engine_running")


def _wait_until(what: str, condition: Callable[[], bool], timeout_s: float = 30.0) -> float:
    """Poll ``condition`` until it holds; return the seconds that took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s:.1f} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _settled(fanin: Fanin, key: str | None = None) -> None:
    """Nothing in flight on any API server, nothing running in the engine, no KV slot taken."""

    def idle() -> bool:
        samples = _metrics(fanin, key)
        return (
            _sample(samples, "fanin_server_inflight") == 0
            and _sample(samples, "fanin_engine_running") == 0
            and _sample(samples, "fanin_engine_kv_cache_usage") == 0
        )

    _wait_until("servers and engine idle", idle)


@pytest.fixture(scope="module")
def token_s(main: Fanin) -> float:
    """Seconds per generated token of one lone request on this machine (a lower bound for the
    per-token time of a long generation, whose attention only grows)."""
    stream = _client(main).completions.create(
        model=SERVED_NAME,
        prompt="Once upon a time",
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    stamps, usage = [], None
    for chunk in stream:
        if chunk.choices:
            stamps.append(time.monotonic())
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 64
    return (stamps[-1] - stamps[0]) / (usage.completion_tokens - 1)


def _abort_deadline(token_s: float, tokens_left: int) -> float:
    """How long an aborted request may take to leave the engine: a third of the time its
    remaining tokens would take. An abort shows within about a heartbeat (0.5 s)."""
    deadline = min(15.0, tokens_left * token_s / 3)
    assert deadline > 2.0, f"generation too fast ({token_s * 1000:.2f} ms/token) to tell"
    return deadline


def _wait_aborted(fanin: Fanin, token_s: float, tokens_left: int, key: str | None = None) -> None:
    _wait_until(
        "the engine freed the aborted request's slot",
        lambda: _engine_running(fanin, key) == 0,
        _abort_deadline(token_s, tokens_left),
    )


def _still_serving(fanin: Fanin, key: str = "unused") -> None:
    r = _client(fanin, key).chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
    )
    assert r.choices[0].finish_reason == "length" and r.usage is not None
    assert r.usage.completion_tokens == 2


@functools.cache
def _prompt(i: int = 0) -> str:
    """The ``i``-th short ShareGPT prompt (real text)."""
    return sharegpt_prompts(i + 1, max_chars=300)[i]


# --- generation ------------------------------------------------------------------------------


def _pick_stop(text: str) -> str:
    """A 4-character piece from the middle of ``text`` that first occurs after its start."""
    middle = len(text) // 2
    for shift in range(middle):
        for start in (middle + shift, middle - shift):
            piece = text[start : start + 4]
            usable = len(piece) == 4 and piece.strip() and "\ufffd" not in piece
            if usable and len(text) // 4 <= text.index(piece):
                return piece
    raise AssertionError(f"no stop string in {text!r}")


def _generate(client: openai.OpenAI, kind: str, prompt: str, **kw: Any) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of one chat or text completion."""
    if kind == "chat":
        chat = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": prompt}], **kw
        )
        text, reason, usage = (
            chat.choices[0].message.content,
            chat.choices[0].finish_reason,
            chat.usage,
        )
    else:
        done = client.completions.create(model=SERVED_NAME, prompt=prompt, **kw)
        text, reason, usage = done.choices[0].text, done.choices[0].finish_reason, done.usage
    assert text is not None and usage is not None
    return text, reason, usage.completion_tokens


def _stream(client: openai.OpenAI, kind: str, prompt: str, **kw: Any) -> tuple[list[str], str]:
    """(text deltas, finish reason) of one streamed chat or text completion."""
    deltas, reason = [], None
    if kind == "chat":
        chunks: Any = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": prompt}], stream=True, **kw
        )
        for chunk in chunks:
            if chunk.choices:
                deltas.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
    else:
        chunks = client.completions.create(model=SERVED_NAME, prompt=prompt, stream=True, **kw)
        for chunk in chunks:
            if chunk.choices:
                deltas.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
    assert reason is not None
    return deltas, reason


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_greedy_stream_equals_nonstream_and_stop_strings(
    main: Fanin, token_s: float, kind: str
) -> None:
    client = _client(main)
    prompt = _prompt(0)
    full, reason, n = _generate(client, kind, prompt, max_tokens=40, temperature=0)
    assert reason == "length" and n == 40
    deltas, reason = _stream(client, kind, prompt, max_tokens=40, temperature=0)
    assert "".join(deltas) == full and reason == "length"

    stop = _pick_stop(full)
    expected = full[: full.index(stop)]
    # The same greedy prefix, but the engine would go on for thousands of tokens: only the
    # stop string ends it (and the API server must abort it in the engine).
    long = {"max_tokens": LONG_TOKENS, "temperature": 0, "extra_body": LONG}
    text, reason, n = _generate(client, kind, prompt, stop=[stop], **long)
    assert (text, reason) == (expected, "stop")
    assert n < 40
    _wait_aborted(main, token_s, LONG_TOKENS - 40)
    deltas, reason = _stream(client, kind, prompt, stop=stop, **long)
    assert ("".join(deltas), reason) == (expected, "stop")
    assert not any(stop in d for d in deltas)
    _wait_aborted(main, token_s, LONG_TOKENS - 40)


def test_chat_logprobs(main: Fanin) -> None:
    client = _client(main)
    messages: Any = [{"role": "user", "content": _prompt(1)}]
    r = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert r.usage is not None and r.choices[0].logprobs is not None
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) == r.usage.completion_tokens == 6
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(v <= 0 for v in [item.logprob, *tops])
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].token == item.token
        assert math.isclose(item.logprob, tops[0], abs_tol=1e-4)
    # Streamed, the same tokens and values arrive chunk by chunk.
    streamed = []
    for chunk in client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(
                (x.token, round(x.logprob, 4)) for x in chunk.choices[0].logprobs.content
            )
    assert streamed == [(x.token, round(x.logprob, 4)) for x in content]
    # logprobs without top_logprobs: the chosen token's logprob only.
    plain = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=3,
        logprobs=True,
    )
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content
    assert all(x.logprob <= 0 and x.top_logprobs == [] for x in plain.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=SERVED_NAME,
            messages=messages,
            max_tokens=3,
            logprobs=True,
            top_logprobs=21,
        )


def test_completion_logprobs(main: Fanin) -> None:
    r = _client(main).completions.create(
        model=SERVED_NAME, prompt=_prompt(1), max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and r.usage is not None
    assert lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n == 6
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(n)]
    for token, value, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # Two alternatives, unless two partial UTF-8 tokens both print as U+FFFD.
        assert len(tops) == 2 or (len(tops) == 1 and "\ufffd" in tops)
        assert value <= 0 and all(v <= 0 for v in tops.values())
        assert math.isclose(value, max(tops.values()), abs_tol=1e-4)  # greedy
        assert tops[token] == value


def test_seed_reproducible_even_beside_other_requests(main: Fanin) -> None:
    client = _client(main)
    prompt = _prompt(2)

    def sampled(seed: int) -> str:
        return _generate(client, "completion", prompt, max_tokens=24, temperature=1, seed=seed)[0]

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(4321) != first
    greedy = _generate(client, "completion", prompt, max_tokens=24, temperature=0)[0]
    assert first != greedy
    # A seeded request draws from its own generator: other requests in the same batch do not
    # change its output.
    busy = _client(main).completions.create(
        model=SERVED_NAME,
        prompt="Once upon a time",
        max_tokens=LONG_TOKENS,
        stream=True,
        extra_body=LONG,
    )
    try:
        next(iter(busy))
        assert sampled(1234) == first
    finally:
        busy.close()


def test_vllm_sampling_extras_take_effect(main: Fanin) -> None:
    client = _client(main)
    prompt = _prompt(1)
    greedy = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=48, temperature=0, logprobs=0
    )
    greedy_text = greedy.choices[0].text
    assert greedy.choices[0].logprobs is not None and greedy.choices[0].logprobs.tokens
    greedy_tokens = greedy.choices[0].logprobs.tokens

    # top_k=1 and min_p=1 leave only the most likely token: sampling becomes greedy.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        text, _, _ = _generate(
            client, "completion", prompt, max_tokens=48, temperature=1, extra_body=extra
        )
        assert text == greedy_text, extra

    # The greedy text repeats tokens; a strong repetition penalty steers away from them.
    assert len(set(greedy_tokens)) < len(greedy_tokens)
    penalized = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=48,
        temperature=0,
        logprobs=0,
        extra_body={"repetition_penalty": 2.0},
    )
    assert penalized.choices[0].logprobs is not None and penalized.choices[0].logprobs.tokens
    tokens = penalized.choices[0].logprobs.tokens
    assert tokens != greedy_tokens and len(set(tokens)) > len(set(greedy_tokens))

    # stop_token_ids: the first greedy token stops the request right after it...
    with _fresh(main) as http:
        first_id = http.post(
            "/tokenize", json={"prompt": greedy_tokens[0], "add_special_tokens": False}
        ).json()["tokens"]
    assert len(first_id) == 1
    text, reason, n = _generate(
        client,
        "completion",
        prompt,
        max_tokens=48,
        temperature=0,
        extra_body={"stop_token_ids": first_id},
    )
    assert (text, reason, n) == (greedy_tokens[0], "stop", 1)
    # ...unless min_tokens holds the stop ids back.
    _, _, n = _generate(
        client,
        "completion",
        prompt,
        max_tokens=48,
        temperature=0,
        extra_body={"stop_token_ids": first_id, "min_tokens": 5},
    )
    assert n >= 5
    # min_tokens and ignore_eos: exactly max_tokens, whatever the model says.
    for extra in ({"min_tokens": 32}, {"ignore_eos": True}):
        for kind in ("completion", "chat"):
            _, reason, n = _generate(client, kind, prompt, max_tokens=32, extra_body=extra)
            assert (reason, n) == ("length", 32), (extra, kind)
    # Out of range: a 400 from the engine's own checks.
    for extra, words in (
        ({"min_tokens": 10}, "min_tokens"),
        ({"stop_token_ids": [1 << 20]}, "stop token ids"),
    ):
        with pytest.raises(openai.BadRequestError, match=words):
            client.completions.create(
                model=SERVED_NAME, prompt=prompt, max_tokens=5, extra_body=extra
            )


def test_token_id_prompts(main: Fanin) -> None:
    client = _client(main)
    text = _prompt(0)
    with _fresh(main) as http:
        ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=12, temperature=0)
    by_text = client.completions.create(
        model=SERVED_NAME, prompt=text, max_tokens=12, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=SERVED_NAME, prompt=[5, 1 << 20], max_tokens=2)
    vocab = int(str(exc.value).split("[0, ")[1].split(")")[0])
    assert vocab > 1000
    last = client.completions.create(model=SERVED_NAME, prompt=[vocab - 1], max_tokens=2)
    assert last.usage is not None and last.usage.completion_tokens == 2
    for bad in ([vocab], [-1], [5, 1 << 64]):
        with pytest.raises(openai.BadRequestError, match="token ids"):
            client.completions.create(model=SERVED_NAME, prompt=bad, max_tokens=2)
    _still_serving(main)


# --- bad input -------------------------------------------------------------------------------


def _assert_error(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


def test_bad_requests_get_openai_errors(main: Fanin) -> None:
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    text = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}
    with _fresh(main) as http:
        raw = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert _assert_error(raw, 400, "JSON")["code"] == "invalid_json"
        wrong = http.post("/v1/chat/completions", json={**chat, "max_tokens": "many"})
        assert _assert_error(wrong, 400, "max_tokens")["param"] == "max_tokens"
        content = http.post(
            "/v1/chat/completions",
            json={**chat, "messages": [{"role": "user", "content": 5}]},
        )
        assert _assert_error(content, 400)["param"] == "messages[0].content"
        for path, body in (
            ("/v1/chat/completions", chat),
            ("/v1/completions", text),
            ("/v1/embeddings", {"model": "gpt-17", "input": "hi"}),
        ):
            missing = http.post(path, json={**body, "model": "gpt-17"})
            assert _assert_error(missing, 404, "gpt-17")["code"] == "model_not_found"
        assert _assert_error(http.get("/v1/nothing-here"), 404)
        # Integers past what the engine's wire format holds are the client's error too.
        for field, value in (
            ("seed", 1 << 64),
            ("top_k", 1 << 64),
            ("min_tokens", 1 << 64),
            ("priority", -(1 << 63) - 1),
            ("stop_token_ids", [1 << 64]),
        ):
            for path, body in (("/v1/completions", text), ("/v1/chat/completions", chat)):
                resp = http.post(path, json={**body, field: value})
                assert _assert_error(resp, 400, field)["param"].startswith(field), (path, field)
        huge = http.post("/v1/embeddings", json={"model": SERVED_NAME, "input": [1 << 64]})
        _assert_error(huge, 400, "token ids")
        detok = http.post("/detokenize", json={"tokens": [1 << 64]})
        _assert_error(detok, 400, "token ids")
        unsupported = http.post("/v1/chat/completions", json={**chat, "n": 2})
        assert _assert_error(unsupported, 400)["param"] == "n"

    # The prompt over the model's context: the numbers are in the message.
    client = _client(main)
    max_len = (client.models.list().data[0].model_extra or {})["max_model_len"]
    assert max_len == 8192
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=SERVED_NAME, prompt=[5] * (max_len + 1), max_tokens=1)
    assert str(max_len) in str(exc.value) and str(max_len + 1) in str(exc.value)
    assert exc.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=SERVED_NAME, prompt=[5] * 8000, max_tokens=500)
    assert all(str(n) in str(exc.value) for n in (8000, 500, max_len))
    assert exc.value.param == "max_tokens"
    _still_serving(main)
    assert "unhandled error" not in main.log()


def _chat_with_images(fanin: Fanin, *urls: str) -> Any:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]
    return _client(fanin).chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=2
    )


def _b64_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_images_good_and_bad(main: Fanin, media_dir: Path) -> None:
    from skimage import data

    # Good: a JPEG data URL and a file:// URL under the allowed folder.
    photo = f"file://{media_dir / 'astronaut.png'}"
    both = _chat_with_images(main, image_data_url("coffee"), photo)
    one = _chat_with_images(main, photo)
    assert both.usage.prompt_tokens > one.usage.prompt_tokens > 100  # placeholder tokens
    # The engine keeps their encoder outputs, and says how many bytes in every load snapshot.
    assert _sample(_metrics(main), "fanin_engine_encoder_cache_bytes") > 0

    big = io.BytesIO()
    Image.new("L", (1500, 1500)).save(big, "PNG")  # 2.25 Mpixel > this server's 1 Mpixel
    outside = media_dir.parent / "outside.png"
    Image.fromarray(data.camera()).save(outside)
    cases: list[tuple[list[str], str]] = [
        (["data:image/png;base64,@@@not-base64@@@"], "base64"),
        ([_b64_url(b"these bytes are plain text, not a picture")], "not a readable image"),
        ([_b64_url(_png_header_only(60000, 60000))], "decompression bomb"),
        ([_b64_url(big.getvalue())], "1500x1500"),
        ([photo] * (MAX_IMAGES + 1), f"{MAX_IMAGES + 1} images"),
        (["http://127.0.0.1:9/x.png"], "non-public"),
        (["http://169.254.169.254/latest/meta-data"], "non-public"),
        (["http://[::1]:9/x.png"], "non-public"),
        ([f"file://{outside}"], "outside the allowed media path"),
        ([f"file://{media_dir}/../outside.png"], "outside the allowed media path"),
        ([f"file://{media_dir}/missing.png"], "cannot read image file"),
        (["ftp://example.com/x.png"], "scheme"),
    ]
    for urls, words in cases:
        with pytest.raises(openai.BadRequestError, match=words):
            _chat_with_images(main, *urls)
    assert _chat_with_images(main, photo).usage.prompt_tokens == one.usage.prompt_tokens
    assert "unhandled error" not in main.log()


# --- small endpoints and metrics -------------------------------------------------------------


def test_tokenize_detokenize_round_trip(main: Fanin, media_dir: Path) -> None:
    text = _prompt(3)
    with _fresh(main) as http:
        tok = http.post("/tokenize", json={"prompt": text}).json()
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text
        # A chat's token count (template and image placeholders included) is what generation
        # reports as its prompt tokens.
        for content in (
            text,
            [
                {"type": "image_url", "image_url": {"url": f"file://{media_dir / 'coffee.jpg'}"}},
                {"type": "text", "text": text},
            ],
        ):
            messages = [{"role": "user", "content": content}]
            count = http.post("/tokenize", json={"messages": messages}).json()["count"]
            r = _client(main).chat.completions.create(
                model=SERVED_NAME,
                messages=messages,
                max_tokens=1,
            )
            assert r.usage is not None and r.usage.prompt_tokens == count
        missing = http.post("/tokenize", json={"prompt": "hi", "model": "gpt-17"})
        _assert_error(missing, 404)


def test_metrics_sum_over_both_api_servers(main: Fanin) -> None:
    # The cached SDK clients' idle keep-alive connections count as load in the spread (for up
    # to --keep-alive-timeout): closed, so that fresh connections may go to either server.
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()
    _settled(main)
    before = _metrics(main)
    servers: list[str] = []
    usage = []
    with _fresh(main) as http:
        while len(servers) < 6 or set(servers) != {"0", "1"}:
            assert len(servers) < 60, servers
            r = http.post(
                "/v1/completions",
                json={"model": SERVED_NAME, "prompt": _prompt(len(servers) % 4), "max_tokens": 3},
            )
            assert r.status_code == 200, r.text
            servers.append(r.headers["x-fanin-server"])
            usage.append(r.json()["usage"])

    def delta(name: str, **labels: str) -> float:
        return _sample(_metrics(main), name, **labels) - _sample(before, name, **labels)

    ok = {"endpoint": "/v1/completions", "status": "200"}
    _wait_until(
        "every request counted", lambda: delta("fanin_requests_total", **ok) >= len(servers)
    )
    assert delta("fanin_requests_total", **ok) == len(servers)
    assert delta("fanin_generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("fanin_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("fanin_e2e_request_latency_seconds_count") == len(servers)


# --- aborts ----------------------------------------------------------------------------------


def test_stream_disconnect_aborts_in_engine(main: Fanin, token_s: float) -> None:
    _settled(main)
    stream = _client(main).completions.create(
        model=SERVED_NAME, prompt=_prompt(0), max_tokens=LONG_TOKENS, stream=True, extra_body=LONG
    )
    for received, _ in enumerate(stream, 1):
        if received == 8:
            break
    _wait_until("the request runs in the engine", lambda: _engine_running(main) == 1)
    assert _sample(_metrics(main), "fanin_engine_kv_cache_usage") > 0  # its slot is taken
    stream.close()  # the client goes away mid-stream
    _wait_aborted(main, token_s, LONG_TOKENS - 8)
    _still_serving(main)
    _settled(main)  # the slot is given back too


def test_nonstream_disconnect_aborts_in_engine(main: Fanin, token_s: float) -> None:
    _settled(main)
    body = {"model": SERVED_NAME, "prompt": _prompt(0), "max_tokens": LONG_TOKENS, **LONG}
    conn = http.client.HTTPConnection("127.0.0.1", main.port, timeout=30)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
        )
        _wait_until("the request runs in the engine", lambda: _engine_running(main) == 1)
    finally:
        conn.close()  # gone before the answer
    _wait_aborted(main, token_s, LONG_TOKENS - 100)
    _still_serving(main)


# --- the guarded server: API key, admission, request timeout ---------------------------------


def test_api_key_required_except_health(guarded: Fanin) -> None:
    for key in ("wrong-key", "unused"):
        with pytest.raises(openai.AuthenticationError):
            _client(guarded, key).models.list()
    with _fresh(guarded) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 401
        ready = http.get("/ready", headers={"Authorization": f"Bearer {KEY}"})
        assert ready.status_code == 200
        assert http.get("/metrics").status_code == 401
        denied = http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "hi"})
        assert _assert_error(denied, 401)["code"] == "invalid_api_key"
    assert [m.id for m in _client(guarded, KEY).models.list().data] == [SERVED_NAME]
    _still_serving(guarded, KEY)


def test_admission_429_with_retry_after_then_served(guarded: Fanin) -> None:
    _settled(guarded, KEY)
    body = {
        "model": SERVED_NAME,
        "prompt": "Once upon a time",
        "max_tokens": LONG_TOKENS,
        "stream": True,
        **LONG,
    }
    held: list[tuple[httpx.Client, httpx.Response]] = []
    refused: list[httpx.Response] = []
    try:
        # Open long streams until each API server holds one (its limit) and one was refused.
        while {r.headers["x-fanin-server"] for _, r in held} != {"0", "1"} or not refused:
            assert len(held) + len(refused) < 60
            http = _fresh(guarded, KEY)
            resp = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            if resp.status_code == 200:
                held.append((http, resp))
                continue
            resp.read()
            http.close()
            refused.append(resp)
        for resp in refused:
            error = _assert_error(resp, 429, "in flight")
            assert error["code"] == "rate_limit_exceeded" and resp.headers["retry-after"] == "1"
        # Both servers are full: the official client sees a RateLimitError.
        with pytest.raises(openai.RateLimitError) as exc:
            _client(guarded, KEY).completions.create(model=SERVED_NAME, prompt="hi", max_tokens=1)
        assert exc.value.response.headers["retry-after"] == "1"
    finally:
        for http, resp in held:
            resp.close()
            http.close()

    def admitted() -> bool:
        try:
            _still_serving(guarded, KEY)
        except openai.RateLimitError:
            return False
        return True

    _wait_until("a request admitted after the streams closed", admitted)
    _settled(guarded, KEY)


def test_request_timeout_408_aborts_in_engine(guarded: Fanin, token_s: float) -> None:
    _settled(guarded, KEY)
    body = {"model": SERVED_NAME, "prompt": _prompt(0), "max_tokens": LONG_TOKENS, **LONG}
    answers: list[httpx.Response] = []

    def post() -> None:
        with _fresh(guarded, KEY) as http:
            answers.append(http.post("/v1/completions", json=body))

    waiter = threading.Thread(target=post)
    start = time.monotonic()
    waiter.start()
    try:
        _wait_until("the request runs in the engine", lambda: _engine_running(guarded, KEY) == 1)
    finally:
        waiter.join(60)
    assert time.monotonic() - start >= 3.0
    _assert_error(answers[0], 408, "timed out after 3 s")
    _wait_aborted(guarded, token_s, LONG_TOKENS - int(3.0 / token_s), KEY)

    # Streamed: the timeout arrives as an error event.
    stream = _client(guarded, KEY).completions.create(
        model=SERVED_NAME, prompt=_prompt(0), max_tokens=LONG_TOKENS, stream=True, extra_body=LONG
    )
    with pytest.raises(openai.APIError, match="timed out"):
        for _ in stream:
            pass
    _wait_aborted(guarded, token_s, LONG_TOKENS - int(3.0 / token_s), KEY)
    _still_serving(guarded, KEY)
