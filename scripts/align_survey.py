"""What `--align auto` would choose for each dataset, and the measurements behind the choice.

Runs the very survey `anoscope train` runs at its start (`training.train.survey_training_normals`: up
to 48 of the training split's normal images, with training's default split), so an engineer can see
before training whether the parts will be turned to one pose, and why.

    python scripts/align_survey.py ../shared/datasets/screw ../shared/datasets/bottle ../shared/datasets/magnetic_tile
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.config import TrainConfig
from training.train import survey_training_normals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="folders of normal images or MVTec category roots")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
    args = parser.parse_args()
    print("| data | auto chooses | what the survey saw |")
    print("|---|---|---|")
    for data in args.data:
        found = survey_training_normals(data, val_fraction=args.val_fraction, seed=args.seed)
        print(f"| {data.name} | {found.choice} | {found.describe()} |")


if __name__ == "__main__":
    main()
