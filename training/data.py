"""Training data: normal images decoded and pre-processed exactly as the service does, cached in memory.

Pixels enter through `service.images.load_image_file` and `service.tiles.preprocess_tiles`, the functions
the service calls on the line, so the network is trained on the very pixels it will score. Datasets
of normal images are small (hundreds of images), so every image is decoded once into one tensor.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from models.config import ModelConfig
from service.align import FULL_BOX, Align
from service.bundle import Resize
from service.datasets import DatasetError, list_images, normal_folder
from service.errors import InputError, InvalidImageError
from service.images import load_image_file
from service.tiles import preprocess_tiles

#: Images are normalised to [-1, 1], matching the generators' tanh output.
MEAN = 0.5
STD = 0.5


def normalisation(channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel, as written into checkpoints and bundles."""
    return [MEAN] * channels, [STD] * channels


def find_normal_images(data: str | os.PathLike[str]) -> list[Path]:
    """Normal training images of `data`: a plain folder, or `train/good` of an MVTec root."""
    return list_images(normal_folder(data))


def split_paths(paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, validation) split of normal images: same paths and seed, same split.

    The validation share is `round(n * val_fraction)`, at least one image when the fraction is positive,
    and at least one image always stays for training.
    """
    ordered = sorted(paths, key=str)
    n = len(ordered)
    if n == 0:
        msg = "no images to split"
        raise DatasetError(msg)
    n_val = 0 if val_fraction <= 0 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(ordered) if i not in val_idx]
    val = [p for i, p in enumerate(ordered) if i in val_idx]
    return train, val


class ImageDataset(Dataset[Tensor]):
    """Pre-processed images (C, S, S) float32 from a list of paths, all decoded up front.

    With `resize="tiles"` an elongated image contributes one item per tile (`service.tiles`), so the
    dataset can hold more items than `paths`; `tiles_per_image` says how many each path gave.

    A file that cannot be read raises `InvalidImageError` naming it; with `skip_bad=True` it is skipped
    with a warning and listed in `skipped`. `paths` then holds only the images actually loaded.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        image_size: int,
        channels: int,
        skip_bad: bool = False,
        workers: int = 0,
        resize: Resize = "squash",
        align: Align = "none",
        crop_box: tuple[float, float] = FULL_BOX,
        exposure: tuple[float, float] | None = None,
    ) -> None:
        self.image_size, self.channels, self.resize, self.align = image_size, channels, resize, align
        self.crop_box, self.exposure = crop_box, exposure
        self.mean, self.std = normalisation(channels)
        requested = [Path(p) for p in paths]
        threads = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL releases the GIL while decoding
            results = list(pool.map(self._load, requested))
        self.paths: list[Path] = []
        self.tiles_per_image: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        arrays = []
        for path, result in zip(requested, results, strict=True):
            if isinstance(result, InputError):
                if not skip_bad:
                    msg = f"{result}. Fix or remove the file, or pass --skip-bad-images to skip it"
                    raise InvalidImageError(msg) from result
                warnings.warn(f"skipping unreadable image: {result}", stacklevel=2)
                self.skipped.append((path, str(result)))
                continue
            self.paths.append(path)
            self.tiles_per_image.append(len(result))
            arrays.append(result)
        shape = (0, channels, image_size, image_size)
        self.images: Tensor = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(shape)  # (N, C, S, S)

    @classmethod
    def for_model(cls, paths: Sequence[str | os.PathLike[str]], config: ModelConfig, **kw: Any) -> ImageDataset:
        """The images as `config`'s detector takes them: its size, channels, resize, align, crop and exposure."""
        c = config
        return cls(
            paths,
            image_size=c.image_size,
            channels=c.channels,
            resize=c.resize,
            align=c.align,
            crop_box=c.crop_box,
            exposure=c.exposure_standard,
            **kw,
        )

    def _load(self, path: Path) -> np.ndarray | InputError:
        try:
            img = load_image_file(path)
            size, channels = self.image_size, self.channels
            tiles, _ = preprocess_tiles(
                img,
                image_size=size,
                channels=channels,
                mean=self.mean,
                std=self.std,
                resize=self.resize,
                align=self.align,
                crop_box=self.crop_box,
                exposure=self.exposure,
            )
        except InputError as exc:  # InvalidImageError, ImageTooLargeError: both name the file
            return exc
        return tiles

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]  # (C, S, S): an image, or one tile of one


def load_split(
    data: str | os.PathLike[str],
    *,
    image_size: int,
    channels: int,
    val_fraction: float,
    seed: int,
    skip_bad: bool = False,
    workers: int = 0,
    resize: Resize = "squash",
    align: Align = "none",
    crop_box: tuple[float, float] = FULL_BOX,
    exposure: tuple[float, float] | None = None,
    train_paths: Sequence[str] | None = None,
    val_paths: Sequence[str] | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, validation) datasets of the normal images under `data`.

    A resumed run passes the recorded `train_paths` / `val_paths` instead of splitting again.
    """
    if train_paths is None:
        paths = find_normal_images(data)
        if len(paths) < 2:
            msg = f"{normal_folder(data)} holds {len(paths)} image; training needs at least 2 normal images"
            raise DatasetError(msg)
        train_list, val_list = split_paths(paths, val_fraction, seed)
    else:
        train_list, val_list = [Path(p) for p in train_paths], [Path(p) for p in (val_paths or [])]
    kw = {
        "image_size": image_size,
        "channels": channels,
        "skip_bad": skip_bad,
        "workers": workers,
        "resize": resize,
        "align": align,
        "crop_box": crop_box,
        "exposure": exposure,
    }
    train, val = ImageDataset(train_list, **kw), ImageDataset(val_list, **kw)
    if len(train) == 0:
        msg = (
            f"no readable image among the {len(train_list)} training images of {normal_folder(data)} "
            f"({len(train.skipped)} skipped as unreadable); check the folder"
        )
        raise DatasetError(msg)
    return train, val
