"""What `--align principal-axis` adds to pre-processing one image, per input size.

Times `service.tiles.preprocess_tiles` (decode excluded) with and without alignment on one image of
the dataset given, resized to each side, on the calling thread (the service pre-processes on its
worker threads, one image each):

    python scripts/align_cost.py ../shared/datasets/screw --sides 384 1024 2048
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from service.datasets import list_images, normal_folder
from service.images import load_image_file
from service.tiles import preprocess_tiles


def per_call_ms(img: Image.Image, align: str, repeats: int) -> float:
    kw = {"image_size": 128, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "align": align}
    preprocess_tiles(img, **kw)  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        preprocess_tiles(img, **kw)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a folder of normal images or an MVTec category root")
    parser.add_argument("--sides", type=int, nargs="+", default=[384, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    source = load_image_file(list_images(normal_folder(args.data))[0]).convert("RGB")
    print("| input (RGB) | pre-processing to 128 px, none | principal-axis | added by alignment |")
    print("|---|---|---|---|")
    for side in args.sides:
        img = source.resize((side, side), Image.Resampling.BILINEAR)
        plain, aligned = per_call_ms(img, "none", args.repeats), per_call_ms(img, "principal-axis", args.repeats)
        print(f"| {side} x {side} | {plain:.1f} ms | {aligned:.1f} ms | {aligned - plain:+.1f} ms |")


if __name__ == "__main__":
    main()
