"""Do per-pixel statistics of normal images sharpen the image scores? Measured on finished runs.

Each run's exported checkpoint is given the per-pixel statistics `--position-statistics` fits after
training (`training.position_stats`, on up to 200 of the run's *training* normals, for both maps; the validation
normals carry the selection set), without retraining. Printed per run, map (residual,
discrimination) and variant (raw: the map as the run scores it; standardised: against the
statistics, as a `--position-statistics` run scores it): the image AUROC of the map's reduction and
the pixel AUROC of the map, on the label-free synthetic set and (with `--test`) on the test set. The
test columns are a measurement, never an input to a choice. `--placement S` rebuilds the synthetic set
with `--corruption-object-placement S` (1: every shape on the part) instead of the run's own setting.

    python scripts/map_statistics_crosscheck.py reports/acc12-skip-bottle/runs/bottle-skipganomaly-default-128 \\
        --test ../shared/datasets/bottle
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _runs import fmt, parse_runs, print_header, run_name
from residual_crosscheck import aurocs, test_set

from models import build_model
from models.scoring import reduce_map, standardise
from training import metrics
from training.checkpoint import load_checkpoint
from training.position_stats import STATS_IMAGES, fit_position_statistics, raw_maps, training_normals
from training.train import finished_run, selection_set

NAMES = ("residual", "discrimination")


def maps(model, images: torch.Tensor, batch: int) -> dict[str, np.ndarray]:
    """map name -> (N, 1, S, S): the maps the head standardises, raw."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in NAMES}
    with torch.no_grad():
        for start in range(0, len(images), batch):
            for name, amap in zip(NAMES, raw_maps(model, images[start : start + batch]), strict=True):
                if amap is not None:
                    out[name].append(amap.numpy())
    return {name: np.concatenate(parts) for name, parts in out.items() if parts}


def with_statistics(run, batch: int):
    """The run's model with per-pixel statistics fitted on its training normals, as training fits them."""
    trained = run.trained
    model = build_model(replace(trained.model_config, position_statistics=True))
    model.load_state_dict(trained.model.state_dict(), strict=False)
    model.eval()
    images = training_normals(load_checkpoint(trained.path)["train_paths"], trained.model_config)
    fit_position_statistics(model, images, batch, torch.device("cpu"))
    return model


def variant(model, amap: np.ndarray, name: str, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), map (N, S, S)) of one map, raw or standardised as the head would score it."""
    t = torch.from_numpy(amap)
    if how == "standardised":
        t = standardise(t, model.position, NAMES.index(name))
    config = model.config
    return reduce_map(t, config.score_reduction, config.topk_fraction).numpy(), t[:, 0].numpy()


def main() -> None:
    def extra(parser):
        parser.add_argument("--test", type=Path, help="the category root to score too")
        parser.add_argument(
            "--placement",
            type=float,
            help="rebuild the synthetic set with this --corruption-object-placement (default: the run's own)",
        )

    args = parse_runs(__doc__, extra)
    print_header("run", "map", "variant", "synthetic image / pixel", "test image / pixel")
    for path in args.runs:
        run = finished_run(path)
        model = with_statistics(run, args.batch_size)
        config = run.config
        if args.placement is not None:
            config = replace(config, corruption=replace(config.corruption, object_placement=args.placement))
        synthetic = selection_set(run.normals, config)
        normal = maps(model, run.normals, args.batch_size)
        relit = None if synthetic.relit is None else maps(model, synthetic.relit, args.batch_size)
        defective = maps(model, synthetic.images, args.batch_size)
        test = test_set(args.test, model.config) if args.test else None
        real_maps = None if test is None else maps(model, test[0], args.batch_size)
        for name in normal:
            for how in ("raw", "standardised"):
                negatives = normal[name] if relit is None else np.concatenate([normal[name], relit[name]])
                neg, pos = variant(model, negatives, name, how), variant(model, defective[name], name, how)
                syn = aurocs(neg, pos, synthetic.masks[:, 0].numpy())
                real: tuple[float | None, float | None] = (None, None)
                if test is not None and real_maps is not None:
                    _, labels, masks, known = test
                    scores, amap = variant(model, real_maps[name], name, how)
                    pixel = metrics.auroc(masks[known].ravel(), amap[known].ravel()) if masks.any() else None
                    real = (metrics.auroc(labels, scores), pixel)
                cells = f"{fmt(syn[0])} / {fmt(syn[1])} | {fmt(real[0])} / {fmt(real[1])}"
                print(f"| {run_name(path)} | {name} | {how} | {cells} |", flush=True)
    print(f"\nStatistics from up to {STATS_IMAGES} training normals per run; image score = the map's reduction.")


if __name__ == "__main__":
    main()
