"""Loss functions of both families. Logits are raw discriminator outputs (B,); features (B, F, h, w)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.scoring import msgms_mean


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """D's loss on a real and a fake batch: BCE (real -> 1, fake -> 0) or hinge (Lim & Ye 2017)."""
    if kind == "bce":
        real = F.binary_cross_entropy_with_logits(real_logits, real_logits.new_ones(real_logits.shape))
        fake = F.binary_cross_entropy_with_logits(fake_logits, fake_logits.new_zeros(fake_logits.shape))
        return real + fake
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    msg = f"unknown GAN loss {kind!r}; use 'bce' or 'hinge'"
    raise ValueError(msg)


def generator_adversarial_loss(fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """G's adversarial loss: non-saturating BCE (fake -> 1) or hinge (-D(fake))."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_logits, fake_logits.new_ones(fake_logits.shape))
    if kind == "hinge":
        return -fake_logits.mean()
    msg = f"unknown GAN loss {kind!r}; use 'bce' or 'hinge'"
    raise ValueError(msg)


def feature_matching_loss(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """Salimans et al. 2016: squared distance between the batch means of D features (real is a target)."""
    return F.mse_loss(fake_features.mean(dim=0), real_features.detach().mean(dim=0))  # over (F, h, w)


def contextual_loss(x_hat: Tensor, target: Tensor) -> Tensor:
    """Skip-GANomaly's contextual loss: mean |x_hat - target|."""
    return F.l1_loss(x_hat, target)


def structure_loss(x_hat: Tensor, target: Tensor) -> Tensor:
    """RIAD's MSGMS loss: the mean of `models.scoring.msgms_map` (computed by `msgms_mean`), in [0, 1].
    An L1 loss alone is met by a blurred reconstruction; this one asks for the target's edges and
    texture at four scales, so the residual of a repaired defect is not drowned by blur elsewhere."""
    return msgms_mean(x_hat, target)


def latent_loss(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """Skip-GANomaly's latent loss: per-sample L2 between D features of the target and of G(x)."""
    return F.mse_loss(fake_features, real_features.detach())


def izif_loss(x: Tensor, x_hat: Tensor, fx: Tensor, fx_hat: Tensor, kappa: float = 1.0) -> tuple[Tensor, Tensor]:
    """f-AnoGAN izi_f encoder loss parts: (image MSE, kappa-weighted discriminator-feature MSE)."""
    return F.mse_loss(x_hat, x), kappa * F.mse_loss(fx_hat, fx.detach())


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Lin et al. 2017, as DRAEM trains its mask: mean over pixels of -(1 - p_t)^gamma log p_t.

    logits, target: (B, 1, H, W), target in {0, 1}. Down-weights the easy (mostly normal) pixels, so
    the few defect pixels of a synthetic mask are not drowned out.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, 1, H, W)
    p_t = torch.exp(-bce)  # probability given to the true class
    return ((1 - p_t) ** gamma * bce).mean()
