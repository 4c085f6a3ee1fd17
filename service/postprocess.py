"""Everything after the graph, once: score combination, [0, 1] normalisation, heatmaps, regions.

The service, `evaluate` and `calibrate` all call these functions, so a threshold chosen offline means
the same thing on the line.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from service.bundle import BundleMetadata, Normalization, NormalizationPair, ScoreStats, ScoreWeights

# Provisional thresholds before calibration: the validation normals' upper quantiles.
PROVISIONAL_IMAGE_QUANTILE = 0.99
PROVISIONAL_PIXEL_QUANTILE = 0.999


def combine_scores(
    residual: np.ndarray,
    discrimination: np.ndarray,
    stats: Mapping[str, ScoreStats],
    weights: ScoreWeights,
    aspect: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Weighted sum of z-scored raw scores: the one image score thresholds and AUROC are taken on.

    `aspect`: each image's width / height as it arrived, needed where the bundle fitted an aspect
    baseline (`ScoreStats.aspect_slope`), ignored where it did not.
    """
    r, d = stats["residual"], stats["discrimination"]
    z_r = (baselined(residual, r, aspect) - r.mean) / r.std
    z_d = (baselined(discrimination, d, aspect) - d.mean) / d.std
    return weights.residual * z_r + weights.discrimination * z_d


def baselined(values: np.ndarray, stats: ScoreStats, aspect: np.ndarray | Sequence[float] | None) -> np.ndarray:
    """A raw score less its normals' baseline at each image's aspect ratio (as is where none was fitted)."""
    v = np.asarray(values, dtype=np.float64)
    if stats.aspect_slope == 0.0:
        return v
    if aspect is None:
        msg = (
            "this bundle's scores depend on the image's aspect ratio (score_stats.aspect_slope != 0): "
            "pass each image's width / height to combine_scores"
        )
        raise ValueError(msg)
    log_aspect = np.log(np.asarray(aspect, dtype=np.float64))
    return v - stats.aspect_slope * (log_aspect - stats.aspect_centre)


#: `fit_aspect_baseline` keeps a slope only when it is this many standard errors from zero ...
ASPECT_MIN_T = 3.0
#: ... fitted on at least this many normals whose log aspect ratios spread by at least ASPECT_MIN_SPREAD
#: (a camera with a fixed frame gives one shape: nothing to fit).
ASPECT_MIN_IMAGES = 20
ASPECT_MIN_SPREAD = 0.05


def fit_aspect_baseline(scores: np.ndarray, aspect: np.ndarray) -> tuple[float, float]:
    """(slope, centre): a normal image's score against log(width / height), by least squares.

    Images of different shapes squashed to one square show their texture at different scales, and a
    reconstruction's error, hence the score of a *normal* image, can follow that scale. The line fitted on
    normals is a baseline to subtract, so that a wide good part and a tall one start level. The slope is
    kept only when it is significant (|t| >= ASPECT_MIN_T): otherwise (0, centre), and scores are as they were.
    """
    s = np.asarray(scores, dtype=np.float64)
    x = np.log(np.asarray(aspect, dtype=np.float64))
    centre = float(x.mean()) if x.size else 0.0
    if s.size < ASPECT_MIN_IMAGES or float(x.std()) < ASPECT_MIN_SPREAD:
        return 0.0, centre
    dx, ds = x - centre, s - s.mean()
    slope = float((dx * ds).sum() / (dx * dx).sum())
    dof = s.size - 2
    residual_var = float(((ds - slope * dx) ** 2).sum()) / dof
    se = (residual_var / float((dx * dx).sum())) ** 0.5
    if se > 0 and abs(slope) / se < ASPECT_MIN_T:
        return 0.0, centre
    return slope, centre


def normalize(values: np.ndarray | float, norm: Normalization, *, clip: bool = True) -> np.ndarray:
    """Map raw values to [0, 1] with 0.5 at the threshold (anomalib's min-max normalisation).
    `clip=False` keeps the values beyond min and max apart (for comparing maps, where a clip makes ties)."""
    span = max(norm.max - norm.min, 1e-12)
    scaled = (np.asarray(values, dtype=np.float64) - norm.threshold) / span + 0.5
    return np.clip(scaled, 0.0, 1.0) if clip else scaled


def fit_score_stats(residual: np.ndarray, discrimination: np.ndarray) -> dict[str, ScoreStats]:
    """Mean/std of each raw score on validation normals (std floored so a constant score cannot divide by 0)."""
    stats = {}
    for name, values in (("residual", residual), ("discrimination", discrimination)):
        v = np.asarray(values, dtype=np.float64)
        stats[name] = ScoreStats(mean=float(v.mean()), std=float(max(v.std(), 1e-8 * max(abs(v.mean()), 1.0), 1e-12)))
    return stats


def fit_normalization(
    image_scores: np.ndarray,
    pixel_values: np.ndarray,
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    source: str,
) -> NormalizationPair:
    """Normalisation of image scores and map pixels; thresholds default to the provisional quantiles."""
    s = np.asarray(image_scores, dtype=np.float64).ravel()
    p = np.asarray(pixel_values, dtype=np.float64).ravel()
    return NormalizationPair(
        image=fit_image_normalization(s, threshold=image_threshold, source=source),
        pixel=_fit_one(p, PROVISIONAL_PIXEL_QUANTILE, pixel_threshold, source),
    )


def fit_image_normalization(scores: np.ndarray, *, threshold: float | None = None, source: str) -> Normalization:
    """The image half of `fit_normalization`."""
    return _fit_one(np.asarray(scores, dtype=np.float64).ravel(), PROVISIONAL_IMAGE_QUANTILE, threshold, source)


def _fit_one(values: np.ndarray, quantile: float, threshold: float | None, source: str) -> Normalization:
    t = float(np.quantile(values, quantile)) if threshold is None else float(threshold)
    return Normalization(threshold=t, min=float(min(values.min(), t)), max=float(max(values.max(), t)), source=source)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (h, w) float map to `size` = (width, height)."""
    if (amap.shape[1], amap.shape[0]) == size:
        return amap.astype(np.float32, copy=False)
    img = Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)]  # r, g, b
    return (np.stack(channels, axis=1) * 255).round().astype(np.uint8)  # (256, 3)


_LUT = _jet_lut()
_PALETTE = _LUT.tobytes()  # r0 g0 b0 r1 g1 b1 ...


def colorize(map01: np.ndarray) -> np.ndarray:
    """(..., H, W) values in [0, 1] -> (..., H, W, 3) uint8 jet colours (blue = normal, red = anomalous)."""
    idx = np.clip(np.asarray(map01) * 255.0, 0, 255).astype(np.uint8)  # (..., H, W)
    if idx.size == 0:
        return _LUT[idx]
    # The same pixels as `_LUT[idx]`, through PIL's palette expansion: 9x less CPU than numpy's fancy
    # indexing on a 1024x1024 heatmap (3 ms against 28 ms), which is on the request path.
    img = Image.fromarray(np.ascontiguousarray(idx.reshape(-1, idx.shape[-1]) if idx.ndim else idx.reshape(1, 1)))
    img.putpalette(_PALETTE, "RGB")
    return np.asarray(img.convert("RGB")).reshape(*idx.shape, 3)


def overlay(image_rgb: np.ndarray, heat01: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend the colour-mapped map over the input image (H, W, 3) uint8, where the map is high.

    The blend weight ramps from 0 (map value 0.2 and below) to `alpha` (0.5, the pixel threshold, and
    above), so normal surface keeps its own colours and only suspicious areas are painted.
    """
    weight = (alpha * np.clip((np.asarray(heat01, dtype=np.float32) - 0.2) / 0.3, 0.0, 1.0))[..., None]
    blended = image_rgb.astype(np.float32) * (1 - weight) + colorize(heat01).astype(np.float32) * weight
    return blended.round().astype(np.uint8)


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes; a low compress level because heatmaps are encoded on the request path."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


@dataclass(frozen=True)
class Region:
    """A connected area of the anomaly map above the pixel threshold, in input-image pixels."""

    x: int
    y: int
    width: int
    height: int
    area: int
    peak_score: float  # normalised to [0, 1] like anomaly_score

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def find_regions(map_raw: np.ndarray, norm: Normalization, *, min_area: int = 1, max_regions: int = 50) -> list[Region]:
    """Connected components (8-connectivity) of `map_raw >= norm.threshold`, largest first."""
    mask = map_raw >= norm.threshold
    if not mask.any():
        return []
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    regions = []
    # Area and peak are measured inside each region's bounding box: on a 6-megapixel map this takes 40 ms where
    # ndimage.sum_labels + ndimage.maximum over the whole label image took over a second.
    for label, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        inside = labels[sl] == label
        area = int(np.count_nonzero(inside))
        if area < min_area:
            continue
        peak = map_raw[sl][inside].max()
        ys, xs = sl
        regions.append(
            Region(
                x=int(xs.start),
                y=int(ys.start),
                width=int(xs.stop - xs.start),
                height=int(ys.stop - ys.start),
                area=int(area),
                peak_score=round(float(normalize(peak, norm)), 6),
            )
        )
    regions.sort(key=lambda r: r.area, reverse=True)
    return regions[:max_regions]


def image_scores(
    meta: BundleMetadata,
    residual: np.ndarray,
    discrimination: np.ndarray,
    aspect: np.ndarray | Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Combined raw score and its [0, 1] normalisation for a batch, as the bundle defines them."""
    combined = combine_scores(residual, discrimination, meta.score_stats, meta.score_weights, aspect)
    return {"combined": combined, "normalized": normalize(combined, meta.normalization.image)}
