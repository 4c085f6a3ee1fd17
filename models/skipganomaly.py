"""Skip-GANomaly (Akçay et al. 2019): a U-Net generator that reconstructs its input, and a DCGAN D.

With skips at every level (the paper) the generator learns to copy its input, defects included;
`skip_levels` keeps only the coarsest skips and `skip_dropout` drops skip activations while training,
so fine detail has to come from what was learnt about normal images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Detector
from .config import ModelConfig
from .discriminator import Discriminator
from .layers import SelfAttention, conv_transpose2d, down_block, up_block


class UNetGenerator(nn.Module):
    """U-Net: (B, C, S, S) -> (B, C, S, S) in [-1, 1].

    Encoder: conv 4x4 stride 2 + BatchNorm + LeakyReLU per halving, S -> 4x4 (no BatchNorm on the first).
    Decoder: transposed conv + BatchNorm + ReLU per doubling; at each resolution in
    `config.skip_resolutions` the encoder's feature map of that resolution is concatenated (after
    dropout). Last layer: transposed conv + tanh.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.skip_resolutions = config.skip_resolutions
        self.downs = nn.ModuleList()
        in_ch, resolution = config.channels, config.image_size
        for i in range(config.num_stages):
            resolution //= 2
            out_ch = config.width_at(resolution)
            self.downs.append(down_block(in_ch, out_ch, norm=i > 0))
            in_ch = out_ch

        # Decoder, coarse to fine: ups[i] maps resolution 4 * 2**i to 8 * 2**i.
        self.ups = nn.ModuleList()
        self.attention = nn.Identity()
        self._attention_at = config.attention_resolution if config.self_attention else -1
        self._keep_skip: list[bool] = []  # per decoder block but the last
        self._attend: list[bool] = []
        width = in_ch  # bottleneck width
        while resolution < config.image_size // 2:
            resolution *= 2
            out_ch = config.width_at(resolution)
            self.ups.append(up_block(width, out_ch))
            self._attend.append(resolution == self._attention_at)
            if resolution == self._attention_at:
                self.attention = SelfAttention(out_ch)
            keep = resolution in self.skip_resolutions
            self._keep_skip.append(keep)
            width = out_ch * 2 if keep else out_ch
        self.ups.append(nn.Sequential(conv_transpose2d(width, config.channels, 4, 2, 1, bias=True), nn.Tanh()))
        self.skip_dropout = nn.Dropout(config.skip_dropout)

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        h = x  # (B, C, S, S)
        for down in self.downs:
            h = down(h)  # (B, w_r, r, r), r = S/2 ... 4
            skips.append(h)
        skips.pop()  # the bottleneck (B, F, 4, 4) is h itself
        for i, keep in enumerate(self._keep_skip):  # every decoder block but the output layer
            h = self.ups[i](h)  # (B, w_r, r, r), r = 8 ... S/2
            skip = skips.pop()  # encoder map of the same resolution
            if self._attend[i]:
                h = self.attention(h)  # (B, w_r, r, r)
            if keep:
                h = torch.cat([h, self.skip_dropout(skip)], dim=1)  # (B, 2 * w_r, r, r)
        return self.ups[-1](h)  # (B, C, S, S)


class SkipGANomaly(Detector):
    """Skip-GANomaly detector: `generator` U-Net G(x), `discriminator` D(x); reconstruct = G(x)."""

    def __init__(self, config: ModelConfig) -> None:
        if config.family != "skipganomaly":
            msg = (
                f"SkipGANomaly needs a config with family='skipganomaly' (got {config.family!r});"
                " use build_model(config)"
            )
            raise ValueError(msg)
        super().__init__(config)
        self.generator = UNetGenerator(config)
        self.discriminator = Discriminator(config)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.generator(x)  # (B, C, S, S)
