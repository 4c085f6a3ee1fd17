"""Would a multi-scale anomaly map cover large, faint defect regions better? Measured on finished runs.

The head box-filters each map once (`--map-smoothing`, 9 px at 128 px). A 9-px filter keeps a thin
crack but leaves a large region of changed finish (magnetic_tile's "uneven" bands, a quarter of the
tile) flagged only where its map happens to peak. Each run's exported checkpoint is rescored with
its maps unsmoothed, then filtered here by every `--filters` entry: `K` is one K-px box, `K1+K2+...`
the mean of several boxes (a multi-scale map: a peak of the finest size on a skirt of the widest),
`K1,K2,...` the pixelwise max of each box's map z-scored against the run's training normals (scale-space
detection: each defect found at the scale that suits it), `whole` the image's mean map value on every
pixel (a map with no localisation, as a reference).
Printed per run, map and filter: pixel AUROC and AUPRO on the label-free synthetic set and (with
`--test`) on the test set, at the model's resolution (masks squashed like the images), and on the
test set per defect type. The test columns are a measurement, never an input to a choice.

    python scripts/multiscale_crosscheck.py reports/f1-skip-magnetic_tile/runs/magnetic_tile-skipganomaly-default-128 \\
        --test ../shared/datasets/magnetic_tile --filters 9 17 33 9+33 9+17+33
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _runs import fmt, parse_runs, print_header, run_name
from map_statistics_crosscheck import maps
from residual_crosscheck import test_set

from models import build_model
from models.scoring import smooth
from training import metrics
from training.checkpoint import load_checkpoint
from training.evaluate import load_samples
from training.position_stats import training_normals
from training.train import finished_run, selection_set


def unsmoothed(model, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """map name -> (N, 1, S, S), the head's maps before any box filter (the model smooths with 1 px)."""
    return {name: torch.from_numpy(amap) for name, amap in maps(model, images, batch).items()}


def filter_spec(text: str) -> str:
    """`--filters` entry check: "whole", or odd box sizes joined by one of "+" (mean) or "," (z-scored max)."""
    if text == "whole":
        return text
    parts = text.replace(",", "+").split("+")
    if ("+" in text and "," in text) or not all(p.isdigit() and int(p) % 2 == 1 for p in parts):
        msg = (
            f"{text!r}: give 'whole', or odd box sizes joined by '+' (mean) or ',' (z-scored max), e.g. 9+33 or 3,9,33"
        )
        raise argparse.ArgumentTypeError(msg)
    return text


def scale_statistics(amap: torch.Tensor, kernels: set[int]) -> dict[int, tuple[float, float]]:
    """Box size -> (mean, std) over every pixel of the normals' maps `amap` (N, 1, S, S) at that size."""
    out = {}
    for k in sorted(kernels):
        values = smooth(amap, k)
        out[k] = (float(values.mean()), float(values.std()) + 1e-12)
    return out


def filtered(amap: torch.Tensor, spec: str, stats: dict[int, tuple[float, float]]) -> np.ndarray:
    """`amap` (N, 1, S, S) under the filter `spec` -> (N, S, S): "9" one box, "9+33" the mean of the
    boxes, "9,33" the max over the boxes of each box's map z-scored by `stats` (from training normals),
    "whole" every pixel given its image's mean (no localisation at all: what image-level evidence alone
    earns in pixel AUROC)."""
    if spec == "whole":
        return amap.mean(dim=(2, 3), keepdim=True).expand_as(amap)[:, 0].numpy()
    if "," in spec:
        kernels = [int(k) for k in spec.split(",")]
        zs = [(smooth(amap, k) - stats[k][0]) / stats[k][1] for k in kernels]
        return torch.stack(zs).amax(dim=0)[:, 0].numpy()
    kernels = [int(k) for k in spec.split("+")]
    return (sum(smooth(amap, k) for k in kernels) / len(kernels))[:, 0].numpy()


def pixel_figures(negatives: np.ndarray, positives: np.ndarray, masks: np.ndarray) -> tuple[float | None, float | None]:
    """(pixel AUROC, AUPRO) of maps (N, S, S) of normal and defective images, `masks` (P, S, S)."""
    all_maps = [*negatives, *positives]
    all_masks = [*np.zeros(negatives.shape, dtype=bool), *masks]
    values, truth = metrics.pool_pixels(all_maps, all_masks)
    return metrics.auroc(truth, values), metrics.aupro(all_maps, all_masks)


def main() -> None:
    def extra(parser):
        parser.add_argument("--test", type=Path, help="the category root to score too")
        parser.add_argument(
            "--filters",
            nargs="+",
            type=filter_spec,
            default=["9", "17", "33", "9+33"],
            help="odd box sizes: K one box, K1+K2 their mean, K1,K2 the max of their z-scored maps; or whole",
        )

    args = parse_runs(__doc__, extra)
    zscored = {int(k) for spec in args.filters if "," in spec for k in spec.split(",")}
    rows = []
    for path in args.runs:
        run = finished_run(path)
        trained = run.trained
        model = build_model(replace(trained.model_config, map_smoothing=1))
        model.load_state_dict(trained.model.state_dict(), strict=False)
        model.eval()
        synthetic = selection_set(run.normals, run.config)
        negatives = run.normals if synthetic.relit is None else torch.cat([run.normals, synthetic.relit])
        normal, defective = (
            unsmoothed(model, negatives, args.batch_size),
            unsmoothed(model, synthetic.images, args.batch_size),
        )
        test = test_set(args.test, trained.model_config) if args.test else None
        real = None if test is None else unsmoothed(model, test[0], args.batch_size)
        fitting = {}
        if zscored:  # only the z-scored max needs the training normals' maps
            train_paths = load_checkpoint(trained.path)["train_paths"]
            fitting = unsmoothed(model, training_normals(train_paths, trained.model_config), args.batch_size)
        kinds = None if test is None else np.array([s.defect_type for s in load_samples(args.test)])
        for name in normal:
            stats = scale_statistics(fitting[name], zscored) if zscored else {}
            for spec in args.filters:
                syn = pixel_figures(
                    filtered(normal[name], spec, stats),
                    filtered(defective[name], spec, stats),
                    synthetic.masks[:, 0].numpy(),
                )
                cells = [*syn]
                per_kind: dict[str, float | None] = {}
                if test is not None and real is not None and kinds is not None:
                    _, labels, masks, known = test
                    test_maps = filtered(real[name], spec, stats)
                    good, bad = (labels == 0) & known, (labels == 1) & known
                    cells += pixel_figures(test_maps[good], test_maps[bad], masks[bad])
                    for kind in sorted(set(kinds[bad])):
                        pick = good | (bad & (kinds == kind))
                        values, truth = metrics.pool_pixels(list(test_maps[pick]), list(masks[pick]))
                        per_kind[kind] = metrics.auroc(truth, values)
                rows.append((run_name(path), name, spec, cells, per_kind))
                print(f"{run_name(path)} {name} {spec}: " + " / ".join(map(fmt, cells)), flush=True)
    kinds_seen = sorted({k for *_, per in rows for k in per})
    print()
    print_header(
        "run", "map", "filter", "synthetic pixel / AUPRO", "test pixel / AUPRO", *(f"{k} pixel" for k in kinds_seen)
    )
    for run, name, spec, cells, per_kind in rows:
        test_cells = " / ".join(map(fmt, cells[2:])) if len(cells) > 2 else "–"
        kind_cells = [fmt(per_kind.get(k)) for k in kinds_seen]
        synthetic_cells = " / ".join(map(fmt, cells[:2]))
        print(f"| {run} | {name} | {spec} | {synthetic_cells} | {test_cells} | {' | '.join(kind_cells)} |")
    print("\nMaps unsmoothed by the head, then filtered here; pixel figures at the model's resolution.")


if __name__ == "__main__":
    main()
