"""Set a bundle's alarm thresholds from images of good (and optionally defective) parts.

`anoscope calibrate` scores the images through the service's own path (`OnnxEngine`,
`predict_images`, `combine_scores`), so a threshold chosen here means the same thing on the line.
It writes the thresholds and the normalisation that maps them to 0.5 into the bundle (atomically,
keeping the previous calibration in the history), prints a report and draws score histograms and a
ROC curve. Torch-free: it runs on the factory box. Workflow and strategies: docs/calibration.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import calibration as cal
from service.bundle import (
    METADATA_FILE,
    BundleMetadata,
    Calibration,
    Thresholds,
    read_metadata,
    utc_now,
    write_metadata,
)
from service.datasets import GOOD, IMAGE_EXTENSIONS, DatasetError, Sample, is_mvtec_root, list_images, load_mask
from service.datasets import normal_folder as training_folder_of
from service.errors import AnoscopeError, InvalidImageError

STRATEGIES = ("fpr", "recall", "f1", "percentile", "manual")
DEFAULT_REPORT_ROOT = Path("calibration")
PLOT_FILE = "calibration.png"
REPORT_FILE = "report.json"
MAX_NAMED_FAILURES = 10


# ---------------------------------------------------------------------------------------------- options


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Strategies (pick one; default --target-fpr 0.005):\n"
        "  --target-fpr R      at most R of good parts flagged (needs >= ceil(1/R)-1 normal images)\n"
        "  --target-recall R   catch R of the given defects (needs >= R/(1-R) defective images)\n"
        "  --strategy f1       best image F1 on the given normals + defects\n"
        "  --percentile P      the P-th percentile of normal scores\n"
        "  --threshold T       a combined-score threshold set by hand\n"
        "Example: anoscope calibrate --bundle models/bottle --normals line/good --target-fpr 0.005\n"
        "Then reload a running service: curl -X POST http://127.0.0.1:8000/v1/models/NAME/reload"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    data = parser.add_argument_group("data")
    data.add_argument("--bundle", required=True, type=Path, help="bundle folder (model.onnx + model.json) to calibrate")
    data.add_argument(
        "--normals",
        required=True,
        type=Path,
        help="folder of good-part images the model did not train on; an MVTec category root uses test/good "
        "(never train/good), plus test/<defect> as defects and ground_truth/ as masks",
    )
    data.add_argument(
        "--defects",
        type=Path,
        help="defective images: a folder of images, of defect-type sub-folders, or an MVTec root",
    )
    data.add_argument(
        "--masks",
        type=Path,
        help="defect masks: <masks>/[<type>/]<stem>_mask.png (255 = defect); sets the pixel threshold",
    )

    strategy = parser.add_argument_group("image threshold strategy")
    strategy.add_argument("--strategy", choices=STRATEGIES, help="how to choose it; implied by the options below")
    strategy.add_argument(
        "--target-fpr",
        type=float,
        metavar="R",
        help=f"expected false-alarm rate on good parts (default {cal.DEFAULT_TARGET_FPR} = 1 in 200)",
    )
    strategy.add_argument(
        "--target-recall",
        type=float,
        metavar="R",
        help=f"share of defects to catch (default {cal.DEFAULT_TARGET_RECALL})",
    )
    strategy.add_argument("--percentile", type=float, metavar="P", help="percentile of normal scores, 0 < P < 100")
    strategy.add_argument("--threshold", type=float, metavar="T", help="combined-score threshold set by hand")
    strategy.add_argument(
        "--allow-fallback",
        action="store_true",
        help="with too few images for the asked rate, use the highest normal (lowest defect) score and warn, "
        "instead of refusing",
    )

    pixel = parser.add_argument_group(
        "pixel threshold (heatmap regions)",
        "default: best pixel F1 against --masks when given; otherwise --region-fpr at the image target rate",
    ).add_mutually_exclusive_group()
    pixel.add_argument(
        "--region-fpr",
        type=float,
        metavar="R",
        help="share of good parts allowed to show any region: the k-th highest per-image map maximum of the "
        "normals (default: the --target-fpr value, else 0.005)",
    )
    pixel.add_argument(
        "--pixel-fpr", type=float, metavar="R", help="share of all normal pixels allowed at or above it (e.g. 0.001)"
    )
    pixel.add_argument("--pixel-threshold", type=float, metavar="T", help="anomaly-map threshold set by hand")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--report-dir",
        type=Path,
        help=f"folder for {PLOT_FILE} and {REPORT_FILE} (default ./{DEFAULT_REPORT_ROOT}/<model>-<UTC time>/; "
        "never inside the bundle)",
    )
    out.add_argument("--no-plots", action="store_true", help=f"skip {PLOT_FILE}")
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="print the report and change nothing: the bundle is not written, and no report files unless "
        "--report-dir is given",
    )
    out.add_argument("--confidence", type=float, default=cal.DEFAULT_CONFIDENCE, help="confidence level of intervals")
    out.add_argument("--service-url", default="http://127.0.0.1:8000", help="printed in the reload hint")

    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=16, help="images per inference batch")
    run.add_argument("--providers", default="cuda,cpu", help="ONNX Runtime providers in order of preference")
    run.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


@dataclass(frozen=True)
class Strategy:
    name: str  # one of STRATEGIES
    value: float | None


def resolve_strategy(args: argparse.Namespace, has_defects: bool) -> Strategy:
    """The strategy the options ask for, validated before anything is read or written."""
    given = [
        (name, value)
        for name, value in (
            ("fpr", args.target_fpr),
            ("recall", args.target_recall),
            ("percentile", args.percentile),
            ("manual", args.threshold),
        )
        if value is not None
    ]
    flags = {"fpr": "--target-fpr", "recall": "--target-recall", "percentile": "--percentile", "manual": "--threshold"}
    if len(given) > 1:
        msg = f"choose one strategy; got {' and '.join(flags[n] for n, _ in given)}"
        raise cal.CalibrationError(msg)
    if args.strategy and given and given[0][0] != args.strategy:
        msg = f"--strategy {args.strategy} contradicts {flags[given[0][0]]}; give one of them"
        raise cal.CalibrationError(msg)
    name = args.strategy or (given[0][0] if given else "fpr")
    value = given[0][1] if given else None
    if name == "fpr":
        value = cal.check_rate("--target-fpr", cal.DEFAULT_TARGET_FPR if value is None else value)
    elif name == "recall":
        value = cal.check_rate("--target-recall", cal.DEFAULT_TARGET_RECALL if value is None else value)
    elif name == "percentile":
        if value is None:
            msg = "--strategy percentile needs --percentile P (e.g. 99.5)"
            raise cal.CalibrationError(msg)
        if not 0.0 < value < 100.0:
            msg = f"--percentile must be strictly between 0 and 100 (e.g. 99.5); got {value:g}"
            raise cal.CalibrationError(msg)
    elif name == "manual":
        if value is None:
            msg = "--strategy manual needs --threshold T (a combined score)"
            raise cal.CalibrationError(msg)
        cal.threshold_manual(value)
    if name in ("recall", "f1") and not has_defects:
        what = "--target-recall" if name == "recall" else "--strategy f1"
        msg = f"{what} needs defective images: pass --defects DIR, or an MVTec category root as --normals"
        raise cal.CalibrationError(msg)
    return Strategy(name, value)


def _check_options(args: argparse.Namespace) -> None:
    if args.pixel_fpr is not None:
        cal.check_rate("--pixel-fpr", args.pixel_fpr)
    if args.region_fpr is not None:
        cal.check_rate("--region-fpr", args.region_fpr)
    if args.pixel_threshold is not None and not np.isfinite(args.pixel_threshold):
        msg = f"--pixel-threshold must be a finite number; got {args.pixel_threshold!r}"
        raise cal.CalibrationError(msg)
    if not 0.0 < args.confidence < 1.0:
        msg = f"--confidence must be strictly between 0 and 1 (e.g. 0.95); got {args.confidence!r}"
        raise cal.CalibrationError(msg)
    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1; got {args.batch_size}"
        raise cal.CalibrationError(msg)


# ------------------------------------------------------------------------------------------------- data


@dataclass
class DataPlan:
    normals_dir: Path
    normals: list[Path]
    defects_dir: Path | None = None
    defects: list[Sample] = field(default_factory=list)
    masks_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def masked(self) -> int:
        return sum(s.mask_path is not None for s in self.defects)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _defect_samples(root: Path) -> list[Sample]:
    """Defective images from an MVTec root (test/<defect>), a folder of type folders, or a flat folder."""
    if not root.is_dir():
        msg = f"defect folder {root} is not a directory; point at a folder of defective images"
        raise DatasetError(msg)
    base = root / "test" if is_mvtec_root(root) else root
    groups = sorted(d for d in base.iterdir() if d.is_dir() and d.name != GOOD)
    samples = [Sample(f, 1, g.name) for g in groups for f in _image_files(g)]
    samples += [Sample(f, 1, "defect") for f in _image_files(base)]
    if not samples:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        msg = f"{root} holds no defective images ({exts}), neither directly nor in defect-type sub-folders"
        raise DatasetError(msg)
    return samples


def _find_mask(masks: Path, sample: Sample) -> Path | None:
    stem, kind = sample.path.stem, sample.defect_type
    for candidate in (
        masks / kind / f"{stem}_mask.png",
        masks / f"{stem}_mask.png",
        masks / kind / f"{stem}.png",
        masks / f"{stem}.png",
    ):
        if candidate.is_file():
            return candidate
    return None


def resolve_data(normals: Path, defects: Path | None, masks: Path | None) -> DataPlan:
    """Which images play which part; an MVTec root given as --normals supplies all three."""
    notes: list[str] = []
    normals_dir = normals
    if normals.is_dir() and is_mvtec_root(normals):
        normals_dir = normals / "test" / GOOD
        if not normals_dir.is_dir():
            msg = f"{normals} looks like an MVTec root (it has test/) but no test/{GOOD}; pass a folder of good images"
            raise DatasetError(msg)
        notes.append(f"MVTec root: normals from test/{GOOD} (train/{GOOD} is what the model trained on)")
        if defects is None:
            defects = normals  # its test/<defect> folders, and ground_truth/ below
    plan = DataPlan(normals_dir=normals_dir, normals=list_images(normals_dir), notes=notes)
    if defects is not None:
        plan.defects_dir = defects
        plan.defects = _defect_samples(defects)
        if masks is None and is_mvtec_root(defects) and (defects / "ground_truth").is_dir():
            masks = defects / "ground_truth"
    if masks is not None:
        if not masks.is_dir():
            msg = f"mask folder {masks} is not a directory"
            raise DatasetError(msg)
        if not plan.defects:
            msg = "--masks needs defective images to go with them: pass --defects DIR"
            raise DatasetError(msg)
        plan.masks_dir = masks
        plan.defects = [Sample(s.path, 1, s.defect_type, _find_mask(masks, s)) for s in plan.defects]
        if plan.masked == 0:
            msg = (
                f"no mask in {masks} matches a defective image; masks are looked up as "
                "<masks>/<type>/<stem>_mask.png, <masks>/<stem>_mask.png or the same names without _mask"
            )
            raise DatasetError(msg)
        missing = len(plan.defects) - plan.masked
        if missing:
            notes.append(f"{missing} defective images have no mask; their pixels are left out of the pixel F1")
    overlap = {p.resolve() for p in plan.normals} & {s.path.resolve() for s in plan.defects}
    if overlap:
        msg = f"{len(overlap)} images are both normal and defective (e.g. {sorted(overlap)[0]}); separate the folders"
        raise DatasetError(msg)
    return plan


def _provenance_folders(obj: Any, key: str = "") -> list[tuple[str, Path]]:
    """(key, training image folder) for provenance entries that name an existing data or training folder."""
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in _provenance_folders(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, str) and any(word in key.lower() for word in ("train", "data")):
        path = Path(obj)
        if path.is_dir():
            return [(key, training_folder_of(path).resolve())]
    return []


def check_not_training_data(meta: BundleMetadata, normals_dir: Path) -> None:
    """Refuse normals the bundle's provenance says it trained on: their scores are optimistically low."""
    normals = normals_dir.resolve()
    for key, folder in _provenance_folders(meta.provenance):
        if normals == folder or folder in normals.parents:
            msg = (
                f"{normals_dir} holds the images model {meta.name} was trained on (provenance {key!r} = {folder}); "
                "the model scores its training images lower than new parts, so a threshold set on them "
                "would raise more false alarms than promised. Use good images it has not seen."
            )
            raise cal.CalibrationError(msg)


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    combined: np.ndarray  # (N,) combined image scores, float64
    map_max: np.ndarray  # (N,) highest anomaly-map value per image
    pixels: np.ndarray  # sampled map values, float32
    pixel_labels: np.ndarray | None  # mask value of each sampled pixel (None: no masks)


def score_images(
    engine: Any,
    paths: Sequence[Path],
    mask_paths: Sequence[Path | None] | None,
    *,
    batch_size: int,
    pixel_cap: int,
    rng: np.random.Generator,
    failures: list[str],
) -> Scores:
    """Score images through the service's path; unreadable files are appended to `failures` by name."""
    from service.engine import score_files
    from service.postprocess import combine_scores

    residual: list[float] = []
    discrimination: list[float] = []
    map_max: list[float] = []
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i, img, out in score_files(
        engine, paths, batch_size=batch_size, on_error=lambda _i, e: failures.append(str(e))
    ):
        mask = None
        if mask_paths is not None and mask_paths[i] is not None:
            try:
                mask = _load_mask(mask_paths[i], img.size)
            except InvalidImageError as exc:
                failures.append(str(exc))
                continue
        residual.append(out.residual_score)
        discrimination.append(out.discrimination_score)
        map_max.append(float(out.anomaly_map.max()))
        if mask_paths is not None and mask is None:
            continue  # a defective image without a mask says nothing about which pixels are defective
        values, lab = cal.sample_pixels(out.anomaly_map, mask, pixel_cap, rng)
        pixels.append(values)
        if lab is not None:
            labels.append(lab)
    meta = engine.metadata
    combined = combine_scores(np.asarray(residual), np.asarray(discrimination), meta.score_stats, meta.score_weights)
    return Scores(
        combined=np.asarray(combined, dtype=np.float64),
        map_max=np.asarray(map_max, dtype=np.float64),
        pixels=np.concatenate(pixels) if pixels else np.zeros(0, np.float32),
        pixel_labels=np.concatenate(labels) if labels else None,
    )


def _load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        return load_mask(path, size)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        msg = f"mask {path} could not be read ({type(exc).__name__}: {exc})"
        raise InvalidImageError(msg) from exc


# ----------------------------------------------------------------------------------------------- choice


def choose_image_threshold(
    strategy: Strategy, normal: np.ndarray, defect: np.ndarray, *, allow_fallback: bool
) -> cal.ThresholdChoice:
    assert strategy.name == "f1" or strategy.value is not None  # resolve_strategy fills every value
    if strategy.name == "fpr":
        return cal.threshold_target_fpr(normal, strategy.value, allow_fallback=allow_fallback)
    if strategy.name == "recall":
        return cal.threshold_target_recall(defect, strategy.value, allow_fallback=allow_fallback)
    if strategy.name == "f1":
        return cal.threshold_f1(normal, defect)
    if strategy.name == "percentile":
        return cal.threshold_percentile(normal, strategy.value)
    return cal.threshold_manual(strategy.value)


def choose_pixel_threshold(
    args: argparse.Namespace, strategy: Strategy, normal: Scores, defect: Scores | None
) -> cal.ThresholdChoice:
    if args.pixel_threshold is not None:
        return cal.ThresholdChoice(float(args.pixel_threshold), "manual", f"set by hand to {args.pixel_threshold:g}")
    if args.pixel_fpr is not None:
        return cal.pixel_threshold_quantile(normal.pixels, args.pixel_fpr)
    region_rate = args.region_fpr
    if region_rate is None:
        region_rate = strategy.value if strategy.name == "fpr" and strategy.value else cal.DEFAULT_TARGET_FPR
    if args.region_fpr is None and defect is not None and defect.pixel_labels is not None:
        if defect.pixel_labels.any():
            values = np.concatenate([normal.pixels, defect.pixels])
            labels = np.concatenate([np.zeros(normal.pixels.size, bool), defect.pixel_labels])
            return cal.pixel_threshold_f1(values, labels)
        choice = cal.pixel_threshold_region_rate(normal.map_max, region_rate)
        warning = "the masks mark no defect pixels; the pixel threshold uses the region rate instead"
        return cal.ThresholdChoice(choice.threshold, choice.strategy, choice.rule, (*choice.warnings, warning))
    return cal.pixel_threshold_region_rate(normal.map_max, region_rate)


def build_report(
    *,
    image: cal.ThresholdChoice,
    pixel: cal.ThresholdChoice,
    normal: Scores,
    defect: Scores | None,
    confidence: float,
) -> dict[str, Any]:
    """Everything the terminal report, report.json and the bundle's calibration record say."""
    t, tp = image.threshold, pixel.threshold
    n = normal.combined.size
    report: dict[str, Any] = {
        "image_threshold": t,
        "strategy": image.strategy,
        "rule": image.rule,
        "false_alarms": cal.rate_summary(int((normal.combined >= t).sum()), n, confidence),
        "pixel_threshold": tp,
        "pixel_strategy": pixel.strategy,
        "pixel_rule": pixel.rule,
        "normal_images_with_regions": cal.rate_summary(int((normal.map_max >= tp).sum()), n, confidence),
        "normal_pixel_rate": float((normal.pixels >= tp).mean()) if normal.pixels.size else None,
        "counts": {"normal_images": n, "defective_images": 0 if defect is None else int(defect.combined.size)},
        "warnings": [*image.warnings, *pixel.warnings],
    }
    if defect is not None and defect.combined.size:
        m = defect.combined.size
        report["recall"] = cal.rate_summary(int((defect.combined >= t).sum()), m, confidence)
        report["auroc"] = cal.auroc(normal.combined, defect.combined)
        report["defect_images_with_regions"] = cal.rate_summary(int((defect.map_max >= tp).sum()), m, confidence)
        if defect.pixel_labels is not None and defect.pixel_labels.any():
            labels = np.concatenate([np.zeros(normal.pixels.size, bool), defect.pixel_labels])
            flagged = np.concatenate([normal.pixels, defect.pixels]) >= tp
            tp_px = int((flagged & labels).sum())
            report["pixel_f1"] = 2 * tp_px / (int(flagged.sum()) + int(labels.sum()))
    return report


# ----------------------------------------------------------------------------------------------- report


def _rate_line(label: str, summary: dict[str, Any], noun: str) -> str:
    lo, hi = summary["ci"]
    return (
        f"  {label:<17} {summary['count']} of {summary['of']} {noun} ({summary['rate']:.2%}); "
        f"{summary['confidence']:.0%} CI {lo:.2%} to {hi:.2%} (Clopper-Pearson)"
    )


def format_report(meta: BundleMetadata, provider: str, plan: DataPlan, report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [
        f"anoscope calibrate: model {meta.name} (version {meta.version}) on {provider}",
        f"normals           {counts['normal_images']} images from {plan.normals_dir}",
    ]
    if plan.defects:
        kinds = sorted({s.defect_type for s in plan.defects})
        lines.append(
            f"defects           {counts['defective_images']} images ({', '.join(kinds)}) from {plan.defects_dir}"
        )
    if plan.masks_dir is not None:
        lines.append(f"masks             {plan.masked} from {plan.masks_dir}")
    lines += [f"note              {note}" for note in plan.notes]
    lines += [
        f"strategy          {report['strategy']}: {report['rule']}",
        f"image threshold   {report['image_threshold']:.6g} (combined score; anomaly_score 0.5; flagged when >=)",
        _rate_line("false alarms", report["false_alarms"], "normal images"),
    ]
    if "recall" in report:
        lines.append(_rate_line("recall", report["recall"], "defective images"))
        lines.append(f"  {'AUROC':<17} {report['auroc']:.4f}")
    lines += [
        f"pixel threshold   {report['pixel_threshold']:.6g} ({report['pixel_strategy']}: {report['pixel_rule']})",
        _rate_line("regions on good", report["normal_images_with_regions"], "normal images"),
    ]
    if report.get("normal_pixel_rate") is not None:
        lines.append(f"  {'normal pixels':<17} {report['normal_pixel_rate']:.3%} at or above it")
    if "defect_images_with_regions" in report:
        lines.append(_rate_line("regions on bad", report["defect_images_with_regions"], "defective images"))
    if "pixel_f1" in report:
        lines.append(f"  {'pixel F1':<17} {report['pixel_f1']:.4f}")
    return "\n".join(lines)


def write_plots(
    path: Path, normal: np.ndarray, defect: np.ndarray | None, threshold: float, report: dict[str, Any]
) -> None:
    """Score histograms with the threshold, and the ROC curve with the operating point when defects exist."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no pyplot, no global backend
    from matplotlib.figure import Figure

    has_defects = defect is not None and defect.size > 0
    fig = Figure(figsize=(12 if has_defects else 7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_defects else 1, squeeze=False)[0]
    ax = axes[0]
    everything = np.concatenate([normal, defect]) if has_defects else normal
    lo, hi = float(min(everything.min(), threshold)), float(max(everything.max(), threshold))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 50)
    ax.hist(normal, bins=bins, alpha=0.6, color="tab:blue", label=f"normal (n={normal.size})")
    if has_defects:
        ax.hist(defect, bins=bins, alpha=0.6, color="tab:red", label=f"defective (n={defect.size})")
    fa = report["false_alarms"]
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g} ({fa['rate']:.2%} FA)")
    ax.set_xlabel("combined score")
    ax.set_ylabel("images")
    ax.set_title(f"{report['strategy']}")
    ax.legend()
    if has_defects:
        fpr, tpr = cal.roc_curve_points(normal, defect)
        roc = axes[1]
        roc.plot(fpr, tpr, color="tab:purple", label=f"AUROC {report['auroc']:.4f}")
        roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
        roc.plot([fa["rate"]], [report["recall"]["rate"]], "ko", label="chosen threshold")
        roc.set_xlabel("false-alarm rate")
        roc.set_ylabel("recall")
        roc.set_title("ROC (images)")
        roc.legend(loc="lower right")
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------- main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_report_dir(meta: BundleMetadata) -> Path:
    stamp = utc_now().replace("-", "").replace(":", "")
    return DEFAULT_REPORT_ROOT / f"{meta.name}-{stamp}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    resolve_strategy(args, has_defects=True)  # bad values fail here, before any file is read
    bundle: Path = args.bundle
    meta = read_metadata(bundle)
    before = _digest(bundle / METADATA_FILE)
    report_dir = args.report_dir
    if report_dir is None and not args.dry_run:
        report_dir = _default_report_dir(meta)
    if report_dir is not None and bundle.resolve() in (report_dir.resolve(), *report_dir.resolve().parents):
        msg = f"--report-dir {report_dir} is inside the bundle; choose a folder outside it"
        raise cal.CalibrationError(msg)
    plan = resolve_data(args.normals, args.defects, args.masks)
    strategy = resolve_strategy(args, has_defects=bool(plan.defects))
    check_not_training_data(meta, plan.normals_dir)
    # Refuse before spending time on inference when the image count alone cannot support the target.
    if strategy.name == "fpr" and not args.allow_fallback:
        cal.require_normals(len(plan.normals), strategy.value)
    if strategy.name == "recall" and not args.allow_fallback:
        cal.require_defects(len(plan.defects), strategy.value)

    from service.engine import OnnxEngine

    providers = [p for p in args.providers.split(",") if p.strip()]
    engine = OnnxEngine(bundle, providers=providers, intra_op_threads=args.threads)
    rng = np.random.default_rng(0)
    cap = cal.pixels_per_image(len(plan.normals) + len(plan.defects))
    failures: list[str] = []
    normal = score_images(
        engine, plan.normals, None, batch_size=args.batch_size, pixel_cap=cap, rng=rng, failures=failures
    )
    defect = None
    if plan.defects:
        mask_paths = [s.mask_path for s in plan.defects] if plan.masks_dir is not None else None
        defect = score_images(
            engine,
            [s.path for s in plan.defects],
            mask_paths,
            batch_size=args.batch_size,
            pixel_cap=cap,
            rng=rng,
            failures=failures,
        )
    if failures:
        named = "\n  ".join(failures[:MAX_NAMED_FAILURES])
        more = f"\n  ... and {len(failures) - MAX_NAMED_FAILURES} more" if len(failures) > MAX_NAMED_FAILURES else ""
        msg = f"{len(failures)} files could not be read; fix or remove them and run again:\n  {named}{more}"
        raise cal.CalibrationError(msg)

    image = choose_image_threshold(
        strategy,
        normal.combined,
        np.zeros(0) if defect is None else defect.combined,
        allow_fallback=args.allow_fallback,
    )
    pixel = choose_pixel_threshold(args, strategy, normal, defect)
    report = build_report(image=image, pixel=pixel, normal=normal, defect=defect, confidence=args.confidence)
    if plan.masks_dir is not None:
        report["counts"]["masked_images"] = plan.masked
    report["provider"] = engine.provider

    print(format_report(meta, engine.provider, plan, report))
    for warning in report["warnings"]:
        _warn(warning)

    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not args.no_plots:
            defect_scores = None if defect is None else defect.combined
            write_plots(report_dir / PLOT_FILE, normal.combined, defect_scores, image.threshold, report)
        plots = "" if args.no_plots else f", {report_dir / PLOT_FILE}"
        print(f"report            {report_dir / REPORT_FILE}{plots}")

    if args.dry_run:
        print("dry run           the bundle was not changed")
        return 0

    from service.postprocess import fit_normalization

    all_scores = normal.combined if defect is None else np.concatenate([normal.combined, defect.combined])
    all_pixels = normal.pixels if defect is None else np.concatenate([normal.pixels, defect.pixels])
    source = f"calibration: {image.strategy}; {report['counts']['normal_images']} normals from {plan.normals_dir}"
    calibration = Calibration(
        date=utc_now(),
        strategy=f"{image.strategy}; pixel {pixel.strategy}",
        thresholds=Thresholds(image=image.threshold, pixel=pixel.threshold),
        normalization=fit_normalization(
            all_scores, all_pixels, image_threshold=image.threshold, pixel_threshold=pixel.threshold, source=source
        ),
        data={
            "normals": str(plan.normals_dir.resolve()),
            "normal_images": len(plan.normals),
            "defects": None if plan.defects_dir is None else str(plan.defects_dir.resolve()),
            "defective_images": len(plan.defects),
            "masks": None if plan.masks_dir is None else str(plan.masks_dir.resolve()),
            "masked_images": plan.masked,
        },
        report=dict(report),
    )
    if _digest(bundle / METADATA_FILE) != before:
        msg = f"{bundle / METADATA_FILE} changed while calibrating (another calibration?); run again"
        raise cal.CalibrationError(msg)
    try:
        write_metadata(bundle, meta.with_calibration(calibration))
    except OSError as exc:
        msg = (
            f"writing {bundle} failed ({exc}); {METADATA_FILE}, the source of truth, still holds the previous "
            "calibration (the copy inside model.onnx may already be new). Free space or fix permissions, run again."
        )
        raise _WriteError(msg) from exc
    kept = len(meta.calibration_history) + (meta.calibration is not None)
    print(f"bundle            {bundle / METADATA_FILE} updated; {kept} earlier calibrations kept in its history")
    served_as = bundle.resolve().name  # the service names a model after its bundle folder
    print(f"reload            curl -X POST {args.service_url.rstrip('/')}/v1/models/{served_as}/reload")
    return 0


class _WriteError(AnoscopeError):
    """Writing the bundle itself failed (the only error after which the bundle may differ)."""


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (AnoscopeError, OSError) as exc:
        print(f"anoscope calibrate: error: {exc}", file=sys.stderr)
        if not isinstance(exc, _WriteError):
            print("the bundle was not changed", file=sys.stderr)
        return 2
