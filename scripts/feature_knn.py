"""Would a memory of normal local features localise better than the head's map? (PatchCore-style, no
pretrained network.)

PatchCore (Roth et al. 2022) scores each place of an image by the distance of its local feature to
the nearest feature of the training normals, any place of any normal image. Without pretrained
weights the features here are a run's own: its discriminator's trunk stages, 4x4 patches of the
input's grey levels, or 4x4 patches of the residual x - x̂, each feature averaged over its 3x3
neighbourhood where it is a network's. A memory of 30000 features drawn at random from 300 training
normals (seeded); every test image of the category is scored, each map smoothed like the head's
(5 px at 64) and compared by `pixel_decomposition.decompose`, with the bundle's own map as the first
row. It answers whether comparing each place with all normal places ranks a tile's defect above the
rest of that tile better than comparing the image with its reconstruction does.

    python scripts/feature_knn.py ../shared/datasets/magnetic_tile \
        reports/s64-seed0/runs/magnetic_tile-skipganomaly-default-64

A run folder under a bench's runs/ is read with the bundle of the same name under its bundles/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _runs import print_header, run_name
from pixel_decomposition import decompose, scored_with_masks, with_masks
from torch import Tensor

from models.scoring import smooth
from service.bundle import BundleMetadata
from service.engine import OnnxEngine, preprocess_for
from service.images import load_image_file
from service.postprocess import resize_map
from training.checkpoint import load_trained
from training.evaluate import load_samples

MEMORY_IMAGES = 300
MEMORY_FEATURES = 30_000


def patches(grey: Tensor) -> Tensor:
    """4x4 patches of a (B, 1, S, S) map at stride 2: (B, 16, S/2, S/2)."""
    b, _, s, _ = grey.shape
    return F.unfold(grey, 4, stride=2, padding=1).reshape(b, 16, s // 2, s // 2)


def neighbourhood(t: Tensor) -> Tensor:
    return F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)


#: The local features compared, in table order.
FEATURES = ("D stages 2+3 (S/4)", "D stage 1 (S/2)", "grey 4x4 patches (S/2)", "residual 4x4 patches (S/2)")


def local_features(model: torch.nn.Module, x: Tensor) -> dict[str, Tensor]:
    """`FEATURES` of a normalised batch (B, C, S, S): name -> (B, F, h, w)."""
    stages, h = [], x
    for stage in model.discriminator.trunk.stages:
        h = stage(h)
        stages.append(h)
    d0, d1, d2 = stages[:3]
    coarse = F.interpolate(neighbourhood(d2), size=d1.shape[-2:], mode="bilinear", align_corners=False)
    return dict(
        zip(
            FEATURES,
            (
                torch.cat([neighbourhood(d1), coarse], 1),
                neighbourhood(d0),
                patches(x.mean(1, keepdim=True)),
                patches((x - model.reconstruct(x)).mean(1, keepdim=True)),
            ),
            strict=True,
        )
    )


def to_rows(f: Tensor) -> Tensor:
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*h*w, F)


def batch(meta: BundleMetadata, paths: list[str]) -> Tensor:
    """The bundle's own preprocessing of image files: (B, C, S, S)."""
    return torch.cat([torch.from_numpy(preprocess_for(meta, load_image_file(p))[0]) for p in paths])


def memory_bank(model: torch.nn.Module, meta: BundleMetadata, normals: list[str]) -> dict[str, Tensor]:
    """Name -> `MEMORY_FEATURES` local features (N, F) drawn at random from `MEMORY_IMAGES` of `normals`."""
    rng = np.random.default_rng(0)
    chosen = list(rng.permutation(normals)[:MEMORY_IMAGES])
    parts: dict[str, list[Tensor]] = {name: [] for name in FEATURES}
    for start in range(0, len(chosen), 32):
        for name, f in local_features(model, batch(meta, chosen[start : start + 32])).items():
            parts[name].append(to_rows(f))
    bank = {}
    for name, rows in parts.items():
        everything = torch.cat(rows)
        pick = rng.choice(len(everything), min(MEMORY_FEATURES, len(everything)), replace=False)
        bank[name] = everything[torch.from_numpy(pick)]
    return bank


@torch.no_grad()
def score_run(run: Path, samples: list) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray], np.ndarray]:
    """(map name -> maps, masks, labels) of `samples`, at `anoscope evaluate`'s resolution."""
    bundle = run.parent.parent / "bundles" / run.name
    if not (bundle / "model.json").is_file():
        msg = f"{run}: no bundle at {bundle}; give run folders of `anoscope bench accuracy` (its runs/ beside bundles/)"
        raise SystemExit(msg)
    engine = OnnxEngine(bundle, providers=("cpu",))
    meta, trained = engine.metadata, load_trained(run)
    model = trained.model.eval()
    bank = memory_bank(model, meta, trained.train_paths)
    maps, masks, labels = scored_with_masks(engine, samples)
    rows: dict[str, list[np.ndarray]] = {"the head's map": maps} | {name: [] for name in FEATURES}
    for s, mask in zip(samples, masks, strict=True):
        for name, f in local_features(model, batch(meta, [s.path])).items():  # (1, F, h, w) each
            nearest = torch.cdist(to_rows(f), bank[name]).min(1).values.reshape(1, 1, *f.shape[-2:])
            m = F.interpolate(nearest, size=(meta.image_size,) * 2, mode="bilinear", align_corners=False)
            m = smooth(m, model.config.smoothing_kernel)  # as the head smooths its maps
            rows[name].append(resize_map(m[0, 0].numpy(), mask.shape[::-1]))
    return rows, masks, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category", type=Path, help="an MVTec AD category root with test/ and ground_truth/")
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders under a bench's runs/")
    args = parser.parse_args()
    torch.set_num_threads(2)
    samples = with_masks(load_samples(args.category))
    if not any(s.label for s in samples):
        msg = f"{args.category}: no defect has a mask under ground_truth/; the comparison needs pixel labels"
        raise SystemExit(msg)
    for i, run in enumerate(args.runs):
        rows, masks, labels = score_run(run, samples)
        for name, maps in rows.items():
            cells = decompose(maps, masks, labels)
            if i == 0 and name == "the head's map":
                print_header("run", "map", *cells)
            print(f"| {run_name(run)} | {name} | " + " | ".join(cells.values()) + " |")


if __name__ == "__main__":
    main()
