"""Threshold calibration maths: strategies, order-statistic quantiles, confidence intervals. No I/O.

`service/calibrate.py` (the `anoscope calibrate` command; its data and report halves are
`calibration_data.py` and `calibration_report.py`) reads images, scores them through the
service's engine and calls these functions; tests call them directly with arrays.

Decision rule everywhere: a value is flagged when `value >= threshold` (an image is anomalous when its
combined score reaches the image threshold, i.e. `anomaly_score >= 0.5`; a pixel belongs to a region
when its map value reaches the pixel threshold, as `postprocess.find_regions` does).

Why the target false-alarm rule is an order statistic. Take n normal scores and flag fresh images at
or above the j-th highest of them. For any continuous score distribution, a fresh normal image lands
above the j-th highest of n with probability exactly j / (n + 1) on average over calibration sets
(the rank of the fresh score among n + 1 exchangeable scores is uniform). Choosing
`j = floor(fpr * (n + 1))` therefore promises an expected false-alarm rate <= fpr, and needs j >= 1,
i.e. `n >= ceil(1 / fpr) - 1` normal images: 199 for 0.5 %, 999 for 0.1 %. With fewer, no threshold
set from the data can honestly promise the rate, so calibration refuses (or, when allowed, falls back
to the highest normal score, whose expected rate 1 / (n + 1) is reported). The same argument on the
defect scores gives the target-recall rule: the k-th highest of m defect scores with
`k = ceil(recall * (m + 1))`, which needs `m >= recall / (1 - recall)` defective images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from service.errors import InputError

DEFAULT_TARGET_FPR = 0.005
DEFAULT_TARGET_RECALL = 0.99
DEFAULT_PIXEL_FPR = 0.001
DEFAULT_CONFIDENCE = 0.95
# Pixel statistics keep at most this many pixels per image (a seeded uniform sample): enough for a
# 99.9th percentile, and memory stays bounded on large camera images.
MAX_PIXELS_PER_IMAGE = 65_536
PIXEL_BUDGET = 8_000_000  # all images together; bounds memory and the F1 sort on big data sets
_EPS = 1e-9


class CalibrationError(InputError):
    """The data or the options cannot support the asked calibration; the message says what to change."""

    title = "Calibration error"


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and how it was chosen."""

    threshold: float
    strategy: str  # short, recorded in the bundle, e.g. "target-fpr 0.005"
    rule: str  # one sentence for the report
    warnings: tuple[str, ...] = field(default_factory=tuple)
    fallback: bool = False


def check_rate(name: str, value: float) -> float:
    """A rate strictly inside (0, 1), or a CalibrationError naming the option."""
    v = float(value)
    if not (0.0 < v < 1.0) or math.isnan(v):
        msg = f"{name} must be a rate strictly between 0 and 1 (e.g. 0.005 for 1 in 200); got {value!r}"
        raise CalibrationError(msg)
    return v


def _as_scores(values: np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        msg = f"no {what} to calibrate on"
        raise CalibrationError(msg)
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        msg = f"{bad} {what} are NaN or infinite; the model produced invalid outputs, check the bundle"
        raise CalibrationError(msg)
    return v


def min_normals_for_fpr(fpr: float) -> int:
    """Fewest normal images for which the order-statistic rule can promise `fpr` (n >= 1/fpr - 1)."""
    return max(math.ceil(1.0 / fpr - _EPS) - 1, 1)


def min_defects_for_recall(recall: float) -> int:
    """Fewest defective images for which the order-statistic rule can promise `recall` (m >= r/(1-r))."""
    return max(math.ceil(recall / (1.0 - recall) - _EPS), 1)


def threshold_flagging_at_most(values: np.ndarray, k: int) -> float:
    """The lowest threshold at or between observed values that flags at most `k` of them (`>=` rule).

    Normally the k-th highest value. When ties at that value would flag more than k, the threshold moves
    to the midpoint between the tied value and the next higher distinct value (or just above the
    maximum), so ties never make the data promise more than it supports.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if not 1 <= k <= n:
        msg = f"k must be in [1, {n}]; got {k}"
        raise ValueError(msg)
    t = float(np.partition(v, n - k)[n - k])  # the k-th highest
    if int(np.count_nonzero(v >= t)) <= k:
        return t
    higher = v[v > t]
    if higher.size:
        nxt = float(higher.min())
        mid = t + (nxt - t) / 2.0
        return mid if t < mid < nxt else nxt
    return t + max(abs(t) * 1e-6, 1e-9)


def require_normals(n: int, fpr: float) -> None:
    """Refuse, saying what to do, when n normal images cannot support an expected false-alarm rate of fpr."""
    if n < min_normals_for_fpr(fpr):
        _refuse_normals(n, fpr)


def _refuse_normals(n: int, fpr: float) -> NoReturn:
    need = min_normals_for_fpr(fpr)
    best = 1.0 / (n + 1)
    msg = (
        f"a false-alarm rate of {fpr:g} needs at least {need} normal images (the threshold is the k-th highest "
        f"normal score with k = floor(rate x (n + 1)) >= 1), but only {n} were given. Collect at least "
        f"{need} good images (about {math.ceil(10 / fpr)} for a tight interval), ask for --target-fpr "
        f"{_round_up(best)} or higher, or pass --allow-fallback to use the highest normal score "
        f"(expected false-alarm rate 1/(n + 1) = {best:.2%})"
    )
    raise CalibrationError(msg)


def threshold_target_fpr(normal_scores: np.ndarray, fpr: float, *, allow_fallback: bool = False) -> ThresholdChoice:
    """The k-th highest normal score, k = floor(fpr * (n + 1)): expected false-alarm rate <= fpr."""
    fpr = check_rate("--target-fpr", fpr)
    s = _as_scores(normal_scores, "normal scores")
    n = s.size
    k = math.floor(fpr * (n + 1) + _EPS)
    strategy = f"target-fpr {fpr:g}"
    if k >= 1:
        rule = (
            f"the {_kth(k)} of {n} normal scores (k = floor({fpr:g} x (n + 1)) = {k}); "
            f"expected false-alarm rate on new good parts {k}/{n + 1} = {k / (n + 1):.4%} <= {fpr:.4%}"
        )
        return ThresholdChoice(threshold_flagging_at_most(s, k), strategy, rule)
    if not allow_fallback:
        _refuse_normals(n, fpr)
    best = 1.0 / (n + 1)
    warning = (
        f"only {n} normal images: a false-alarm rate of {fpr:g} needs {min_normals_for_fpr(fpr)}. Using the highest "
        f"normal score; expected false-alarm rate 1/(n + 1) = {best:.2%}, NOT {fpr:.2%}. Collect more good images."
    )
    rule = f"fallback: the highest of {n} normal scores; expected false-alarm rate 1/{n + 1} = {best:.4%}"
    return ThresholdChoice(
        threshold_flagging_at_most(s, 1), f"{strategy} (fallback: max normal)", rule, (warning,), fallback=True
    )


def require_defects(m: int, recall: float) -> None:
    """Refuse, saying what to do, when m defective images cannot support an expected recall."""
    if m < min_defects_for_recall(recall):
        _refuse_defects(m, recall)


def _refuse_defects(m: int, recall: float) -> NoReturn:
    need = min_defects_for_recall(recall)
    best = m / (m + 1)
    msg = (
        f"a recall of {recall:g} needs at least {need} defective images (the threshold is the k-th highest "
        f"defect score with k = ceil(recall x (m + 1)) <= m), but only {m} were given. Add defective "
        f"images, ask for --target-recall {math.floor(best * 1000) / 1000:g} or lower, or pass "
        f"--allow-fallback to use the lowest defect score (expected recall m/(m + 1) = {best:.2%})"
    )
    raise CalibrationError(msg)


def threshold_target_recall(
    defect_scores: np.ndarray, recall: float, *, allow_fallback: bool = False
) -> ThresholdChoice:
    """The k-th highest defect score, k = ceil(recall * (m + 1)): expected recall on new defects >= recall."""
    recall = check_rate("--target-recall", recall)
    d = _as_scores(defect_scores, "defect scores")
    m = d.size
    k = math.ceil(recall * (m + 1) - _EPS)
    strategy = f"target-recall {recall:g}"
    if k <= m:
        rule = (
            f"the {_kth(k)} of {m} defect scores (k = ceil({recall:g} x (m + 1)) = {k}); "
            f"expected recall on new defects of these kinds >= {k}/{m + 1} = {k / (m + 1):.4%}"
        )
        return ThresholdChoice(float(np.sort(d)[m - k]), strategy, rule)
    if not allow_fallback:
        _refuse_defects(m, recall)
    best = m / (m + 1)
    warning = (
        f"only {m} defective images: a recall of {recall:g} needs {min_defects_for_recall(recall)}. Using the "
        f"lowest defect score; expected recall m/(m + 1) = {best:.2%}, NOT {recall:.2%}."
    )
    rule = f"fallback: the lowest of {m} defect scores; expected recall {m}/{m + 1} = {best:.4%}"
    return ThresholdChoice(float(d.min()), f"{strategy} (fallback: min defect)", rule, (warning,), fallback=True)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of `scores >= threshold` against boolean `labels`.

    The threshold is an observed score; among equal F1 the highest threshold wins (fewer false alarms).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.size != y.size:
        msg = f"scores ({s.size}) and labels ({y.size}) differ in length"
        raise ValueError(msg)
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        msg = "F1 needs both normal and defective examples"
        raise CalibrationError(msg)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    flagged = np.arange(1, s.size + 1)
    last_of_tie = np.append(s_sorted[1:] != s_sorted[:-1], True)  # only cut between distinct values
    f1 = np.where(last_of_tie, 2.0 * tp / (flagged + positives), -1.0)
    i = int(np.argmax(f1))  # first maximum = highest threshold
    return float(s_sorted[i]), float(f1[i])


def threshold_f1(normal_scores: np.ndarray, defect_scores: np.ndarray) -> ThresholdChoice:
    n = _as_scores(normal_scores, "normal scores")
    d = _as_scores(defect_scores, "defect scores")
    t, f1 = best_f1_threshold(np.concatenate([n, d]), np.r_[np.zeros(n.size, bool), np.ones(d.size, bool)])
    rule = (
        f"the score maximising image F1 on {n.size} normal and {d.size} defective images (F1 = {f1:.4f}); "
        "F1 depends on the share of defects in these folders, not on the line's"
    )
    return ThresholdChoice(t, "f1", rule)


def threshold_percentile(normal_scores: np.ndarray, percentile: float) -> ThresholdChoice:
    """The P-th percentile of normal scores (numpy's linear interpolation)."""
    p = float(percentile)
    if not (0.0 < p < 100.0) or math.isnan(p):
        msg = f"--percentile must be strictly between 0 and 100 (e.g. 99.5); got {percentile!r}"
        raise CalibrationError(msg)
    s = _as_scores(normal_scores, "normal scores")
    n = s.size
    warnings: tuple[str, ...] = ()
    if (1.0 - p / 100.0) < 1.0 / (n + 1):
        warnings = (
            f"the {p:g}th percentile of {n} normal scores lies beyond the data: {n} images cannot show a "
            f"false-alarm rate below 1/(n + 1) = {1 / (n + 1):.2%}; collect more good images",
        )
    rule = f"the {p:g}th percentile of {n} normal scores (linear interpolation)"
    return ThresholdChoice(float(np.percentile(s, p)), f"percentile {p:g}", rule, warnings)


def threshold_manual(threshold: float) -> ThresholdChoice:
    t = float(threshold)
    if not math.isfinite(t):
        msg = f"--threshold must be a finite number; got {threshold!r}"
        raise CalibrationError(msg)
    return ThresholdChoice(t, "manual", f"set by hand to {t:g}")


def pixel_threshold_quantile(normal_pixels: np.ndarray, rate: float) -> ThresholdChoice:
    """The pixel value above which at most `rate` of normal pixels lie (same order-statistic rule)."""
    rate = check_rate("--pixel-fpr", rate)
    v = _as_scores(normal_pixels, "normal pixel values")
    k = math.floor(rate * (v.size + 1) + _EPS)
    if k < 1:
        msg = f"--pixel-fpr {rate:g} needs at least {min_normals_for_fpr(rate)} normal pixels; got {v.size}"
        raise CalibrationError(msg)
    rule = f"normal-pixel quantile: at most {rate:.3%} of {v.size} sampled normal pixels lie at or above it"
    return ThresholdChoice(threshold_flagging_at_most(v, k), f"pixel-fpr {rate:g}", rule)


def pixel_threshold_region_rate(normal_map_max: np.ndarray, rate: float) -> ThresholdChoice:
    """The k-th highest per-image map maximum of normal images, k = floor(rate * (n + 1)).

    A good part then shows any region at all with expected probability <= rate: regions appear on good
    parts about as rarely as false alarms do. With too few normals for the rate it uses the highest
    maximum (regions on good parts at expected rate 1/(n + 1)) and says so; the pixel threshold only
    draws regions, it decides no verdict, so this falls back rather than refusing.
    """
    rate = check_rate("--region-fpr", rate)
    v = _as_scores(normal_map_max, "normal anomaly-map maxima")
    n = v.size
    k = math.floor(rate * (n + 1) + _EPS)
    strategy = f"region-fpr {rate:g}"
    if k >= 1:
        rule = (
            f"the {_kth(k)} of {n} normal-image map maxima: expected share of good parts showing any region "
            f"{k}/{n + 1} = {k / (n + 1):.3%}"
        )
        return ThresholdChoice(threshold_flagging_at_most(v, k), strategy, rule)
    warning = (
        f"only {n} normal images: regions on good parts at a rate of {rate:g} need {min_normals_for_fpr(rate)}; "
        f"using the highest normal-image map maximum (expected rate 1/(n + 1) = {1 / (n + 1):.2%})"
    )
    rule = f"fallback: the highest of {n} normal-image map maxima"
    return ThresholdChoice(threshold_flagging_at_most(v, 1), f"{strategy} (fallback)", rule, (warning,), True)


def pixel_threshold_f1(pixels: np.ndarray, labels: np.ndarray) -> ThresholdChoice:
    """The pixel value maximising pixel F1 against defect masks."""
    t, f1 = best_f1_threshold(pixels, labels)
    rule = f"best pixel F1 against the masks ({f1:.4f}) on {np.size(pixels)} sampled pixels"
    return ThresholdChoice(t, "pixel-f1 (masks)", rule)


def pixels_per_image(n_images: int) -> int:
    """How many pixels to keep from each image's map so that all images together stay within budget."""
    return int(min(MAX_PIXELS_PER_IMAGE, max(4096, PIXEL_BUDGET // max(n_images, 1))))


def sample_pixels(
    amap: np.ndarray, mask: np.ndarray | None, cap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """At most `cap` (value, mask) pairs from an (H, W) map, uniformly without replacement."""
    values = np.asarray(amap, dtype=np.float32).ravel()
    labels = None if mask is None else np.asarray(mask, dtype=bool).ravel()
    if values.size > cap:
        idx = rng.choice(values.size, size=cap, replace=False)
        values = values[idx]
        labels = None if labels is None else labels[idx]
    return values, labels


def clopper_pearson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial rate after k successes in n trials."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        msg = f"need 0 <= k <= n and n > 0; got k={k}, n={n}"
        raise ValueError(msg)
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def rate_summary(flagged: int, total: int, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    lo, hi = clopper_pearson(flagged, total, confidence)
    return {"count": int(flagged), "of": int(total), "rate": flagged / total, "ci": [lo, hi], "confidence": confidence}


def auroc(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    n, d = np.asarray(normal_scores).ravel(), np.asarray(defect_scores).ravel()
    return float(roc_auc_score(np.r_[np.zeros(n.size), np.ones(d.size)], np.r_[n, d]))


def roc_curve_points(normal_scores: np.ndarray, defect_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the image ROC curve."""
    from sklearn.metrics import roc_curve

    n, d = np.asarray(normal_scores).ravel(), np.asarray(defect_scores).ravel()
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(n.size), np.ones(d.size)], np.r_[n, d])
    return fpr, tpr


def _kth(k: int) -> str:
    """'highest', '2nd highest', ... for the report."""
    if k == 1:
        return "highest"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix} highest"


def _round_up(x: float) -> str:
    """`x` rounded up to 3 significant digits, for suggesting a rate the data supports."""
    digits = 3 - math.floor(math.log10(x)) - 1
    return f"{math.ceil(x * 10**digits) / 10**digits:g}"
