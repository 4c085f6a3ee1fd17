"""`anoscope bench reduction`: which reduction of the anomaly maps makes the best image score?

The exported head reduces each smoothed map to one score per image (`--score-reduction`: the maximum,
the mean of the top `--topk-fraction` of pixels, or the mean). This bench rescores a trained run's
exported checkpoint under every reduction and reports, side by side, what the label-free selection
would see (image AUROC of the weighting it would choose on the run's own synthetic selection set) and
what the test set says (image AUROC of that same weighting, and of each score alone). The test labels
fill the report only; nothing here feeds a choice back into a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.bundle import ScoreStats, ScoreWeights

REDUCTIONS = ("max", "topk", "mean")


@dataclass(frozen=True)
class ReductionRow:
    run: str
    reduction: str
    weights: str  # "w_r/w_d" the selection's rule chose on the synthetic set under this reduction
    synthetic_auroc: float  # of that weighting on the synthetic set (what the selection compares)
    test_auroc: float  # of that weighting on the test set
    test_residual: float  # the residual score alone on the test set
    test_discrimination: float  # the discrimination score alone


def _test_auroc(
    labels: np.ndarray,
    residual: np.ndarray,
    discrimination: np.ndarray,
    stats: dict[str, ScoreStats],
    weights: ScoreWeights,
) -> float:
    from service.postprocess import combine_scores
    from training.metrics import auroc

    value = auroc(labels, combine_scores(residual, discrimination, stats, weights))
    return float("nan") if value is None else value


def study_run(
    run_dir: Path, batch_size: int, data: Path | None = None, margin_z: float | None = None
) -> list[ReductionRow]:
    """One row per reduction for a training run's exported checkpoint; `margin_z` (None = the run's own
    `--select-margin`) gates the weighting choice as in `training.selection.choose_weights`."""
    import torch

    from service.bundle import ScoreWeights
    from service.datasets import labelled_samples
    from service.tiles import image_maxima
    from training.data import ImageDataset
    from training.loops.engine import fit_scores, score_images
    from training.train import finished_run, selection_set

    run = finished_run(run_dir)
    trained, normals, train_config = run.trained, run.normals, run.config
    config, device = trained.model_config, torch.device("cpu")

    synthetic = selection_set(normals, train_config)  # the run's own selection set, rebuilt from its seed
    margin = train_config.select_margin if margin_z is None else margin_z
    samples = labelled_samples(data if data is not None else train_config.data)
    test_set = ImageDataset.for_model([s.path for s in samples], config)
    test, labels = test_set.images, np.array([s.label for s in samples])
    per_image = test_set.tiles_per_image
    rows = []
    for how in REDUCTIONS:
        trained.model.config = replace(config, score_reduction=how)
        # Exactly what the run's end of epoch does: statistics on the normals, weights chosen on the set.
        fitted = fit_scores(
            trained.model, normals, ScoreWeights(), batch_size, device, "bench", synthetic, True, margin_z=margin
        )
        chosen = fitted.selection
        assert chosen is not None, "fit_scores selects when given the synthetic set"
        residual, discrimination, _ = score_images(trained.model, test, batch_size, device)
        # An image's score is its tiles' maximum, as the service takes it.
        residual, discrimination = image_maxima(residual, per_image), image_maxima(discrimination, per_image)
        on_test = partial(_test_auroc, labels, residual, discrimination, fitted.stats)
        rows.append(
            ReductionRow(
                run=run_dir.name,
                reduction=how,
                weights=f"{chosen.weights.residual:g}/{chosen.weights.discrimination:g}",
                synthetic_auroc=chosen.image_auroc,
                test_auroc=on_test(chosen.weights),
                test_residual=on_test(ScoreWeights(residual=1.0, discrimination=0.0)),
                test_discrimination=on_test(ScoreWeights(residual=0.0, discrimination=1.0)),
            )
        )
    return rows


def reduction_table(rows: Sequence[ReductionRow], command: str) -> str:
    """Markdown: one line per run and reduction; the label-free best per run in bold."""
    lines = [
        f"Command: `{command}`",
        "",
        "| run | reduction | weights chosen | synthetic AUROC (label-free) | test image AUROC "
        "| residual / discr. alone |",
        "|---|---|---|---|---|---|",
    ]
    for run in dict.fromkeys(r.run for r in rows):
        mine = [r for r in rows if r.run == run]
        best = max(r.synthetic_auroc for r in mine)
        for r in mine:
            synthetic = f"{r.synthetic_auroc:.3f}"
            synthetic = f"**{synthetic}**" if r.synthetic_auroc >= best - 5e-4 else synthetic
            lines.append(
                f"| {run} | {r.reduction} | {r.weights} | {synthetic} | {r.test_auroc:.3f} "
                f"| {r.test_residual:.3f} / {r.test_discrimination:.3f} |"
            )
    lines += [
        "",
        "Weights: chosen by the selection's rule on the run's synthetic set under that reduction; bold: the",
        "reduction the label-free score prefers (within 0.0005). The test columns read the labels of the",
        "run's `test/` split and feed nothing back.",
    ]
    return "\n".join(lines) + "\n"


def build_parser(parser: argparse.ArgumentParser) -> None:
    from training.bench import add_study_arguments

    add_study_arguments(parser, section="reduction")
    parser.add_argument("--data", type=Path, help="labelled test data (default: each run's --data)")
    parser.add_argument(
        "--margin-z",
        type=float,
        help="choose the weighting with this --select-margin instead of each run's own (0 = the plain maximum)",
    )


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from training.bench import study_runs

    return study_runs(
        args,
        "reduction",
        lambda run: study_run(run, args.batch_size, args.data, args.margin_z),
        reduction_table,
        log=log,
    )
