"""The bench's photos: valid JPEGs of the asked size, distinct in their pixels (so no content
cache can hit), and the data URL text is exactly the base64 of the JPEG."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from bench.images import DistinctImages


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize(
    ("width", "height", "count"), [(320, 240, 200), (64, 48, 300), (40, 8, 50)]
)
def test_distinct_valid_photos(width: int, height: int, count: int) -> None:
    images = DistinctImages(width, height, count)
    assert images.capacity >= count
    digests = set()
    for i in range(count):
        jpeg = b"".join(images.jpeg(i))
        pixels = _pixels(jpeg)
        assert pixels.shape == (height, width, 3)
        digests.add(hashlib.sha256(pixels.tobytes()).digest())
        assert base64.b64decode(b"".join(images.base64(i)), validate=True) == jpeg
        assert all(len(piece) % 4 == 0 for piece in images.base64(i))
    assert len(digests) == count


def test_images_are_real_photos_not_noise() -> None:
    images = DistinctImages(256, 192, 2)
    pixels = _pixels(b"".join(images.jpeg(0))).astype(np.float64)
    # A photo is smooth: neighbouring pixels differ far less than random ones would (~85).
    assert np.abs(np.diff(pixels, axis=1)).mean() < 30
    assert pixels.std() > 20


def test_neighbouring_indices_differ_in_pixels_of_the_same_photo() -> None:
    images = DistinctImages(640, 480, 10_000)
    bases = len(images._headers)
    first, second = (_pixels(b"".join(images.jpeg(i))) for i in (0, bases))
    changed = np.argwhere((first != second).any(axis=2))
    assert 0 < len(changed) < 0.05 * first.shape[0] * first.shape[1]


def test_out_of_range_and_too_small() -> None:
    images = DistinctImages(16, 16, 10)
    with pytest.raises(IndexError):
        images.jpeg(images.capacity)
    with pytest.raises(ValueError):
        DistinctImages(4, 4, 1)
