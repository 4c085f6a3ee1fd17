"""How a bundle's scores and maps follow the images' aspect ratio, and whether the maps would gain from
the aspect baseline too. Measured on exported bundles of finished runs.

`anoscope export` fits a baseline of each image score against log(width / height) on the training
normals and takes it off the scores (docs/training.md). First lines: on the test set, the correlation
of the combined score *without* the baseline with log(width / height), on good and on defective images,
and the image AUROC within the wide (aspect > 1.2) and the tall (< 0.8) images alone. Then: the maps are
left as they are; this fits the same kind of line to the training normals' *mean map value*, shifts each
test image's map by it, and compares the pixel AUROC with and without the shift (`--scales` multiplies
the fitted slope). Last: the label-free weighting on the run's own selection set (its validation normals
and their synthetic copies), chosen on the scores as they are and again with the bundle's baseline taken
off each copy at its source image's aspect: would the selection choose otherwise if it saw the baseline?
The test figures are a measurement, never an input to a choice.

    python scripts/aspect_crosscheck.py reports/b1-ctl-seed0/runs/magnetic_tile-skipganomaly-default-128 \\
        reports/asp-ctl-seed0/bundle --test ../shared/datasets/magnetic_tile
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.engine import OnnxEngine, score_files
from service.postprocess import baselined, combine_scores
from training import metrics
from training.checkpoint import load_trained
from training.evaluate import load_samples, score_samples
from training.loops.engine import score_images
from training.position_stats import spaced_indices
from training.selection import choose_weights
from training.train import finished_run, selection_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training run folder (its training normals are read)")
    parser.add_argument("bundle", type=Path, help="the run's exported bundle")
    parser.add_argument("--test", type=Path, required=True, help="MVTec-layout category with test/ and ground_truth/")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    args = parser.parse_args()

    trained = load_trained(args.run)
    engine = OnnxEngine(args.bundle, providers=("cpu",), intra_op_threads=1)
    paths = [trained.train_paths[i] for i in spaced_indices(len(trained.train_paths))]
    level, log_aspect = [], []
    for _, img, out in score_files(engine, paths):
        level.append(float(out.anomaly_map.mean()))
        log_aspect.append(float(np.log(img.size[0] / img.size[1])))
    x, y = np.asarray(log_aspect), np.asarray(level)
    centre = float(x.mean())
    slope = float(np.polyfit(x - centre, y, 1)[0])
    print(
        f"{args.bundle}: mean map value of {x.size} training normals against log aspect: slope {slope:+.4f}, "
        f"r {np.corrcoef(x, y)[0, 1]:+.2f}"
    )
    scored = score_samples(engine, load_samples(args.test))
    test_log_aspect = np.log(scored.aspect)
    meta = engine.metadata
    plain = {k: s.model_copy(update={"aspect_slope": 0.0}) for k, s in meta.score_stats.items()}
    combined = combine_scores(scored.residual, scored.discrimination, plain, meta.score_weights)
    labels = scored.labels
    for name, sel in (("good", labels == 0), ("defective", labels == 1)):
        r = np.corrcoef(test_log_aspect[sel], combined[sel])[0, 1]
        print(f"combined score without the baseline against log aspect, {name} test images: r {r:+.2f}")
    for name, sel in (("wide (> 1.2)", scored.aspect > 1.2), ("tall (< 0.8)", scored.aspect < 0.8)):
        print(f"image AUROC without the baseline, {name} images alone: {metrics.auroc(labels[sel], combined[sel]):.3f}")
    keep = scored.has_mask
    masks = [m for m, k in zip(scored.masks, keep, strict=True) if k]
    print("| map shift (x fitted slope) | pixel AUROC |")
    print("|---|---|")
    for scale in args.scales:
        maps = [
            m - scale * slope * (la - centre) for m, la, k in zip(scored.maps, test_log_aspect, keep, strict=True) if k
        ]
        values, labels = metrics.pool_pixels(maps, masks)
        print(f"| {scale:g} | {metrics.auroc(labels, values):.3f} |")
    selection_with_baseline(args.run, meta)


def selection_with_baseline(run_dir: Path, meta) -> None:
    """The weighting the run's selection set chooses with and without the bundle's aspect baseline."""
    run = finished_run(run_dir)
    synthetic = selection_set(run.normals, run.config)

    def scores(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return score_images(run.trained.model, images, 32, torch.device("cpu"))[:2]  # type: ignore[return-value]

    aspect = np.array([w / h for w, h in (Image.open(p).size for p in run.trained.val_paths)])
    normals = run.normals
    if synthetic.relit is not None:  # the selection counts the relit normals as normals too (fit_scores)
        normals, aspect = torch.cat([normals, synthetic.relit]), np.r_[aspect, aspect]
    normal, defective = scores(normals), scores(synthetic.images)
    copies = aspect[np.arange(len(defective[0])) % len(run.normals)]  # copy i is made from validation normal i mod N
    stats = meta.score_stats
    plain = {k: s.model_copy(update={"aspect_slope": 0.0}) for k, s in stats.items()}

    def off(pair, asp):
        return tuple(baselined(v, stats[k], asp) for v, k in zip(pair, ("residual", "discrimination"), strict=True))

    print("| selection set | weights chosen | AUROC of each candidate |")
    print("|---|---|---|")
    for name, (n, d) in (("as is", (normal, defective)), ("baselined", (off(normal, aspect), off(defective, copies)))):
        weights, candidates = choose_weights(n, d, plain)
        shown = ", ".join(f"{k}: {v:.4f}" for k, v in candidates.items())
        print(f"| {name} | {weights.residual:g}/{weights.discrimination:g} | {shown} |")


if __name__ == "__main__":
    main()
