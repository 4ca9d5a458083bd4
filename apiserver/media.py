"""Fetching image bytes for a request: ``data:`` URLs, http(s) and ``file://``, with the
limits that keep a hostile URL from reaching private networks or exhausting memory, and the
decode step (run on a render worker thread, never on the event loop).

http(s) safety: every hop's host is resolved here and each address checked with ``ipaddress``
before any connection; redirects are followed by hand (at most ``MAX_REDIRECTS``) so each hop
is checked again. The connection then goes to the address that was checked, not to the name
(the URL carries the IP; ``Host`` and TLS SNI/certificate checks keep the name): resolving the
name a second time would let a DNS server answer differently the second time (rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from apiserver.config import ServerConfig
from apiserver.errors import ApiError

MAX_REDIRECTS = 5


@dataclass(frozen=True, slots=True)
class MediaBytes:
    """An image's encoded bytes, or the base64 text of a ``data:`` URL (decoded off-loop)."""

    payload: bytes | str
    is_base64: bool = False


class MediaFetcher:
    """Turns image URLs into :class:`MediaBytes` under the server's media limits."""

    def __init__(
        self, config: ServerConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """``transport`` replaces the network (tests)."""
        self._config = config
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.media_fetch_timeout),
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> MediaBytes:
        """Raise ApiError(400) for anything refused or unreadable."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            return self._data_url(url)
        if scheme in ("http", "https"):
            try:
                data = await asyncio.wait_for(self._http(url), self._config.media_fetch_timeout)
                return MediaBytes(data)
            except asyncio.TimeoutError:
                raise ApiError(400, "image download timed out", param="image_url") from None
        if scheme == "file":
            return MediaBytes(await asyncio.to_thread(self._local_file, url))
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}", param="image_url")

    def _data_url(self, url: str) -> MediaBytes:
        header, sep, data = url[5:].partition(",")
        if not sep or not header.startswith("image/") or not header.endswith(";base64"):
            raise ApiError(
                400, "data URL must look like data:image/<type>;base64,<data>", param="image_url"
            )
        if len(data) * 3 // 4 > self._config.max_media_bytes:
            raise ApiError(
                400, f"image larger than {self._config.max_media_bytes} bytes", param="image_url"
            )
        return MediaBytes(data, is_base64=True)

    def _local_file(self, url: str) -> bytes:
        root = self._config.allowed_local_media_path
        if root is None:
            raise ApiError(400, "file:// image URLs are disabled on this server", param="image_url")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ApiError(400, "file:// URL must not name a host", param="image_url")
        real = os.path.realpath(unquote(parts.path))
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) != base:
            raise ApiError(400, "file:// URL outside the allowed media path", param="image_url")
        try:
            with open(real, "rb") as f:
                data = f.read(self._config.max_media_bytes + 1)
        except OSError as exc:
            raise ApiError(
                400, f"cannot read image file: {exc.strerror}", param="image_url"
            ) from None
        self._check_size(len(data))
        return data

    async def _http(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            address = await self._check_host(url)
            try:
                request = self._client.build_request("GET", url)  # Host header: the name
                if address is not None:
                    request.extensions["sni_hostname"] = request.url.raw_host.decode("ascii")
                    request.url = request.url.copy_with(host=address)
                resp = await self._client.send(request, stream=True)
                try:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise ApiError(
                            400, f"image URL answered HTTP {resp.status_code}", param="image_url"
                        )
                    data = bytearray()
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        self._check_size(len(data))
                    return bytes(data)
                finally:
                    await resp.aclose()
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise ApiError(
                    400, f"cannot fetch image: {type(exc).__name__}", param="image_url"
                ) from None
        raise ApiError(400, f"more than {MAX_REDIRECTS} redirects", param="image_url")

    async def _check_host(self, url: str) -> str | None:
        """Refuse ``url``'s host unless allowed; return the checked address to connect to, or
        None when private addresses are allowed (then the name is resolved as usual)."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ApiError(400, "image URL is malformed", param="image_url") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ApiError(400, "redirect to a non-http(s) URL refused", param="image_url")
        allowed = self._config.allowed_media_domains
        if allowed is not None and not any(host == d or host.endswith("." + d) for d in allowed):
            raise ApiError(400, f"image domain {host!r} is not allowed", param="image_url")
        if self._config.allow_private_media_urls:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            raise ApiError(400, f"cannot resolve image host {host!r}", param="image_url") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        for addr in addresses:
            if not addr.is_global or addr.is_multicast:
                raise ApiError(
                    400, f"image host {host!r} resolves to a non-public address", param="image_url"
                )
        return str(addresses[0])

    def _check_size(self, n: int) -> None:
        if n > self._config.max_media_bytes:
            raise ApiError(
                400, f"image larger than {self._config.max_media_bytes} bytes", param="image_url"
            )


def image_bytes(media: MediaBytes) -> bytes:
    """The image file's bytes (a ``data:`` URL's base64 decoded)."""
    if not media.is_base64:
        assert isinstance(media.payload, bytes)
        return media.payload
    try:
        return base64.b64decode(media.payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64", param="image_url") from None


def decode_image(media: MediaBytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image; the pixel count is checked from the header before decoding."""
    data = image_bytes(media)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ApiError(
                400,
                f"image has {width}x{height} pixels, more than the limit of {max_pixels}",
                param="image_url",
            )
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ApiError(400, "image is a decompression bomb", param="image_url") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(400, "image data is not a readable image", param="image_url") from None
