"""Label-free check of `--corruption-object-placement`: score finished runs on synthetic sets placed both ways.

Each run's exported checkpoint scores its own selection set rebuilt from its seed and validation
normals twice, once with every shape placed anywhere (placement 0) and once with every shape centred
on structure (placement 1), through `fit_scores`, the run's own end-of-epoch code. A run trained with
uniform placement that scores well on the first set and poorly on the second has a detector that is
blind where parts have their defects. No test image is read.

    python scripts/placement_crosscheck.py reports/acc11-base-skipganomaly/runs/screw-skipganomaly-default-128 ...
"""

from __future__ import annotations

from dataclasses import replace

import torch
from _runs import parse_runs, print_header

from service.bundle import ScoreWeights
from training.loops.engine import fit_scores
from training.train import finished_run, selection_set


def main() -> None:
    args = parse_runs(__doc__)
    print_header(
        "run", "trained with", "set placed", "weights chosen", "image AUROC", "pixel AUROC", "residual / discr. alone"
    )
    for run in args.runs:
        finished = finished_run(run)
        trained, config, normals = finished.trained, finished.config, finished.normals
        for placement in (0.0, 1.0):
            placed = replace(config, corruption=replace(config.corruption, object_placement=placement))
            synthetic = selection_set(normals, placed)
            fitted = fit_scores(trained.model, normals, ScoreWeights(), args.batch_size, torch.device("cpu"), "check",
                                synthetic, True)  # fmt: skip
            s = fitted.selection
            assert s is not None, "fit_scores selects when given the synthetic set"
            pixel = "–" if s.pixel_auroc is None else f"{s.pixel_auroc:.3f}"
            print(
                f"| {run.name} | {config.corruption.object_placement:g} | {placement:g} "
                f"| {s.weights.residual:g}/{s.weights.discrimination:g} | {s.image_auroc:.3f} | {pixel} "
                f"| {s.candidates['1,0']:.3f} / {s.candidates['0,1']:.3f} |"
            )


if __name__ == "__main__":
    main()
