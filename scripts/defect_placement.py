"""How often synthetic defects land on the part, for each `--corruption-object-placement` share.

For categories that show a part against a plain background (screw, not a texture like magnetic_tile).
The part is estimated as the pixels whose grey level differs from the image's median (the background)
by more than `--contrast`, widened by 4 px. One shape per image of every local kind (stains, large by
nature, are always placed anywhere), the run's cross-border setting; nothing here is used in training.

    python scripts/defect_placement.py ../shared/datasets/screw
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from training.corruption import CorruptionConfig, corrupt_batch
from training.data import ImageDataset, find_normal_images
from training.selection import SELECTION_KINDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", type=Path, help="a category folder with train/good")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=60, help="first N training images")
    parser.add_argument("--contrast", type=float, default=0.3, help="|grey - background| on the [-1, 1] scale")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(1)

    paths = find_normal_images(args.category)[: args.images]
    dataset = ImageDataset(paths, image_size=args.image_size, channels=3)
    images = torch.stack([dataset[i] for i in range(len(paths))])  # (N, 3, S, S)
    grey = images.mean(dim=1, keepdim=True)  # (N, 1, S, S)
    background = grey.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    part = F.max_pool2d(((grey - background).abs() > args.contrast).float(), 9, stride=1, padding=4) > 0
    print(
        f"{args.category.name}: {len(paths)} images at {args.image_size} px; the part covers "
        f"{float(part.float().mean()):.0%} of the frame (within 4 px)"
    )
    kinds = tuple(k for k in SELECTION_KINDS if k != "stain")  # stains stay anywhere
    print("| object placement | images whose defect touches the part | defect pixels on the part |")
    print("|---|---|---|")
    for share in args.shares:
        cfg = CorruptionConfig(kinds=kinds, max_count=1, cross_border=True, object_placement=share)
        mask = corrupt_batch(images, cfg, torch.Generator().manual_seed(0)).mask  # (N, 1, S, S)
        touches = float((mask & part).flatten(1).any(dim=1).float().mean())
        print(f"| {share:g} | {touches:.0%} | {float((mask & part).sum() / mask.sum()):.0%} |")


if __name__ == "__main__":
    main()
