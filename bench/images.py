"""Distinct real photos of one size, each one a valid JPEG, made in microseconds.

A cache keyed on image content (the server's or the engine's) must never hit, so every request
gets its own picture; encoding 400 JPEGs a second would take cores away from the server under
test. So each photo is built from pieces encoded once, up front:

* bases: crops of scikit-image's sample photos (astronaut, coffee, chelsea, ...), resized to
  cover the target size, taken at two offsets each;
* variants: ``k`` copies of each base, copy ``v`` with a small block of inverted pixels at its
  own place in every 16-pixel band (one MCU row of 4:2:0 JPEG);
* every variant is encoded with a restart marker after each MCU row. A restart resets the
  entropy coder, so the bytes of one band are independent of the bands around them: band ``r``
  of image ``i`` is taken from variant ``digit_r(i)``, the ``r``-th base-``k`` digit of ``i``.

Two images of one base differ in at least one band's pixels, and the number of distinct images,
``bases * k ** bands``, is made to exceed what is asked for. Each piece is padded with 0xFF fill
bytes before its marker (the JPEG standard allows any number there) to a multiple of 3 bytes,
so its base64 text is computed once too: a data URL is a join of precomputed strings.
"""

from __future__ import annotations

import base64
import functools
import io
import math

import numpy as np

_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
_BAND = 16  # pixel rows of one MCU row with 4:2:0 chroma subsampling
_SOS = b"\xff\xda"
_EOI = b"\xff\xd9"
_MAX_VARIANTS = 4096


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The sample photos (read once per process; never written to)."""
    from skimage import data

    photos = []
    for name in _PHOTOS:
        photo = getattr(data, name)()
        if isinstance(photo, tuple):  # stereo_motorcycle: (left, right, disparity)
            photo = photo[0]
        photos.append(np.ascontiguousarray(photo[..., :3]))
    return tuple(photos)


def _bases(width: int, height: int) -> list[np.ndarray]:
    """Two crops of every photo, each resized first so that it covers 110 % of the size."""
    from PIL import Image

    out = []
    for photo in _photos():
        h, w = photo.shape[:2]
        scale = max(width * 1.1 / w, height * 1.1 / h)
        size = (max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale)))
        big = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
        dy, dx = big.shape[0] - height, big.shape[1] - width
        for y, x in ((0, 0), (dy, dx)):
            out.append(big[y : y + height, x : x + width])
    return out


def _encode(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling=2, restart_marker_rows=1)
    return buf.getvalue()


def _pad(piece: bytes) -> bytes:
    """Fill bytes before the 2-byte marker that ends ``piece``, to a multiple of 3 bytes."""
    fill = -len(piece) % 3
    return piece[:-2] + b"\xff" * fill + piece[-2:]


def _split(jpeg: bytes, bands: int) -> tuple[bytes, list[bytes]]:
    """(header through the SOS segment, padded; one piece per band: its entropy-coded bytes
    and the marker after them, RSTn or EOI, padded)."""
    sos = jpeg.index(_SOS)
    start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    # The fill goes before the SOS marker; decoders skip 0xFF bytes in front of any marker.
    header = jpeg[:sos] + b"\xff" * (-start % 3) + jpeg[sos:start]
    pieces, at = [], start
    for r in range(bands - 1):
        end = jpeg.find(bytes((0xFF, 0xD0 + r % 8)), at)
        if end < 0:
            raise RuntimeError("the JPEG encoder wrote no restart markers (needs Pillow >= 10.2)")
        pieces.append(_pad(jpeg[at : end + 2]))
        at = end + 2
    if not jpeg.endswith(_EOI) or _EOI in jpeg[at:-2]:
        raise RuntimeError("unexpected JPEG layout after the last restart marker")
    pieces.append(_pad(jpeg[at:]))
    return header, pieces


def _variant(base: np.ndarray, v: int) -> np.ndarray:
    """``base`` with, in every band, a 6x6 block inverted at a place that depends on ``v``."""
    if v == 0:
        return base
    out: np.ndarray = base.copy()
    height, width = out.shape[:2]
    block = min(6, width, height)
    for r in range(math.ceil(height / _BAND)):
        y = min(r * _BAND + 5, height - block)
        x = (r * 131 + v * 197) % (width - block + 1)
        out[y : y + block, x : x + block] = 255 - out[y : y + block, x : x + block]
    return out


class DistinctImages:
    """``count`` (at least) distinct ``width`` x ``height`` JPEG photos, by index."""

    def __init__(self, width: int, height: int, count: int, quality: int = 90) -> None:
        if width < 8 or height < 8:
            raise ValueError(f"images must be at least 8x8 pixels, not {width}x{height}")
        self.width, self.height = width, height
        self.bands = math.ceil(height / _BAND)
        bases = _bases(width, height)
        per_base = math.ceil(max(count, 1) / len(bases))
        self.num_variants = max(2, math.ceil(per_base ** (1 / self.bands) - 1e-9))
        while self.num_variants**self.bands < per_base:
            self.num_variants += 1
        if self.num_variants > _MAX_VARIANTS:
            raise ValueError(f"{width}x{height} is too small for {count} distinct images")
        self.capacity = len(bases) * self.num_variants**self.bands
        self._headers: list[bytes] = []
        self._raw: list[list[list[bytes]]] = []  # [base][band][variant]
        for base in bases:
            bands: list[list[bytes]] = [[] for _ in range(self.bands)]
            for v in range(self.num_variants):
                header, pieces = _split(_encode(_variant(base, v), quality), self.bands)
                if v and header != self._headers[-1]:
                    raise RuntimeError("JPEG variants of one base got different tables")
                if not v:
                    self._headers.append(header)
                for band, piece in zip(bands, pieces, strict=True):
                    band.append(piece)
            self._raw.append(bands)
        self._headers_b64 = [base64.b64encode(h) for h in self._headers]
        self._b64 = [[[base64.b64encode(p) for p in band] for band in b] for b in self._raw]

    def _digits(self, index: int) -> tuple[int, list[int]]:
        if not 0 <= index < self.capacity:
            raise IndexError(f"image {index} of {self.capacity}")
        base, n = index % len(self._headers), index // len(self._headers)
        digits = []
        for _ in range(self.bands):
            n, d = divmod(n, self.num_variants)
            digits.append(d)
        return base, digits

    def jpeg(self, index: int) -> list[bytes]:
        """Image ``index`` as JPEG bytes, in pieces (join them to get the file)."""
        base, digits = self._digits(index)
        bands = self._raw[base]
        return [self._headers[base], *(bands[r][d] for r, d in enumerate(digits))]

    def base64(self, index: int) -> list[bytes]:
        """Image ``index`` as base64 text (ASCII bytes), in pieces."""
        base, digits = self._digits(index)
        bands = self._b64[base]
        return [self._headers_b64[base], *(bands[r][d] for r, d in enumerate(digits))]
