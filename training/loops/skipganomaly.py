"""Skip-GANomaly training (Akçay et al. 2019): adversarial + contextual L1 + latent L2 losses.

Recipe "paper": G reconstructs its input. Recipe "corruption" (the default, see FINDINGS.md): G gets a
corrupted normal image and is trained to output the clean one, so at test time it repairs defects
instead of copying them, and the residual shows them.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from training.corruption import corrupt_batch
from training.losses import (
    contextual_loss,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    latent_loss,
)
from training.runtime import frozen

from .base import Loop


class SkipGANomalyLoop(Loop):
    phases: ClassVar[tuple[str, ...]] = ("gan",)
    columns: ClassVar[dict[str, tuple[str, ...]]] = {"gan": ("d", "g", "g_adv", "g_con", "g_lat")}

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.optimizers = {
            "g": self.adam(self.model.generator.parameters(), cfg.lr_g),
            "d": self.adam(self.model.discriminator.parameters(), cfg.lr_d),
        }

    def inputs(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(generator input, target): corrupted and clean images, or the image twice."""
        if self.config.recipe == "corruption":
            corrupted, target, _ = corrupt_batch(x, self.config.corruption, generator)
            return corrupted, target
        return x, x

    def step(self, phase: str, x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg, G, D, amp = self.config, self.model.generator, self.model.discriminator, self.precision
        x_in, target = self.inputs(x, generator)  # (B, C, S, S) each
        with amp.autocast():
            fake = G(x_in)  # (B, C, S, S)
            real_logits, _ = D(target)  # (B,)
            fake_logits, _ = D(fake.detach())  # (B,)
            loss_d = discriminator_loss(real_logits.float(), fake_logits.float(), cfg.gan_loss)
        amp.step("d", loss_d, self.optimizers["d"])

        with frozen(D), amp.autocast():
            fake_logits, f_fake = D(fake)  # (B,), (B, F, 4, 4)
            with torch.no_grad():
                _, f_real = D(target)  # (B, F, 4, 4)
            f_real, f_fake = f_real.float(), f_fake.float()
            if cfg.feature_matching:
                adv = feature_matching_loss(f_real, f_fake)
            else:
                adv = generator_adversarial_loss(fake_logits.float(), cfg.gan_loss)
            con = contextual_loss(fake.float(), target)
            lat = latent_loss(f_real, f_fake)
            loss_g = cfg.w_adv * adv + cfg.w_con * con + cfg.w_lat * lat
        amp.step("g", loss_g, self.optimizers["g"])
        return {"d": loss_d, "g": loss_g, "g_adv": adv, "g_con": con, "g_lat": lat}

    def sample_rows(self, x: Tensor, generator: torch.Generator) -> list[tuple[str, np.ndarray]]:
        if self.config.recipe != "corruption":
            return []
        corrupted, _ = self.inputs(x, generator)
        restored = self.model.reconstruct(corrupted)
        return [("corrupted", corrupted.float().cpu().numpy()), ("restored", restored.float().cpu().numpy())]
