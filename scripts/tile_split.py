"""Image and pixel AUROC of bundles on a category, split by how many tiles each test image makes.

`--resize tiles` changes nothing for images closer to square than 1.5:1 and cuts the others into
tiles. To see where a tiles bundle wins or loses against a squash one, this scores every test image
with `anoscope evaluate`'s own functions and reports the figures separately for the images that stay
one tile and those that become several (under the tiles rule, whichever mode the bundle uses).

    python scripts/tile_split.py ../shared/datasets/magnetic_tile BUNDLE...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service.engine import OnnxEngine
from service.images import load_image_file
from service.tiles import tile_grid
from training import metrics
from training.evaluate import load_samples, score_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", type=Path, help="an MVTec AD category root with test/ and ground_truth/")
    parser.add_argument("bundles", nargs="+", type=Path)
    args = parser.parse_args()
    samples = load_samples(args.category)
    cut = np.array([tile_grid(*load_image_file(s.path).size).count > 1 for s in samples])
    print(f"{args.category.name}: {int((~cut).sum())} test images stay one tile, {int(cut.sum())} become several\n")
    print("| bundle | resize | image AUROC one tile / several | pixel AUROC one tile / several |")
    print("|---|---|---|---|")
    for bundle in args.bundles:
        engine = OnnxEngine(bundle, providers=("cpu",))
        scored = score_samples(engine, samples)
        labels, cells = scored.labels, {"image": [], "pixel": []}
        for group in (~cut, cut):
            cells["image"].append(metrics.auroc(labels[group], scored.combined[group]))
            known = group & scored.has_mask
            maps = [m for m, k in zip(scored.maps, known, strict=True) if k]
            masks = [m for m, k in zip(scored.masks, known, strict=True) if k]
            cells["pixel"].append(metrics.pixel_auroc(maps, masks))
        image, pixel = (" / ".join(f"{v:.3f}" for v in cells[k]) for k in ("image", "pixel"))
        print(f"| {bundle} | {engine.metadata.resize} | {image} | {pixel} |")


if __name__ == "__main__":
    main()
