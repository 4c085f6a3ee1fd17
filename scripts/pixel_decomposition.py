"""Where a bundle's pooled pixel AUROC is won and lost: against which normal pixels defects rank high.

Pixel AUROC pools every pixel of every test image, so a defect's pixels are ranked against two kinds
of normal pixel: those of the good images, and the defect-free rest of the defective images. A map
can rank defects well above the good images and still score a low pooled figure if defective images
light up as a whole (or the reverse: an image-level decision painted over the mask scores well
without localising anything). This scores each bundle with `anoscope evaluate`'s own functions and
splits the figure:

* defects against the good images' pixels, and against their own images' normal pixels: those near
  a defect (within 1/16 of the image's long side, where a smoothed map's halo lies) and the far rest;
* how far the far normal pixels of defective images outscore the good images' pixels (0.5 = not at
  all: the map is quiet away from a defect);
* pixel AUROC / AUPRO of the map as it is, with each map's median subtracted (only the contrast
  inside each image left), and with each map's mean added (an image-level term painted over it);
* a bound that reads the labels: the pixel AUROC with every defective image's map lifted above every
  good image's, i.e. what the maps would score behind a perfect image-level decision, with the
  ranking inside and between defective images as it is.

`--exposure-from-normal-pixels` is a diagnostic that reads the test masks: a bundle that standardises
exposure measures each test image's mean and std on its normal pixels only, so a defect cannot move
the gain and offset of the rest of its image. It answers whether the standardisation makes defective
images light up; it is not a way to score.

`--per-image` adds a table of each defective image's own split: how its defect's pixels rank against
the far normal pixels of the same image (median, 10th and 90th percentile over the images of each
defect type, and the share of images where the defect ranks *below* the rest of its image, i.e. the
map peaks elsewhere in it). `--average-flips` scores every image four times (as is, mirrored left to
right, upside down, turned half a turn) and averages the four maps turned back: test-time flips, as a
check whether averaging out the reconstruction's noise sharpens the maps. `--average-shifts PX`
does the same with the image moved by PX input pixels left, right, up and down (edges repeated) and
the maps moved back: the image's orientation kept, only the sampling grid moved. `--ensemble` adds a
row for the mean of every bundle's map, each first put on the scale of its own pixel normalisation
(`service.postprocess.normalize`, unclipped; measured on normal images at export or calibration): several
runs of one configuration as one detector, without a label to weight them by.

    python scripts/pixel_decomposition.py ../shared/datasets/magnetic_tile BUNDLE...
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _runs import fmt, print_header
from PIL import Image
from scipy import ndimage

import service.images
from service.datasets import load_mask
from service.engine import OnnxEngine, predict_images
from service.images import load_image_file
from service.postprocess import normalize, resize_map
from training import metrics
from training.evaluate import load_samples, score_samples

#: Normal pixels of a defective image within this share of its long side from a mask count as "near".
NEAR = 1 / 16
VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as is": lambda m: m,
    "median subtracted": lambda m: m - np.median(m),
    "mean added": lambda m: m + m.mean(),
}


def auroc_of(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    labels = np.r_[np.ones(positives.size, dtype=bool), np.zeros(negatives.size, dtype=bool)]
    return metrics.auroc(labels, np.r_[positives, negatives])


def near_and_far(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal pixels of an image with defect `mask` (bool, H x W): within `NEAR` of its long side
    from the defect, and the rest."""
    normal = ~mask
    near = ndimage.distance_transform_edt(normal) <= NEAR * max(mask.shape)
    return normal & near, normal & ~near


def decompose(maps: list[np.ndarray], masks: list[np.ndarray], labels: np.ndarray) -> dict[str, str]:
    """Table cells: the pooled figure split by the normal pixels it ranks defects against, then
    pixel AUROC / AUPRO of each of `VARIANTS`."""
    defect, good, near, far = [], [], [], []
    for m, k, y in zip(maps, masks, labels, strict=True):
        if not y:
            good.append(m.ravel())
            continue
        close, away = near_and_far(k)
        defect.append(m[k])
        near.append(m[close])
        far.append(m[away])
    d, g, n, f = (np.concatenate(parts) for parts in (defect, good, near, far))
    cells = {
        "pooled": fmt(auroc_of(d, np.r_[g, n, f])),
        "defects vs good images": fmt(auroc_of(d, g)),
        "vs near": fmt(auroc_of(d, n)),
        "vs far": fmt(auroc_of(d, f)),
        "far vs good": fmt(auroc_of(f, g)),
    }
    for name, change in VARIANTS.items():
        changed = [change(m) for m in maps]
        cells[f"{name}: pixel / AUPRO"] = (
            f"{fmt(metrics.pixel_auroc(changed, masks))} / {fmt(metrics.aupro(changed, masks))}"
        )
    lift = 10 * max(float(np.ptp(np.r_[d, g, n, f])), 1.0)
    lifted = [m + lift if y else m for m, y in zip(maps, labels, strict=True)]
    cells["bound: defective images lifted above good"] = fmt(metrics.pixel_auroc(lifted, masks))
    return cells


def per_image(maps: list[np.ndarray], masks: list[np.ndarray], labels: np.ndarray) -> dict[str, str]:
    """Table cells: the defective images' own AUROCs of defect pixels against their far normal pixels."""
    own = []
    for m, k, y in zip(maps, masks, labels, strict=True):
        far = near_and_far(k)[1]
        if y and k.any() and far.any():
            own.append(auroc_of(m[k], m[far]))
    if not own:
        return {"images": "0", "median": "–", "10th / 90th percentile": "–", "share below 0.5": "–"}
    q10, q50, q90 = np.quantile(own, [0.1, 0.5, 0.9])
    return {
        "images": str(len(own)),
        "median": fmt(q50),
        "10th / 90th percentile": f"{fmt(q10)} / {fmt(q90)}",
        "share below 0.5": fmt(float(np.mean(np.asarray(own) < 0.5))),
    }


#: (PIL transpose, the numpy flip that turns its map back): the four flips `--average-flips` averages.
FLIPS = (
    (None, lambda a: a),
    (Image.Transpose.FLIP_LEFT_RIGHT, np.fliplr),
    (Image.Transpose.FLIP_TOP_BOTTOM, np.flipud),
    (Image.Transpose.ROTATE_180, lambda a: a[::-1, ::-1]),
)


def scored_flips_averaged(engine: OnnxEngine, samples: list) -> tuple[list, list, np.ndarray]:
    """As `scored_with_masks`, each map the mean of the maps of the image's four `FLIPS`, turned back."""

    def averaged(img: Image.Image, size: tuple[int, int], _sample: object) -> np.ndarray:
        outs = predict_images(engine, [img if t is None else img.transpose(t) for t, _ in FLIPS])
        turned_back = [back(resize_map(o.anomaly_map, size)) for (_, back), o in zip(FLIPS, outs, strict=True)]
        return np.mean(turned_back, axis=0)

    return scored_one_by_one(samples, averaged)


def scored_shifts_averaged(engine: OnnxEngine, samples: list, px: float) -> tuple[list, list, np.ndarray]:
    """As `scored_with_masks`, each map the mean of the maps of the image as is and moved by `px`
    input pixels in each of the four directions (edge pixels repeated), each moved back."""
    side = engine.metadata.image_size

    def moved(arr: np.ndarray, dy: int, dx: int) -> np.ndarray:
        """`arr` (H, W, ...) moved by (dy, dx) pixels, the edge repeated into the gap."""
        pad = [(abs(dy), abs(dy)), (abs(dx), abs(dx))] + [(0, 0)] * (arr.ndim - 2)
        padded = np.pad(arr, pad, mode="edge")
        h, w = arr.shape[:2]
        return padded[abs(dy) - dy : abs(dy) - dy + h, abs(dx) - dx : abs(dx) - dx + w]

    def averaged(img: Image.Image, size: tuple[int, int], _sample: object) -> np.ndarray:
        arr = np.asarray(img)
        steps = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
        # px input pixels in the image's own pixels and in the evaluated map's, per axis
        img_px = (px * arr.shape[0] / side, px * arr.shape[1] / side)
        map_px = (px * size[1] / side, px * size[0] / side)
        images = [Image.fromarray(moved(arr, round(sy * img_px[0]), round(sx * img_px[1]))) for sy, sx in steps]
        outs = predict_images(engine, images)
        back = [
            moved(resize_map(o.anomaly_map, size), -round(sy * map_px[0]), -round(sx * map_px[1]))
            for (sy, sx), o in zip(steps, outs, strict=True)
        ]
        return np.mean(back, axis=0)

    return scored_one_by_one(samples, averaged)


def on_pixel_scale(maps: list[np.ndarray], engine: OnnxEngine) -> list[np.ndarray]:
    """`maps` on the scale of the bundle's pixel normalisation (the service's heatmap scale), unclipped."""
    return [normalize(m, engine.metadata.normalization.pixel, clip=False) for m in maps]


def scored_one_by_one(
    samples: list, map_of: Callable[[Image.Image, tuple[int, int], object], np.ndarray]
) -> tuple[list, list, np.ndarray]:
    """(maps, masks, labels) of `with_masks(samples)` at `anoscope evaluate`'s resolution, each map
    `map_of(image, (width, height), sample)`: for checks that score an image differently from the service."""
    maps, masks, labels = [], [], []
    for s in with_masks(samples):
        img = load_image_file(s.path)
        size = metrics.eval_size(img.size, metrics.DEFAULT_MAX_PIXEL_SIDE)
        maps.append(map_of(img, size, s))
        masks.append(load_mask(s.mask_path, size))
        labels.append(s.label)
    return maps, masks, np.array(labels)


def with_masks(samples: list) -> list:
    """The samples with pixel labels: every good image, and the defects that have a mask file."""
    return [s for s in samples if s.label == 0 or s.mask_path is not None]


def scored_with_masks(engine: OnnxEngine, samples: list) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(maps, masks, labels) of `with_masks(samples)`, at `anoscope evaluate`'s resolution."""
    scored = score_samples(engine, with_masks(samples))
    return scored.maps, scored.masks, scored.labels


def scored_exposure_from_normal_pixels(engine: OnnxEngine, samples: list) -> tuple[list, list, np.ndarray]:
    """As `scored_with_masks`, each image's exposure measured on its normal pixels (one image at a time)."""
    meta = engine.metadata
    if meta.exposure is None or meta.resize != "squash":
        msg = "--exposure-from-normal-pixels needs a bundle that standardises exposure and squashes images"
        raise SystemExit(msg)
    original = service.images.standardise_exposure
    normal = {}

    def from_normal_pixels(arr: np.ndarray, target: tuple[float, float]) -> np.ndarray:
        keep = normal["pixels"]
        return original(arr, target, measured_on=arr[:, keep] if keep.any() else arr)

    def measured_off_the_defect(img: Image.Image, size: tuple[int, int], sample: object) -> np.ndarray:
        normal["pixels"] = ~load_mask(sample.mask_path, (meta.image_size, meta.image_size))
        return resize_map(predict_images(engine, [img])[0].anomaly_map, size)

    service.images.standardise_exposure = from_normal_pixels
    try:
        return scored_one_by_one(samples, measured_off_the_defect)
    finally:
        service.images.standardise_exposure = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", type=Path, help="an MVTec AD category root with test/ and ground_truth/")
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument(
        "--exposure-from-normal-pixels", action="store_true", help="diagnostic: measure exposure off the defects"
    )
    parser.add_argument("--per-type", action="store_true", help="also a row per defect type (against every good image)")
    parser.add_argument("--per-image", action="store_true", help="also each defective image's own split, per type")
    parser.add_argument("--average-flips", action="store_true", help="average each map over four flips of the image")
    parser.add_argument(
        "--average-shifts", type=float, metavar="PX", help="average each map over the image moved by PX input pixels"
    )
    parser.add_argument("--ensemble", action="store_true", help="also a row for the mean of every bundle's map")
    args = parser.parse_args()
    samples = load_samples(args.category)
    if not any(s.label for s in with_masks(samples)):
        msg = f"{args.category}: no defect has a mask under ground_truth/; the split needs pixel labels"
        raise SystemExit(msg)
    types = [s.defect_type for s in with_masks(samples)]
    checks = [args.exposure_from_normal_pixels, args.average_flips, args.average_shifts is not None]
    if sum(checks) > 1:
        msg = "--exposure-from-normal-pixels, --average-flips and --average-shifts are separate checks; give one"
        raise SystemExit(msg)
    if args.average_shifts is not None and args.average_shifts <= 0:
        msg = f"--average-shifts takes a positive number of input pixels (got {args.average_shifts})"
        raise SystemExit(msg)
    if args.ensemble and len(args.bundles) < 2:
        msg = "--ensemble needs two bundles or more"
        raise SystemExit(msg)
    score = scored_with_masks
    if args.exposure_from_normal_pixels:
        score = scored_exposure_from_normal_pixels
    elif args.average_flips:
        score = scored_flips_averaged
    elif args.average_shifts is not None:
        score = functools.partial(scored_shifts_averaged, px=args.average_shifts)
    images_table: list[tuple[str, str, dict[str, str]]] = []

    def report(bundle: str, maps: list, masks: list, labels: np.ndarray, first: bool) -> None:
        """Print the bundle's rows of the main table; keep its per-image rows for the second."""
        rows = {"all": range(len(maps))}
        if args.per_type or args.per_image:
            for t in sorted({t for t, y in zip(types, labels, strict=True) if y}):
                rows[t] = [j for j, (u, y) in enumerate(zip(types, labels, strict=True)) if u == t or not y]
        for name, sel in rows.items():
            chosen = [maps[j] for j in sel], [masks[j] for j in sel], labels[list(sel)]
            if args.per_image:
                images_table.append((bundle, name, per_image(*chosen)))
            if name != "all" and not args.per_type:
                continue
            cells = decompose(*chosen)
            if first and name == "all":
                print_header("bundle", "defects", *cells)
            print(f"| {bundle} | {name} | " + " | ".join(cells.values()) + " |")

    scaled = []  # each bundle's maps on its own pixel scale, for --ensemble
    for i, bundle in enumerate(args.bundles):
        engine = OnnxEngine(bundle, providers=("cpu",))
        maps, masks, labels = score(engine, samples)
        report(str(bundle), maps, masks, labels, first=i == 0)
        if args.ensemble:
            scaled.append(on_pixel_scale(maps, engine))
    if args.ensemble:
        mean = [np.mean(ms, axis=0) for ms in zip(*scaled, strict=True)]
        report(f"mean of {len(scaled)}", mean, masks, labels, first=False)
    for j, (bundle, name, cells) in enumerate(images_table):
        if j == 0:
            print("\nEach defective image's defect pixels against its own far normal pixels:\n")
            print_header("bundle", "defects", *cells)
        print(f"| {bundle} | {name} | " + " | ".join(cells.values()) + " |")


if __name__ == "__main__":
    main()
