"""Which per-pixel residual separates defects best, on finished runs, without retraining them.

Each run's exported checkpoint reconstructs its validation normals, the relit copies and synthetic
defects of its own selection set (label-free), and, with `--test CATEGORY_ROOT`, the category's test
images; the reconstructions are scored with every residual of `models.config.RESIDUALS`, smoothed and
reduced exactly as the run's head does. Printed per run and residual: the image AUROC of the residual
score alone and the pixel AUROC of the residual map, on the synthetic set and (with `--test`) on the
test set at the model's resolution. The test columns are a measurement, never an input to a choice.

    python scripts/residual_crosscheck.py reports/acc11-base-skipganomaly/runs/screw-skipganomaly-default-128 \\
        --test ../shared/datasets/screw
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _runs import parse_runs, print_header

from models.config import RESIDUALS
from models.scoring import reduce_map, residual_map, smooth
from service.datasets import load_mask
from training import metrics
from training.evaluate import load_samples
from training.export import load_images
from training.train import finished_run, selection_set


def residual_outputs(model, images: torch.Tensor, kind: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(residual score (N,), smoothed residual map (N, S, S)) of the head with residual `kind`."""
    config = replace(model.config, residual=kind)
    scores, maps = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            amap = smooth(residual_map(x, model.reconstruct(x), kind), config.smoothing_kernel)
            scores.append(reduce_map(amap, config.score_reduction, config.topk_fraction).numpy())
            maps.append(amap[:, 0].numpy())
    return np.concatenate(scores), np.concatenate(maps)


def aurocs(negatives: tuple[np.ndarray, np.ndarray], positives: tuple[np.ndarray, np.ndarray], masks: np.ndarray):
    labels = np.r_[np.zeros(len(negatives[0])), np.ones(len(positives[0]))]
    image = metrics.auroc(labels, np.r_[negatives[0], positives[0]])
    truth = np.concatenate([np.zeros(negatives[1].shape, dtype=bool), masks]).ravel()
    pixel = metrics.auroc(truth, np.concatenate([negatives[1], positives[1]]).ravel()) if masks.any() else None
    return image, pixel


def test_set(root: Path, size: int, channels: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Squashed test images (N, C, S, S), labels (N,), masks (N, S, S) and which images have pixel labels."""
    samples = load_samples(root)
    mean, std = [0.5] * channels, [0.5] * channels
    images = load_images([s.path for s in samples], image_size=size, channels=channels, mean=mean, std=std, limit=10**9)
    masks = np.stack([load_mask(s.mask_path, (size, size)) for s in samples])
    known = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    return torch.from_numpy(images), np.array([s.label for s in samples]), masks, known


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> None:
    args = parse_runs(
        __doc__, lambda parser: parser.add_argument("--test", type=Path, help="the category root to score too")
    )
    print_header("run", "residual", "synthetic image / pixel", "test image / pixel")
    for path in args.runs:
        run = finished_run(path)
        model, cfg, normals = run.trained.model.eval(), run.config, run.normals
        synthetic = selection_set(normals, cfg)
        test = test_set(args.test, model.config.image_size, model.config.channels) if args.test else None
        for kind in RESIDUALS:
            neg = residual_outputs(model, normals, kind, args.batch_size)
            if synthetic.relit is not None:
                relit = residual_outputs(model, synthetic.relit, kind, args.batch_size)
                neg = (np.r_[neg[0], relit[0]], np.concatenate([neg[1], relit[1]]))
            pos = residual_outputs(model, synthetic.images, kind, args.batch_size)
            syn = aurocs(neg, pos, synthetic.masks[:, 0].numpy())
            real: tuple[float | None, float | None] = (None, None)
            if test is not None:
                images, labels, masks, known = test
                scores, maps = residual_outputs(model, images, kind, args.batch_size)
                image = metrics.auroc(labels, scores)
                pixel = metrics.auroc(masks[known].ravel(), maps[known].ravel()) if masks.any() else None
                real = (image, pixel)
            name = f"{path.parent.parent.name}/{path.name}" if path.parent.name == "runs" else path.name
            cells = f"{_fmt(syn[0])} / {_fmt(syn[1])} | {_fmt(real[0])} / {_fmt(real[1])}"
            print(f"| {name} | {kind} | {cells} |", flush=True)
    print("\nResidual score alone; pixel AUROC of the smoothed residual map at the model's resolution.")


if __name__ == "__main__":
    main()
