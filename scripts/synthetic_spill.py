"""Does a defect raise a run's maps far from it? Measured on its label-free synthetic set.

Each synthetic defect is pasted on a copy of a validation normal, so the same pixels can be scored
with and without the defect. For the pixels farther than 1/16 of the side from the pasted mask, this
prints the AUROC of their map values on the defective copy against the same pixels of the clean
normal (0.5: the defect changes nothing away from itself) and the ratio of the two means, for each
map the head standardises (raw, before per-pixel statistics). A reconstruction that shifts as a whole
when its input holds a defect (a bottleneck's code is global) shows up here as values above 0.5;
`scripts/pixel_decomposition.py` measures the same on real test images, where the masks may also
miss part of a defect. No test images are read.

    python scripts/synthetic_spill.py reports/s64-seed0/runs/magnetic_tile-skipganomaly-default-64
"""

from __future__ import annotations

import numpy as np
from _runs import fmt, parse_runs, print_header, run_name
from map_statistics_crosscheck import maps
from pixel_decomposition import auroc_of, near_and_far

from training.train import finished_run, selection_set


def main() -> None:
    args = parse_runs(__doc__)
    print_header("run", "map", "far pixels: defective copy vs clean (AUROC)", "mean ratio")
    for path in args.runs:
        run = finished_run(path)
        model = run.trained.model.eval()
        synthetic = selection_set(run.normals, run.config)
        clean, defective = maps(model, run.normals, args.batch_size), maps(model, synthetic.images, args.batch_size)
        masks = synthetic.masks[:, 0].numpy()
        far = [near_and_far(k)[1] if k.any() else None for k in masks]
        for name in clean:
            n = len(run.normals)  # copy i is of normal i mod n
            pairs = [(defective[name][i, 0][f], clean[name][i % n, 0][f]) for i, f in enumerate(far) if f is not None]
            on, off = (np.concatenate(side) for side in zip(*pairs, strict=True))
            print(f"| {run_name(path)} | {name} | {fmt(auroc_of(on, off))} | {fmt(float(on.mean() / off.mean()))} |")


if __name__ == "__main__":
    main()
