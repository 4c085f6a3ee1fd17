"""What `anoscope calibrate` reports: the report dict (terminal, report.json and the bundle's record),
its terminal text, and the score histograms / ROC plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service import calibration as cal
from service.bundle import BundleMetadata
from service.calibration_data import DataPlan, Scores


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
