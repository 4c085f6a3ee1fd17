"""Post-processing maths: score combination, normalisation to [0, 1], heatmaps, regions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.bundle import Normalization, ScoreStats, ScoreWeights
from service.postprocess import (
    colorize,
    combine_scores,
    encode_png,
    find_regions,
    fit_aspect_baseline,
    fit_normalization,
    fit_score_stats,
    normalize,
    overlay,
    resize_map,
)

NORM = Normalization(threshold=2.0, min=0.0, max=4.0, source="test")


def test_normalize_puts_threshold_at_half_and_clips() -> None:
    np.testing.assert_allclose(normalize(np.array([2.0, 0.0, 4.0, -100.0, 100.0]), NORM), [0.5, 0.0, 1.0, 0.0, 1.0])
    unclipped = normalize(np.array([2.0, -100.0, 100.0]), NORM, clip=False)
    np.testing.assert_allclose(unclipped, [0.5, -25.0, 25.0])  # the same scale, the extremes kept apart


def test_combine_scores_z_scores_then_weights() -> None:
    stats = {"residual": ScoreStats(mean=1.0, std=2.0), "discrimination": ScoreStats(mean=10.0, std=5.0)}
    out = combine_scores(np.array([3.0]), np.array([20.0]), stats, ScoreWeights(residual=0.5, discrimination=2.0))
    np.testing.assert_allclose(out, [0.5 * 1.0 + 2.0 * 2.0])


def test_an_aspect_baseline_takes_the_normals_trend_off_before_z_scoring() -> None:
    stats = {
        "residual": ScoreStats(mean=1.0, std=2.0, aspect_slope=-3.0, aspect_centre=0.0),
        "discrimination": ScoreStats(mean=10.0, std=5.0),
    }
    weights = ScoreWeights(residual=1.0, discrimination=1.0)
    wide, square = np.e, 1.0  # log aspect 1 and 0
    out = combine_scores(np.array([3.0, 3.0]), np.array([20.0, 20.0]), stats, weights, [wide, square])
    # the wide image's residual is 3 above its baseline's -3 at log aspect 1: (3 + 3 - 1) / 2 = 2.5
    np.testing.assert_allclose(out, [2.5 + 2.0, 1.0 + 2.0])
    with pytest.raises(ValueError, match="aspect"):
        combine_scores(np.array([3.0]), np.array([20.0]), stats, weights)  # the bundle needs the aspect
    plain = {"residual": ScoreStats(mean=1.0, std=2.0), "discrimination": ScoreStats(mean=10.0, std=5.0)}
    assert combine_scores(np.array([3.0]), np.array([20.0]), plain, weights, [wide]) == pytest.approx(
        combine_scores(np.array([3.0]), np.array([20.0]), plain, weights)
    )


def test_the_aspect_baseline_is_kept_only_where_the_normals_show_one() -> None:
    rng = np.random.default_rng(0)
    aspect = np.exp(rng.uniform(-0.9, 0.9, 200))  # widths / heights from 0.4 to 2.5
    noise = rng.normal(0, 1, 200)
    slope, centre = fit_aspect_baseline(5 - 2 * np.log(aspect) + noise, aspect)
    assert slope == pytest.approx(-2.0, abs=0.3) and centre == pytest.approx(np.log(aspect).mean())
    assert fit_aspect_baseline(5 + noise, aspect)[0] == 0.0  # no trend: nothing subtracted
    assert fit_aspect_baseline(5 + noise, np.full(200, 4 / 3))[0] == 0.0  # one frame shape
    assert fit_aspect_baseline(5 - 2 * np.log(aspect[:10]), aspect[:10])[0] == 0.0  # too few to tell


def test_fit_score_stats_survives_constant_scores() -> None:
    stats = fit_score_stats(np.zeros(5), np.ones(5))
    assert stats["residual"].std > 0 and stats["discrimination"].std > 0


def test_fit_normalization_uses_quantiles_unless_given() -> None:
    scores = np.arange(1000, dtype=float)
    pair = fit_normalization(scores, np.linspace(0, 1, 10000), source="unit")
    assert pair.image.threshold == pytest.approx(np.quantile(scores, 0.99))
    assert pair.image.min == 0 and pair.image.max == 999
    fixed = fit_normalization(scores, np.linspace(0, 1, 10), image_threshold=5000.0, pixel_threshold=0.2, source="u")
    assert fixed.image.threshold == 5000.0 and fixed.image.max == 5000.0 and fixed.pixel.threshold == 0.2


def test_resize_map_to_width_height() -> None:
    out = resize_map(np.ones((8, 8), np.float32), (30, 20))
    assert out.shape == (20, 30) and out.dtype == np.float32


def test_colorize_goes_from_blue_to_red() -> None:
    lut = colorize(np.array([[0.0, 1.0]]))
    assert lut[0, 0, 2] > lut[0, 0, 0]  # blue at 0
    assert lut[0, 1, 0] > lut[0, 1, 2]  # red at 1


def test_overlay_paints_only_where_the_map_is_high_and_survives_png() -> None:
    base = np.full((10, 12, 3), 100, np.uint8)
    heat01 = np.zeros((10, 12))
    heat01[:, 6:] = 1.0
    png = encode_png(overlay(base, heat01, alpha=0.5))
    back = np.asarray(Image.open(io.BytesIO(png)))
    assert back.shape == (10, 12, 3)
    assert (back[:, :6] == 100).all(), "normal areas keep the image's own pixels"
    np.testing.assert_array_equal(back[0, 11], np.round(0.5 * 100 + 0.5 * colorize(np.array([[1.0]]))[0, 0]))


def test_regions_are_connected_components_largest_first() -> None:
    m = np.zeros((50, 60), np.float32)
    m[5:10, 5:20] = 3.0  # 5x15 = 75 px
    m[30:33, 40:43] = 4.0  # 3x3 = 9 px, higher peak
    regions = find_regions(m, NORM)
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(5, 5, 15, 5, 75), (40, 30, 3, 3, 9)]
    assert regions[0].peak_score == pytest.approx(0.75) and regions[1].peak_score == pytest.approx(1.0)
    assert find_regions(m, NORM, min_area=10) == regions[:1]
    assert find_regions(np.zeros((4, 4)), NORM) == []
