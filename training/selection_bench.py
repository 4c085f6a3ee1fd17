"""`anoscope bench selection`: does the label-free weighting rule generalise to a defect kind it never saw?

The label-free selection (`training.selection`) picks the score weights that best separate synthetic
defects from the validation normals. Real defects are a kind it never saw, so this bench asks the same
question one step removed, still without a single test label: for each synthetic kind k, a rule picks
weights on the *other* kinds, and the choice is scored on kind k (leave-one-kind-out). A rule that
wins here generalises across defect kinds; one that loses was fitting the kinds it saw.

Rules: `pooled` (the selection's plain rule, `choose_weights` on all other kinds together), `gated`
(the same, but leaving 1/1 only for a gain beyond 1.645 standard errors, `choose_weights(margin_z=...)`),
`worst-kind` (the candidate whose worst other kind is best), and each fixed candidate weighting. The
negatives are the validation normals plus, when the run trained with lighting drift, relit copies of
them, as in the selection; the z-score statistics are the normals', as in the bundle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.selection import SEED_OFFSET, WEIGHT_CANDIDATES

if TYPE_CHECKING:
    import torch

    from service.bundle import ScoreStats
    from training.config import TrainConfig

Pair = tuple[np.ndarray, np.ndarray]  # (residual (N,), discrimination (N,))
FIXED_RULES = tuple(f"{w_r:g},{w_d:g}" for w_r, w_d in WEIGHT_CANDIDATES)
#: The significance-gated rule's margin in the study: one-sided 95%.
STUDY_MARGIN_Z = 1.645
RULES = ("pooled", "gated", "worst-kind", *FIXED_RULES)


@dataclass(frozen=True)
class HoldoutRow:
    run: str
    rule: str
    mean_auroc: float  # mean over held-out kinds of the chosen weighting's AUROC on that kind
    min_auroc: float
    chosen: dict[str, str]  # held-out kind -> the weighting the rule chose without it


def kind_auroc(negatives: Pair, positives: Pair, stats: dict[str, ScoreStats], weights: tuple[float, float]) -> float:
    from service.bundle import ScoreWeights
    from service.postprocess import combine_scores
    from training.metrics import auroc

    labels = np.r_[np.zeros(len(negatives[0])), np.ones(len(positives[0]))]
    scores = combine_scores(
        np.r_[negatives[0], positives[0]],
        np.r_[negatives[1], positives[1]],
        stats,
        ScoreWeights(residual=weights[0], discrimination=weights[1]),
    )
    value = auroc(labels, scores)
    return 0.5 if value is None else value


def _pool(per_kind: dict[str, Pair], kinds: Sequence[str]) -> Pair:
    return np.concatenate([per_kind[k][0] for k in kinds]), np.concatenate([per_kind[k][1] for k in kinds])


Choice = tuple[str, str, float]  # (held-out kind, chosen weighting, its AUROC on that kind)


def holdout(per_kind: dict[str, Pair], negatives: Pair, stats: dict[str, ScoreStats]) -> dict[str, list[Choice]]:
    """rule -> [(held-out kind, chosen weighting, its AUROC on that kind)] for every kind in `per_kind`."""
    from training.selection import choose_weights

    def key(w: tuple[float, float]) -> str:
        return f"{w[0]:g},{w[1]:g}"

    out: dict[str, list[Choice]] = {rule: [] for rule in RULES}
    for kind in per_kind:
        others = [k for k in per_kind if k != kind]
        pooled, _ = choose_weights(negatives, _pool(per_kind, others), stats)
        gated, _ = choose_weights(negatives, _pool(per_kind, others), stats, margin_z=STUDY_MARGIN_Z)
        per_other = {w: min(kind_auroc(negatives, per_kind[k], stats, w) for k in others) for w in WEIGHT_CANDIDATES}
        worst = max(WEIGHT_CANDIDATES, key=lambda w: per_other[w])  # first of equal maxima, as choose_weights
        choices = {
            "pooled": (pooled.residual, pooled.discrimination),
            "gated": (gated.residual, gated.discrimination),
            "worst-kind": worst,
        }
        choices.update({key(w): w for w in WEIGHT_CANDIDATES})
        for rule, w in choices.items():
            out[rule].append((kind, key(w), kind_auroc(negatives, per_kind[kind], stats, w)))
    return out


@dataclass(frozen=True)
class RunScorer:
    """A finished run ready for label-free studies: its config, validation normals, a scoring function,
    the negatives its selection scored (normals, plus relit copies with lighting drift) and the normals'
    z-score statistics."""

    config: TrainConfig
    normals: torch.Tensor
    scores: Callable[[torch.Tensor], Pair]
    negatives: Pair
    stats: dict[str, ScoreStats]


def run_scorer(run_dir: Path, batch_size: int) -> RunScorer:
    """Load a run's exported checkpoint and score its validation normals as its selection did."""
    import torch

    from service.postprocess import fit_score_stats
    from training.loops.engine import score_images
    from training.train import finished_run, selection_set

    run = finished_run(run_dir)
    trained, normals, train_config, device = run.trained, run.normals, run.config, torch.device("cpu")

    def scores(images: torch.Tensor) -> Pair:
        residual, discrimination, _ = score_images(trained.model, images, batch_size, device)
        return residual, discrimination

    normal = scores(normals)
    negatives = normal
    if train_config.lighting_drift > 0:  # the very relit normals the run's selection scored as normals
        relit_images = selection_set(normals, train_config).relit
        assert relit_images is not None
        relit = scores(relit_images)
        negatives = (np.r_[normal[0], relit[0]], np.r_[normal[1], relit[1]])
    return RunScorer(train_config, normals, scores, negatives, fit_score_stats(*normal))


def study_run(run_dir: Path, copies: int, batch_size: int) -> list[HoldoutRow]:
    """Leave-one-kind-out rows for one training run (its exported checkpoint and validation normals)."""
    from training.selection import selection_kinds

    run = run_scorer(run_dir, batch_size)
    kinds = selection_kinds(run.config.corruption)  # the kinds of the run's own set
    per_kind = per_kind_scores(run.scores, run.normals, run.config, kinds, copies)
    rows = []
    for rule, results in holdout(per_kind, run.negatives, run.stats).items():
        values = [value for _, _, value in results]
        chosen = {kind: weights for kind, weights, _ in results}
        rows.append(HoldoutRow(run_dir.name, rule, float(np.mean(values)), float(min(values)), chosen))
    return rows


def per_kind_scores(
    scores: Callable[[torch.Tensor], Pair],
    normals: torch.Tensor,
    train_config: TrainConfig,
    kinds: Sequence[str],
    copies: int,
) -> dict[str, Pair]:
    """kind -> the (residual, discrimination) scores of `copies` corrupted copies of the normals, each
    copy with shapes of that kind only, at the run's shape sizes and counts. The k-th kind of `kinds`
    always gets the same draws (kinds sort, so adding one at the end leaves the others' as they were)."""
    import torch

    from training.corruption import corrupt_batch

    seed = train_config.seed + SEED_OFFSET  # the selection's stream offset, never the training one
    per_kind: dict[str, Pair] = {}
    for index, kind in enumerate(kinds):
        config = replace(train_config.corruption, kinds=(kind,), clean_fraction=0.0)
        parts = [
            scores(corrupt_batch(normals, config, torch.Generator().manual_seed(seed + 1000 * c + index)).corrupted)
            for c in range(copies)
        ]
        per_kind[kind] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return per_kind


def holdout_table(rows: Sequence[HoldoutRow], command: str) -> str:
    """Markdown: one line per run, the mean (min) held-out AUROC of every rule; the best in bold."""
    runs = list(dict.fromkeys(r.run for r in rows))
    lines = [
        f"Command: `{command}`",
        "",
        "| run | " + " | ".join(RULES) + " |",
        "|---|" + "---|" * len(RULES),
    ]
    for run in runs:
        by_rule = {r.rule: r for r in rows if r.run == run}
        best = max(r.mean_auroc for r in by_rule.values())
        cells = []
        for rule in RULES:
            r = by_rule[rule]
            text = f"{r.mean_auroc:.3f} ({r.min_auroc:.3f})"
            cells.append(f"**{text}**" if r.mean_auroc >= best - 5e-4 else text)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: mean over the held-out synthetic kinds of the AUROC of the weighting the rule chose on",
        "the other kinds (in brackets the worst kind); bold within 0.0005 of the best rule. No test image",
        "is read.",
    ]
    return "\n".join(lines) + "\n"


def build_parser(parser: argparse.ArgumentParser) -> None:
    from training.bench import add_study_arguments

    add_study_arguments(parser, section="selection-holdout")
    parser.add_argument("--copies", type=int, default=3, help="defective copies of each validation normal per kind")


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from training.bench import study_runs

    problems = [] if args.copies >= 1 else [f"--copies must be at least 1 (got {args.copies})"]
    return study_runs(
        args, "selection", lambda run: study_run(run, args.copies, args.batch_size), holdout_table, problems, log
    )
