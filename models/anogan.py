"""AnoGAN with an f-AnoGAN encoder (Schlegl et al. 2017, 2019), and the original latent search.

G and D are trained as a DCGAN on normal images; the encoder E is trained afterwards with G and D
frozen (izi_f: ||x - G(E(x))||² + k * ||f(x) - f(G(E(x)))||², in training/), so scoring is one
forward pass: x_hat = G(E(x)). `latent_search` keeps AnoGAN's iterative search for z as a reference.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import Detector
from .config import ModelConfig
from .discriminator import ConvTrunk, Discriminator
from .layers import SelfAttention, batch_norm, conv2d, conv_transpose2d, up_block
from .scoring import feature_distance, residual_map, score_triple


class Generator(nn.Module):
    """DCGAN generator: z (B, nz) -> image (B, C, S, S) in [-1, 1]; one up-block per doubling from 4x4."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.width_at(4)
        layers: list[nn.Module] = [
            conv_transpose2d(config.latent_dim, width, 4, 1, 0, bias=False),  # 1x1 -> 4x4
            batch_norm(width),
            nn.ReLU(True),
        ]
        resolution = 4
        while resolution < config.image_size // 2:
            resolution *= 2
            out_ch = config.width_at(resolution)
            layers.append(up_block(width, out_ch))
            if config.self_attention and resolution == config.attention_resolution:
                layers.append(SelfAttention(out_ch))
            width = out_ch
        layers += [conv_transpose2d(width, config.channels, 4, 2, 1, bias=True), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])  # (B, nz, 1, 1) -> (B, C, S, S)


class Encoder(nn.Module):
    """f-AnoGAN encoder: image (B, C, S, S) -> z (B, nz), unbounded like z ~ N(0, 1).

    Same trunk as the discriminator, with BatchNorm (it is not trained adversarially).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.trunk = ConvTrunk(config, norm=True, spectral=False)
        self.head = conv2d(self.trunk.out_channels, config.latent_dim, 4)  # 4x4 valid conv -> 1x1

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).flatten(1)  # (B, nz)


class AnoGAN(Detector):
    """f-AnoGAN detector: `generator` G(z), `discriminator` D(x), `encoder` E(x); reconstruct = G(E(x))."""

    def __init__(self, config: ModelConfig) -> None:
        if config.family != "anogan":
            msg = f"AnoGAN needs a config with family='anogan' (got {config.family!r}); use build_model(config)"
            raise ValueError(msg)
        super().__init__(config)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.encoder = Encoder(config)

    def sample_latent(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """n latent codes z ~ N(0, 1): (n, nz)."""
        return torch.randn(n, self.config.latent_dim, device=device, generator=generator)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.generator(self.encoder(x))  # (B, C, S, S)


def latent_search(
    model: AnoGAN,
    x: Tensor,
    steps: int = 500,
    lr: float = 0.01,
    feature_weight: float = 0.1,
    init: Literal["encoder", "random"] = "encoder",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """AnoGAN's iterative scorer: find z with G(z) close to x by gradient descent, then score G(z).

    Minimises, per image, (1 - w) * mean residual(x, G(z)) + w * ||f(x) - f(G(z))||² / n_f with Adam on
    z only (w = `feature_weight`, 0.1 as AnoGAN's lambda), starting from E(x) ("encoder") or from
    z ~ N(0, 1) ("random", drawn with `generator`). Runs in eval mode and restores the model's mode;
    no model parameter is changed or accumulates gradients. Returns the scoring head's triple for the
    final z, detached: (residual_score (B,), discrimination_score (B,), anomaly_map (B, 1, S, S)).
    """
    if not isinstance(model, AnoGAN):
        msg = f"latent_search needs an AnoGAN model (got {type(model).__name__})"
        raise TypeError(msg)
    if steps < 0:
        msg = f"steps must be >= 0 (got {steps})"
        raise ValueError(msg)
    if init not in ("encoder", "random"):
        msg = f"init must be 'encoder' or 'random' (got {init!r})"
        raise ValueError(msg)
    if not 0 <= feature_weight <= 1:
        msg = f"feature_weight must be in [0, 1] (got {feature_weight})"
        raise ValueError(msg)
    was_training = model.training
    model.eval()
    try:
        x = x.detach()
        with torch.no_grad():
            _, fx = model.discriminator(x)  # (B, F, 4, 4)
            if init == "encoder":
                z0 = model.encoder(x)  # (B, nz)
            else:
                z0 = model.sample_latent(x.shape[0], x.device, generator).to(x.dtype)  # (B, nz)
        z = z0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        kind = model.config.residual
        with torch.enable_grad():
            for _ in range(steps):
                x_hat = model.generator(z)  # (B, C, S, S)
                _, fx_hat = model.discriminator(x_hat)  # (B, F, 4, 4)
                per_image = (1 - feature_weight) * residual_map(x, x_hat, kind).mean(dim=(1, 2, 3))  # (B,)
                per_image = per_image + feature_weight * feature_distance(fx, fx_hat)  # (B,)
                # Summing keeps images independent; autograd.grad leaves the parameters' .grad alone.
                (z.grad,) = torch.autograd.grad(per_image.sum(), z)
                optimizer.step()
        with torch.no_grad():
            return score_triple(
                model.config,
                model.discriminator,
                x,
                model.generator(z),
                model.map_discriminator,
                model.position,
                model.roi,
            )
    finally:
        model.train(was_training)
