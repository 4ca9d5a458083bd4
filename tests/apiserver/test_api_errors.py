"""Every kind of bad input gets the right OpenAI-style error, and the server keeps serving:
after each test an ordinary request must still succeed."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(main_stack: Any) -> Iterator[Any]:
    yield main_stack
    r = main_stack.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "still there?"}], max_tokens=2
    )
    assert r.choices[0].finish_reason == "length"


def chat_with_image(client: openai.OpenAI, *urls: str) -> Any:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}],
        max_tokens=2,
    )


def b64_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def assert_error(resp: Any, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]
    return error


def test_invalid_json(stack: Any) -> None:
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert_error(resp, 400, "JSON")


def test_wrong_field_type_names_the_field(stack: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens="many"
        )
    assert "max_tokens" in str(exc.value)
    with stack.http() as http:
        resp = http.post(
            "/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": 5}]},
        )
        assert assert_error(resp, 400)["param"] == "messages[0].content"


def test_unknown_model_404(stack: Any) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        stack.client().completions.create(model="gpt-17", prompt="hi", max_tokens=1)
    assert exc.value.body["code"] == "model_not_found"


def test_unknown_route_is_openai_style_404(stack: Any) -> None:
    with stack.http() as http:
        assert_error(http.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize("chunked", [False, True])
def test_body_too_large_413(stack: Any, chunked: bool) -> None:
    body = b'{"model": "default", "prompt": "' + b"x" * (5 << 20) + b'"}'
    content: Any = (
        iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    )
    with stack.http() as http:
        resp = http.post(
            "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        assert_error(resp, 413)


def test_prompt_over_model_length_says_the_numbers(stack: Any) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="default", prompt=[5] * 600, max_tokens=1)
    assert "512" in str(exc.value) and "600" in str(exc.value)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="default", prompt=[5] * 500, max_tokens=100)
    assert "500" in str(exc.value) and "100" in str(exc.value) and "512" in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"temperature": 7.0}, "temperature"),
    ],
)
def test_unsupported_or_invalid_chat_params_400(
    stack: Any, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kwargs
        )
    assert param in str(exc.value)


@pytest.mark.parametrize("kwargs", [{"best_of": 3}, {"echo": True}, {"suffix": "end"}])
def test_unsupported_completion_params_400(stack: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        stack.client().completions.create(model="default", prompt="hi", max_tokens=2, **kwargs)


def test_bad_embedding_inputs_400(stack: Any) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="default", input="hi", dimensions=3)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="default", input=[5] * 600)


def test_placeholder_token_in_text_is_refused(stack: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        stack.client().completions.create(model="default", prompt="<|image_pad|> hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        stack.client().completions.create(model="default", prompt=[99999], max_tokens=2)


def test_bad_base64(stack: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        chat_with_image(stack.client(), "data:image/png;base64,@@@not-base64@@@")
    assert "base64" in str(exc.value)


def test_bytes_that_are_no_image(stack: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        chat_with_image(stack.client(), b64_url(b"these bytes are plain text, not a picture"))
    assert "not a readable image" in str(exc.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` pixels (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs(stack: Any) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError):
        chat_with_image(client, b64_url(_png_header_only(60000, 60000)))
    buf = io.BytesIO()
    Image.new("L", (1500, 1500)).save(buf, "PNG")  # 2.25 Mpixel > this server's 1 Mpixel
    assert len(buf.getvalue()) < 20_000
    with pytest.raises(openai.BadRequestError) as exc:
        chat_with_image(client, b64_url(buf.getvalue()))
    assert "1500x1500" in str(exc.value)


def test_too_many_images(stack: Any, media_dir: Path) -> None:
    url = f"file://{media_dir / 'coffee.jpg'}"
    with pytest.raises(openai.BadRequestError) as exc:
        chat_with_image(stack.client(), url, url, url)
    assert "3 images" in str(exc.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/x.png",
        "http://localhost:9/x.png",
        "http://0.0.0.0:9/x.png",
    ],
)
def test_private_http_urls_refused(stack: Any, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        chat_with_image(stack.client(), url)
    assert "non-public" in str(exc.value)


def test_file_urls_outside_media_dir_refused(stack: Any, media_dir: Path) -> None:
    outside = media_dir.parent / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    for url in (f"file://{outside}", f"file://{media_dir}/../outside.png"):
        with pytest.raises(openai.BadRequestError, match="outside the allowed media path"):
            chat_with_image(stack.client(), url)


@pytest.mark.parametrize(
    "url_of",
    [lambda root: f"file://{root}/missing.png", lambda root: "ftp://example.com/x.png"],
)
def test_missing_file_and_bad_scheme(stack: Any, media_dir: Path, url_of: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        chat_with_image(stack.client(), url_of(media_dir))


def test_symlink_out_of_media_dir_refused(stack: Any, media_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    link = media_dir / "link.png"
    link.symlink_to(outside)
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            chat_with_image(stack.client(), f"file://{link}")
        assert "outside" in str(exc.value)
    finally:
        link.unlink()
