"""What `--align auto` and `--roi auto` would choose for each dataset, and the measurements behind the choice.

Runs the very survey `anoscope train` runs at its start (`training.train.survey_training_normals`: up
to 48 of the training split's normal images, with training's default split), so an engineer can see
before training whether the parts will be turned to one pose and scored only where the part lies, and why.

    python scripts/align_survey.py ../shared/datasets/screw ../shared/datasets/bottle ../shared/datasets/magnetic_tile

With `--ends`, every image of each dataset (train and test) is also aligned, and the script counts
those whose part is widest in the lower half of the frame: for a part with one wide end (a screw's
head), a count short of all says some images were turned end over end.

    python scripts/align_survey.py ../shared/datasets/screw --ends
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from service.align import align_image, part_mask
from service.datasets import IMAGE_EXTENSIONS
from service.images import load_image_file
from training.config import TrainConfig
from training.train import survey_training_normals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="folders of normal images or MVTec category roots")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    parser.add_argument("--ends", action="store_true", help="count the aligned parts widest in the lower half")
    args = parser.parse_args()
    print("| data | --align auto | --roi auto | what the survey saw |")
    print("|---|---|---|---|")
    for data in args.data:
        found = survey_training_normals(data, val_fraction=args.val_fraction, seed=args.seed)
        print(f"| {data.name} | {found.choice} | {found.roi_choice} | {found.describe()} |")
    if args.ends:
        print()
        for data in args.data:
            paths = sorted(
                p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and "ground_truth" not in p.parts
            )
            lower = sum(_widest_in_lower_half(load_image_file(p)) for p in paths)
            print(f"{data.name}: {lower} of {len(paths)} aligned parts are widest in the lower half of the frame")


def _widest_in_lower_half(img: Image.Image) -> bool:
    aligned, _ = align_image(img.convert("L"), "principal-axis")
    mask = part_mask(aligned)
    rows = np.nonzero(mask.any(axis=1))[0]
    if len(rows) == 0:
        return False
    widths = mask.sum(axis=1)
    return int(np.argmax(widths)) > (rows.min() + rows.max()) / 2


if __name__ == "__main__":
    main()
