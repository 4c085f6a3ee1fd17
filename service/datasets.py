"""Finding images on disk: plain folders of normal images and the MVTec AD layout.

    <root>/train/good/                          normal images (training)
    <root>/test/good/                           normal test images
    <root>/test/<defect>/                       defective test images
    <root>/ground_truth/<defect>/<stem>_mask.png  pixel masks (255 = defect), where they exist

Torch-free, so `evaluate`, `calibrate` and training all read data the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.errors import InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"


class DatasetError(InputError):
    title = "Dataset error"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normals
    mask_path: Path | None = None


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside `folder`, sorted; a clear error when there are none."""
    root = Path(folder)
    if not root.is_dir():
        msg = f"{root} is not a directory; point at a folder of images"
        raise DatasetError(msg)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        msg = f"{root} holds no image files ({exts}); check the path"
        raise DatasetError(msg)
    return files


def normal_folder(path: str | os.PathLike[str]) -> Path:
    """The folder of normal training images: `path/train/good` for an MVTec root, else `path`."""
    root = Path(path)
    mvtec = root / "train" / GOOD
    return mvtec if mvtec.is_dir() else root


def is_mvtec_root(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "test").is_dir()


def labelled_samples(root: str | os.PathLike[str]) -> list[Sample]:
    """Labelled test samples from an MVTec root (`root/test/...`) or a folder of class sub-folders.

    Sub-folder `good` holds normals; every other sub-folder is a defect type. Masks are looked up at
    `root/ground_truth/<defect>/<stem>_mask.png` and are optional.
    """
    base = Path(root)
    test = base / "test" if (base / "test").is_dir() else base
    if not test.is_dir():
        msg = f"{base} is not a directory; point at an MVTec category folder or a folder of class folders"
        raise DatasetError(msg)
    groups = sorted(d for d in test.iterdir() if d.is_dir())
    if not any(d.name == GOOD for d in groups):
        msg = f"{test} has no '{GOOD}' sub-folder of normal images; evaluation needs normals and defects"
        raise DatasetError(msg)
    samples: list[Sample] = []
    for group in groups:
        files = sorted(p for p in group.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for f in files:
            mask = None
            if group.name != GOOD:
                candidate = base / "ground_truth" / group.name / f"{f.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            samples.append(Sample(f, int(group.name != GOOD), group.name, mask))
    if not samples:
        msg = f"{test} holds no images in its class folders"
        raise DatasetError(msg)
    return samples


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask at `size` = (width, height); all-False when there is no mask file."""
    width, height = size
    if path is None:
        return np.zeros((height, width), dtype=bool)
    with Image.open(path) as m:
        mask = m.convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        return np.asarray(mask) > 127
