"""Per-pixel normal statistics of a trained detector's maps (`ModelConfig.position_statistics`).

A reconstruction detector leaves residual on good parts too, and at the same places on every image:
the part's outline, sharp edges, the frame's border. Reduced by its max, such a map reports the
busiest place rather than the defect. Reconstructions of the training normals give each pixel's usual
value (mean) and spread (std) of the residual and discrimination maps; the scoring head then reduces
(map - mean) / scale, where scale is the std, raised to its median over the image where smaller (a
place that never varies must not turn noise into a defect).

The statistics are fitted once training is done, on the exported weights, from the *training* split:
the validation normals carry the label-free selection set and the score statistics, and must stay
images the statistics have not seen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.base import Detector
from models.config import ModelConfig
from models.scoring import map_pair, residual_map, smooth
from training.data import ImageDataset

#: At most this many training normals, evenly spaced over the split, enter the statistics: enough for
#: a stable per-pixel std (the std of a std estimate from n samples is about 1/sqrt(2n) of it) at a
#: cost of a few seconds on a CPU.
STATS_IMAGES = 200


def spaced_indices(n: int, limit: int = STATS_IMAGES) -> list[int]:
    """Up to `limit` of the indices 0..n-1, evenly spaced, in order."""
    if n <= limit:
        return list(range(n))
    return torch.linspace(0, n - 1, limit).round().long().tolist()


def evenly_spaced(images: Tensor, limit: int = STATS_IMAGES) -> Tensor:
    """Up to `limit` of `images` (N, ...), evenly spaced, in order."""
    return images[spaced_indices(images.shape[0], limit)]


def training_normals(paths: Sequence[str | os.PathLike[str]], config: ModelConfig) -> Tensor:
    """What the statistics of a finished run are fitted on: up to `STATS_IMAGES` of its training
    normals (a checkpoint's `train_paths`), evenly spaced, as the model takes them."""
    picked = [Path(paths[i]) for i in spaced_indices(len(paths))]
    return ImageDataset.for_model(picked, config).images


#: The maps statistics describe, in the order of the buffers' first axis.
MAPS = ("residual", "discrimination")


def use_statistics(model: Detector, fitted: tuple[Tensor, Tensor], names: tuple[str, ...]) -> None:
    """Standardise only the maps in `names` with the `fitted` (mean, scale); the others get identity
    statistics and are scored raw."""
    mean, scale = fitted
    reset_position_statistics(model)
    for name in names:
        i = MAPS.index(name)
        model.position_mean[i].copy_(mean[i])
        model.position_scale[i].copy_(scale[i])


def reset_position_statistics(model: Detector) -> None:
    """Identity statistics (mean 0, scale 1): the head then scores the raw maps, as during training."""
    if model.position is not None:
        model.position_mean.zero_()
        model.position_scale.fill_(1.0)


def raw_maps(model: Detector, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The maps the statistics describe, before standardising: the smoothed residual map and (with a map
    discriminator, else None) the discrimination map of a batch, (B, 1, S, S) each."""
    config = model.config
    x_hat = model.reconstruct(x)
    if model.map_discriminator is None:
        return smooth(residual_map(x, x_hat, config.residual), config.smoothing_kernel), None
    return map_pair(config, x, x_hat, model.map_discriminator)


@torch.no_grad()
def fit_position_statistics(model: Detector, images: Tensor, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Fit `model`'s per-pixel statistics on normal `images` (N, C, S, S) in eval mode; returns a summary
    for the checkpoint's provenance. A model without the option is left alone (summary says so)."""
    if model.position is None:
        return {"fitted": False}
    if images.shape[0] < 2:
        msg = f"per-pixel statistics need at least 2 normal images (got {images.shape[0]})"
        raise ValueError(msg)
    was_training = model.training
    model.eval()
    try:
        n = 0
        sums: list[Tensor | None] = [None, None]
        squares: list[Tensor | None] = [None, None]
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            for i, amap in enumerate(raw_maps(model, x)):
                if amap is None:
                    continue
                amap = amap.double()
                s, q = amap.sum(dim=0), amap.pow(2).sum(dim=0)  # (1, S, S) x2
                sums[i] = s if sums[i] is None else sums[i] + s
                squares[i] = q if squares[i] is None else squares[i] + q
            n += x.shape[0]
        summary: dict[str, Any] = {"fitted": True, "images": n}
        for i, name in enumerate(MAPS):
            total, total_sq = sums[i], squares[i]
            if total is None or total_sq is None:
                continue
            mean = total / n  # (1, S, S)
            std = (total_sq / n - mean.pow(2)).clamp_min(0).mul(n / (n - 1)).sqrt()  # (1, S, S)
            floor = std.median()
            if floor <= 0:  # a map that never varies (e.g. an untrained discriminator): only centre it
                floor = torch.ones((), dtype=std.dtype, device=std.device)
            model.position_mean[i].copy_(mean.to(model.position_mean.dtype))
            model.position_scale[i].copy_(std.clamp_min(floor).to(model.position_scale.dtype))
            summary[name] = {"mean": float(mean.mean()), "median_std": float(floor), "max_std": float(std.max())}
        return summary
    finally:
        model.train(was_training)
