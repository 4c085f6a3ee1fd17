"""How much of a test set's defective pixels each defect type holds: what pixel AUROC mostly measures.

Pixel AUROC pools every pixel of every test image, so a defect type whose masks are large decides it.
For each MVTec-layout category this prints, per defect type, the images, the mean and median share
of the image the mask covers, and the type's share of all defective pixels (every mask resized to
`--size`, the model's input, so images of different sizes count alike). It reads masks only; nothing
is trained or chosen from it.

    python scripts/defect_area.py ../shared/datasets/magnetic_tile ../shared/datasets/bottle
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from service.datasets import IMAGE_EXTENSIONS


def mask_shares(folder: Path, size: int) -> list[float]:
    """The share of the image each mask under `folder` covers, at `size` x `size`."""
    shares = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        mask = Image.open(path).convert("L").resize((size, size), Image.Resampling.NEAREST)
        shares.append(float((np.asarray(mask) > 127).mean()))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="MVTec-layout category roots (with ground_truth/)")
    parser.add_argument("--size", type=int, default=128, help="side the masks are resized to (the model's input)")
    args = parser.parse_args()
    print("| category | defect type | images | mask share of the image, mean / median | share of defective pixels |")
    print("|---|---|---|---|---|")
    for data in args.data:
        truth = data / "ground_truth"
        if not truth.is_dir():
            print(f"| {data.name} | (no ground_truth/: image labels only) | | | |")
            continue
        per_type = {t.name: mask_shares(t, args.size) for t in sorted(truth.iterdir()) if t.is_dir()}
        total = sum(sum(s) for s in per_type.values()) or 1.0
        for name, shares in per_type.items():
            if not shares:
                continue
            print(
                f"| {data.name} | {name} | {len(shares)} | {np.mean(shares):.1%} / {np.median(shares):.1%} "
                f"| {sum(shares) / total:.0%} |"
            )


if __name__ == "__main__":
    main()
