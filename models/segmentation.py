"""The map discriminator: a small U-Net that sees an image and its reconstruction and says, per pixel,
whether the image is defective there (DRAEM's discriminative sub-network, Zavrtanik et al. 2021).

It is trained (in training/) to flag the synthetic defects of the corruption pipeline, whose masks are
known exactly, next to the adversarial game. Reconstruction residuals alone fail where the generator
repairs texture imperfectly everywhere (FINDINGS.md: magnetic_tile); a network that compares the two
images learns which differences matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import SelfAttention, conv_transpose2d, down_block, up_block

#: Halvings between the image and the bottleneck (S / 16: 4x4 at 64 px, 8x8 at 128 px).
DEPTH = 4
#: Initial defect probability of every pixel (RetinaNet's prior): defects cover a few percent of pixels,
#: so starting at 0.5 would spend the first steps unlearning false alarms.
PRIOR = 0.05


class MapDiscriminator(nn.Module):
    """(x, x_hat) (B, C, S, S) x2 -> defect logits (B, 1, S, S); raw logits, apply a sigmoid for probabilities.

    Widths start at `config.map_width` and double per halving (up to 8x). Encoder:
    conv 4x4 stride 2 (+ BatchNorm) + LeakyReLU; decoder: transposed conv + BatchNorm + ReLU with the
    encoder map of the same resolution concatenated (a full U-Net: this network must localise). With
    `config.map_attention`, a self-attention block mixes the bottleneck's positions.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.map_width
        widths = [width * min(8, 2**i) for i in range(DEPTH)]  # S/2 ... S/16
        self.downs = nn.ModuleList()
        in_ch = 2 * config.channels
        for i, out_ch in enumerate(widths):
            self.downs.append(down_block(in_ch, out_ch, norm=i > 0))
            in_ch = out_ch
        self.ups = nn.ModuleList()
        for i in range(DEPTH - 1, 0, -1):  # S/16 -> S/8 ... S/4 -> S/2
            self.ups.append(up_block(in_ch, widths[i - 1]))
            in_ch = 2 * widths[i - 1]  # after concatenating the skip
        self.out = conv_transpose2d(in_ch, 1, 4, 2, 1, bias=True)  # S/2 -> S
        self.attention = SelfAttention(widths[-1]) if config.map_attention else None
        nn.init.constant_(self.out.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        h = torch.cat([x, x_hat], dim=1)  # (B, 2C, S, S)
        skips: list[Tensor] = []
        for down in self.downs:
            h = down(h)  # (B, w_r, r, r), r = S/2 ... S/16
            skips.append(h)
        skips.pop()  # the bottleneck is h itself
        if self.attention is not None:
            h = self.attention(h)  # (B, w, S/16, S/16)
        for up in self.ups:
            h = torch.cat([up(h), skips.pop()], dim=1)  # (B, 2 * w_r, r, r), r = S/8 ... S/2
        return self.out(h)  # (B, 1, S, S)
