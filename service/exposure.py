"""Exposure: whether a product's good images come at one brightness and contrast, and which level.

Some lines photograph every part under the same light: a bottle's images differ in brightness by 1%.
Others do not: magnetic_tile's good tiles were photographed from dark (mean grey 49 of 255) to bright
(207), with contrast varying as much, so a reconstruction model must learn every exposure, and its
residual grows with the contrast of the image rather than with the defect. `ModelConfig.exposure`
"standardise" takes the exposure away: every image is shifted and scaled to one mean and standard
deviation of its pixels before the model sees it (`service.images.standardise_exposure`).

`survey` measures the training normals for training's `exposure="auto"`: standardise where their own
brightness or contrast spreads by more than `MAX_SPREAD` (coefficient of variation over the images),
to the normals' median level. Normal images only: no labels. No torch here: the service image carries none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from service.images import to_mode

#: `exposure="auto"` standardises when the normals' brightness or contrast varies by more than this
#: (std over mean across the images). It is the gain training's lighting drift already teaches the
#: model to ignore (`--lighting-drift 0.15`): a spread beyond it is more than augmentation covers.
MAX_SPREAD = 0.15
#: Exposure is measured on a copy at most this many pixels on a side (a mean and a std need no more).
_SIDE = 128


def measure(img: Image.Image, channels: int) -> tuple[float, float]:
    """(mean, std) of an image's 0-1 pixels, all channels together, as `standardise_exposure` sees them."""
    img = to_mode(img, channels)
    if max(img.size) > _SIDE:
        img = img.resize((min(_SIDE, img.width), min(_SIDE, img.height)), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    return float(arr.mean()), float(arr.std())


def _spread(values: np.ndarray) -> float:
    mean = float(values.mean())
    return float(values.std() / mean) if mean > 0 else 0.0


@dataclass(frozen=True)
class ExposureSurvey:
    """The training normals' exposure: their median (mean, std) and how much each varies (std / mean)."""

    images: int
    mean: float
    std: float
    brightness_spread: float
    contrast_spread: float

    @property
    def choice(self) -> Literal["none", "standardise"]:
        """`--exposure auto`: standardise where the normals' exposure varies beyond `MAX_SPREAD`."""
        varies = max(self.brightness_spread, self.contrast_spread) > MAX_SPREAD
        return "standardise" if varies and self.std > 0 else "none"

    @property
    def target(self) -> tuple[float, float]:
        """The level "standardise" brings every image to: the normals' median mean and std (rounded, so
        the recorded config reads plainly), kept inside `ModelConfig`'s valid range."""
        return round(min(max(self.mean, 0.01), 0.99), 3), round(min(max(self.std, 0.005), 0.5), 3)

    def describe(self) -> str:
        return (
            f"brightness varies {self.brightness_spread:.0%}, contrast {self.contrast_spread:.0%} over "
            f"{self.images} normals (standardises above {MAX_SPREAD:.0%})"
        )


def survey(images: Sequence[Image.Image], channels: int) -> ExposureSurvey:
    """Measure the exposure of normal images for the `auto` choice and the target level."""
    if not images:
        return ExposureSurvey(0, 0.5, 0.2, 0.0, 0.0)
    stats = np.array([measure(img, channels) for img in images])
    means, stds = stats[:, 0], stats[:, 1]
    return ExposureSurvey(
        images=len(images),
        mean=float(np.median(means)),
        std=float(np.median(stds)),
        brightness_spread=_spread(means),
        contrast_spread=_spread(stds),
    )
