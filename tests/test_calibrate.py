"""`anoscope calibrate`: the threshold maths on known distributions, and the command on the toy bundle.

The toy bundle's map is relu(mean of the normalised channels), so pixels brighter than mid-grey score.
`normal_image` is a texture that sometimes reaches mid-grey; `defect_image` adds a bright square. The
bundle here weights both raw scores (0.5 residual + 1.0 discrimination), which makes combined scores
practically continuous and checks that calibrate combines them as the bundle says.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from anoscope import cli
from service import calibration as cal
from service.bundle import ScoreWeights, read_metadata, read_onnx_metadata, write_metadata
from service.postprocess import combine_scores, normalize
from tests.toy_bundle import make_toy_bundle, toy_image

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


# ------------------------------------------------------------------------------------------- factories


def normal_image(seed: int) -> np.ndarray:
    """A good part: grey texture whose brightest pixels just reach the toy model's mid-grey alarm level."""
    return np.random.default_rng(seed).integers(40, 150, (SIZE, SIZE, 3), dtype=np.uint8)


def defect_image(seed: int) -> np.ndarray:
    """A good part with a bright square of random size, brightness and place."""
    rng = np.random.default_rng(seed)
    img = normal_image(seed)
    side = int(rng.integers(3, 7))
    y, x = rng.integers(0, SIZE - side, 2)
    img[y : y + side, x : x + side] = rng.integers(170, 256)
    return img


def defect_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    side = int(rng.integers(3, 7))
    y, x = rng.integers(0, SIZE - side, 2)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y : y + side, x : x + side] = 255
    return mask


def write_images(folder: Path, make, seeds, prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        Image.fromarray(make(seed)).save(folder / f"{prefix}{seed:05d}.png")
    return folder


def make_bundle(directory: Path) -> Path:
    make_toy_bundle(directory, image_size=SIZE)
    meta = read_metadata(directory)
    write_metadata(directory, meta.model_copy(update={"score_weights": ScoreWeights(residual=0.5, discrimination=1.0)}))
    return directory


def digest(directory: Path) -> dict[str, str]:
    """Every file in the bundle folder by content hash (also catches stray temporary files)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("line")
    return {
        "normals": write_images(root / "normals", normal_image, range(250), "n"),
        "few": write_images(root / "few", normal_image, range(30), "n"),
        "defects": write_images(root / "defects" / "bright", defect_image, range(1000, 1030), "d").parent,
        "masks": write_images(root / "masks" / "bright", defect_mask, range(1000, 1030), "d").parent,
    }


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default report folder lands in the working directory


def calibrate(*args: str | Path) -> int:
    return cli.main(["calibrate", "--providers", "cpu", *map(str, args)])


def engine_scores(bundle: Path, images: list[np.ndarray], aspect: list[float] | None = None) -> np.ndarray:
    """Combined scores through the service's own path, computed independently of the command."""
    from service.engine import OnnxEngine, predict_images

    engine = OnnxEngine(bundle, providers=["cpu"])
    out = predict_images(engine, [Image.fromarray(im) for im in images], batch_size=64)
    meta = engine.metadata
    return combine_scores(
        np.array([o.residual_score for o in out]),
        np.array([o.discrimination_score for o in out]),
        meta.score_stats,
        meta.score_weights,
        aspect,
    )


# ----------------------------------------------------------------------------------------- pure maths


def test_target_fpr_threshold_is_the_kth_highest_normal_score():
    scores = np.random.default_rng(0).permutation(999).astype(float)  # 0..998
    choice = cal.threshold_target_fpr(scores, 0.01)  # k = floor(0.01 * (999 + 1)) = 10, not floor(9.99)
    assert choice.threshold == 989.0
    assert int((scores >= choice.threshold).sum()) == 10
    assert not choice.fallback and not choice.warnings


@pytest.mark.parametrize(
    ("dist", "quantile"),
    [(stats.norm(), 0.95), (stats.expon(), 0.99), (stats.lognorm(1.0), 0.995)],
)
def test_target_fpr_on_a_known_distribution_lands_on_its_quantile(dist, quantile):
    scores = dist.rvs(size=200_000, random_state=1)
    t = cal.threshold_target_fpr(scores, 1 - quantile).threshold
    # The empirical quantile's standard error is sqrt(p(1-p)/n)/pdf; 5 of them is a safe band.
    se = np.sqrt(quantile * (1 - quantile) / scores.size) / dist.pdf(dist.ppf(quantile))
    assert abs(t - dist.ppf(quantile)) < 5 * se


@pytest.mark.parametrize("dist", [stats.norm(), stats.expon(), stats.t(3)])
def test_false_alarm_rate_on_fresh_normals_matches_the_target(dist):
    """Calibrate on 2000 normals, measure on 20000 fresh ones, 100 times.

    For one calibration the fresh false-alarm rate is Beta(k, n + 1 - k) with mean k/(n + 1) = 0.04998
    and sd sqrt(0.05 * 0.95 / 2002) = 0.0049, plus 0.0015 of sampling noise from 20000 fresh scores: sd
    0.0051 per run, 0.00051 for the mean of 100 runs. The mean must sit within 4 of those (0.002) of
    the target, and a single run within 4 sd (0.021).
    """
    rng = np.random.default_rng(2)
    rates = []
    for _ in range(100):
        t = cal.threshold_target_fpr(dist.rvs(size=2000, random_state=rng), 0.05).threshold
        rates.append(float((dist.rvs(size=20_000, random_state=rng) >= t).mean()))
    assert abs(np.mean(rates) - 0.05) < 0.002
    assert max(abs(r - 0.05) for r in rates) < 0.021


def test_minimum_normals_follow_the_order_statistic_rule():
    assert cal.min_normals_for_fpr(0.005) == 199
    assert cal.min_normals_for_fpr(0.05) == 19
    assert cal.min_normals_for_fpr(0.001) == 999
    scores = np.arange(199.0)
    choice = cal.threshold_target_fpr(scores, 0.005)  # k = floor(0.005 * 200) = 1
    assert choice.threshold == 198.0 and not choice.fallback and not choice.warnings
    with pytest.raises(cal.CalibrationError, match="needs at least 199 normal images.*only 198"):
        cal.threshold_target_fpr(scores[:198], 0.005)


def test_too_few_normals_fall_back_to_the_max_only_when_allowed_and_say_so():
    scores = np.random.default_rng(3).normal(size=50)
    with pytest.raises(cal.CalibrationError, match="--allow-fallback"):
        cal.threshold_target_fpr(scores, 0.005)
    choice = cal.threshold_target_fpr(scores, 0.005, allow_fallback=True)
    assert choice.fallback
    assert choice.threshold == scores.max()
    assert "NOT 0.50%" in choice.warnings[0]
    assert "1/(n + 1) = 1.96%" in choice.warnings[0]


def test_ties_never_flag_more_than_the_rate_allows():
    scores = np.r_[np.zeros(990), np.ones(10)]  # k = floor(0.05 * 1001) = 50 falls inside the tie at 0
    t = cal.threshold_target_fpr(scores, 0.05).threshold
    assert 0.0 < t <= 1.0
    assert int((scores >= t).sum()) == 10
    constant = np.full(300, 2.5)
    t = cal.threshold_target_fpr(constant, 0.01).threshold
    assert t > 2.5 and not (constant >= t).any()


def test_target_recall_is_the_kth_highest_defect_score():
    defects = np.random.default_rng(4).permutation(np.arange(1.0, 101.0))  # 1..100
    choice = cal.threshold_target_recall(defects, 0.9)  # k = ceil(0.9 * 101) = 91
    assert choice.threshold == 10.0
    assert int((defects >= choice.threshold).sum()) == 91
    assert cal.min_defects_for_recall(0.99) == 99
    with pytest.raises(cal.CalibrationError, match="needs at least 99 defective images"):
        cal.threshold_target_recall(defects[:50], 0.99)
    fallback = cal.threshold_target_recall(defects[:50], 0.99, allow_fallback=True)
    assert fallback.fallback and fallback.threshold == defects[:50].min()


def test_f1_threshold_separates_separable_scores_and_prefers_fewer_alarms():
    normal, defect = np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0])
    choice = cal.threshold_f1(normal, defect)
    assert choice.threshold == 5.0
    scores, labels = np.array([3.0, 2.0, 1.5, 1.0, 0.0]), np.array([1, 0, 0, 1, 0], bool)
    t, f1 = cal.best_f1_threshold(scores, labels)
    assert (t, f1) == (3.0, pytest.approx(2 / 3))  # cutting at 1.0 also gives 2/3 but flags two normals


def test_percentile_and_manual():
    scores = np.random.default_rng(5).normal(size=1000)
    assert cal.threshold_percentile(scores, 99.5).threshold == np.percentile(scores, 99.5)
    assert cal.threshold_percentile(scores, 99.99).warnings  # beyond what 1000 images can show
    for bad in (0, 100, 150, float("nan")):
        with pytest.raises(cal.CalibrationError, match="--percentile"):
            cal.threshold_percentile(scores, bad)
    assert cal.threshold_manual(1.25).threshold == 1.25


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rates_outside_the_unit_interval_are_refused(rate):
    with pytest.raises(cal.CalibrationError, match="strictly between 0 and 1"):
        cal.threshold_target_fpr(np.arange(1000.0), rate)


def test_clopper_pearson_matches_closed_forms():
    lo, hi = cal.clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = cal.clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    lo, hi = cal.clopper_pearson(5, 10)
    assert lo == pytest.approx(1 - hi) and (round(lo, 3), round(hi, 3)) == (0.187, 0.813)


def test_region_rate_and_pixel_quantile():
    maxima = np.arange(1.0, 401.0)  # k = floor(0.01 * 401) = 4 -> the 4th highest
    assert cal.pixel_threshold_region_rate(maxima, 0.01).threshold == 397.0
    few = cal.pixel_threshold_region_rate(maxima[:50], 0.005)
    assert few.threshold == 50.0 and few.warnings
    pixels = np.random.default_rng(6).random(100_000)
    t = cal.pixel_threshold_quantile(pixels, 0.001).threshold
    assert int((pixels >= t).sum()) == 100  # floor(0.001 * 100001)


# -------------------------------------------------------------------------------------- the command


def test_end_to_end_writes_thresholds_normalisation_report_and_plot(bundle, data, tmp_path, capsys):
    report_dir = tmp_path / "report"
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--defects", data["defects"],
                     "--target-fpr", "0.02", "--report-dir", report_dir) == 0  # fmt: skip
    out = capsys.readouterr().out
    meta = read_metadata(bundle)

    normals = engine_scores(bundle, [normal_image(s) for s in range(250)])
    expected = cal.threshold_target_fpr(normals, 0.02).threshold  # k = floor(0.02 * 251) = 5
    assert meta.thresholds.image == expected  # same engine path, same number
    assert int((normals >= expected).sum()) == 5
    assert meta.normalization.image.threshold == expected
    assert float(normalize(expected, meta.normalization.image)) == 0.5
    assert float(normalize(meta.thresholds.pixel, meta.normalization.pixel)) == 0.5
    assert meta.normalization.image.source.startswith("calibration: target-fpr 0.02")
    assert meta.calibration is not None and meta.calibration.strategy.startswith("target-fpr 0.02")
    assert meta.calibration.data["normal_images"] == 250 and meta.calibration.data["defective_images"] == 30
    report = meta.calibration.report
    assert report["false_alarms"]["count"] == 5 and report["false_alarms"]["of"] == 250
    lo, hi = report["false_alarms"]["ci"]
    assert lo < 0.02 < hi
    assert report["recall"]["of"] == 30 and 0.5 < report["auroc"] <= 1.0
    assert read_onnx_metadata(bundle / "model.onnx") == meta  # the mirror follows model.json

    for text in ("image threshold", "false alarms      5 of 250", "Clopper-Pearson", "AUROC", "recall", "reload"):
        assert text in out
    assert json.loads((report_dir / "report.json").read_text())["image_threshold"] == expected
    assert (report_dir / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in bundle.iterdir()} == {"model.onnx", "model.json"}  # nothing else in the bundle


def test_false_alarm_rate_on_fresh_images_is_close_to_the_target(bundle, tmp_path):
    """Calibrate on 1000 good images at 5 %, then count alarms on 3000 fresh ones.

    The fresh rate has mean k/(n + 1) = 50/1001 and sd sqrt(0.05 * 0.95 / 1002 + 0.05 * 0.95 / 3000) =
    0.0079 (calibration draw + fresh sampling): a band of 3 sd, 0.024, around 5 %.
    """
    normals = write_images(tmp_path / "many", normal_image, range(1000), "n")
    assert calibrate("--bundle", bundle, "--normals", normals, "--target-fpr", "0.05", "--no-plots") == 0
    threshold = read_metadata(bundle).thresholds.image
    fresh = engine_scores(bundle, [normal_image(s) for s in range(100_000, 103_000)])
    assert abs(float((fresh >= threshold).mean()) - 0.05) < 0.024


def test_calibration_takes_the_bundles_aspect_baseline_off_each_image(bundle, tmp_path):
    """A bundle with an aspect baseline is calibrated on its scores as the service computes them: the
    threshold is the k-th highest of the baselined scores of normals photographed in two shapes."""
    meta = read_metadata(bundle)
    stats = {**meta.score_stats, "residual": meta.score_stats["residual"].model_copy(update={"aspect_slope": 0.5})}
    write_metadata(bundle, meta.model_copy(update={"score_stats": stats}))
    images = [normal_image(s) for s in range(200)]
    images = [np.concatenate([im, im], axis=1) if i % 2 else im for i, im in enumerate(images)]  # every other: wide
    normals = tmp_path / "mixed"
    normals.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(normals / f"n{i:03d}.png")
    assert calibrate("--bundle", bundle, "--normals", normals, "--target-fpr", "0.05", "--no-plots") == 0
    aspect = [im.shape[1] / im.shape[0] for im in images]
    expected = cal.threshold_target_fpr(engine_scores(bundle, images, aspect), 0.05).threshold
    assert read_metadata(bundle).thresholds.image == pytest.approx(expected)


def test_history_keeps_every_previous_calibration(bundle, data):
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--target-fpr", "0.01", "--no-plots") == 0
    first = read_metadata(bundle).calibration
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--percentile", "98", "--no-plots") == 0
    meta = read_metadata(bundle)
    assert meta.calibration.strategy.startswith("percentile 98")
    assert meta.calibration_history == [first]
    assert first.date and first.data["normals"] == str(data["normals"].resolve())
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--threshold", "1.5", "--no-plots") == 0
    meta = read_metadata(bundle)
    assert meta.thresholds.image == 1.5 and meta.calibration.strategy.startswith("manual")
    assert [c.strategy.split(";")[0] for c in meta.calibration_history] == ["target-fpr 0.01", "percentile 98"]
    assert read_onnx_metadata(bundle / "model.onnx").calibration_history == meta.calibration_history


def test_dry_run_writes_nothing(bundle, data, tmp_path, capsys):
    before = digest(bundle)
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--target-fpr", "0.01", "--dry-run") == 0
    assert digest(bundle) == before
    assert not (tmp_path / "calibration").exists()  # no default report folder either
    out = capsys.readouterr().out
    assert "image threshold" in out and "not changed" in out


def test_default_report_folder_is_in_the_working_directory(bundle, data, tmp_path):
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--target-fpr", "0.01") == 0
    (run,) = (tmp_path / "calibration").iterdir()
    assert run.name.startswith("toy-") and {p.name for p in run.iterdir()} == {"calibration.png", "report.json"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--target-recall", "0.9"], "--target-recall 0.9: the"),
        (["--strategy", "f1"], "f1: the score maximising image F1"),
        (["--percentile", "99"], "percentile 99: the 99th percentile"),
        (["--threshold", "3.0"], "manual: set by hand to 3"),
    ],
)
def test_strategies_with_defects_and_masks(bundle, data, args, fragment, capsys):
    code = calibrate("--bundle", bundle, "--normals", data["normals"], "--defects", data["defects"],
                     "--masks", data["masks"], "--no-plots", *args)  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert fragment.split(": ")[1] in out
    meta = read_metadata(bundle)
    assert meta.calibration.data["masked_images"] == 30
    assert "pixel pixel-f1 (masks)" in meta.calibration.strategy  # masks given: the pixel threshold is F1's
    assert "pixel F1" in out
    if args[0] == "--target-recall":  # 30 defects support a recall of 0.9: k = ceil(0.9 * 31) = 28
        assert meta.calibration.report["recall"]["count"] >= 28


def test_too_few_normals_refuse_and_fall_back_with_a_warning(bundle, data, capsys):
    before = digest(bundle)
    assert calibrate("--bundle", bundle, "--normals", data["few"]) == 2  # default target 0.005 needs 199
    err = capsys.readouterr().err
    assert "needs at least 199 normal images" in err and "only 30" in err
    assert digest(bundle) == before
    assert calibrate("--bundle", bundle, "--normals", data["few"], "--allow-fallback", "--no-plots") == 0
    err = capsys.readouterr().err
    assert "warning: only 30 normal images" in err
    meta = read_metadata(bundle)
    assert "fallback" in meta.calibration.strategy
    assert meta.thresholds.image == engine_scores(bundle, [normal_image(s) for s in range(30)]).max()


@pytest.mark.parametrize(
    ("args", "strategy"),
    [([], "pixel region-fpr 0.01"), (["--region-fpr", "0.02"], "pixel region-fpr 0.02"),
     (["--pixel-fpr", "0.001"], "pixel pixel-fpr 0.001"), (["--pixel-threshold", "0.4"], "pixel manual")],
)  # fmt: skip
def test_pixel_threshold_options_without_masks(bundle, data, args, strategy):
    assert calibrate("--bundle", bundle, "--normals", data["normals"], "--target-fpr", "0.01", "--no-plots", *args) == 0
    meta = read_metadata(bundle)
    assert meta.calibration.strategy.endswith(strategy)
    report = meta.calibration.report
    if not args or args[0] == "--region-fpr":  # k-th highest of 250 map maxima: at most k good parts show regions
        rate = 0.01 if not args else 0.02
        assert report["normal_images_with_regions"]["count"] <= int(rate * 251)
    elif args[0] == "--pixel-fpr":
        assert report["normal_pixel_rate"] <= 0.001
    else:
        assert meta.thresholds.pixel == 0.4


def test_identical_normal_scores_put_the_threshold_above_them(bundle, tmp_path):
    """toy_image's good parts are all below mid-grey: every map is 0, every score the same."""
    normals = write_images(tmp_path / "flat", lambda s: toy_image(SIZE, defect=False, seed=s), range(250), "n")
    defects = write_images(tmp_path / "bright", lambda s: toy_image(SIZE, defect=True, seed=s), range(20), "d")
    assert calibrate("--bundle", bundle, "--normals", normals, "--defects", defects, "--no-plots") == 0
    meta = read_metadata(bundle)
    assert meta.calibration.report["false_alarms"]["count"] == 0
    assert meta.calibration.report["recall"]["count"] == 20
    assert meta.thresholds.pixel > 0.0  # regions never cover a whole good part


def test_mvtec_root_uses_test_good_never_train_good(bundle, tmp_path):
    root = tmp_path / "mvtec"
    write_images(root / "train" / "good", normal_image, range(5000, 5040), "t")
    write_images(root / "test" / "good", normal_image, range(300), "n")
    write_images(root / "test" / "bright", defect_image, range(1000, 1010), "d")
    write_images(root / "ground_truth" / "bright", defect_mask, range(1000, 1010), "d")
    for p in (root / "ground_truth" / "bright").iterdir():
        p.rename(p.with_name(p.stem + "_mask.png"))
    assert calibrate("--bundle", bundle, "--normals", root, "--strategy", "f1", "--no-plots") == 0
    data = read_metadata(bundle).calibration.data
    assert data["normals"] == str((root / "test" / "good").resolve()) and data["normal_images"] == 300
    assert data["defective_images"] == 10 and data["masked_images"] == 10


def test_refuses_the_images_the_bundle_was_trained_on(bundle, data, capsys):
    meta = read_metadata(bundle)
    write_metadata(bundle, meta.model_copy(update={"provenance": {"train_data": str(data["normals"])}}))
    before = digest(bundle)
    assert calibrate("--bundle", bundle, "--normals", data["normals"]) == 2
    assert "was trained on" in capsys.readouterr().err
    assert digest(bundle) == before


def _broken_image_folder(tmp_path: Path, data: dict[str, Path]) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    for p in sorted(data["normals"].iterdir())[:220]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "n99999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("empty folder", "holds no image files"),
        ("missing folder", "is not a directory"),
        ("rate zero", "strictly between 0 and 1"),
        ("rate above one", "strictly between 0 and 1"),
        ("unreadable image", "n99999.png"),
        ("recall without defects", "needs defective images"),
        ("two strategies", "choose one strategy"),
        ("empty defect folder", "holds no defective images"),
        ("unreadable mask", "mask"),
        ("report inside the bundle", "inside the bundle"),
        ("bad pixel rate", "--pixel-fpr must be a rate"),
    ],
)
def test_failed_runs_leave_the_bundle_byte_identical(bundle, data, tmp_path, case, fragment, capsys):
    normals: Path | str = data["normals"]
    extra: list[str | Path] = []
    if case == "empty folder":
        normals = tmp_path / "empty"
        normals.mkdir()
    elif case == "missing folder":
        normals = tmp_path / "nowhere"
    elif case == "rate zero":
        extra = ["--target-fpr", "0"]
    elif case == "rate above one":
        extra = ["--target-fpr", "1.5"]
    elif case == "unreadable image":
        normals = _broken_image_folder(tmp_path, data)
    elif case == "recall without defects":
        extra = ["--target-recall", "0.9"]
    elif case == "two strategies":
        extra = ["--target-fpr", "0.01", "--percentile", "99"]
    elif case == "empty defect folder":
        (tmp_path / "nodefects").mkdir()
        extra = ["--defects", tmp_path / "nodefects"]
    elif case == "unreadable mask":
        masks = write_images(tmp_path / "masks" / "bright", defect_mask, range(1000, 1030), "d").parent
        (masks / "bright" / "d01007.png").write_bytes(b"not a png")
        fragment = f"mask {masks / 'bright' / 'd01007.png'} could not be read"
        extra = ["--defects", data["defects"], "--masks", masks, "--strategy", "f1"]
    elif case == "report inside the bundle":
        extra = ["--target-fpr", "0.01", "--report-dir", bundle / "plots"]
    elif case == "bad pixel rate":
        extra = ["--target-fpr", "0.01", "--pixel-fpr", "2"]
    before = digest(bundle)
    assert calibrate("--bundle", bundle, "--normals", normals, *extra) == 2
    err = capsys.readouterr().err
    assert fragment in err and "the bundle was not changed" in err
    assert digest(bundle) == before
    assert not (bundle / "plots").exists()
    assert not (tmp_path / "calibration").exists()


@pytest.mark.parametrize("broken", ["no model.json", "not json", "garbage onnx"])
def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path, data, broken, capsys):
    folder = make_bundle(tmp_path / "notabundle")
    if broken == "no model.json":
        (folder / "model.json").unlink()
    elif broken == "not json":
        (folder / "model.json").write_text("{nope")
    else:
        (folder / "model.onnx").write_bytes(b"not a model")
    before = digest(folder)
    assert calibrate("--bundle", folder, "--normals", data["normals"], "--target-fpr", "0.01") == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(folder) in err
    assert digest(folder) == before


BLOCK_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "models", "training"}:
            raise ImportError(f"{name} is not installed in this environment (blocked by test_calibrate)")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


@pytest.mark.slow
def test_calibrate_runs_without_torch(bundle, data, tmp_path):
    hook = tmp_path / "notorch"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by test_calibrate" in probe.stderr  # the hook is active
    cmd = [sys.executable, "-m", "anoscope", "calibrate", "--providers", "cpu", "--bundle", str(bundle),
           "--normals", str(data["normals"]), "--defects", str(data["defects"]), "--target-fpr", "0.01"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "image threshold" in result.stdout
    assert read_metadata(bundle).calibrated


def _png(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_a_running_service_reports_the_new_threshold_after_reload(tmp_path, data):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from service.app.main import create_app
    from service.settings import Settings

    bundle = make_bundle(tmp_path / "models" / "toy")
    settings = Settings(model_dir=tmp_path / "models", default_model="toy", providers=("cpu",), max_batch_wait_ms=0)
    defect, good = defect_image(1000), normal_image(0)
    with TestClient(create_app(settings)) as client:
        before = client.get("/v1/models/toy").json()
        assert before["calibrated"] is False and before["thresholds"]["image"] is None
        files = [("files", ("defect.png", _png(defect), "image/png")), ("files", ("good.png", _png(good), "image/png"))]
        assert [r["is_anomalous"] for r in client.post("/v1/predict", files=files).json()["results"]] == [None, None]

        assert calibrate("--bundle", bundle, "--normals", data["normals"], "--target-fpr", "0.01", "--no-plots") == 0
        threshold = read_metadata(bundle).thresholds.image
        assert client.get("/v1/models/toy").json()["thresholds"]["image"] is None  # still the loaded version

        reloaded = client.post("/v1/models/toy/reload")
        assert reloaded.status_code == 200, reloaded.text
        model = reloaded.json()["model"]
        assert model["calibrated"] is True and model["thresholds"]["image"] == threshold
        assert model["metadata"]["calibration"]["strategy"].startswith("target-fpr 0.01")
        results = client.post("/v1/predict", files=files).json()["results"]
        scores = engine_scores(bundle, [defect, good])
        assert [r["threshold"] for r in results] == [threshold, threshold]
        assert [r["is_anomalous"] for r in results] == [bool(s >= threshold) for s in scores] == [True, False]
        assert results[0]["anomaly_score"] > 0.5 > results[1]["anomaly_score"]
