"""Measure an exported bundle on labelled images: image and pixel AUROC, AUPRO, per-defect AUROC, best F1, plots.

Torch-free: the bundle runs through `service.engine.OnnxEngine` and `predict_images`, and raw scores
are combined by `service.postprocess.combine_scores` — the same path the service takes, so the
numbers describe what the line will see. Data: an MVTec category folder (`test/good`,
`test/<defect>`, optional `ground_truth/<defect>/<stem>_mask.png`) or a folder with `good/` and one
sub-folder per defect type.

Writes `report.json`, `scores.csv`, `score_histogram.png`, `roc_image.png`, `roc_pixel.png` (when
masks exist) and `examples.png` into the report folder; docs/evaluation.md explains each.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.bundle import BundleMetadata
from service.datasets import DatasetError, Sample, labelled_samples, load_mask
from service.engine import Engine, predict_images, score_files
from service.errors import AnoscopeError
from service.images import load_image_file, to_rgb_array
from service.postprocess import baselined, combine_scores, normalize, overlay, resize_map
from training import metrics
from training.metrics import DEFAULT_MAX_PIXEL_SIDE

REPORT_FILE = "report.json"
SCORES_FILE = "scores.csv"
#: Examples per row of examples.png (worst normals, best defects, worst defects).
EXAMPLES_PER_ROW = 4
#: A test set whose mean brightness alone ranks good against defective at or beyond this AUROC (or
#: 1 minus it) gets a warning: image AUROC on it may measure the lighting, not the defects.
BRIGHTNESS_WARNING = 0.9
_SCORE_KEYS = ("combined", "residual", "discrimination")


@dataclass
class ScoredSet:
    """Every test image's scores, and its anomaly map and mask at the (capped) evaluation resolution."""

    samples: list[Sample]
    residual: np.ndarray  # (N,) raw head output
    discrimination: np.ndarray  # (N,) raw head output
    combined: np.ndarray  # (N,) combine_scores(), the score AUROC and thresholds are on
    maps: list[np.ndarray]  # (h, w) float32 raw map values, long side <= max_pixel_side
    masks: list[np.ndarray]  # (h, w) bool; all False for normals
    seconds: float
    brightness: np.ndarray  # (N,) mean grey level of each image (0..255): a shortcut check
    aspect: np.ndarray  # (N,) width / height of each image as it came (the bundle's aspect baseline)

    @functools.cached_property
    def pixel_regions(self) -> metrics.RegionPixels | None:
        """The masked images' pixels as AUPRO reads them: gathered once for the report and the PRO plot."""
        return metrics.RegionPixels.of(*_masked(self, self.has_mask))

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def has_mask(self) -> np.ndarray:
        """Images whose pixel labels are known: normals (all good) and defects with a mask file."""
        return np.array([s.label == 0 or s.mask_path is not None for s in self.samples], dtype=bool)

    def scores(self, key: str) -> np.ndarray:
        return {"combined": self.combined, "residual": self.residual, "discrimination": self.discrimination}[key]


def load_samples(data: str | os.PathLike[str]) -> list[Sample]:
    """Labelled samples with at least one normal and one defective image, or a DatasetError saying why not."""
    samples = labelled_samples(data)
    n_bad = sum(s.label for s in samples)
    if n_bad == 0 or n_bad == len(samples):
        what = "defective images (a sub-folder per defect type)" if n_bad == 0 else "normal images in 'good/'"
        msg = f"{data} holds no {what}; evaluation needs both normal and defective images"
        raise DatasetError(msg)
    return samples


def score_samples(
    engine: Engine, samples: Sequence[Sample], *, batch_size: int = 16, max_pixel_side: int = DEFAULT_MAX_PIXEL_SIDE
) -> ScoredSet:
    """Run every image through the engine in batches; keep maps and masks at most `max_pixel_side` px."""
    meta = engine.metadata
    residual, discrimination, maps, masks, brightness, aspect = [], [], [], [], [], []
    start = time.perf_counter()
    for i, img, out in score_files(engine, [s.path for s in samples], batch_size=batch_size):
        size = metrics.eval_size(img.size, max_pixel_side)
        brightness.append(mean_brightness(img))
        aspect.append(img.size[0] / img.size[1])
        residual.append(out.residual_score)
        discrimination.append(out.discrimination_score)
        maps.append(resize_map(out.anomaly_map, size))
        masks.append(load_mask(samples[i].mask_path, size))
    seconds = time.perf_counter() - start
    r = np.asarray(residual, dtype=np.float64)
    d = np.asarray(discrimination, dtype=np.float64)
    combined = combine_scores(r, d, meta.score_stats, meta.score_weights, aspect)
    combined = np.asarray(combined, dtype=np.float64)
    brightness_, aspect_ = np.asarray(brightness, dtype=np.float64), np.asarray(aspect, dtype=np.float64)
    return ScoredSet(list(samples), r, d, combined, maps, masks, seconds, brightness_, aspect_)


def mean_brightness(img: Image.Image) -> float:
    """The image's mean grey level (0..255), on a thumbnail (the mean hardly depends on the size)."""
    grey = img.convert("L")
    grey.thumbnail((256, 256))
    return float(np.asarray(grey, dtype=np.float64).mean())


def brightness_shortcut(auroc: float | None) -> bool:
    """Whether brightness alone separates the classes well enough to warn (in either direction)."""
    return auroc is not None and max(auroc, 1 - auroc) >= BRIGHTNESS_WARNING


def relight(img: Image.Image, grey: float) -> Image.Image:
    """`img` with every pixel value scaled so its mean grey level (`mean_brightness`) becomes `grey`
    (values clipped to 0..255): a global gain, the lighting change a lamp makes, nothing local."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    gain = grey / max(mean_brightness(img), 1e-6)
    pixels = np.asarray(img, dtype=np.float32) * gain
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode=img.mode)


def score_brightness_matched(
    engine: Engine, samples: Sequence[Sample], grey: float, *, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual, discrimination, brightness) (N,) x3 of every sample relit to mean grey `grey` first."""
    residual, discrimination, brightness = [], [], []
    for start in range(0, len(samples), batch_size):
        images = [relight(load_image_file(s.path), grey) for s in samples[start : start + batch_size]]
        brightness += [mean_brightness(im) for im in images]
        for out in predict_images(engine, images, batch_size=batch_size):
            residual.append(out.residual_score)
            discrimination.append(out.discrimination_score)
    return tuple(np.asarray(v, dtype=np.float64) for v in (residual, discrimination, brightness))  # type: ignore[return-value]


def brightness_matched_report(engine: Engine, scored: ScoredSet, *, batch_size: int = 16) -> dict[str, Any]:
    """The image AUROCs with the lighting shortcut taken away: every test image relit (`relight`) to the
    median mean grey level of the set, then scored again. A detector that finds defects keeps its
    AUROC; one that followed the lighting difference between good and defective images falls to ~0.5."""
    grey = float(np.median(scored.brightness))
    r, d, brightness = score_brightness_matched(engine, scored.samples, grey, batch_size=batch_size)
    meta = engine.metadata
    # relighting keeps each image's size, so its aspect ratio is the one scored before
    combined = combine_scores(r, d, meta.score_stats, meta.score_weights, scored.aspect)
    combined = np.asarray(combined, dtype=np.float64)
    y = scored.labels
    return {
        "grey": round(grey, 2),
        "auroc": metrics.auroc(y, combined),
        "auroc_residual": metrics.auroc(y, baselined(r, meta.score_stats["residual"], scored.aspect)),
        "auroc_discrimination": metrics.auroc(y, baselined(d, meta.score_stats["discrimination"], scored.aspect)),
        "auroc_brightness_only": metrics.auroc(y, brightness),
    }


def _image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    f1 = metrics.best_f1(labels, scores)
    return {
        "auroc": metrics.auroc(labels, scores),
        "average_precision": metrics.average_precision(labels, scores),
        "best_f1": f1.to_dict() if f1 else None,
    }


def _masked(scored: ScoredSet, keep: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(maps, masks) of the images `keep` selects."""
    return (
        [m for m, k in zip(scored.maps, keep, strict=True) if k],
        [m for m, k in zip(scored.masks, keep, strict=True) if k],
    )


def compute_report(scored: ScoredSet, meta: BundleMetadata, *, max_pixel_side: int) -> dict[str, Any]:
    """Every metric as a JSON-ready dict (see docs/evaluation.md)."""
    y = scored.labels
    types = sorted({s.defect_type for s in scored.samples if s.label})
    image = _image_metrics(y, scored.combined)
    # each score alone as the combined score takes it: less its aspect baseline where the bundle has one
    r = baselined(scored.residual, meta.score_stats["residual"], scored.aspect)
    d = baselined(scored.discrimination, meta.score_stats["discrimination"], scored.aspect)
    image["auroc_residual"] = metrics.auroc(y, r)
    image["auroc_discrimination"] = metrics.auroc(y, d)
    # Not a detector: how well the test images' mean brightness alone ranks them (brighter = defective).
    # Near 0 or 1 it is a shortcut any score that reacts to lighting can take (MVTec AD's screw: 1.000).
    image["auroc_brightness_only"] = metrics.auroc(y, scored.brightness)
    good = y == 0
    per_defect = {}
    for t in types:
        sel = good | np.array([s.defect_type == t for s in scored.samples])
        per_defect[t] = {"n": int((sel & ~good).sum()), **_image_metrics(y[sel], scored.combined[sel])}
        per_defect[t]["auroc_residual"] = metrics.auroc(y[sel], r[sel])
        per_defect[t]["auroc_discrimination"] = metrics.auroc(y[sel], d[sel])

    pixel: dict[str, Any] | None = None
    with_mask = scored.has_mask
    n_defect_masks = int((with_mask & (y == 1)).sum())
    if n_defect_masks:
        maps, masks = _masked(scored, with_mask)
        values, labels = metrics.pool_pixels(maps, masks)
        pixel = {
            "auroc": metrics.auroc(labels, values),
            "aupro": metrics.aupro_of(scored.pixel_regions),
            "aupro_fpr_limit": metrics.PRO_FPR_LIMIT,
            "n_images": int(with_mask.sum()),
            "n_defective_images_with_masks": n_defect_masks,
            "n_defective_images_without_masks": int(((y == 1) & ~with_mask).sum()),
            "n_pixels": int(values.size),
            "anomalous_pixel_fraction": float(labels.mean()) if labels.size else None,
            "max_side": max_pixel_side,
        }
        for t in types:  # each defect type against every good image, where the type has masks
            sel = with_mask & (good | np.array([s.defect_type == t for s in scored.samples]))
            if (sel & ~good).any():
                maps, masks = _masked(scored, sel)
                per_defect[t]["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
                per_defect[t]["aupro"] = metrics.aupro(maps, masks)

    calibrated = None
    if meta.thresholds.image is not None:
        calibrated = metrics.rates_at(y, scored.combined, meta.thresholds.image)

    report = {
        "bundle": {
            "name": meta.name,
            "version": meta.version,
            "family": meta.family,
            "image_size": meta.image_size,
            "channels": meta.channels,
            "precision": meta.precision,
            "calibrated": meta.calibrated,
            "score_weights": meta.score_weights.model_dump(),
        },
        "data": {
            "n_images": len(scored.samples),
            "n_good": int(good.sum()),
            "n_defective": int((~good).sum()),
            "defect_types": {t: int(sum(s.defect_type == t for s in scored.samples)) for t in types},
        },
        "image": image,
        "per_defect_type": per_defect,
        "pixel": pixel,
        "at_calibrated_threshold": calibrated,
        "timing": {
            "seconds": round(scored.seconds, 3),
            "images_per_second": round(len(scored.samples) / scored.seconds, 2) if scored.seconds > 0 else None,
        },
    }
    return metrics.finite_or_none(report)


# ---------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout=layout)


def plot_histograms(scored: ScoredSet, report: dict[str, Any], meta: BundleMetadata, path: Path) -> None:
    fig = _figure(13, 3.6)
    axes = fig.subplots(1, 3)
    y = scored.labels
    titles = {"combined": "combined score", "residual": "residual_score", "discrimination": "discrimination_score"}
    for ax, key in zip(axes, _SCORE_KEYS, strict=True):
        s = scored.scores(key)
        bins = np.histogram_bin_edges(s, bins=30)
        ax.hist(s[y == 0], bins=bins, alpha=0.6, color="tab:blue", label=f"good ({int((y == 0).sum())})")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, color="tab:red", label=f"defective ({int((y == 1).sum())})")
        if key == "combined":
            f1 = report["image"]["best_f1"]
            if f1:
                ax.axvline(f1["threshold"], color="k", ls="--", lw=1, label="best-F1 threshold (this data)")
            if meta.thresholds.image is not None:
                ax.axvline(meta.thresholds.image, color="k", lw=1.5, label="calibrated threshold")
        ax.set_title(titles[key])
        ax.set_xlabel("score (higher = more anomalous)")
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def _roc_axes(fig: Any, title: str) -> Any:
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (good flagged)")
    ax.set_ylabel("true positive rate (defects caught)")
    ax.set_title(title)
    return ax


def plot_image_roc(scored: ScoredSet, path: Path) -> None:
    fig = _figure(5, 5)
    ax = _roc_axes(fig, "image ROC")
    for key, style in zip(_SCORE_KEYS, ("-", "--", ":"), strict=True):
        pts = metrics.roc_points(scored.labels, scored.scores(key))
        if pts is not None:
            auc = metrics.auroc(scored.labels, scored.scores(key))
            ax.plot(*pts, ls=style, lw=2 if key == "combined" else 1.2, label=f"{key} (AUROC {auc:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)


def plot_pixel_roc(scored: ScoredSet, pixel: dict[str, Any], path: Path) -> None:
    """Pixel ROC beside the PRO curve up to its false-positive limit (what AUPRO integrates); the
    areas in the legends are the report's `pixel` figures, not computed again."""
    maps, masks = _masked(scored, scored.has_mask)
    values, labels = metrics.pool_pixels(maps, masks)
    pts = metrics.roc_points(labels, values)
    fig = _figure(10, 5)
    left, right = fig.subfigures(1, 2)
    ax = _roc_axes(left, "pixel ROC")
    if pts is not None:
        ax.plot(*pts, lw=2, label=f"anomaly_map (AUROC {_fmt(pixel['auroc'])})")
        ax.legend(loc="lower right", fontsize=8)
    limit = pixel["aupro_fpr_limit"]
    ax = right.subplots()
    ax.set_xlim(0, limit)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (good pixels flagged)")
    ax.set_ylabel("per-region overlap (mean share of each defect found)")
    ax.set_title(f"PRO curve up to FPR {limit:g}")
    if (curve := metrics.pro_curve_of(scored.pixel_regions, fpr_limit=limit)) is not None:
        ax.plot(*curve, lw=2, label=f"anomaly_map (AUPRO {_fmt(pixel['aupro'])})")
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)


def pick_examples(scored: ScoredSet, k: int = EXAMPLES_PER_ROW) -> dict[str, list[int]]:
    """Indices of the highest-scoring normals, the highest- and the lowest-scoring defects."""
    y, s = scored.labels, scored.combined
    good = np.flatnonzero(y == 0)
    bad = np.flatnonzero(y == 1)
    bad_sorted = bad[np.argsort(-s[bad], kind="stable")]
    return {
        "good images scoring highest (false alarms first)": good[np.argsort(-s[good], kind="stable")][:k].tolist(),
        "defects scoring highest": bad_sorted[:k].tolist(),
        "defects scoring lowest (missed first)": bad_sorted[::-1][:k].tolist(),
    }


def plot_examples(scored: ScoredSet, meta: BundleMetadata, path: Path) -> None:
    """Heatmaps over the images, coloured as the service colours them; ground truth outlined in white."""
    rows = pick_examples(scored)
    fig = _figure(2.6 * EXAMPLES_PER_ROW, 2.9 * len(rows), layout=None)  # a fixed grid: no layout engine needed
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=0.92, wspace=0.06, hspace=0.32)
    axes = fig.subplots(len(rows), EXAMPLES_PER_ROW, squeeze=False)
    for r, (title, indices) in enumerate(rows.items()):
        for c in range(EXAMPLES_PER_ROW):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(indices):
                continue
            i = indices[c]
            amap, mask = scored.maps[i], scored.masks[i]
            h, w = amap.shape
            rgb = np.asarray(Image.fromarray(to_rgb_array(load_image_file(scored.samples[i].path))).resize((w, h)))
            ax.imshow(overlay(rgb, normalize(amap, meta.normalization.pixel)))
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"{scored.samples[i].defect_type}  score {scored.combined[i]:.2f}", fontsize=8)
        axes[r][0].text(0, 1.12, title, transform=axes[r][0].transAxes, fontsize=9, weight="bold", va="bottom")
    fig.savefig(path, dpi=100)


def write_scores_csv(scored: ScoredSet, meta: BundleMetadata, path: Path) -> None:
    normalized = normalize(scored.combined, meta.normalization.image)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["path", "defect_type", "label", "residual_score", "discrimination_score", "combined", "anomaly_score"]
        )
        for s, r, d, c, n in zip(
            scored.samples, scored.residual, scored.discrimination, scored.combined, normalized, strict=True
        ):
            w.writerow([str(s.path), s.defect_type, s.label, f"{r:.6g}", f"{d:.6g}", f"{c:.6g}", f"{n:.4f}"])


# ---------------------------------------------------------------------------------------- evaluate
def evaluate(
    engine: Engine,
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    *,
    batch_size: int = 16,
    max_pixel_side: int = DEFAULT_MAX_PIXEL_SIDE,
    samples: Sequence[Sample] | None = None,
    brightness_matched: bool | None = None,
) -> dict[str, Any]:
    """Score the labelled images in `data` with `engine`; write the report files when `out_dir` is given.

    `brightness_matched`: also score every image relit to one mean grey level (`brightness_matched_report`);
    None = only when the brightness shortcut check warns."""
    import json

    if batch_size < 1:
        msg = f"batch size must be at least 1 (got {batch_size})"
        raise ValueError(msg)
    if max_pixel_side < 8:
        msg = f"max pixel side must be at least 8 (got {max_pixel_side})"
        raise ValueError(msg)
    samples = list(samples) if samples is not None else load_samples(data)
    meta = engine.metadata
    scored = score_samples(engine, samples, batch_size=batch_size, max_pixel_side=max_pixel_side)
    report = compute_report(scored, meta, max_pixel_side=max_pixel_side)
    if brightness_matched or (
        brightness_matched is None and brightness_shortcut(report["image"]["auroc_brightness_only"])
    ):
        matched = brightness_matched_report(engine, scored, batch_size=batch_size)
        report["image"]["brightness_matched"] = metrics.finite_or_none(matched)
    report["data"]["path"] = str(data)
    report["bundle"]["provider"] = engine.provider
    if out_dir is None:
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [REPORT_FILE, SCORES_FILE, "score_histogram.png", "roc_image.png"]
    write_scores_csv(scored, meta, out / SCORES_FILE)
    plot_histograms(scored, report, meta, out / "score_histogram.png")
    plot_image_roc(scored, out / "roc_image.png")
    if report["pixel"] is not None:
        plot_pixel_roc(scored, report["pixel"], out / "roc_pixel.png")
        files.append("roc_pixel.png")
    plot_examples(scored, meta, out / "examples.png")
    files.append("examples.png")
    report["files"] = files
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / REPORT_FILE)
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(report: dict[str, Any]) -> str:
    """A few readable lines for the terminal."""
    b, d, im, px = report["bundle"], report["data"], report["image"], report["pixel"]
    lines = [
        f"bundle {b['name']} ({b['family']}, {b['image_size']} px) on {b.get('provider', '?')}: "
        f"{d['n_good']} good and {d['n_defective']} defective images ({len(d['defect_types'])} defect types)",
        f"image AUROC {_fmt(im['auroc'])}  (residual {_fmt(im['auroc_residual'])}, "
        f"discrimination {_fmt(im['auroc_discrimination'])})   average precision {_fmt(im['average_precision'])}",
    ]
    if im["best_f1"]:
        f1 = im["best_f1"]
        lines.append(
            f"best F1 {f1['f1']:.3f} at combined score >= {f1['threshold']:.4g} "
            f"(precision {f1['precision']:.3f}, recall {f1['recall']:.3f}; chosen on these labels, not a threshold)"
        )
    if px:
        lines.append(
            f"pixel AUROC {_fmt(px['auroc'])}, AUPRO (FPR <= {px['aupro_fpr_limit']:g}) {_fmt(px['aupro'])}  "
            f"({px['n_images']} images, maps at <= {px['max_side']} px)"
        )
    else:
        lines.append("pixel AUROC n/a (no ground-truth masks)")
    shortcut = im.get("auroc_brightness_only")
    if brightness_shortcut(shortcut):
        lines.append(
            f"warning: the images' mean brightness alone ranks good against defective with AUROC {shortcut:.3f}: "
            "lighting differs between the classes, so image AUROC here may measure the lighting, not the defects"
        )
    matched = im.get("brightness_matched")
    if matched:
        lines.append(
            f"with every image relit to mean grey {matched['grey']:.0f} (brightness alone then "
            f"{_fmt(matched['auroc_brightness_only'])}): image AUROC {_fmt(matched['auroc'])}  (residual "
            f"{_fmt(matched['auroc_residual'])}, discrimination {_fmt(matched['auroc_discrimination'])})"
        )
    per = ", ".join(f"{t} {_fmt(v['auroc'])}" for t, v in report["per_defect_type"].items())
    lines.append(f"image AUROC per defect type: {per}")
    if pro := [f"{t} {_fmt(v['aupro'])}" for t, v in report["per_defect_type"].items() if "aupro" in v]:
        lines.append(f"AUPRO per defect type: {', '.join(pro)}")
    cal = report.get("at_calibrated_threshold")
    if cal:
        lines.append(
            f"at the calibrated threshold {cal['threshold']:.4g}: recall {_fmt(cal['recall'])}, "
            f"false positive rate {_fmt(cal['false_positive_rate'])}"
        )
    t = report["timing"]
    lines.append(f"scored in {t['seconds']:.1f} s ({t['images_per_second']} images/s, incl. decoding)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- command
def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure a bundle on labelled images: image AUROC (combined, residual and discrimination scores), "
        "per-defect-type AUROC, average precision, best F1, and pixel AUROC and AUPRO where ground-truth masks exist. "
        "Writes report.json, scores.csv and PNG plots (see docs/evaluation.md)."
    )
    parser.epilog = "example: anoscope evaluate --bundle bundles/fabric --data data/fabric --out reports/fabric"
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder (model.onnx + model.json)")
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="MVTec category folder (test/good, test/<defect>, ground_truth/) or a folder with good/ + defect folders",
    )
    parser.add_argument("--out", required=True, type=Path, help="report folder to write (created if missing)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per inference batch")
    parser.add_argument(
        "--max-pixel-side",
        type=int,
        default=DEFAULT_MAX_PIXEL_SIDE,
        help="pixel AUROC compares maps and masks resized to at most this many pixels on the long side",
    )
    parser.add_argument(
        "--providers", default="cuda,cpu", help="ONNX Runtime providers in order of preference (falls back to cpu)"
    )
    parser.add_argument(
        "--brightness-matched",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,  # unset = automatic; SUPPRESS keeps "(default: None)" out of the help
        help="also score every image relit to one mean grey level, so lighting cannot separate good from "
        "defective (default: only when mean brightness alone separates them with AUROC >= 0.9 or <= 0.1)",
    )


def main(args: argparse.Namespace) -> int:
    from service.engine import OnnxEngine

    if args.batch_size < 1 or args.max_pixel_side < 8:
        print("anoscope evaluate: error: --batch-size must be >= 1 and --max-pixel-side >= 8", file=sys.stderr)
        return 2
    try:
        samples = load_samples(args.data)
        engine = OnnxEngine(args.bundle, providers=[p for p in args.providers.split(",") if p.strip()])
        report = evaluate(
            engine,
            args.data,
            args.out,
            batch_size=args.batch_size,
            max_pixel_side=args.max_pixel_side,
            samples=samples,
            brightness_matched=getattr(args, "brightness_matched", None),
        )
    except (AnoscopeError, ValueError) as exc:
        print(f"anoscope evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(report))
    print(f"report: {args.out / REPORT_FILE} (+ {', '.join(f for f in report['files'] if f != REPORT_FILE)})")
    return 0
