"""Image decoding and pre-processing: the one place pixels enter anoscope.

Training's dataset and the service both call `preprocess`, so the network sees at serving time exactly
the pixels it saw in training.

Decoding rules (documented for camera integrators in the README):
* EXIF orientation is applied; multi-frame files (GIF, TIFF) use their first frame.
* 16-bit images are scaled to 8 bits (value / 257), float NaN becomes 0; alpha channels are dropped;
  palette, CMYK and YCbCr images are converted to RGB; RGB is converted to luminance for
  single-channel models and grayscale is replicated for colour models.
* The pixel count is checked from the header before any pixel is decoded.
* Only the formats in `FORMATS` are opened. Pillow can read forty more (PSD, EPS, FITS, ...); each is
  attack surface for bytes from the network, and EPS would even run Ghostscript where it is installed.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from service.errors import ImageTooLargeError, InvalidImageError

DEFAULT_MAX_PIXELS = 40_000_000
#: Pillow format names decode_image opens (PPM covers PGM/PBM; JPEG covers the multi-picture MPO variant).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM")
# PIL's own bomb guard raises inside Image.open, before we can see the size and say which limit applies.
# decode_image always checks `max_pixels` from the header instead, so the guard is replaced, not dropped.
Image.MAX_IMAGE_PIXELS = None
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        msg = f"{what} declares an empty size {width}x{height}; send a real image"
        raise InvalidImageError(msg)
    if width * height > max_pixels:
        msg = (
            f"{what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); the limit is "
            f"{max_pixels / 1e6:g} megapixels (operators: set ANOSCOPE_MAX_PIXELS to change it)"
        )
        raise ImageTooLargeError(msg)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the image") -> Image.Image:
    """Decode bytes into a fully loaded PIL image (orientation applied), or raise a domain error.

    Every failure of the third-party decoders is translated here, so nothing unmapped escapes.
    """
    if not data:
        msg = f"{what} is empty (0 bytes); send the image file's bytes"
        raise InvalidImageError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(img.width, img.height, max_pixels, what)
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img = ImageOps.exif_transpose(img) or img
    except (ImageTooLargeError, InvalidImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        msg = f"{what} declares too many pixels to decode safely ({exc}); send a smaller image"
        raise ImageTooLargeError(msg) from exc
    except Image.UnidentifiedImageError as exc:
        msg = f"{what} is not an image anoscope can read; send PNG, JPEG, BMP or TIFF bytes"
        raise InvalidImageError(msg) from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on broken files
        msg = f"{what} could not be decoded ({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
        raise InvalidImageError(msg) from exc
    return img


def load_image_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file; errors name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        msg = f"cannot read {p}: {exc.strerror or exc}"
        raise InvalidImageError(msg) from exc
    return decode_image(data, max_pixels=max_pixels, what=str(p))


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any decoded image to 8-bit 'L' (channels=1) or 'RGB' (channels=3), predictably."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        # NaN would cast to an undefined byte; as 0 it is predictable (infinities clip to 0 and 255).
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        scale = 1.0 if img.mode == "F" and arr.max(initial=0) <= 255 else 257.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("LA", "La"):
        img = img.getchannel(0)
    elif img.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBa", "RGBX"):
        img = img.convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def preprocess(
    img: Image.Image, *, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Decoded image -> normalised float32 array (C, S, S), exactly as the model was trained.

    This squashes the image to the square; `service.tiles.preprocess_tiles` cuts it into tiles instead.
    """
    img = to_mode(img, channels)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return normalise_array(img, mean, std)


def normalise_array(
    img: Image.Image, mean: Sequence[float], std: Sequence[float], exposure: tuple[float, float] | None = None
) -> np.ndarray:
    """An 'L' or 'RGB' image -> float32 (C, H, W), scaled to [0, 1], its exposure standardised to the
    (mean, std) `exposure` where given (`standardise_exposure`), and normalised per channel."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)  # (H, W) or (H, W, 3)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    if exposure is not None:
        arr = standardise_exposure(arr, exposure)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - m) / s, dtype=np.float32)


#: Below this pixel std (a blank or nearly blank frame) an image is not stretched further: its noise
#: would otherwise become contrast.
MIN_EXPOSURE_STD = 2.0 / 255.0


def standardise_exposure(
    arr: np.ndarray, target: tuple[float, float], *, measured_on: np.ndarray | None = None
) -> np.ndarray:
    """0-1 pixels (any shape) shifted and scaled so their mean and standard deviation are `target`
    (over all pixels and channels together, so colours keep their balance), clipped to [0, 1].

    One gain and one offset per image: the image's structure is untouched, only the exposure it was
    taken at is taken away, so a model trained on tiles photographed dark and bright alike sees one
    level (`ModelConfig.exposure`; docs/training.md). `measured_on`: the pixels the mean and standard
    deviation are taken from, where not all of `arr` (a study's diagnostic; the service measures all)."""
    measured = arr if measured_on is None else measured_on
    mean, std = float(measured.mean()), float(measured.std())
    gain = target[1] / max(std, MIN_EXPOSURE_STD)
    return np.clip((arr - mean) * gain + target[0], 0.0, 1.0).astype(np.float32, copy=False)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 view of a decoded image, for overlays."""
    return np.asarray(to_mode(img, 3), dtype=np.uint8)
