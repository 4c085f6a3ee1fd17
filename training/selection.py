"""Label-free model selection: choose the checkpoint and the score weights on synthetic defects only.

A detector must never be tuned on the labelled test images it is judged on. What is known without
labels is the held-out share of the *normal training images* (the validation normals). This module
turns them into a labelled set by pasting synthetic defects on copies of them, with the kinds of
`SELECTION_KINDS` and the run's own (so also shapes the run never trained on) and a seed of its own,
and measures on it:

* the image AUROC of each candidate weighting of the z-scored residual and discrimination scores
  (z-scores from the normal half, exactly as `service.postprocess.combine_scores` computes them); the
  best weighting is the one the bundle gets, and
* the pixel AUROC of the exported anomaly map against the synthetic masks; with a map discriminator
  and `select_map`, of each candidate map (discrimination, mean, residual), and the best one becomes
  the exported map.

Their mean is the run's *selection score*; the training engine keeps the epoch with the highest one as
`checkpoints/best.pt`, which export and evaluate load. The inputs are structural: every function here
takes tensors of normal images from the training split (the engine passes the validation normals) or
scores computed on them, never a path, a folder or a label from a test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.bundle import ScoreStats, ScoreWeights
from service.postprocess import combine_scores
from training.augment import lighting_drift as relight
from training.corruption import CorruptionConfig, corrupt_batch
from training.metrics import auroc, auroc_difference_se

#: The synthetic validation defects are drawn from the run's seed plus this offset, never the
#: training stream, and are the same at every epoch.
SEED_OFFSET = 1_000_003
#: Candidate (residual, discrimination) weights, in order of preference on ties (the residual first:
#: it is the simpler score).
WEIGHT_CANDIDATES: tuple[tuple[float, float], ...] = ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 2.0))
#: Candidate anomaly maps (`ModelConfig.map_source`) when there is a map discriminator, in order of
#: preference on ties.
MAP_CANDIDATES: tuple[str, ...] = ("discrimination", "mean", "residual")


@dataclass(frozen=True)
class SyntheticDefects:
    """Copies of the validation normals with synthetic defects; index i is a copy of normal i mod N."""

    images: Tensor  # (N, C, S, S)
    masks: Tensor  # (N, 1, S, S) bool: exactly the changed pixels
    relit: Tensor | None = None  # (N, C, S, S): the normals under other lighting, still normal; None = not made


def selection_copies(n_normals: int, min_defects: int) -> int:
    """Defective copies of each validation normal so that the set holds at least `min_defects` (>= 1)."""
    return max(1, math.ceil(min_defects / n_normals)) if n_normals > 0 else 1


#: The kinds every selection set holds. Fixed rather than "every registered kind": a kind registered
#: later (`warp`) must not change the selection set of a run that does not train on it, or old runs
#: would no longer replay and `bench selection` / `bench reduction` would rebuild other sets for them.
SELECTION_KINDS = ("colour", "line", "patch", "perlin", "spot", "stain")


def selection_kinds(corruption: CorruptionConfig) -> tuple[str, ...]:
    """`SELECTION_KINDS` plus the kinds the run trains on, in sorted order."""
    return tuple(sorted(set(SELECTION_KINDS) | set(corruption.kinds)))


def synthetic_defects(
    normals: Tensor, corruption: CorruptionConfig, seed: int, lighting_drift: float = 0.0, copies: int = 1
) -> SyntheticDefects:
    """Each normal image (N, C, S, S) `copies` times more, each copy with its own 1..max_count defects of
    the kinds below, and, with `lighting_drift` > 0, once more relit
    (`training.augment.lighting_drift`) as a normal.

    Uses the run's shape sizes and counts but every kind of `SELECTION_KINDS` and of the run's own
    `kinds`, and no clean images, so the set measures how well the model finds defects it was not
    necessarily trained on. The relit normals make a score that flags a global brightness change lose
    the selection.
    """
    config = replace(corruption, kinds=selection_kinds(corruption), clean_fraction=0.0)
    generator = torch.Generator().manual_seed(seed + SEED_OFFSET)
    out = corrupt_batch(normals.repeat(copies, 1, 1, 1), config, generator)  # one copy: the draws of older runs
    relit = relight(normals, lighting_drift, generator) if lighting_drift > 0 else None
    return SyntheticDefects(out.corrupted, out.mask, relit)


def within_region(synthetic: SyntheticDefects, roi: Tensor) -> SyntheticDefects:
    """The copies whose defects touch the region of interest `roi` (1, 1, S, S) of 0/1, their masks cut
    to it: what a head that scores only the region can be asked to find. A defect pasted wholly on the
    table beside the part is not one under that definition, and would only add unfindable positives."""
    inside = synthetic.masks & roi.bool()  # (N, 1, S, S)
    keep = inside.flatten(1).any(dim=1)  # (N,)
    return SyntheticDefects(synthetic.images[keep], inside[keep], synthetic.relit)


@dataclass(frozen=True)
class Selection:
    """What the synthetic validation set says about one epoch's model."""

    weights: ScoreWeights  # the best candidate
    image_auroc: float  # of the combined score with `weights`
    pixel_auroc: float | None  # of the anomaly map (None without defect pixels)
    candidates: dict[str, float]  # "w_r,w_d" -> image AUROC
    map_source: str | None = None  # the best candidate map, when maps were compared
    map_candidates: dict[str, float | None] | None = None  # map source -> pixel AUROC

    @property
    def score(self) -> float:
        """The selection score: mean of image and pixel AUROC (image AUROC alone without pixels)."""
        return self.image_auroc if self.pixel_auroc is None else (self.image_auroc + self.pixel_auroc) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.model_dump(),
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "candidates": dict(self.candidates),
            "map_source": self.map_source,
            "map_candidates": None if self.map_candidates is None else dict(self.map_candidates),
            "score": self.score,
        }


#: The weighting a significance-gated choice (`choose_weights(margin_z=...)`) falls back to: both scores,
#: equally. A run makes two scores; dropping or favouring one needs evidence, not a tie on an easy set.
BALANCED = (1.0, 1.0)


def choose_weights(
    normal: tuple[np.ndarray, np.ndarray],
    defective: tuple[np.ndarray, np.ndarray],
    stats: dict[str, ScoreStats],
    candidates: tuple[tuple[float, float], ...] = WEIGHT_CANDIDATES,
    margin_z: float = 0.0,
) -> tuple[ScoreWeights, dict[str, float]]:
    """The candidate weighting with the highest image AUROC on (normal, defective) (residual, discrimination) scores.

    Ties keep the earlier candidate. With `margin_z` > 0, the best candidate replaces `BALANCED` only if
    its AUROC is higher by more than `margin_z` standard errors of the paired difference (DeLong,
    `training.metrics.auroc_difference_se`): on a set the model finds easily, every weighting scores
    0.98-0.99 and the plain maximum follows noise from epoch to epoch. Returns the weights and every
    candidate's AUROC.
    """
    labels = np.r_[np.zeros(len(normal[0])), np.ones(len(defective[0]))]
    residual = np.r_[normal[0], defective[0]]
    discrimination = np.r_[normal[1], defective[1]]
    results: dict[str, float] = {}
    combined: dict[tuple[float, float], np.ndarray] = {}
    best: tuple[float, tuple[float, float]] | None = None
    for w_r, w_d in candidates:
        weights = ScoreWeights(residual=w_r, discrimination=w_d)
        combined[(w_r, w_d)] = combine_scores(residual, discrimination, stats, weights)
        value = auroc(labels, combined[(w_r, w_d)])
        value = 0.5 if value is None else value
        results[f"{w_r:g},{w_d:g}"] = value
        if best is None or value > best[0]:
            best = (value, (w_r, w_d))
    assert best is not None, "at least one candidate"
    chosen = best[1]
    if margin_z > 0 and BALANCED in combined and chosen != BALANCED and labels.sum() >= 2 and len(normal[0]) >= 2:
        gain = best[0] - results[f"{BALANCED[0]:g},{BALANCED[1]:g}"]
        if gain <= margin_z * auroc_difference_se(labels, combined[chosen], combined[BALANCED]):
            chosen = BALANCED
    return ScoreWeights(residual=chosen[0], discrimination=chosen[1]), results


def assess(
    normal: tuple[np.ndarray, np.ndarray, np.ndarray],
    defective: tuple[np.ndarray, np.ndarray, np.ndarray],
    masks: np.ndarray,
    stats: dict[str, ScoreStats],
    map_candidates: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    margin_z: float = 0.0,
) -> Selection:
    """Score one model: (residual, discrimination, maps) on the normals and on their defective copies.

    `masks` (N, 1, S, S) are the synthetic defects' masks; the normals' pixels are all normal. With
    `map_candidates` (map source -> (maps of the normals, maps of the copies)), the pixel AUROC of each
    is measured and the best (ties: the earlier) is the selection's map and pixel AUROC. `margin_z`: see
    `choose_weights`.
    """
    weights, candidates = choose_weights(normal[:2], defective[:2], stats, margin_z=margin_z)
    key = f"{weights.residual:g},{weights.discrimination:g}"
    truth = np.concatenate([np.zeros(normal[2].shape, dtype=bool), masks]).ravel()
    if not map_candidates:
        maps = np.concatenate([normal[2], defective[2]]).ravel()
        return Selection(weights, candidates[key], auroc(truth, maps), candidates)
    pixel = {name: auroc(truth, np.concatenate(pair).ravel()) for name, pair in map_candidates.items()}
    best = max(pixel, key=lambda name: -1.0 if pixel[name] is None else pixel[name])  # first of equal maxima
    return Selection(weights, candidates[key], pixel[best], candidates, best, pixel)
