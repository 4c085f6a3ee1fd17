"""Label-free check of `--corruption-object-placement`: score finished runs on synthetic sets placed both ways.

Each run's exported checkpoint scores its own selection set rebuilt from its seed and validation
normals twice, once with every shape placed anywhere (placement 0) and once with every shape centred
on structure (placement 1), through `fit_scores`, the run's own end-of-epoch code. A run trained with
uniform placement that scores well on the first set and poorly on the second has a detector that is
blind where parts have their defects. No test image is read.

    python scripts/placement_crosscheck.py reports/acc11-base-skipganomaly/runs/screw-skipganomaly-default-128 ...
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from service.bundle import ScoreWeights
from training.checkpoint import load_trained
from training.config import TrainConfig
from training.loops.engine import fit_scores
from training.train import selection_set, validation_normals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | trained with | set placed | weights chosen | image AUROC | pixel AUROC | residual / discr. alone |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        trained = load_trained(run)
        config = TrainConfig.from_dict(trained.train_config)
        normals = validation_normals(trained, run)
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
