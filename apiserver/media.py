"""Fetching image bytes for a request: ``data:`` URLs, http(s) and ``file://``, with the
limits that keep a hostile URL from reaching private networks or exhausting memory, and the
decode steps (run on a render worker thread, never on the event loop).

Every read is bounded in bytes and in time. A download asks for ``Accept-Encoding: identity``
and refuses any other ``Content-Encoding``: a few KB of gzip or brotli can inflate to
gigabytes, and httpx would inflate each chunk whole, on the loop, before any size check. Local
files are opened without following a final symlink and without blocking (a FIFO would hang
``open``), must be regular files, and are read on a small pool of their own under the fetch
timeout, so a hung filesystem costs one of its threads, not the render pool. Decoding is split
in two: :func:`open_image` reads only the header (PIL is lazy) and checks the pixel count, so
that the renderer can check the request's token budget before :func:`load_rgb` decodes.

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
import stat
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image

from apiserver.config import ServerConfig
from apiserver.errors import ApiError

T = TypeVar("T")
MAX_REDIRECTS = 5
#: Threads reading local image files (a hung filesystem holds at most these).
FILE_READ_THREADS = 2
_WHITESPACE = b" \t\n\r\f\v"


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
            headers={"accept-encoding": "identity"},
        )
        self._files = ThreadPoolExecutor(FILE_READ_THREADS, thread_name_prefix="media-file")

    async def aclose(self) -> None:
        await self._client.aclose()
        self._files.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, url: str) -> MediaBytes:
        """Raise ApiError(400) for anything refused or unreadable."""
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            return self._data_url(url)
        timeout = self._config.media_fetch_timeout
        if scheme in ("http", "https"):
            return MediaBytes(await _within(self._http(url), timeout, "image download"))
        if scheme == "file":
            loop = asyncio.get_running_loop()
            read = loop.run_in_executor(self._files, self._local_file, url)
            return MediaBytes(await _within(read, timeout, "reading the image file"))
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}", param="image_url")

    def _data_url(self, url: str) -> MediaBytes:
        # Media types and the base64 token are case-insensitive (RFC 2397); parameters such as
        # ;charset= may come between them.
        header, sep, data = url[5:].partition(",")
        kind, *params = header.lower().split(";")
        if not sep or not kind.startswith("image/") or not params or params[-1] != "base64":
            raise ApiError(
                400, "data URL must look like data:image/<type>;base64,<data>", param="image_url"
            )
        # Exact once decoded (decode_base64, off the loop); here only text too long even if
        # a third of it were line breaks.
        if len(data) * 3 // 4 > self._config.max_media_bytes * 3 // 2:
            raise self._too_large()
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
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ApiError(
                400, f"cannot read image file: {exc.strerror}", param="image_url"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ApiError(400, "file:// URL is not a regular file", param="image_url")
            self._check_size(info.st_size)
            data = b""
            while len(data) <= self._config.max_media_bytes:
                chunk = os.read(fd, self._config.max_media_bytes + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ApiError(
                400, f"cannot read image file: {exc.strerror}", param="image_url"
            ) from None
        finally:
            os.close(fd)
        self._check_size(len(data))  # it may have grown since the fstat
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
                    encoding = resp.headers.get("content-encoding", "identity").lower()
                    if encoding.strip() != "identity":
                        raise ApiError(
                            400,
                            f"image URL answered with Content-Encoding {encoding!r}; only "
                            "uncompressed (identity) responses are accepted",
                            param="image_url",
                        )
                    length = resp.headers.get("content-length", "")
                    if length.isdigit():
                        self._check_size(int(length))
                    data = bytearray()  # identity: httpx decodes nothing below
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
            raise self._too_large()

    def _too_large(self) -> ApiError:
        return too_large(self._config.max_media_bytes)


def image_bytes(media: MediaBytes, max_bytes: int) -> bytes:
    """The image file's bytes, as the client sent them (a ``data:`` URL's base64 decoded).
    Blocking (base64 decoding)."""
    if media.is_base64:
        return decode_base64(media.payload, max_bytes)
    assert isinstance(media.payload, bytes)
    return media.payload


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """An image file's bytes -> a lazily opened image: only its header is read, and its pixel
    count checked (decompression bombs)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ApiError(400, "image is a decompression bomb", param="image_url") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(400, "image data is not a readable image", param="image_url") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(
            400,
            f"image has {width}x{height} pixels, more than the limit of {max_pixels}",
            param="image_url",
        )
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an image from :func:`open_image` to RGB. Blocking."""
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ApiError(400, "image is a decompression bomb", param="image_url") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(400, "image data is not a readable image", param="image_url") from None


def decode_base64(text: str | bytes, max_bytes: int) -> bytes:
    """The bytes of a data URL's base64 text. Line breaks and spaces are allowed (as vLLM and
    MIME encoders write them); anything else outside the alphabet is a 400. Blocking."""
    try:
        raw = text.encode("ascii") if isinstance(text, str) else text
        data = base64.b64decode(raw.translate(None, _WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64", param="image_url") from None
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


def too_large(max_bytes: int) -> ApiError:
    return ApiError(400, f"image larger than {max_bytes} bytes", param="image_url")


async def _within(work: Awaitable[T], timeout_s: float, what: str) -> T:
    """``work`` within ``timeout_s`` or a 400. Unlike ``asyncio.wait_for`` on Python 3.10 and
    3.11, a cancellation of the caller is never swallowed when ``work`` ends in the same turn."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise ApiError(400, f"{what} timed out after {timeout_s:g} s", param="image_url")
    return task.result()
