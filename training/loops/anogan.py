"""AnoGAN training with the f-AnoGAN encoder (Schlegl et al. 2017, 2019).

Phase "gan": a DCGAN on normal images (BCE or hinge, TTUR learning rates, optional feature matching).
Phase "encoder": G and D frozen in eval mode, E trained with the izi_f loss
||x - G(E(x))||² + kappa * ||f(x) - f(G(E(x)))||², f = D's last feature map.
With a map discriminator M (`ModelConfig.discriminator_map`), the encoder phase also trains M to find
synthetic defects: M(corrupted, G(E(corrupted))) -> the corruption mask, focal loss (G and E not updated
by it). It trains in the encoder phase only, where G(E(.)) is the reconstruction that will be scored.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from training.corruption import corrupt_batch
from training.losses import (
    discriminator_loss,
    feature_matching_loss,
    focal_loss,
    generator_adversarial_loss,
    izif_loss,
    structure_loss,
)
from training.runtime import frozen

from .base import Loop

#: Fixed latent codes for the per-epoch sample grid come from this seed offset.
_SAMPLE_SEED = 12345


class AnoGANLoop(Loop):
    phases: ClassVar[tuple[str, ...]] = ("gan", "encoder")
    columns: ClassVar[dict[str, tuple[str, ...]]] = {
        "gan": ("d", "g"),
        "encoder": ("e", "e_img", "e_feat", "e_struct", "m"),
    }

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg, m = self.config, self.model
        self.optimizers = {
            "g": self.adam(m.generator.parameters(), cfg.lr_g),
            "d": self.adam(m.discriminator.parameters(), cfg.lr_d),
            "e": self.adam(m.encoder.parameters(), cfg.lr_e),
        }
        if m.map_discriminator is not None:
            self.optimizers["m"] = self.adam(m.map_discriminator.parameters(), cfg.lr_m)

    def train_mode(self, phase: str) -> None:
        if phase == "gan":
            self.model.train()
        else:  # G and D score the encoder's output with their trained statistics
            self.model.eval()
            self.model.encoder.train()
            if self.model.map_discriminator is not None:
                self.model.map_discriminator.train()

    def step(self, phase: str, x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        if phase == "gan":
            return self._gan_step(x)
        losses = self._encoder_step(x)
        if self.model.map_discriminator is not None:
            losses["m"] = self._map_step(x, generator)
        return losses

    def _map_step(self, x: Tensor, generator: torch.Generator) -> Tensor:
        m, amp = self.model, self.precision
        assert m.map_discriminator is not None
        corrupted, _, mask = corrupt_batch(x, self.config.corruption, generator)  # (B, C, S, S), (B, 1, S, S)
        m.encoder.eval()  # reconstruct as the scoring head will (E's running statistics, not this batch's)
        with torch.no_grad(), amp.autocast():
            restored = m.generator(m.encoder(corrupted))  # (B, C, S, S)
        m.encoder.train()
        with amp.autocast():
            logits = m.map_discriminator(corrupted, restored)  # (B, 1, S, S)
            loss = focal_loss(logits.float(), mask.float())
        amp.step("m", loss, self.optimizers["m"])
        return loss

    def _gan_step(self, x: Tensor) -> dict[str, Tensor]:
        cfg, G, D, amp = self.config, self.model.generator, self.model.discriminator, self.precision
        z = self.model.sample_latent(x.shape[0], x.device)  # (B, nz), from the global RNG
        with amp.autocast():
            fake = G(z)  # (B, C, S, S)
            real_logits, _ = D(x)  # (B,)
            fake_logits, _ = D(fake.detach())  # (B,)
            loss_d = discriminator_loss(real_logits.float(), fake_logits.float(), cfg.gan_loss)
        amp.step("d", loss_d, self.optimizers["d"])

        with frozen(D), amp.autocast():
            fake_logits, f_fake = D(fake)  # (B,), (B, F, 4, 4)
            if cfg.feature_matching:
                with torch.no_grad():
                    _, f_real = D(x)  # (B, F, 4, 4)
                adv = feature_matching_loss(f_real.float(), f_fake.float())
            else:
                adv = generator_adversarial_loss(fake_logits.float(), cfg.gan_loss)
            loss_g = cfg.w_adv * adv
        amp.step("g", loss_g, self.optimizers["g"])
        return {"d": loss_d, "g": loss_g}

    def _encoder_step(self, x: Tensor) -> dict[str, Tensor]:
        m, amp = self.model, self.precision
        with frozen(m.generator, m.discriminator), amp.autocast():
            x_hat = m.generator(m.encoder(x))  # (B, C, S, S)
            with torch.no_grad():
                _, fx = m.discriminator(x)  # (B, F, 4, 4)
            _, fx_hat = m.discriminator(x_hat)  # (B, F, 4, 4)
            img, feat = izif_loss(x, x_hat.float(), fx.float(), fx_hat.float(), self.config.kappa)
            loss = img + feat
            if self.config.w_struct > 0:
                struct = structure_loss(x_hat.float(), x)
                loss = loss + self.config.w_struct * struct
        amp.step("e", loss, self.optimizers["e"])
        losses = {"e": loss, "e_img": img, "e_feat": feat}
        if self.config.w_struct > 0:
            losses["e_struct"] = struct
        return losses

    def sample_rows(self, x: Tensor, generator: torch.Generator) -> list[tuple[str, np.ndarray]]:
        fixed = torch.Generator().manual_seed(self.config.seed + _SAMPLE_SEED)
        z = self.model.sample_latent(x.shape[0], "cpu", generator=fixed).to(x.device)  # (N, nz)
        return [("G(z)", self.model.generator(z).float().cpu().numpy())]
