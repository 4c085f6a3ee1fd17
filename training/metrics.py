"""Detection metrics on scores and maps (numpy, scikit-learn and scipy), torch-free. Larger score = more anomalous.

Metrics that need both classes return None when the labels hold only one, instead of raising: a
report can then still say what it could measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

#: Anomaly maps and masks are compared at most at this many pixels on the long side, which bounds the
#: memory of pixel AUROC to ~330 KB per image (float32 map + bool mask) whatever the camera resolution.
DEFAULT_MAX_PIXEL_SIDE = 256


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < int(labels.sum()) < labels.size


def _labelled_scores(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, needs: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels as bool, finite scores in their own float type) flattened, or None without both
    classes; a clear error for scores that do not pair with the labels or are not finite."""
    y = np.asarray(labels).ravel().astype(bool, copy=False)
    if not _both_classes(y):
        return None
    s = np.asarray(scores).ravel()
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    if s.shape != y.shape:
        msg = f"got {y.size} labels but {s.size} scores"
        raise ValueError(msg)
    if not np.isfinite(s).all():
        msg = f"scores contain NaN or infinity; {needs} needs finite scores"
        raise ValueError(msg)
    return y, s


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve: the chance that a random anomalous item outscores a random normal one
    (ties count half).

    Computed from ranks (Mann-Whitney U): one sort of the scores, then each anomalous item's rank range
    among them by binary search, ties given their average rank. The same value as scikit-learn's
    `roc_auc_score` (tested), several times faster on the millions of pixels that pixel AUROC pools:
    training computes three pixel AUROCs every epoch it scores the label-free selection set, and with
    scikit-learn they took a fifth of a CPU run's time budget (docs/performance.md, "Training speed").
    """
    checked = _labelled_scores(labels, scores, "AUROC")
    if checked is None:
        return None
    y, s = checked
    ordered = np.sort(s)  # a plain sort: several times cheaper than the argsort a rank vector needs
    positive = s[y]
    # Items tied with a positive hold 1-based ranks first+1 .. last: their average is its rank.
    first = np.searchsorted(ordered, positive, side="left")
    last = np.searchsorted(ordered, positive, side="right")
    n_pos, n_neg = positive.size, s.size - positive.size
    u = float((first + last + 1).sum()) / 2.0 - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auroc_difference_se(labels: Sequence[int] | np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of AUROC(a) - AUROC(b), two scores of the same items (DeLong et al. 1988, paired).

    Each score's AUROC is the mean of per-item placements (a positive's share of negatives below it, a
    negative's share of positives above it, ties half); the variance of the difference is that of the
    paired placement differences, over positives and over negatives. Correlated scores (two weightings
    of the same two scores) have a far smaller SE of their difference than either AUROC alone.
    """
    y = np.asarray(labels).ravel().astype(bool)
    if not _both_classes(y) or y.sum() < 2 or (~y).sum() < 2:
        msg = "the SE of an AUROC difference needs at least two positive and two negative items"
        raise ValueError(msg)

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = np.sort(s[y]), np.sort(s[~y])
        # positive i: (negatives below + half the tied) / n_neg; negative j: (positives above + half tied) / n_pos
        v10 = (np.searchsorted(neg, s[y], "left") + np.searchsorted(neg, s[y], "right")) / (2.0 * neg.size)
        v01 = 1.0 - (np.searchsorted(pos, s[~y], "left") + np.searchsorted(pos, s[~y], "right")) / (2.0 * pos.size)
        return v10, v01

    a10, a01 = placements(np.asarray(a, dtype=np.float64).ravel())
    b10, b01 = placements(np.asarray(b, dtype=np.float64).ravel())
    variance = np.var(a10 - b10, ddof=1) / a10.size + np.var(a01 - b01, ddof=1) / a01.size
    return float(math.sqrt(max(variance, 0.0)))


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the precision-recall curve (scikit-learn's step-wise average precision)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    if not _both_classes(y):
        return None
    return float(average_precision_score(y, np.asarray(scores, dtype=np.float64).ravel()))


@dataclass(frozen=True)
class BestF1:
    """The threshold on the score that maximises F1 on the evaluated data (`score >= threshold` = anomalous)."""

    f1: float
    threshold: float
    precision: float
    recall: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def best_f1(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> BestF1 | None:
    """Best F1 over all thresholds (precision_recall_curve); None without both classes."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    if not _both_classes(y):
        return None
    precision, recall, thresholds = precision_recall_curve(y, np.asarray(scores, dtype=np.float64).ravel())
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    i = int(np.argmax(f1))
    return BestF1(f1=float(f1[i]), threshold=float(thresholds[i]), precision=float(p[i]), recall=float(r[i]))


def rates_at(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """Confusion counts and rates of `score >= threshold` (e.g. at the bundle's calibrated threshold)."""
    y = np.asarray(labels, dtype=bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {
        "threshold": float(threshold),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "true_negatives": tn,
        "recall": tp / (tp + fn) if tp + fn else None,
        "false_positive_rate": fp / (fp + tn) if fp + tn else None,
        "precision": tp / (tp + fp) if tp + fp else None,
    }


#: `roc_points` gives a curve at most this many points long: more than a plotted curve can show.
ROC_PLOT_POINTS = 2000


def roc_points(
    labels: np.ndarray, scores: np.ndarray, *, max_points: int = ROC_PLOT_POINTS
) -> tuple[np.ndarray, np.ndarray] | None:
    """(false positive rates, true positive rates) of the ROC curve, for plotting; None without both classes.

    Up to `max_points` scores: every corner of the exact curve (scikit-learn). Beyond (pooled pixels:
    tens of millions): the curve at `max_points` thresholds spaced evenly in rank, half among the
    normal scores and half among the anomalous ones, so neither rate moves by more than 2 / max_points
    between two points except across a tie, which the exact curve crosses with the same straight
    segment. A plot of it cannot be told from the exact curve, and it takes one plain sort per class
    where scikit-learn argsorts every score (docs/evaluation.md, `roc_pixel.png`)."""
    checked = _labelled_scores(labels, scores, "a ROC curve")
    if checked is None:
        return None
    y, s = checked
    if y.size <= max_points:
        fpr, tpr, _ = roc_curve(y.astype(np.int64), s)
        return fpr, tpr
    normal, anomalous = np.sort(s[~y]), np.sort(s[y])
    per_class = max(max_points // 2, 2)
    thresholds = np.unique(
        np.r_[
            normal[np.linspace(0, normal.size - 1, per_class).astype(np.int64)],
            anomalous[np.linspace(0, anomalous.size - 1, per_class).astype(np.int64)],
        ]
    )[::-1]  # from the highest down: both rates rise along the curve

    def share_at_or_above(ordered: np.ndarray) -> np.ndarray:
        return (ordered.size - np.searchsorted(ordered, thresholds, side="left")) / ordered.size

    return np.r_[0.0, share_at_or_above(normal), 1.0], np.r_[0.0, share_at_or_above(anomalous), 1.0]


def eval_size(size: tuple[int, int], max_side: int = DEFAULT_MAX_PIXEL_SIDE) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most `max_side`, keeping the aspect ratio."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) mask -> bool mask at `size` = (width, height), nearest neighbour."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask.astype(bool, copy=False)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize(size, Image.Resampling.NEAREST)) > 127


def pool_pixels(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of every (map, mask) pair as flat (values float32, labels bool) arrays."""
    if len(maps) != len(masks):
        msg = f"got {len(maps)} anomaly maps but {len(masks)} masks"
        raise ValueError(msg)
    for m, k in zip(maps, masks, strict=True):
        if m.shape != k.shape:
            msg = f"an anomaly map of shape {m.shape} was paired with a mask of shape {k.shape}"
            raise ValueError(msg)
    if not maps:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    labels = np.concatenate([np.asarray(k, dtype=bool).ravel() for k in masks])
    return values, labels


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float | None:
    """AUROC over every pixel of every (map, mask) pair, pooled; None unless some but not all pixels are anomalous."""
    values, labels = pool_pixels(maps, masks)
    return auroc(labels, values)


#: AUPRO integrates the PRO curve up to this false-positive rate (Bergmann et al., MVTec AD, IJCV 2021):
#: beyond it a map flags so much of every good part that no operator would use the threshold.
PRO_FPR_LIMIT = 0.3


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        msg = f"the AUPRO false-positive-rate limit must be in (0, 1] (got {fpr_limit})"
        raise ValueError(msg)


@dataclass(frozen=True)
class RegionPixels:
    """The pixels AUPRO reads: normal values sorted, defect values sorted with each pixel's weight
    1 / (its region's size) summed from the top down, and the number of regions. Built once by `of`,
    it serves both `aupro_of` and `pro_curve_of` (labelling the regions and sorting every pixel is
    most of their cost)."""

    normal: np.ndarray  # (N,) ascending
    defect: np.ndarray  # (M,) ascending
    weight_from: np.ndarray  # (M + 1,): [i] = summed weight of defect[i:], so [M] = 0
    n_regions: int

    @classmethod
    def of(cls, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> RegionPixels | None:
        """None without both normal pixels and a defect region."""
        from scipy import ndimage

        values, _ = pool_pixels(maps, masks)
        if not np.isfinite(values).all():
            msg = "anomaly maps contain NaN or infinity; AUPRO needs finite values"
            raise ValueError(msg)
        weights = np.zeros(values.size, dtype=np.float64)
        start, n_regions = 0, 0
        for mask in masks:
            labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=bool))
            flat = labels.ravel()
            if n:
                sizes = np.bincount(flat, minlength=n + 1).astype(np.float64)
                inside = flat > 0
                weights[start : start + flat.size][inside] = 1.0 / sizes[flat[inside]]
                n_regions += n
            start += flat.size
        defect = weights > 0
        if n_regions == 0 or defect.all():
            return None
        order = np.argsort(values[defect])  # defect pixels are few; the normal ones only need a plain sort
        weight_from = np.r_[np.cumsum(weights[defect][order][::-1])[::-1], 0.0]
        return cls(np.sort(values[~defect]), values[defect][order], weight_from, n_regions)

    def pro_at_least(self, t: np.ndarray) -> np.ndarray:
        """PRO at thresholds `t`: mean share of each region's pixels with value >= t."""
        return self.weight_from[np.searchsorted(self.defect, t, side="left")] / self.n_regions

    def pro_above(self, t: np.ndarray) -> np.ndarray:
        return self.weight_from[np.searchsorted(self.defect, t, side="right")] / self.n_regions

    def fpr_at_least(self, t: np.ndarray) -> np.ndarray:
        return (self.normal.size - np.searchsorted(self.normal, t, side="left")) / self.normal.size


def pro_curve(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, fpr_limit: float = 1.0, points: int = 2000
) -> tuple[np.ndarray, np.ndarray] | None:
    """(false positive rates, per-region overlaps) at up to `points` thresholds from the highest map
    value down to where the false positive rate passes `fpr_limit`, for plotting; None without both
    normal pixels and a defect region (`aupro` has the definition; it integrates the exact curve).
    """
    _check_fpr_limit(fpr_limit)
    return pro_curve_of(RegionPixels.of(maps, masks), fpr_limit=fpr_limit, points=points)


def pro_curve_of(
    regions: RegionPixels | None, *, fpr_limit: float = 1.0, points: int = 2000
) -> tuple[np.ndarray, np.ndarray] | None:
    """`pro_curve` of pixels already gathered by `RegionPixels.of`."""
    _check_fpr_limit(fpr_limit)
    if regions is None:
        return None
    normal = regions.normal
    reach = min(normal.size, int(np.ceil(fpr_limit * normal.size)) + 1)  # the normal pixels down to the limit
    ranks = np.unique(np.linspace(0, reach - 1, min(points, reach)).round().astype(np.int64))
    t = np.unique(normal[::-1][ranks])[::-1]  # thresholds at those normal pixels' values, from the highest down
    fpr, pro = regions.fpr_at_least(t), regions.pro_at_least(t)
    found_first = regions.pro_above(normal[-1:])  # what lies above every normal pixel: found at FPR 0
    return np.r_[0.0, 0.0, fpr], np.r_[0.0, found_first, pro]


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = PRO_FPR_LIMIT) -> float | None:
    """Area under the PRO curve up to `fpr_limit`, divided by it: 1 = every defect region fully found
    before any good pixel is flagged. The MVTec AD benchmark's segmentation metric beside pixel AUROC,
    which large defects dominate. None without both normal pixels and a defect region.

    PRO at a threshold is the mean, over every connected defect region of every mask (8-connected), of
    the share of the region's pixels at or above it: each defect counts once, however large, so a
    scratch weighs as much as a missing half. The false positive rate is over all normal pixels (good
    images and the good parts of defective ones). The curve joins the points of every distinct map
    value by straight lines; its area is summed per normal pixel, each a 1/N step of the false positive
    rate (a tie of c normal pixels splits its segment into c equal steps), so it needs sorts and
    binary searches only, no argsort of all pixels: exact, and a few seconds for 20 million pixels.
    """
    _check_fpr_limit(fpr_limit)
    return aupro_of(RegionPixels.of(maps, masks), fpr_limit)


def aupro_of(regions: RegionPixels | None, fpr_limit: float = PRO_FPR_LIMIT) -> float | None:
    """`aupro` of pixels already gathered by `RegionPixels.of`."""
    _check_fpr_limit(fpr_limit)
    if regions is None:
        return None
    normal, n = regions.normal, regions.normal.size
    full = int(np.floor(fpr_limit * n))  # normal pixels whose whole step lies within the limit
    part = fpr_limit * n - full  # the share of the next one's step that does
    m = min(n, full + 1)
    u = normal[::-1][:m]  # the m highest normal values, from the top down
    after, before = regions.pro_at_least(u), regions.pro_above(u)  # PRO at the end and start of u's tie segment
    ties_above = n - np.searchsorted(normal, u, side="right")  # normal pixels strictly above u
    ties = (n - np.searchsorted(normal, u, side="left")) - ties_above  # pixels tied with u
    step = np.arange(m) - ties_above  # this pixel's place within its tie, 0-based
    start = before + (after - before) * step / ties
    end = before + (after - before) * (step + 1) / ties
    area = float(np.sum(start[:full] + end[:full]) / 2.0)
    if full < m and part > 0:
        area += part * (start[full] + (start[full] + part * (end[full] - start[full]))) / 2.0
    return area / n / fpr_limit


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: map them to None (recursively through dicts and lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
