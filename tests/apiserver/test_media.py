"""MediaFetcher's URL rules in-process: every redirect hop is checked, domains are matched
exactly or as subdomains, sizes are capped. The network is an httpx MockTransport; name
resolution is replaced so that public-looking names resolve where the test says."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import socket
from typing import Any

import httpx
import pytest

from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.media import MAX_REDIRECTS, MediaBytes, MediaFetcher, decode_base64, image_bytes

ADDRESSES = {
    "public.example": "93.184.216.34",
    "cdn.public.example": "93.184.216.35",
    "inside.example": "10.0.0.7",
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(self: Any, host: str, port: int, **kw: Any) -> list[Any]:
        ip = ADDRESSES.get(host, host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)


def redirecting(routes: dict[str, httpx.Response]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        # The fetcher connects to the checked address; the name travels in the Host header.
        url = f"{request.url.scheme}://{request.headers['host']}{request.url.raw_path.decode()}"
        return routes.get(url, httpx.Response(404))

    return httpx.MockTransport(handler)


def fetch(config: ServerConfig, transport: httpx.MockTransport, url: str) -> MediaBytes:
    async def run() -> MediaBytes:
        fetcher = MediaFetcher(config, transport)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_redirect_to_private_address_refused(fake_dns: None) -> None:
    transport = redirecting(
        {
            "http://public.example/a.png": httpx.Response(
                302, headers={"location": "http://inside.example/b.png"}
            ),
            "http://inside.example/b.png": httpx.Response(200, content=b"secret"),
        }
    )
    with pytest.raises(ApiError, match="non-public"):
        fetch(ServerConfig(), transport, "http://public.example/a.png")


def test_connects_to_the_checked_address_not_to_a_second_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter(["93.184.216.34", "127.0.0.1"])  # a rebinding DNS server

    async def getaddrinfo(self: Any, host: str, port: int, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        sni = request.extensions.get("sni_hostname")
        seen.append((request.url.host, request.url.port, request.headers["host"], sni))
        return httpx.Response(200, content=b"image bytes")

    url = "https://rebind.example:8443/a.png"
    assert fetch(ServerConfig(), httpx.MockTransport(handler), url).payload == b"image bytes"
    assert seen == [("93.184.216.34", 8443, "rebind.example:8443", "rebind.example")]


def test_malformed_urls_are_400(fake_dns: None) -> None:
    for url in ("http://public.example:99999/a", "http://[::1/a", "http:///a"):
        with pytest.raises(ApiError) as info:
            fetch(ServerConfig(), redirecting({}), url)
        assert info.value.status == 400


def test_redirects_followed_and_counted(fake_dns: None) -> None:
    routes = {
        f"http://public.example/{i}": httpx.Response(302, headers={"location": f"/{i + 1}"})
        for i in range(MAX_REDIRECTS + 1)
    }
    routes["http://public.example/3"] = httpx.Response(200, content=b"image bytes")
    assert (
        fetch(ServerConfig(), redirecting(routes), "http://public.example/0").payload
        == b"image bytes"
    )
    del routes["http://public.example/3"]
    routes["http://public.example/3"] = httpx.Response(302, headers={"location": "/4"})
    with pytest.raises(ApiError, match="redirects"):
        fetch(ServerConfig(), redirecting(routes), "http://public.example/0")


def test_domain_allowlist_on_every_hop(fake_dns: None) -> None:
    config = ServerConfig(allowed_media_domains=["public.example"])
    transport = redirecting(
        {
            "http://cdn.public.example/a": httpx.Response(200, content=b"ok"),
            "http://public.example/r": httpx.Response(
                301, headers={"location": "http://evil.test/x"}
            ),
        }
    )
    assert fetch(config, transport, "http://cdn.public.example/a").payload == b"ok"
    with pytest.raises(ApiError, match="not allowed"):
        fetch(config, transport, "http://notpublic.example/a")
    with pytest.raises(ApiError, match="not allowed"):
        fetch(config, transport, "http://public.example/r")


def test_download_size_cap(fake_dns: None) -> None:
    config = ServerConfig(max_media_bytes=4096)
    transport = redirecting({"http://public.example/big": httpx.Response(200, content=b"x" * 5000)})
    with pytest.raises(ApiError, match="larger than 4096"):
        fetch(config, transport, "http://public.example/big")


def test_data_url_rules() -> None:
    config = ServerConfig(max_media_bytes=4096)
    with pytest.raises(ApiError, match="data URL"):
        fetch(config, redirecting({}), "data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ApiError, match="larger than"):  # too long whatever its line breaks
        fetch(config, redirecting({}), "data:image/png;base64," + "A" * 12000)
    media = fetch(config, redirecting({}), "data:image/png;base64," + "A" * 8000)
    with pytest.raises(ApiError, match="larger than 4096"):  # exact once decoded
        decode_base64(media.payload, 4096)
    with pytest.raises(ApiError, match="base64"):
        image_bytes(MediaBytes("!!!!", is_base64=True), 4096)


def test_data_urls_as_vllm_accepts_them() -> None:
    """Upper-case media types and base64 with line breaks (MIME style) are fine."""
    text = base64.encodebytes(b"x" * 300).decode()  # 76-character lines
    assert "\n" in text
    for header in ("image/png;base64", "IMAGE/PNG;BASE64", "image/jpeg;charset=utf-8;base64"):
        media = fetch(ServerConfig(), redirecting({}), f"data:{header},{text}")
        assert decode_base64(media.payload, 4096) == b"x" * 300
    with pytest.raises(ApiError, match="data URL"):
        fetch(ServerConfig(), redirecting({}), "data:image/png;base64;charset=x," + text)


def test_compressed_downloads_are_refused(fake_dns: None) -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MB inflated from about 8 KB
    routes = {
        "http://public.example/bomb.png": httpx.Response(
            200, content=bomb, headers={"content-encoding": "gzip"}
        )
    }
    with pytest.raises(ApiError, match="Content-Encoding 'gzip'"):
        fetch(ServerConfig(max_media_bytes=1 << 20), redirecting(routes), routes_url(routes))
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["accept-encoding"])
        return httpx.Response(200, content=b"plain")

    assert fetch(ServerConfig(), httpx.MockTransport(handler), "http://public.example/a")
    assert seen == ["identity"]


def routes_url(routes: dict[str, httpx.Response]) -> str:
    return next(iter(routes))


def test_local_files_must_be_regular(tmp_path: Any) -> None:
    config = ServerConfig(allowed_local_media_path=str(tmp_path), max_media_bytes=4096)
    os.mkfifo(tmp_path / "fifo.png")  # open() would block for ever on a FIFO
    (tmp_path / "big.png").write_bytes(b"x" * 5000)
    (tmp_path / "ok.png").write_bytes(b"x" * 100)
    (tmp_path / "link.png").symlink_to(tmp_path / "ok.png")
    with pytest.raises(ApiError, match="not a regular file"):
        fetch(config, redirecting({}), f"file://{tmp_path}/fifo.png")
    with pytest.raises(ApiError, match="larger than 4096"):
        fetch(config, redirecting({}), f"file://{tmp_path}/big.png")
    assert fetch(config, redirecting({}), f"file://{tmp_path}/ok.png").payload == b"x" * 100
    # A symlink inside the folder to a file inside it is resolved first, then opened.
    assert fetch(config, redirecting({}), f"file://{tmp_path}/link.png").payload == b"x" * 100
