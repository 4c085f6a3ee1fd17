"""Which per-pixel residual separates defects best, on finished runs, without retraining them.

Each run's exported checkpoint reconstructs its validation normals, the relit copies and synthetic
defects of its own selection set (label-free), and, with `--test CATEGORY_ROOT`, the category's test
images; the reconstructions are scored with every residual of `models.config.RESIDUALS`, smoothed and
reduced as the run's head does, raw (a run's per-pixel statistics describe its own residual kind only;
`scripts/map_statistics_crosscheck.py` measures them). Printed per run and residual: the image AUROC of the residual
score alone and the pixel AUROC of the residual map, on the synthetic set and (with `--test`) on the
test set at the model's resolution. The test columns are a measurement, never an input to a choice.

    python scripts/residual_crosscheck.py reports/acc11-base-skipganomaly/runs/screw-skipganomaly-default-128 \\
        --test ../shared/datasets/screw
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _runs import fmt, parse_runs, print_header, run_name

from models.config import RESIDUALS
from models.scoring import reduce_map, residual_map, smooth
from service.datasets import load_mask
from training import metrics
from training.data import ImageDataset
from training.evaluate import load_samples
from training.train import finished_run, selection_set


def residual_outputs(model, images: torch.Tensor, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """residual kind -> (residual score (N,), smoothed residual map (N, S, S)), as the head would give
    with that `--residual`; each image is reconstructed once for all kinds."""
    config = model.config
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {kind: ([], []) for kind in RESIDUALS}
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            x_hat = model.reconstruct(x)
            for kind, (scores, maps) in parts.items():
                amap = smooth(residual_map(x, x_hat, kind), config.smoothing_kernel)  # (B, 1, S, S)
                scores.append(reduce_map(amap, config.score_reduction, config.topk_fraction).numpy())
                maps.append(amap[:, 0].numpy())
    return {kind: (np.concatenate(scores), np.concatenate(maps)) for kind, (scores, maps) in parts.items()}


def aurocs(negatives: tuple[np.ndarray, np.ndarray], positives: tuple[np.ndarray, np.ndarray], masks: np.ndarray):
    labels = np.r_[np.zeros(len(negatives[0])), np.ones(len(positives[0]))]
    image = metrics.auroc(labels, np.r_[negatives[0], positives[0]])
    truth = np.concatenate([np.zeros(negatives[1].shape, dtype=bool), masks]).ravel()
    pixel = metrics.auroc(truth, np.concatenate([negatives[1], positives[1]]).ravel()) if masks.any() else None
    return image, pixel


def test_set(root: Path, config) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """The test images as the model takes them (N, C, S, S), labels (N,), masks (N, S, S) and which
    images have pixel labels."""
    if config.resize != "squash":
        msg = f"{root}: this study compares one map per image; the run uses --resize {config.resize}"
        raise SystemExit(msg)
    samples = load_samples(root)
    images = ImageDataset.for_model([s.path for s in samples], config).images
    size = (config.image_size, config.image_size)
    masks = np.stack([load_mask(s.mask_path, size) for s in samples])
    known = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    return images, np.array([s.label for s in samples]), masks, known


def main() -> None:
    args = parse_runs(
        __doc__, lambda parser: parser.add_argument("--test", type=Path, help="the category root to score too")
    )
    print_header("run", "residual", "synthetic image / pixel", "test image / pixel")
    for path in args.runs:
        run = finished_run(path)
        model, cfg, normals = run.trained.model.eval(), run.config, run.normals
        synthetic = selection_set(normals, cfg)
        test = test_set(args.test, model.config) if args.test else None
        normal = residual_outputs(model, normals, args.batch_size)
        relit = None if synthetic.relit is None else residual_outputs(model, synthetic.relit, args.batch_size)
        defective = residual_outputs(model, synthetic.images, args.batch_size)
        real_outputs = None if test is None else residual_outputs(model, test[0], args.batch_size)
        for kind in RESIDUALS:
            neg = normal[kind]
            if relit is not None:
                neg = (np.r_[neg[0], relit[kind][0]], np.concatenate([neg[1], relit[kind][1]]))
            syn = aurocs(neg, defective[kind], synthetic.masks[:, 0].numpy())
            real: tuple[float | None, float | None] = (None, None)
            if test is not None and real_outputs is not None:
                _, labels, masks, known = test
                scores, maps = real_outputs[kind]
                pixel = metrics.auroc(masks[known].ravel(), maps[known].ravel()) if masks.any() else None
                real = (metrics.auroc(labels, scores), pixel)
            cells = f"{fmt(syn[0])} / {fmt(syn[1])} | {fmt(real[0])} / {fmt(real[1])}"
            print(f"| {run_name(path)} | {kind} | {cells} |", flush=True)
    print("\nResidual score alone; pixel AUROC of the smoothed residual map at the model's resolution.")


if __name__ == "__main__":
    main()
