"""Evaluation: metrics with known answers (fake engine), pixel AUROC, report files, CLI errors, toy bundle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoscope import cli
from service.bundle import BundleMetadata, Normalization, NormalizationPair, ScoreStats, ScoreWeights
from service.datasets import DatasetError
from service.engine import Engine, OnnxEngine, RawOutput
from tests.toy_bundle import make_toy_bundle, toy_image
from training import metrics
from training.evaluate import evaluate, format_summary, load_samples, mean_brightness, relight, score_samples
from training.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8


class FakeEngine:
    """An Engine whose scores are the images' brightness: residual = mean, discrimination = -mean, map = pixels."""

    def __init__(self, image_size: int = SIZE) -> None:
        norm = Normalization(threshold=0.5, min=0.0, max=1.0, source="test")
        self._meta = BundleMetadata(
            name="fake",
            version="0-test",
            family="skipganomaly",
            image_size=image_size,
            channels=1,
            mean=[0.0],
            std=[1.0],
            score_weights=ScoreWeights(residual=1.0, discrimination=0.0),
            score_stats={"residual": ScoreStats(mean=0.0, std=1.0), "discrimination": ScoreStats(mean=0.0, std=1.0)},
            normalization=NormalizationPair(image=norm, pixel=norm),
        )

    @property
    def metadata(self) -> BundleMetadata:
        return self._meta

    @property
    def provider(self) -> str:
        return "FakeProvider"

    def run(self, batch: np.ndarray) -> RawOutput:
        m = batch.mean(axis=(1, 2, 3))
        return RawOutput(m, -m, batch[:, 0])


def _gray(value: float, size: int = SIZE) -> np.ndarray:
    return np.full((size, size), round(value * 255), dtype=np.uint8)


def _write(root: Path, groups: dict[str, list[np.ndarray]], masks: dict[str, list[np.ndarray]] | None = None) -> Path:
    """A folder-of-classes dataset (good/ + defect folders), with MVTec-style masks where given."""
    for group, images in groups.items():
        (root / group).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / group / f"{i:03d}.png")
    for group, ms in (masks or {}).items():
        (root / "ground_truth" / group).mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(ms):
            Image.fromarray(m.astype(np.uint8) * 255).save(root / "ground_truth" / group / f"{i:03d}_mask.png")
    return root


def _scores(tmp_path: Path, good: list[float], bad: list[float]) -> dict:
    data = _write(tmp_path / "d", {"good": [_gray(v) for v in good], "dent": [_gray(v) for v in bad]})
    return evaluate(FakeEngine(), data, None)


def test_engine_fake_implements_the_protocol() -> None:
    assert isinstance(FakeEngine(), Engine)


@pytest.mark.parametrize(
    ("good", "bad", "expected"),
    [
        ([0.1, 0.2, 0.3], [0.8, 0.9], 1.0),  # perfect separation
        ([0.8, 0.9], [0.1, 0.2, 0.3], 0.0),  # reversed
        ([0.1, 0.4, 0.35, 0.8], [0.9, 0.5], 7 / 8),  # 0.5 beats 3 of the 4 normals, 0.9 all of them
    ],
)
def test_image_auroc_known_answers(tmp_path: Path, good: list[float], bad: list[float], expected: float) -> None:
    report = _scores(tmp_path, good, bad)
    assert report["image"]["auroc"] == pytest.approx(expected)
    assert report["image"]["auroc_residual"] == pytest.approx(expected)
    assert report["image"]["auroc_discrimination"] == pytest.approx(1 - expected), "scored on its own"
    assert report["pixel"] is None, "no masks, no pixel AUROC"
    assert report["data"] == {
        "n_images": len(good) + len(bad),
        "n_good": len(good),
        "n_defective": len(bad),
        "defect_types": {"dent": len(bad)},
        "path": str(tmp_path / "d"),
    }


def test_brightness_shortcut_is_measured_and_warned_about(tmp_path: Path) -> None:
    """A test set whose defective images are simply brighter is flagged, whatever the detector scores."""
    report = _scores(tmp_path / "a", [0.1, 0.2, 0.3], [0.8, 0.9])
    assert report["image"]["auroc_brightness_only"] == pytest.approx(1.0)
    report["bundle"]["provider"] = "FakeProvider"
    assert "mean brightness alone ranks good against defective with AUROC 1.000" in format_summary(report)

    # Same brightness spread in both classes (0.3 and 0.6 in each): no shortcut, no warning.
    report = _scores(tmp_path / "b", [0.3, 0.6], [0.3, 0.6])
    assert report["image"]["auroc_brightness_only"] == pytest.approx(0.5)
    report["bundle"]["provider"] = "FakeProvider"
    assert "brightness" not in format_summary(report)


class ContrastEngine(FakeEngine):
    """Scores what a global gain keeps: the image's relative contrast, (max - min) / mean."""

    def run(self, batch: np.ndarray) -> RawOutput:
        lo, hi, m = batch.min(axis=(1, 2, 3)), batch.max(axis=(1, 2, 3)), batch.mean(axis=(1, 2, 3))
        contrast = (hi - lo) / np.maximum(m, 1e-6)
        return RawOutput(contrast, contrast, batch[:, 0])


def _textured(value: float, rng: np.random.Generator, spot: bool = False) -> np.ndarray:
    """A grainy surface of mean grey `value` (0..1), with a dark defect when `spot`."""
    img = np.clip(rng.normal(value * 255, 4, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    if spot:
        img[2:4, 2:4] //= 4
    return img


def test_brightness_matched_auroc_takes_the_lighting_shortcut_away(tmp_path: Path) -> None:
    """On a set whose defective images are brighter, a score that follows brightness falls to chance once
    every image is relit to one grey level; a score that sees the defect keeps its AUROC."""
    rng = np.random.default_rng(0)
    good = [_textured(v, rng) for v in rng.uniform(0.3, 0.4, 16)]
    dent = [_textured(v, rng, spot=True) for v in rng.uniform(0.6, 0.7, 16)]
    data = _write(tmp_path / "d", {"good": good, "dent": dent})
    follows_light = evaluate(FakeEngine(), data, None)
    assert follows_light["image"]["auroc"] == pytest.approx(1.0), "as is, brightness looks like a detector"
    matched = follows_light["image"]["brightness_matched"]
    assert 0.2 < matched["auroc_brightness_only"] < 0.8, "relit: lighting no longer separates the classes"
    assert 0.2 < matched["auroc"] < 0.8, "the brightness score loses its shortcut"
    sees_defect = evaluate(ContrastEngine(), data, None)["image"]
    assert sees_defect["auroc"] == pytest.approx(1.0)
    assert sees_defect["brightness_matched"]["auroc"] == pytest.approx(1.0), "a real detector keeps its AUROC"
    follows_light["bundle"]["provider"] = "FakeProvider"
    assert "with every image relit to mean grey" in format_summary(follows_light)


def test_brightness_matched_runs_only_on_a_shortcut_unless_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    groups = {"good": [_textured(v, rng) for v in (0.3, 0.6)], "dent": [_textured(v, rng, True) for v in (0.3, 0.6)]}
    data = _write(tmp_path / "d", groups)
    assert "brightness_matched" not in evaluate(FakeEngine(), data, None)["image"], "no shortcut: one pass"
    forced = evaluate(ContrastEngine(), data, None, brightness_matched=True)["image"]["brightness_matched"]
    assert forced["auroc"] == pytest.approx(1.0)
    shortcut = _write(tmp_path / "s", {"good": [_gray(0.2), _gray(0.3)], "dent": [_gray(0.8)]})
    assert "brightness_matched" not in evaluate(FakeEngine(), shortcut, None, brightness_matched=False)["image"]


def test_relight_sets_the_mean_grey_with_a_global_gain() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(40, 120, (32, 48, 3), dtype=np.uint8))
    out = relight(rgb, 150.0)
    assert out.mode == "RGB" and out.size == rgb.size
    assert mean_brightness(out) == pytest.approx(150.0, abs=1.0)
    ratio = np.asarray(out, dtype=float) / np.asarray(rgb, dtype=float)
    assert ratio.std() < 0.02, "one gain for every pixel: nothing local changes"


def test_best_f1_and_average_precision_known_answer(tmp_path: Path) -> None:
    # At score >= 0.25: 3 defects and 1 normal flagged -> P = 3/4, R = 1, F1 = 6/7 (the best).
    report = _scores(tmp_path, [0.1, 0.2, 0.3], [0.25, 0.4, 0.5])
    f1 = report["image"]["best_f1"]
    assert f1["f1"] == pytest.approx(6 / 7)
    assert f1["threshold"] == pytest.approx(round(0.25 * 255) / 255)
    assert (f1["precision"], f1["recall"]) == (pytest.approx(0.75), pytest.approx(1.0))
    # Ranked: 0.5+ 0.4+ 0.3- 0.25+ ... -> AP = (1 + 1 + 3/4) / 3
    assert report["image"]["average_precision"] == pytest.approx((1 + 1 + 0.75) / 3)


def test_per_defect_type_auroc(tmp_path: Path) -> None:
    groups = {"good": [_gray(0.4), _gray(0.5)], "bright": [_gray(0.9)], "dark": [_gray(0.1), _gray(0.2)]}
    report = evaluate(FakeEngine(), _write(tmp_path, groups), None)
    per = report["per_defect_type"]
    assert per["bright"]["auroc"] == 1.0 and per["bright"]["n"] == 1
    assert per["dark"]["auroc"] == 0.0 and per["dark"]["n"] == 2
    assert report["image"]["auroc"] == pytest.approx(2 / 6)


def test_pixel_auroc_known_maps_and_masks(tmp_path: Path) -> None:
    # Defect image: mask covers 4 pixels, 2 bright and 2 as dark as everything else. Every non-mask pixel
    # is dark, so AUROC = P(mask pixel > normal pixel) + 0.5 P(tie) = 0.5 * 1 + 0.5 * 0.5 = 0.75.
    img = _gray(0.2)
    img[0, 0:2] = 230
    mask = np.zeros((SIZE, SIZE), bool)
    mask[0, 0:4] = True
    data = _write(tmp_path, {"good": [_gray(0.2)] * 2, "dent": [img]}, {"dent": [mask]})
    report = evaluate(FakeEngine(), data, None)
    assert report["pixel"]["auroc"] == pytest.approx(0.75)
    assert report["pixel"]["n_images"] == 3 and report["pixel"]["n_pixels"] == 3 * SIZE * SIZE
    assert report["pixel"]["anomalous_pixel_fraction"] == pytest.approx(4 / (3 * SIZE * SIZE))
    # One region, half of it found before any good pixel (PRO 0.5 at FPR 0), all of it at FPR 1 (the
    # dark ties): PRO rises linearly from 0.5, so the area up to FPR 0.3 is (0.5 + 0.65) / 2.
    assert report["pixel"]["aupro"] == pytest.approx(0.575) and report["pixel"]["aupro_fpr_limit"] == 0.3
    assert report["per_defect_type"]["dent"]["pixel_auroc"] == pytest.approx(0.75)
    assert report["per_defect_type"]["dent"]["aupro"] == pytest.approx(0.575)
    assert "AUPRO (FPR <= 0.3) 0.575" in format_summary(
        report
    ) and "AUPRO per defect type: dent 0.575" in format_summary(report)


def test_the_report_and_the_pro_plot_gather_the_region_pixels_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labelling every mask's regions and sorting every pixel is most of AUPRO's cost (2 s of 19 on
    magnetic_tile): the whole set's are gathered once for report.json and roc_pixel.png, plus once per
    defect type for its own AUPRO."""
    img = _gray(0.2)
    img[0, 0:2] = 230
    mask = np.zeros((SIZE, SIZE), bool)
    mask[0, 0:4] = True
    data = _write(
        tmp_path / "data", {"good": [_gray(0.2)] * 2, "dent": [img], "nick": [img]}, {"dent": [mask], "nick": [mask]}
    )
    gathered = []
    real = metrics.RegionPixels.of.__func__

    def counting(cls, maps, masks):
        gathered.append(len(maps))
        return real(cls, maps, masks)

    monkeypatch.setattr(metrics.RegionPixels, "of", classmethod(counting))
    report = evaluate(FakeEngine(), data, tmp_path / "out")
    assert sorted(gathered) == [3, 3, 4]  # each type with the two good images, then all four images
    assert report["pixel"]["aupro"] == pytest.approx(0.575)
    assert (tmp_path / "out" / "roc_pixel.png").is_file()


def test_defects_without_masks_are_left_out_of_pixel_auroc(tmp_path: Path) -> None:
    img = _gray(0.2)
    img[2:4, 2:4] = 240
    mask = np.zeros((SIZE, SIZE), bool)
    mask[2:4, 2:4] = True
    groups = {"good": [_gray(0.2)], "dent": [img], "smudge": [_gray(0.9)]}  # smudge has no mask folder
    report = evaluate(FakeEngine(), _write(tmp_path, groups, {"dent": [mask]}), None)
    assert report["pixel"]["auroc"] == 1.0
    assert report["pixel"]["n_defective_images_without_masks"] == 1 and report["pixel"]["n_images"] == 2
    assert "aupro" in report["per_defect_type"]["dent"] and "aupro" not in report["per_defect_type"]["smudge"]


def test_metric_functions_edge_cases() -> None:
    assert metrics.auroc([0, 0], [0.1, 0.2]) is None and metrics.best_f1([1, 1], [0.1, 0.2]) is None
    assert metrics.pixel_auroc([np.array([[0.1, 0.9], [0.4, 0.2]])], [np.array([[0, 1], [1, 0]], bool)]) == 1.0
    assert metrics.pixel_auroc([np.array([[0.1, 0.9], [0.15, 0.2]])], [np.array([[0, 1], [1, 0]], bool)]) == 0.75
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc([np.zeros((2, 2))], [np.zeros((3, 3), bool)])
    assert metrics.eval_size((1024, 512)) == (256, 128) and metrics.eval_size((100, 60)) == (100, 60)
    rates = metrics.rates_at([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], 0.5)
    assert (rates["recall"], rates["false_positive_rate"], rates["precision"]) == (0.5, 0.5, 0.5)
    assert metrics.finite_or_none({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("levels", [0, 3, 40])  # 0: continuous scores; else that many distinct values (ties)
def test_auroc_equals_scikit_learn_with_and_without_ties(dtype: type, levels: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(levels)
    scores = rng.random(5000)
    if levels:
        scores = np.floor(scores * levels)
    labels = rng.random(5000) < 0.05 + 0.5 * scores / max(scores.max(), 1e-9)  # informative, imbalanced
    scores = (scores * (1 if levels else 1000)).astype(dtype)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.auroc(labels, -scores) == pytest.approx(1 - roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("levels", [0, 4])  # continuous scores, or heavy ties
def test_auroc_difference_se_matches_delong_by_brute_force(levels: int) -> None:
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(40), np.ones(25)].astype(bool)
    a = rng.normal(size=65) + 1.2 * labels
    b = a + rng.normal(size=65) * 0.7
    if levels:
        a, b = np.floor(a * levels), np.floor(b * levels)

    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        psi = (s[labels][:, None] > s[~labels][None, :]) + 0.5 * (s[labels][:, None] == s[~labels][None, :])
        return psi.mean(axis=1), psi.mean(axis=0)  # per positive, per negative

    (a10, a01), (b10, b01) = components(a), components(b)
    assert a10.mean() == pytest.approx(metrics.auroc(labels, a))
    expected = np.sqrt(np.var(a10 - b10, ddof=1) / 25 + np.var(a01 - b01, ddof=1) / 40)
    assert metrics.auroc_difference_se(labels, a, b) == pytest.approx(expected, rel=1e-12)
    assert metrics.auroc_difference_se(labels, a, a) == 0  # a score against itself: no uncertainty
    with pytest.raises(ValueError, match="two positive and two negative"):
        metrics.auroc_difference_se([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


@pytest.mark.parametrize("levels", [0, 5])  # continuous scores, or a few values with heavy ties
def test_roc_points_of_many_scores_trace_the_exact_curve(levels: int) -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(7)
    scores = rng.normal(size=200_000)
    labels = rng.random(scores.size) < 0.02 + 0.3 * (scores > 1.5)  # imbalanced, like pooled pixels
    if levels:
        scores = np.floor(scores * levels / 2)
    exact_fpr, exact_tpr, _ = roc_curve(labels, scores)
    fpr, tpr = metrics.roc_points(labels, scores, max_points=400)
    assert fpr.size <= 402 and fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    # every point lies on the exact curve, and the polyline strays from it by at most ~2 / max_points
    grid = np.linspace(0, 1, 5001)
    for f, t in zip(fpr, tpr, strict=True):  # the exact curve at f: a vertical run of corners, or a segment
        lo, hi = np.searchsorted(exact_fpr, f, side="left"), np.searchsorted(exact_fpr, f, side="right")
        if lo < hi:
            assert exact_tpr[lo:hi].min() - 1e-12 <= t <= exact_tpr[lo:hi].max() + 1e-12
        else:
            assert t == pytest.approx(np.interp(f, exact_fpr, exact_tpr), abs=1e-12)
    assert np.abs(np.interp(grid, fpr, tpr) - np.interp(grid, exact_fpr, exact_tpr)).max() < 2 / 200 + 1e-9
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(labels, scores), abs=1e-3)
    # a few scores: the exact corners, as scikit-learn gives them
    few = metrics.roc_points(labels[:300], scores[:300])
    assert few is not None and np.array_equal(few[0], roc_curve(labels[:300], scores[:300])[0])
    assert metrics.roc_points(np.zeros(5000, bool), scores[:5000]) is None
    with pytest.raises(ValueError, match="NaN or infinity; a ROC curve"):
        metrics.roc_points(labels, np.where(labels, np.nan, scores))


def test_auroc_refuses_non_finite_scores_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        metrics.auroc([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        metrics.auroc([0, 1, 1], [0.1, 0.3])
    assert metrics.auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half


def _aupro_by_brute_force(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    """The definition, threshold by threshold: PRO = mean over regions of the share of the region at or
    above t; FPR over normal pixels; trapezoids on a fine FPR grid of the interpolated curve."""
    from scipy import ndimage

    regions = []
    for m, k in zip(maps, masks, strict=True):
        labels, n = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [m[labels == i] for i in range(1, n + 1)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        points.append((float((normal >= t).mean()), float(np.mean([(r >= t).mean() for r in regions]))))
    fpr, pro = np.array(points).T
    grid = np.linspace(0, limit, 30001)
    return float(np.trapezoid(np.interp(grid, fpr, pro), grid) / limit)


def test_aupro_counts_every_defect_region_once_whatever_its_size() -> None:
    """A map that finds a large defect and misses a small one: pixel AUROC is high (the large one is
    most defect pixels), AUPRO is about a half (one of two regions)."""
    mask = np.zeros((40, 40), bool)
    mask[2:22, 2:22] = True  # 400 px
    mask[30:32, 30:32] = True  # 4 px, not touching
    amap = 0.05 + 0.001 * np.arange(1600).reshape(40, 40) / 1600
    amap[2:22, 2:22] = 1.0  # the large region stands out
    amap[30:32, 30:32] = 0.0  # the small one is below every good pixel
    good = np.full((40, 40), 0.05)
    assert metrics.pixel_auroc([amap, good], [mask, np.zeros_like(mask)]) > 0.98
    found = metrics.aupro([amap, good], [mask, np.zeros_like(mask)])
    assert found == pytest.approx(0.5)
    perfect = np.where(mask, 1.0, 0.0)
    assert metrics.aupro([perfect, good], [mask, np.zeros_like(mask)]) == pytest.approx(1.0)
    assert metrics.aupro([-perfect, good], [mask, np.zeros_like(mask)]) < 0.01


@pytest.mark.parametrize("levels", [0, 5])  # continuous maps, or heavy ties
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_the_definition_threshold_by_threshold(levels: int, limit: float) -> None:
    rng = np.random.default_rng(levels)
    masks, maps = [], []
    for i in range(4):
        mask = np.zeros((24, 24), bool)
        if i:  # one good image, three with one to three blobs
            for _ in range(i):
                y, x, h, w = rng.integers(0, 20), rng.integers(0, 20), rng.integers(1, 5), rng.integers(1, 5)
                mask[y : y + h, x : x + w] = True
        amap = rng.random((24, 24)) + 0.6 * mask * rng.random((24, 24))
        maps.append(np.floor(amap * levels) / levels if levels else amap)
        masks.append(mask)
    expected = _aupro_by_brute_force(maps, masks, limit)
    assert metrics.aupro(maps, masks, limit) == pytest.approx(expected, abs=2e-4)


def test_the_plotted_pro_curve_follows_the_integrated_one() -> None:
    mask = np.zeros((8, 8), bool)
    mask[0, 0:4] = True
    amap = np.full((8, 8), 0.2)
    amap[0, 0:2] = 0.9  # half the region above every good pixel, the rest tied with them
    fpr, pro = metrics.pro_curve([amap], [mask])
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1])
    rng = np.random.default_rng(1)
    maps = [rng.random((32, 32)) + 0.5 * (np.arange(32) > 20) for _ in range(3)]
    masks = [np.broadcast_to(np.arange(32) > 20, (32, 32)) & (rng.random((32, 32)) < 0.5) for _ in range(3)]
    fpr, pro = metrics.pro_curve(maps, masks, points=100_000)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.trapezoid(pro, fpr) == pytest.approx(metrics.aupro(maps, masks, 1.0), abs=1e-3)
    short, _ = metrics.pro_curve(maps, masks, fpr_limit=0.3, points=50)
    assert short.size <= 52 and 0.3 <= short[-1] < 0.32, "stops just past the limit"


def test_aupro_needs_a_region_and_normal_pixels() -> None:
    empty = np.zeros((4, 4), bool)
    assert metrics.aupro([np.zeros((4, 4))], [empty]) is None
    assert metrics.aupro([np.zeros((4, 4))], [~empty]) is None
    with pytest.raises(ValueError, match="limit"):
        metrics.aupro([np.zeros((4, 4))], [empty], fpr_limit=0)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\] \(got 1.5\)"):
        metrics.pro_curve([np.zeros((4, 4))], [empty], fpr_limit=1.5)  # the plot refuses it alike


def test_an_aspect_baseline_ranks_parts_of_different_shapes_as_the_bundle_defines(tmp_path: Path) -> None:
    """Wide parts score 0.3 above tall ones whether good or not (a flat grey squashes to its own mean):
    raw, a tall defect ranks below a wide good part; with the bundle's baseline both scores rank every
    defect above every good part, and the per-score AUROC is the baselined one too."""
    wide, tall = (
        (lambda g: np.full((SIZE, 2 * SIZE), round(g * 255), np.uint8)),
        (lambda g: np.full((2 * SIZE, SIZE), round(g * 255), np.uint8)),
    )
    data = _write(tmp_path / "d", {"good": [wide(0.6), tall(0.3)], "dent": [wide(0.65), tall(0.35)]})
    engine = FakeEngine()
    assert evaluate(engine, data, None)["image"]["auroc"] == pytest.approx(0.75)
    slope = 0.3 / np.log(4)  # log(2) - log(1/2) apart: the baseline takes the 0.3 off
    stats = {
        "residual": ScoreStats(mean=0.0, std=1.0, aspect_slope=slope),
        "discrimination": ScoreStats(mean=0.0, std=1.0),
    }
    engine._meta = engine.metadata.model_copy(update={"score_stats": stats})
    image = evaluate(engine, data, None)["image"]
    assert image["auroc"] == pytest.approx(1.0)
    assert image["auroc_residual"] == pytest.approx(1.0)


def test_maps_and_masks_are_capped_in_resolution(tmp_path: Path) -> None:
    big = np.full((300, 600), 50, np.uint8)
    mask = np.zeros((300, 600), bool)
    mask[100:200, 200:400] = True
    big[mask] = 250
    data = _write(tmp_path, {"good": [np.full((300, 600), 50, np.uint8)], "dent": [big]}, {"dent": [mask]})
    scored = score_samples(FakeEngine(), load_samples(data), max_pixel_side=64)
    assert [m.shape for m in scored.maps] == [(32, 64), (32, 64)]
    assert [m.shape for m in scored.masks] == [(32, 64), (32, 64)]
    dent = [s.defect_type for s in scored.samples].index("dent")
    assert scored.masks[dent].mean() == pytest.approx(mask.mean(), abs=0.02)
    amap, m = scored.maps[dent], scored.masks[dent]
    assert amap[m].mean() > amap[~m].mean() + 0.2, "map and mask still line up after resizing"


def test_report_files_are_written(tmp_path: Path) -> None:
    img = _gray(0.2)
    img[2:5, 2:5] = 240
    mask = img > 200
    groups = {"good": [_gray(0.2), _gray(0.25)], "dent": [img, img], "smudge": [_gray(0.7)]}
    data = _write(tmp_path / "d", groups, {"dent": [mask, mask]})
    out = tmp_path / "report"
    report = evaluate(FakeEngine(), data, out)
    expected = {"report.json", "scores.csv", "score_histogram.png", "roc_image.png", "roc_pixel.png", "examples.png"}
    assert {p.name for p in out.iterdir()} == expected
    assert json.loads((out / "report.json").read_text()) == report
    for png in expected - {"report.json", "scores.csv"}:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 200
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 5 and {r["defect_type"] for r in rows} == {"good", "dent", "smudge"}
    assert "image AUROC 1.000" in format_summary(report)


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="good"):
        load_samples(_write(tmp_path / "a", {"dent": [_gray(0.5)]}))
    with pytest.raises(DatasetError, match="no defective images"):
        load_samples(_write(tmp_path / "b", {"good": [_gray(0.5)]}))
    with pytest.raises(DatasetError, match="not a directory"):
        load_samples(tmp_path / "missing")


def test_cli_error_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "d", {"good": [_gray(0.5)], "dent": [_gray(0.9)]})
    not_bundle = tmp_path / "nb"
    not_bundle.mkdir()
    args = ["evaluate", "--out", str(tmp_path / "r")]
    assert cli.main([*args, "--bundle", str(not_bundle), "--data", str(data)]) == 1
    assert "is not a bundle" in capsys.readouterr().err
    bundle = make_toy_bundle(tmp_path / "toy", image_size=SIZE)
    good_only = _write(tmp_path / "g", {"good": [_gray(0.5)]})
    assert cli.main([*args, "--bundle", str(bundle), "--data", str(good_only)]) == 1
    assert "no defective images" in capsys.readouterr().err
    assert cli.main([*args, "--bundle", str(bundle), "--data", str(data), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch size"):
        evaluate(FakeEngine(), data, None, batch_size=0)
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--help"])
    assert exc.value.code == 0 and "pixel AUROC" in capsys.readouterr().out


def test_toy_bundle_on_generated_bright_defects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real ONNX engine end to end: the toy model flags bright pixels, so bright defects separate fully."""
    good = [toy_image(64, defect=False, seed=i) for i in range(6)]
    bad = [toy_image(64, defect=True, seed=10 + i) for i in range(4)]
    mask = np.zeros((64, 64), bool)
    mask[16:24, 32:40] = True
    root = tmp_path / "mvtec"
    _write(root / "test", {"good": good, "bright": bad})
    _write(root, {}, {"bright": [mask] * 4})
    bundle = make_toy_bundle(tmp_path / "toy", image_size=32)
    out = tmp_path / "report"
    rc = cli.main(["evaluate", "--bundle", str(bundle), "--data", str(root), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["image"]["auroc"] == 1.0 and report["per_defect_type"]["bright"]["auroc"] == 1.0
    assert report["pixel"]["auroc"] > 0.98 and report["pixel"]["n_images"] == 10
    assert report["bundle"]["provider"] == "CPUExecutionProvider"
    shown = capsys.readouterr().out
    assert "image AUROC 1.000" in shown and "pixel AUROC" in shown and "report.json" in shown


def test_brightness_matched_flag_of_the_command_forces_or_skips_the_relit_pass(tmp_path: Path) -> None:
    good = [toy_image(64, defect=False, seed=i) for i in range(4)]
    bad = [toy_image(64, defect=True, seed=10 + i) for i in range(3)]
    root = _write(tmp_path / "d", {"good": good, "bright": bad})
    bundle = make_toy_bundle(tmp_path / "toy", image_size=32)

    def image_report(*flags: str) -> dict:
        out = tmp_path / f"r{len(flags)}{flags[:1]}"
        assert cli.main(["evaluate", "--bundle", str(bundle), "--data", str(root), "--out", str(out), *flags]) == 0
        return json.loads((out / "report.json").read_text())["image"]

    auto = image_report()
    assert auto["auroc_brightness_only"] == 1.0 and "brightness_matched" in auto, "bright defects: a shortcut, relit"
    assert "brightness_matched" in image_report("--brightness-matched")
    assert "brightness_matched" not in image_report("--no-brightness-matched")


def test_evaluates_a_synthetic_dataset_with_the_onnx_engine(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "syn", texture="grid", n_train=0, n_test_good=3, n_test_defect=2, image_size=48)
    engine = OnnxEngine(make_toy_bundle(tmp_path / "toy", image_size=32), providers=("cpu",))
    report = evaluate(engine, data, None, batch_size=4)
    assert set(report["per_defect_type"]) == {"scratch", "spot", "crack", "missing"}
    assert report["pixel"]["n_images"] == 11 and 0.0 <= report["pixel"]["auroc"] <= 1.0


def test_evaluate_does_not_import_torch() -> None:
    code = "import sys, training.evaluate; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
