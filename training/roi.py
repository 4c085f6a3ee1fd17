"""The region of interest of a part on a plain background (`ModelConfig.roi` = "part").

A reconstruction detector scores every pixel, the table beside the part included. On screw the good
images that scored highest lit up specks of dust on the table, away from the screw: the max of the
map found them before it found a defect. Where the part lies is known without labels: the pixels
that differ from the border's background (`service.align.part_mask`) in the training normals, as the
model takes them (aligned, resized). Their union, less places only a few images reach (specks
themselves), widened by a margin so a burr or a bent end just outside the usual outline still counts,
is the region; the scoring head zeroes both maps outside it (`models.scoring.within`).

Fitted once training is done, on training normals only, before the per-pixel statistics and the
score statistics (which then describe the maps as the head will score them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from models.base import Detector
from service.align import part_mask
from training.data import normalisation
from training.loops.artifacts import to_uint8_rgb

#: A pixel belongs to the region when the part covers it in at least this share of the normals: a speck
#: on the table in one image of a hundred does not widen the region for good.
MIN_SHARE = 0.01
#: The margin around the part: image_size // this pixels (4 at 128 px, 8 at 256), about the width of a
#: thread or a chipped edge; the smoothed maps spread a defect further than that anyway.
MARGIN_DIVISOR = 32


def margin(image_size: int) -> int:
    return max(1, image_size // MARGIN_DIVISOR)


def part_masks(images: Tensor) -> np.ndarray:
    """(N, S, S) bool: each normalised model input's part mask (as `service.align` finds parts)."""
    mean, std = normalisation(images.shape[1])
    pixels = to_uint8_rgb(images.detach().float().cpu().numpy(), mean, std)  # (N, S, S, 3)
    return np.stack([part_mask(Image.fromarray(p)) for p in pixels])


def region(masks: np.ndarray, widen: int | None = None) -> np.ndarray:
    """(S, S) bool: where the part lies in at least `MIN_SHARE` of `masks` (N, S, S), widened by `widen`
    pixels (default `margin`; scripts/roi_crosscheck.py compares others)."""
    size = masks.shape[-1]
    core = torch.from_numpy(masks.mean(axis=0) >= max(MIN_SHARE, 1e-9)).float()[None, None]  # (1, 1, S, S)
    k = margin(size) if widen is None else widen
    if k == 0:
        return core[0, 0].bool().numpy()
    widened = F.max_pool2d(core, kernel_size=2 * k + 1, stride=1, padding=k)  # a (2k+1)-square dilation
    return widened[0, 0].bool().numpy()


def reset_roi(model: Detector) -> None:
    """Everywhere counts (all ones): how the head scores during training, before the region is fitted."""
    if model.roi is not None:
        model.roi_mask.fill_(1.0)


@torch.no_grad()
def fit_roi(model: Detector, images: Tensor) -> dict[str, Any]:
    """Fit `model`'s region of interest on normal `images` (N, C, S, S) as the model takes them; returns a
    summary for the checkpoint's provenance. A model without the option is left alone (summary says so).
    If no part is found in any image, everywhere counts (and the summary says that too)."""
    if model.roi is None:
        return {"fitted": False}
    if images.shape[0] < 1:
        msg = "the region of interest needs at least one normal image"
        raise ValueError(msg)
    masks = part_masks(images)
    roi = region(masks)
    found = bool(roi.any())
    if not found:
        roi = np.ones_like(roi)
    model.roi_mask.copy_(torch.from_numpy(roi).to(model.roi_mask)[None, None])
    return {
        "fitted": True,
        "images": int(masks.shape[0]),
        "part_found": found,
        "part_share": round(float(masks.mean()), 4),
        "share": round(float(roi.mean()), 4),
        "margin_px": margin(masks.shape[-1]),
    }
