"""Which box-filter size of the anomaly maps (`--map-smoothing`) finds defects best? Measured on finished runs.

The head smooths both maps with a box filter before standardising and reducing them (auto: image
size // `map_smoothing_divisor`, made odd). A 1-2 px crack is diluted by a wide filter; a large faint
region is not. Each run's exported checkpoint is rescored under every `--kernels` size without retraining:
the per-pixel statistics are refitted on its training normals for that size (as training fits them),
and each map is scored as the run scores it (standardised if the run standardises it, raw if not).
Printed per run, kernel and map: image AUROC, pixel AUROC and AUPRO on the label-free synthetic set
and (with `--test`) on the test set, at the model's resolution (masks squashed like the images).
The test columns are a measurement, never an input to a choice.

    python scripts/smoothing_crosscheck.py reports/acc15-skipB-seed0/runs/magnetic_tile-skipganomaly-default-128 \\
        --test ../shared/datasets/magnetic_tile --kernels 1 3 5 9 17
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _runs import fmt, parse_runs, print_header, run_name
from map_statistics_crosscheck import maps, variant
from residual_crosscheck import test_set

from models import build_model
from training import metrics
from training.checkpoint import load_checkpoint
from training.position_stats import fit_position_statistics, training_normals
from training.train import finished_run, selection_set


def scores(
    model, negatives: np.ndarray, positives: np.ndarray, masks: np.ndarray, name: str, how: str
) -> tuple[float | None, float | None, float | None]:
    """(image AUROC, pixel AUROC, AUPRO) of one map: `negatives` and `positives` raw (N, 1, S, S),
    `masks` (P, S, S) the positives' defect pixels."""
    neg, pos = variant(model, negatives, name, how), variant(model, positives, name, how)
    labels = np.r_[np.zeros(len(neg[0])), np.ones(len(pos[0]))]
    image = metrics.auroc(labels, np.r_[neg[0], pos[0]])
    all_maps = [*neg[1], *pos[1]]
    all_masks = [*np.zeros(neg[1].shape, dtype=bool), *masks]
    if not masks.any():
        return image, None, None
    values, truth = metrics.pool_pixels(all_maps, all_masks)
    return image, metrics.auroc(truth, values), metrics.aupro(all_maps, all_masks)


def main() -> None:
    def extra(parser):
        parser.add_argument("--test", type=Path, help="the category root to score too")
        parser.add_argument("--kernels", type=int, nargs="+", default=[1, 3, 5, 9, 17], help="odd box sizes")

    args = parse_runs(__doc__, extra)
    print_header("run", "kernel", "map (as scored)", "synthetic image / pixel / AUPRO", "test image / pixel / AUPRO")
    for path in args.runs:
        run = finished_run(path)
        trained = run.trained
        state = load_checkpoint(trained.path)
        standardised = set((state["provenance"].get("position_statistics") or {}).get("standardised", []))
        normals_for_statistics = training_normals(state["train_paths"], trained.model_config)
        synthetic = selection_set(run.normals, run.config)
        test = test_set(args.test, trained.model_config) if args.test else None
        for kernel in args.kernels:
            config = replace(trained.model_config, map_smoothing=kernel, position_statistics=True)
            model = build_model(config)
            model.load_state_dict(trained.model.state_dict(), strict=False)
            model.eval()
            fit_position_statistics(model, normals_for_statistics, args.batch_size, torch.device("cpu"))
            normal = maps(model, run.normals, args.batch_size)
            relit = None if synthetic.relit is None else maps(model, synthetic.relit, args.batch_size)
            defective = maps(model, synthetic.images, args.batch_size)
            real = None if test is None else maps(model, test[0], args.batch_size)
            for name in normal:
                how = "standardised" if name in standardised else "raw"
                negatives = normal[name] if relit is None else np.concatenate([normal[name], relit[name]])
                syn = scores(model, negatives, defective[name], synthetic.masks[:, 0].numpy(), name, how)
                on_test: tuple[float | None, ...] = (None, None, None)
                if test is not None and real is not None:
                    _, labels, masks, known = test
                    good, bad = (labels == 0) & known, (labels == 1) & known
                    on_test = scores(model, real[name][good], real[name][bad], masks[bad], name, how)
                    on_test = (metrics.auroc(labels, variant(model, real[name], name, how)[0]), *on_test[1:])
                cells = " / ".join(map(fmt, syn)) + " | " + " / ".join(map(fmt, on_test))
                print(f"| {run_name(path)} | {kernel} | {name} ({how}) | {cells} |", flush=True)
    print("\nPer-pixel statistics refitted for every kernel on up to 200 training normals per run.")


if __name__ == "__main__":
    main()
