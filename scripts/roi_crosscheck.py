"""What a part's region of interest (`--roi part`) does to finished runs, without retraining.

Each run's exported checkpoint is given the region `training.roi` fits after training (on up to 200 of
its *training* normals), at the default margin and at a few others, and its score statistics are
refitted on its validation normals within the region, as training refits them. Printed per run and
margin: the region's share of the frame, the image AUROC of the combined score on the test set as it
is and with every test image relit to one grey level (`anoscope evaluate --brightness-matched`; the
figure that counts where lighting separates the test set), and the pixel AUROC where there are masks.
"none" is the run as trained. The test columns are a measurement, never an input to a choice: the
default margin was set from the part's geometry (a thread's width) before these runs.

    python scripts/roi_crosscheck.py reports/acc19-skip-screw-seed0/runs/screw-skipganomaly-default-128 \\
        --test ../shared/datasets/screw
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _runs import parse_runs, print_header, run_name
from residual_crosscheck import test_set

from models import build_model
from service.images import load_image_file
from service.postprocess import combine_scores, fit_score_stats
from training import metrics
from training.checkpoint import load_checkpoint
from training.data import ImageDataset
from training.evaluate import load_samples, mean_brightness, relight
from training.position_stats import training_normals
from training.roi import margin, part_masks, region
from training.train import finished_run

MARGINS = (0, 2, 4, 8)  # pixels at 128 px; scaled with the image size


def head_outputs(model, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual (N,), discrimination (N,), anomaly map (N, S, S)) of the exported head."""
    head = model.scoring_head().eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            r, d, m = head(images[start : start + batch])
            out.append((r.numpy(), d.numpy(), m[:, 0].numpy()))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


def relit_images(root: Path, config) -> torch.Tensor:
    """The test images relit to their median mean grey level, as the model takes them."""
    samples = load_samples(root)
    images = [load_image_file(s.path) for s in samples]
    grey = float(np.median([mean_brightness(im) for im in images]))
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(images):
            paths.append(Path(tmp) / f"{i:04d}.png")
            relight(im, grey).save(paths[-1])
        return ImageDataset.for_model(paths, config).images


def main() -> None:
    args = parse_runs(__doc__, lambda p: p.add_argument("--test", type=Path, required=True, help="the category root"))
    print_header("run", "region (margin px)", "share of frame", "image AUROC as is", "relit", "pixel AUROC")
    for path in args.runs:
        run = finished_run(path)
        trained = run.trained
        source = trained.model_config
        model = build_model(replace(source, roi="part"))
        model.load_state_dict(trained.model.state_dict(), strict=False)
        model.eval()
        masks = part_masks(training_normals(load_checkpoint(trained.path)["train_paths"], source))
        images, labels, pixel_masks, known = test_set(args.test, source)
        relit = relit_images(args.test, source)
        size = source.image_size
        for widen in (None, *MARGINS):
            if widen is None:
                roi, label = np.ones((size, size), dtype=bool), "none"
            else:
                px = round(widen * size / 128)
                roi = region(masks, widen=px)
                label = f"part ({px})" + (" default" if px == margin(size) else "")
            model.roi_mask.copy_(torch.from_numpy(roi).float()[None, None])
            stats = fit_score_stats(*head_outputs(model, run.normals, args.batch_size)[:2])
            cells = []
            for batch in (images, relit):
                r, d, amap = head_outputs(model, batch, args.batch_size)
                cells.append(f"{metrics.auroc(labels, combine_scores(r, d, stats, trained.score_weights)):.3f}")
                if batch is images:
                    maps = amap
            pixel = metrics.auroc(pixel_masks[known].ravel(), maps[known].ravel()) if pixel_masks.any() else None
            pixel_cell = "–" if pixel is None else f"{pixel:.3f}"
            print(
                f"| {run_name(path)} | {label} | {roi.mean():.2f} | {cells[0]} | {cells[1]} | {pixel_cell} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
