"""Score maths shared by every scoring head and by the AnoGAN latent search.

Everything here exports with `torch.onnx.export(..., dynamo=True)` with a dynamic batch axis: no
control flow on tensor values; sizes used in Python (top-k's k) come from the static spatial size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RESIDUALS, ModelConfig

#: Names (and order) of the scoring head's outputs, as written into the exported ONNX graph.
SCORE_OUTPUTS = ("residual_score", "discrimination_score", "anomaly_map")


def residual_map(x: Tensor, x_hat: Tensor, kind: str = "l1") -> Tensor:
    """Per-pixel residual: (B, C, H, W) x2 -> (B, 1, H, W), one of `RESIDUALS`.

    "l1" / "l2": |x - x_hat| or (x - x_hat)² averaged over channels (intensity only). "msgms": one
    minus the multi-scale gradient-magnitude similarity (`msgms_map`), which sees edges and texture
    that moved or vanished even where the mean intensity is right. "l1+msgms": their mean, with l1 in
    the same [0, 1] units (|x - x_hat| / 2 on inputs in [-1, 1]).
    """
    if kind == "msgms":
        return msgms_map(x, x_hat)
    diff = x - x_hat  # (B, C, H, W)
    if kind == "l1":
        return diff.abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if kind == "l2":
        return diff.pow(2).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if kind == "l1+msgms":
        return 0.5 * (0.5 * diff.abs().mean(dim=1, keepdim=True) + msgms_map(x, x_hat))  # (B, 1, H, W)
    msg = f"unknown residual kind {kind!r}; use one of {', '.join(RESIDUALS)}"
    raise ValueError(msg)


#: Prewitt kernels (Xue et al. 2014, GMSD; RIAD's MSGMS uses them too), scaled so a unit step gives 1.
_PREWITT_X = (1.0 / 3.0) * torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
#: GMS's stabiliser: RIAD's 0.0026 for images in [0, 1], times 4 because the models see [-1, 1]
#: (`training.data` normalises with mean = std = 0.5), so gradients and their squares are 2x and 4x.
GMS_C = 4 * 0.0026
#: Scales of the multi-scale map: full size and halved three times (RIAD).
MSGMS_SCALES = 4


def gradient_magnitudes(grey: Tensor, *, separable: bool = False) -> Tensor:
    """Prewitt gradient magnitude of each channel of a (B, 2, H, W) pair of images, same size
    (edge-replicated border).

    `separable`: the same filter as sums and differences of shifted views (Prewitt is a 3-tap box
    along one axis times a central difference along the other). Through autograd that is 1.3x faster
    than the grouped convolution, so the training loss uses it; in ONNX Runtime it is slower at
    128 px, so the exported head keeps the convolution.
    """
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")  # no false edge where zeros would pad
    if separable:
        h, w = grey.shape[-2:]
        rows = padded[:, :, :h] + padded[:, :, 1 : h + 1] + padded[:, :, 2:]  # (B, 2, H, W + 2)
        cols = padded[..., :w] + padded[..., 1 : w + 1] + padded[..., 2:]  # (B, 2, H + 2, W)
        gx = (rows[..., :w] - rows[..., 2:]) / 3.0  # (B, 2, H, W)
        gy = (cols[:, :, :h] - cols[:, :, 2:]) / 3.0  # (B, 2, H, W)
        return torch.sqrt(gx * gx + gy * gy + 1e-12)
    kx = _PREWITT_X.to(grey.dtype).to(grey.device).reshape(1, 1, 3, 3)
    kernels = torch.cat((kx, kx.transpose(2, 3))).repeat(2, 1, 1, 1)  # (4, 1, 3, 3): x, y per channel
    g = F.conv2d(padded, kernels, groups=2)  # (B, 4, H, W): gx, gy of channel 0, then of channel 1
    g = g * g
    return torch.sqrt(g[:, 0::2] + g[:, 1::2] + 1e-12)  # (B, 2, H, W)


def gms_map(grey: Tensor, *, separable: bool = False) -> Tensor:
    """One minus the gradient-magnitude similarity of a (B, 2, H, W) pair (image, reconstruction):
    (B, 1, H, W) in [0, 1]."""
    g = gradient_magnitudes(grey, separable=separable)  # (B, 2, H, W)
    g0, g1 = g[:, :1], g[:, 1:]  # (B, 1, H, W) x2
    return 1.0 - (2.0 * g0 * g1 + GMS_C) / (g0 * g0 + g1 * g1 + GMS_C)


def grey_pyramid(x: Tensor, x_hat: Tensor) -> list[Tensor]:
    """The channel means of both images as one (B, 2, H/2**level, W/2**level) tensor per MSGMS scale.

    Both images in one tensor, so each scale costs one pooling, padding and (grouped) convolution
    instead of two of each: 3x faster in ONNX Runtime than per-image ops, the same numbers. Halving
    the last level equals pooling the original by 2**level (block means, sizes floored alike), and
    pooling the channel mean equals the mean of pooled channels: both are linear.
    """
    levels = [torch.cat((x.mean(dim=1, keepdim=True), x_hat.mean(dim=1, keepdim=True)), dim=1)]  # (B, 2, H, W)
    for _ in range(1, MSGMS_SCALES):
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def msgms_map(x: Tensor, x_hat: Tensor) -> Tensor:
    """RIAD's MSGMS (Zavrtanik et al. 2021): `gms_map` of the channel means at full size and 1/2, 1/4,
    1/8, each upsampled back, averaged: (B, C, H, W) x2 -> (B, 1, H, W) in [0, 1]. Coarse scales see
    blobs and bends that are smooth at pixel scale; the full scale sees thin cracks and lost texture.
    """
    size = x.shape[-2:]
    maps = [gms_map(grey) for grey in grey_pyramid(x, x_hat)]  # (B, 1, H/2**level, W/2**level) each
    total = maps[0]
    for coarse in maps[1:]:
        total = total + F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return total / MSGMS_SCALES


def msgms_mean(x: Tensor, x_hat: Tensor) -> Tensor:
    """The mean of `msgms_map(x, x_hat)` over images and pixels (a scalar), without building the map:
    the structure loss of every training step.

    Bilinear upsampling by a whole factor (align_corners=False, edges clamped) gives every source
    pixel the same total weight, so each level's upsampled map has that level's own mean; skipping the
    upsampling and its backward, and using the separable gradients, makes the loss's forward and
    backward twice as fast (about 6% of a Skip-GANomaly step at 128 px). Sizes the levels do not divide
    evenly take the map.
    """
    step = 2 ** (MSGMS_SCALES - 1)
    if x.shape[-2] % step or x.shape[-1] % step:
        return msgms_map(x, x_hat).mean()
    return torch.stack([gms_map(grey, separable=True).mean() for grey in grey_pyramid(x, x_hat)]).mean()


def msgms_map_reference(x: Tensor, x_hat: Tensor) -> Tensor:
    """`msgms_map` written as RIAD defines it, image by image: each image's channel mean pooled by
    2**level from full size, two Prewitt convolutions per image and scale. Not used for scoring; kept
    as the specification the batched map is tested against and timed against
    (`scripts/msgms_cost.py`)."""
    kx = _PREWITT_X.to(x.dtype).to(x.device).reshape(1, 1, 3, 3)

    def magnitude(grey: Tensor) -> Tensor:
        padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
        return torch.sqrt(F.conv2d(padded, kx) ** 2 + F.conv2d(padded, kx.transpose(2, 3)) ** 2 + 1e-12)

    total = torch.zeros_like(x[:, :1])  # (B, 1, H, W)
    for level in range(MSGMS_SCALES):
        a, b = (F.avg_pool2d(t, 2**level) if level else t for t in (x, x_hat))
        g, h = magnitude(a.mean(dim=1, keepdim=True)), magnitude(b.mean(dim=1, keepdim=True))
        gms = 1 - (2 * g * h + GMS_C) / (g * g + h * h + GMS_C)
        total = total + F.interpolate(gms, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return total / MSGMS_SCALES


def smooth(amap: Tensor, kernel: int) -> Tensor:
    """Box-filter a (B, 1, H, W) map with an odd `kernel`, same size out; 1 returns the map unchanged.

    Border pixels average only the pixels inside the image (count_include_pad=False), so a uniform
    map stays uniform and defects at the border are not dimmed.
    """
    if kernel < 1 or kernel % 2 == 0:
        msg = f"smoothing kernel must be an odd positive int (got {kernel})"
        raise ValueError(msg)
    if kernel == 1:
        return amap
    return F.avg_pool2d(amap, kernel, stride=1, padding=kernel // 2, count_include_pad=False)  # (B, 1, H, W)


def topk_count(num_pixels: int, fraction: float) -> int:
    """How many pixels the 'topk' reduction averages: round(fraction * pixels), at least 1."""
    return max(1, min(num_pixels, round(fraction * num_pixels)))


def reduce_map(amap: Tensor, how: str = "max", topk_fraction: float = 0.01) -> Tensor:
    """Image score from a (B, 1, H, W) map: its max, mean, or mean of the top `topk_fraction` pixels -> (B,)."""
    flat = amap.flatten(1)  # (B, H*W)
    if how == "max":
        return flat.amax(dim=1)  # (B,)
    if how == "mean":
        return flat.mean(dim=1)  # (B,)
    if how == "topk":
        k = topk_count(amap.shape[-2] * amap.shape[-1], topk_fraction)  # static: only B is dynamic
        return flat.topk(k, dim=1).values.mean(dim=1)  # (B,)
    msg = f"unknown score reduction {how!r}; use 'max', 'mean' or 'topk'"
    raise ValueError(msg)


def feature_distance(fx: Tensor, fx_hat: Tensor) -> Tensor:
    """Mean squared difference of discriminator features, (B, F, h, w) x2 -> (B,)."""
    return (fx - fx_hat).pow(2).flatten(1).mean(dim=1)  # (B,)


def map_pair(config: ModelConfig, x: Tensor, x_hat: Tensor, map_discriminator: nn.Module) -> tuple[Tensor, Tensor]:
    """The smoothed residual map and the smoothed discrimination map (defect probability): (B, 1, S, S) x2."""
    k = config.smoothing_kernel
    residual = smooth(residual_map(x, x_hat, config.residual), k)  # (B, 1, S, S)
    dmap = smooth(torch.sigmoid(map_discriminator(x, x_hat)), k)  # (B, 1, S, S) in [0, 1]
    return residual, dmap


def standardise(amap: Tensor, position: tuple[Tensor, Tensor] | None, index: int) -> Tensor:
    """`amap` (B, 1, S, S) against the per-pixel normal statistics `position` = (mean, scale), each
    (2, 1, S, S) with index 0 for the residual map and 1 for the discrimination map; None = unchanged."""
    if position is None:
        return amap
    mean, scale = position
    return (amap - mean[index]) / scale[index]  # (B, 1, S, S)


def within(amap: Tensor, roi: Tensor | None) -> Tensor:
    """`amap` (B, 1, S, S) zeroed outside the region of interest `roi` (1, 1, S, S) of 0/1; None = all.
    Zero is "as usual" for a standardised map and "no residual" for a raw one, so a place outside the
    region can neither decide a max nor draw a region."""
    return amap if roi is None else amap * roi


def map_scores(
    config: ModelConfig,
    residual: Tensor,
    dmap: Tensor,
    position: tuple[Tensor, Tensor] | None = None,
    roi: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """With a map discriminator: (residual_score, discrimination_score) (B,) x2, the reductions of `map_pair`'s
    maps (each standardised first when `position` statistics are given, then kept to `roi`)."""
    how, fraction = config.score_reduction, config.topk_fraction
    r = reduce_map(within(standardise(residual, position, 0), roi), how, fraction)  # (B,)
    return r, reduce_map(within(standardise(dmap, position, 1), roi), how, fraction)


def combine_maps(residual: Tensor, dmap: Tensor, source: str) -> Tensor:
    """The anomaly map of `source` ("residual", "discrimination" or "mean") from the two smoothed maps."""
    if source == "discrimination":
        return dmap
    if source == "mean":
        return 0.5 * (residual + dmap)  # (B, 1, S, S)
    if source == "residual":
        return residual
    msg = f"unknown map source {source!r}; use 'residual', 'discrimination' or 'mean'"
    raise ValueError(msg)


def score_triple(
    config: ModelConfig,
    discriminator: nn.Module,
    x: Tensor,
    x_hat: Tensor,
    map_discriminator: nn.Module | None = None,
    position: tuple[Tensor, Tensor] | None = None,
    roi: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The head's outputs for an input and its reconstruction, in `SCORE_OUTPUTS` order.

    residual_score (B,) = reduction of the smoothed residual map (standardised against `position`, the
    per-pixel normal statistics, when given: see `standardise`). Without a map discriminator,
    discrimination_score (B,) = feature_distance of D's last feature map on x and x_hat, and
    anomaly_map (B, 1, S, S) = the smoothed residual. With one, the discrimination map is its smoothed
    defect probability (in [0, 1]), discrimination_score = that map's reduction, and anomaly_map is
    chosen by `config.anomaly_map_source`: the residual map, the discrimination map, or their mean.
    With a region of interest `roi` (1, 1, S, S), every map is zero outside it (`within`).
    """
    if map_discriminator is None:
        residual = smooth(residual_map(x, x_hat, config.residual), config.smoothing_kernel)  # (B, 1, S, S)
        standardised = within(standardise(residual, position, 0), roi)  # (B, 1, S, S)
        residual_score = reduce_map(standardised, config.score_reduction, config.topk_fraction)  # (B,)
        _, fx = discriminator(x)  # (B, F, h, w)
        _, fx_hat = discriminator(x_hat)  # (B, F, h, w)
        return residual_score, feature_distance(fx, fx_hat), within(residual, roi)
    residual, dmap = map_pair(config, x, x_hat, map_discriminator)  # (B, 1, S, S) x2
    residual_score, discrimination_score = map_scores(config, residual, dmap, position, roi)  # (B,) x2
    return residual_score, discrimination_score, within(combine_maps(residual, dmap, config.anomaly_map_source), roi)
