"""Decoding rules: every format and mode converts predictably; every broken input maps to a domain error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLargeError, InvalidImageError
from service.images import decode_image, preprocess, to_mode


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_common_formats_decode(fmt: str) -> None:
    img = decode_image(encode(rgb(), fmt))
    assert img.size == (40, 30)


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), "L"),
        (lambda: rgb().convert("RGBA"), "RGB"),
        (lambda: rgb().convert("P"), "RGB"),
        (lambda: rgb().convert("L"), "L"),
        (lambda: rgb().convert("LA"), "L"),
        (lambda: rgb().convert("CMYK"), "RGB"),
    ],
)
def test_modes_convert_to_8_bit(make, mode: str) -> None:  # type: ignore[no-untyped-def]
    img = make()
    out = to_mode(img, 1 if mode == "L" else 3)
    assert out.mode == mode
    assert np.asarray(out).dtype == np.uint8


def test_sixteen_bit_white_stays_white() -> None:
    img = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_mode(img, 1)).min() == 255
    assert np.asarray(to_mode(img, 3)).shape == (4, 4, 3)


def test_exif_orientation_is_applied() -> None:
    img = rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (30, 40)


def test_preprocess_shape_range_and_grayscale_replication() -> None:
    img = Image.fromarray(np.full((30, 50), 255, np.uint8))
    x = preprocess(img, image_size=16, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"hello, not an image at all", "not an image"),
        (encode(rgb(), "PNG")[:60], "could not be decoded|not an image"),
        (encode(rgb(), "JPEG")[:200], "could not be decoded|not an image"),
    ],
)
def test_bad_bytes_raise_invalid_image(data: bytes, match: str) -> None:
    with pytest.raises(InvalidImageError, match=match):
        decode_image(data)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A 20000x20000 PNG of one colour compresses to a few KB: the classic decompression bomb.
    big = encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(big) < 1_000_000
    with pytest.raises(ImageTooLargeError, match=r"20000x20000.*ANOSCOPE_MAX_PIXELS"):
        decode_image(big, max_pixels=1_000_000)
