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
from dataclasses import dataclass
from pathlib import Path

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
from service.calibration_data import Scores, check_not_training_data, resolve_data, score_images
from service.calibration_report import build_report, format_report, write_plots
from service.errors import AnoscopeError

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
