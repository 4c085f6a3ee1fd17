"""Skip-GANomaly training (Akçay et al. 2019): adversarial + contextual L1 + latent L2 losses.

Recipe "paper": G reconstructs its input. Recipe "corruption" (the default, see FINDINGS.md): G gets a
corrupted normal image and is trained to output the clean one, so at test time it repairs defects
instead of copying them, and the residual shows them.

With a map discriminator M (`ModelConfig.discriminator_map`), every step also trains M to find the
synthetic defects: M(corrupted, G(corrupted)) -> the corruption mask, focal loss. G's output is
detached there, so M learns to read the restoration without steering it.
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
    focal_loss,
    generator_adversarial_loss,
    latent_loss,
    structure_loss,
)
from training.runtime import frozen

from .base import Loop


class SkipGANomalyLoop(Loop):
    phases: ClassVar[tuple[str, ...]] = ("gan",)
    columns: ClassVar[dict[str, tuple[str, ...]]] = {"gan": ("d", "g", "g_adv", "g_con", "g_lat", "g_struct", "m")}

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg, M = self.config, self.model.map_discriminator
        self.optimizers = {
            "g": self.adam(self.model.generator.parameters(), cfg.lr_g),
            "d": self.adam(self.model.discriminator.parameters(), cfg.lr_d),
        }
        if M is not None:
            self.optimizers["m"] = self.adam(M.parameters(), cfg.lr_m)

    def inputs(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(generator input, target): corrupted and clean images, or the image twice."""
        if self.config.recipe == "corruption":
            corrupted, target, _ = corrupt_batch(x, self.config.corruption, generator)
            return corrupted, target
        return x, x

    def step(self, phase: str, x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg, G, D, amp = self.config, self.model.generator, self.model.discriminator, self.precision
        M = self.model.map_discriminator
        mask: Tensor | None = None
        if cfg.recipe == "corruption":
            x_in, target, mask = corrupt_batch(x, cfg.corruption, generator)  # (B, C, S, S) x2, (B, 1, S, S)
        else:
            x_in, target = x, x
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
            if cfg.w_struct > 0:
                struct = structure_loss(fake.float(), target)
                loss_g = loss_g + cfg.w_struct * struct
        amp.step("g", loss_g, self.optimizers["g"])
        losses = {"d": loss_d, "g": loss_g, "g_adv": adv, "g_con": con, "g_lat": lat}
        if cfg.w_struct > 0:
            losses["g_struct"] = struct
        if M is not None:
            if mask is None:  # the paper recipe trains G on clean inputs; M still needs defects to find
                corrupted, _, mask = corrupt_batch(x, cfg.corruption, generator)
                with torch.no_grad(), amp.autocast():
                    restored = G(corrupted)  # (B, C, S, S)
            else:
                corrupted, restored = x_in, fake
            with amp.autocast():
                logits = M(corrupted, restored.detach())  # (B, 1, S, S)
                loss_m = focal_loss(logits.float(), mask.float())
            amp.step("m", loss_m, self.optimizers["m"])
            losses["m"] = loss_m
        return losses

    def sample_rows(self, x: Tensor, generator: torch.Generator) -> list[tuple[str, np.ndarray]]:
        if self.config.recipe != "corruption":
            return []
        corrupted, _ = self.inputs(x, generator)
        restored = self.model.reconstruct(corrupted)
        return [("corrupted", corrupted.float().cpu().numpy()), ("restored", restored.float().cpu().numpy())]
