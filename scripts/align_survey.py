"""What `--align auto`, `--roi auto`, `--crop auto` and `--exposure auto` would choose for each dataset,
and the measurements behind the choice.

Runs the very choice `anoscope train` makes at its start (`training.train.resolve_preprocessing` on
`survey_images`: up to 48 of the training split's normal images, with training's default split), so an
engineer can see before training whether the parts will be turned to one pose, cropped to their box
and scored only where the part lies, and whether every image's exposure will be standardised, and why.

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

from models.config import ModelConfig
from service.align import align_image, part_mask
from service.datasets import IMAGE_EXTENSIONS
from service.images import load_image_file
from training.config import TrainConfig
from training.train import resolve_preprocessing, survey_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="folders of normal images or MVTec category roots")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    parser.add_argument("--ends", action="store_true", help="count the aligned parts widest in the lower half")
    args = parser.parse_args()
    print("| data | --align auto | --roi auto | --crop auto | --exposure auto | what the survey saw |")
    print("|---|---|---|---|---|---|")
    asked = ModelConfig(align="auto", roi="auto", crop="auto", exposure="auto")
    for data in args.data:
        images = survey_images(data, val_fraction=args.val_fraction, seed=args.seed)
        chosen, (found, lit) = resolve_preprocessing(asked, images)
        crop = f"part {chosen.crop_box[0]:g} x {chosen.crop_box[1]:g}" if chosen.crop == "part" else "none"
        level = chosen.exposure_standard
        exposure = f"standardise to {level[0]:g} / {level[1]:g}" if level else "none"
        saw = f"{found.describe()}; {lit.describe()}"
        print(f"| {data.name} | {chosen.align} | {chosen.roi} | {crop} | {exposure} | {saw} |")
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
