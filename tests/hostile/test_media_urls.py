"""Family 2: images that cost far more than they weigh (media, renderer): compressed
downloads that would inflate to gigabytes, trickled and oversize downloads, image headers
that declare huge sizes (checked against the pixel cap and the token budget before any
decoding), local paths that are not regular files; and the data URLs vLLM accepts. The image
server is the test's own, on loopback."""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_kit import HealthProbe, assert_error, assert_served
from PIL import Image

pytestmark = pytest.mark.slow

TARGETS = ["fake_url", "real_url"]


def _png(width: int, height: int, pixels: bytes = b"\0" * 64) -> bytes:
    """A PNG whose header declares ``width`` x ``height``; its pixel data is ``pixels``
    (compressed), so it cannot decode unless it really holds that many."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(pixels)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.cache
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * (64 << 20))  # 64 MB of zeros in about 64 KB


@functools.cache
def _photo() -> bytes:
    from skimage import data

    image = Image.fromarray(data.chelsea()).convert("RGB")
    image.thumbnail((224, 224))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Images(BaseHTTPRequestHandler):
    """The test's image server: /photo.jpg, and the hostile answers."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/photo.jpg":
            self._answer(_photo(), {"content-type": "image/jpeg"})
        elif self.path == "/gzip-bomb.png":
            self._answer(_gzip_bomb(), {"content-encoding": "gzip"})
        elif self.path == "/br.png":
            self._answer(b"\x1b" * 1000, {"content-encoding": "br"})
        elif self.path == "/huge.png":  # says it is bigger than the cap, sends little
            self._answer(b"x" * 1000, {"content-length": str(1 << 40)}, length=False)
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("content-length", "100000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_error(404)

    def _answer(self, body: bytes, headers: dict[str, str], length: bool = True) -> None:
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        if length:
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the server under test hung up: what we wanted
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    _gzip_bomb(), _photo()  # made before any request waits on them
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _chat(url: str, image_urls: list[str], max_tokens: int = 2) -> httpx.Response:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens}
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.post("/v1/chat/completions", json=body)


def test_hostile_downloads_are_refused_without_inflating(fake_url: str, images: str) -> None:
    """Four compressed bombs at once (each would inflate to 64 MB on the loop), a download
    that announces a terabyte, and one that trickles: each a 400, the loop free meanwhile
    (eight requests: as many as the server admits at once)."""
    cases = [
        (f"{images}/gzip-bomb.png", "Content-Encoding 'gzip'"),
        (f"{images}/br.png", "Content-Encoding 'br'"),
        (f"{images}/huge.png", "larger than"),
        (f"{images}/trickle.png", "timed out"),
    ]
    with HealthProbe(fake_url) as probe, ThreadPoolExecutor(8) as pool:
        bombs = [pool.submit(_chat, fake_url, [f"{images}/gzip-bomb.png"]) for _ in range(4)]
        others = [(pool.submit(_chat, fake_url, [u]), words) for u, words in cases]
        for future in bombs:
            assert assert_error(future.result(), 400, "Content-Encoding")["param"] == "image_url"
        for future, words in others:
            assert_error(future.result(), 400, words)
    probe.check()
    served = _chat(fake_url, [f"{images}/photo.jpg"])
    assert served.status_code == 200, served.text
    assert_served(fake_url)


@pytest.mark.parametrize("target", TARGETS)
def test_huge_image_headers_are_refused_before_decoding(
    target: str, request: pytest.FixtureRequest
) -> None:
    """Eight near-limit images per request, none decodable past its header: the pixel cap
    and the token budget refuse them from the header alone (a decode would say "not a
    readable image" instead, after seconds and gigabytes)."""
    url = request.getfixturevalue(target)
    too_many_pixels = "data:image/png;base64," + base64.b64encode(_png(6400, 6400)).decode()
    near_limit = "data:image/png;base64," + base64.b64encode(_png(1900, 1900)).decode()
    with HealthProbe(url) as probe, ThreadPoolExecutor(4) as pool:
        pixels = pool.submit(_chat, url, [too_many_pixels])
        budget = [pool.submit(_chat, url, [near_limit] * 2, 7800) for _ in range(3)]
        assert_error(pixels.result(), 400, "pixels")
        for future in budget:
            error = assert_error(future.result(), 400, "context length")
            assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    probe.check(min_samples=3)
    assert_served(url)


@pytest.mark.parametrize("target", TARGETS)
def test_data_urls_as_vllm_accepts_them(target: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(target)
    text = base64.encodebytes(_photo()).decode()  # MIME style: a line break every 76 chars
    for header in ("image/jpeg;base64", "IMAGE/JPEG;BASE64"):
        response = _chat(url, [f"data:{header},{text}"])
        assert response.status_code == 200, response.text[:300]
    assert_error(_chat(url, ["data:image/jpeg;base64,@@not base64@@"]), 400, "base64")


@pytest.mark.parametrize("target", TARGETS)
def test_local_media_must_be_a_regular_file(
    target: str, request: pytest.FixtureRequest, media_dir: Path
) -> None:
    url = request.getfixturevalue(target)
    fifo = media_dir / f"pipe-{target}.png"
    if not fifo.exists():
        os.mkfifo(fifo)  # open() on it would block for ever
    start = time.monotonic()
    assert_error(_chat(url, [f"file://{fifo}"]), 400, "regular file")
    assert_error(_chat(url, [f"file://{media_dir}"]), 400, "regular file")
    assert time.monotonic() - start < 10
    served = _chat(url, [f"file://{media_dir / 'coffee.jpg'}"])
    assert served.status_code == 200, served.text[:300]
