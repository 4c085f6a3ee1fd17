"""Augmentations of normal training images: variations a good part may show on the line.

Both keep an image normal, so they are applied before corruption and the generator's target moves with
the input: G learns to reproduce them and the map discriminator learns they are not defects.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image (B, C, H, W) mirrored left-right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_rot90(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each square image (B, C, S, S) turned by 0, 90, 180 or 270 degrees, one draw per image.

    Why: a part fed at any angle (a screw on a tray, a nut, a round cap) shows the generator only a
    few of its orientations per training image; quarter turns are exact (no interpolation, no new
    border) and, with flips, give each image eight views. Not for images all taken one way up:
    there it teaches the generator views that never occur (it cost magnetic_tile 0.09-0.14 AUROC).
    """
    if images.shape[-1] != images.shape[-2]:
        msg = f"quarter turns need square images; got {images.shape[-2]}x{images.shape[-1]}"
        raise ValueError(msg)
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator).to(images.device)  # (B,)
    out = images
    for k in (1, 2, 3):
        out = torch.where((turns == k)[:, None, None, None], images.rot90(k, dims=(-2, -1)), out)
    return out


def lighting_drift(
    images: Tensor, strength: float, generator: torch.Generator, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """Each image (B, C, H, W) under a different global illumination: pixel values (above the range's
    floor) times a gain in [1 - s, 1 + s], plus an offset in [-s/2, s/2] of the range, one per image.

    Why: lighting on a line drifts (lamps age, a door opens), and test sets show it too: MVTec AD's
    screw test normals are ~7% darker than its training normals. A detector that never saw a global
    brightness change flags it as a defect everywhere.
    """
    if strength <= 0:
        return images
    low, high = value_range
    n = images.shape[0]
    gain = 1 + strength * (2 * torch.rand(n, generator=generator) - 1)  # (B,)
    offset = strength / 2 * (high - low) * (torch.rand(n, generator=generator) - 0.5)  # (B,)
    gain = gain.to(images).view(-1, 1, 1, 1)
    offset = offset.to(images).view(-1, 1, 1, 1)
    return ((images - low) * gain + low + offset).clamp(low, high)
