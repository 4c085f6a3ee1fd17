"""What every detector family shares: the `Detector` interface and its `ScoringHead`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .scoring import score_triple
from .segmentation import MapDiscriminator


class Detector(nn.Module):
    """A GAN anomaly detector: `generator`, `discriminator`, `reconstruct`, and one scoring head.

    `discriminator(x)` returns `(logits (B,), features (B, F, 4, 4))` for every family. With
    `config.discriminator_map`, `map_discriminator(x, x_hat)` returns per-pixel defect logits (B, 1, S, S);
    otherwise it is None (and the state dict has no such keys, so older checkpoints load unchanged).
    """

    config: ModelConfig
    generator: nn.Module
    discriminator: nn.Module
    map_discriminator: MapDiscriminator | None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.map_discriminator = MapDiscriminator(config) if config.discriminator_map else None
        if config.position_statistics:
            # Identity until `training.position_stats` fits them after training; index 0 = residual
            # map, 1 = discrimination map. Only models with the option have the keys, so older
            # checkpoints load unchanged.
            size = (2, 1, config.image_size, config.image_size)
            self.register_buffer("position_mean", torch.zeros(size))
            self.register_buffer("position_scale", torch.ones(size))
        if config.roi == "part":
            # All ones (everywhere counts) until `training.roi` fits it after training; only models with
            # the option have the key, so older checkpoints load unchanged.
            self.register_buffer("roi_mask", torch.ones(1, 1, config.image_size, config.image_size))

    @property
    def position(self) -> tuple[Tensor, Tensor] | None:
        """(mean, scale) per-pixel normal statistics, (2, 1, S, S) each, or None without the option."""
        if not self.config.position_statistics:
            return None
        return self.position_mean, self.position_scale

    @property
    def roi(self) -> Tensor | None:
        """The (1, 1, S, S) 0/1 mask of where defects count, or None without the option."""
        return self.roi_mask if self.config.roi == "part" else None

    def reconstruct(self, x: Tensor) -> Tensor:
        """What the scoring head compares x with: (B, C, S, S) -> (B, C, S, S) in [-1, 1]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)  # (B, C, S, S)

    def scoring_head(self) -> ScoringHead:
        """The module that is exported to ONNX; it shares this model's weights (and train/eval mode)."""
        return ScoringHead(self)


class ScoringHead(nn.Module):
    """Normalised images (B, C, S, S) -> (residual_score (B,), discrimination_score (B,), anomaly_map (B, 1, S, S)).

    Scores are only meaningful in eval mode (BatchNorm running statistics, no dropout), so the forward
    refuses to run while any shared module is in training mode. Creating the head does not change the
    model's mode: call `model.eval()` (or `head.eval()`) first, and `model.train()` to resume training.
    """

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # a head reports its model's mode; train()/eval() set both

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if any(m.training for m in self.model.modules()):
            msg = "the scoring head must run in eval mode: call model.eval() before scoring (model.train() after)"
            raise RuntimeError(msg)
        x_hat = self.model.reconstruct(x)  # (B, C, S, S)
        m = self.model
        return score_triple(m.config, m.discriminator, x, x_hat, m.map_discriminator, m.position, m.roi)
