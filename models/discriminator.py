"""The DCGAN-style convolutional trunk, and the discriminator both families use.

The trunk halves the resolution from image_size down to 4x4, doubling the width each time up to
8x the effective width. The f-AnoGAN encoder reuses it with BatchNorm instead of spectral norm.
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import ModelConfig
from .layers import SelfAttention, conv2d, down_block


class ConvTrunk(nn.Module):
    """(B, C, S, S) -> (B, F, 4, 4), F = `out_channels`. No BatchNorm on the first stage (as DCGAN)."""

    def __init__(self, config: ModelConfig, *, norm: bool, spectral: bool) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        in_ch, resolution = config.channels, config.image_size
        for i in range(config.num_stages):
            resolution //= 2
            out_ch = config.width_at(resolution)
            stages.append(down_block(in_ch, out_ch, norm=norm and i > 0, spectral=spectral))
            if config.self_attention and resolution == config.attention_resolution:
                stages.append(SelfAttention(out_ch, spectral=spectral))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_ch

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)  # (B, F, 4, 4)


class Discriminator(nn.Module):
    """DCGAN discriminator: x (B, C, S, S) -> (logits (B,), features (B, F, 4, 4)).

    `logits` are raw (no sigmoid): use BCE-with-logits or a hinge loss. `features` is the last conv
    feature map before the classifier: the latent of Skip-GANomaly's latent loss, the target of
    feature matching, and the f-AnoGAN / discrimination-score feature residual.
    With `spectral_norm` every conv is spectrally normalised and there is no BatchNorm.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        sn = config.spectral_norm
        self.trunk = ConvTrunk(config, norm=not sn, spectral=sn)
        self.classifier = conv2d(self.trunk.out_channels, 1, 4, spectral=sn)  # 4x4 valid conv -> 1x1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(x)  # (B, F, 4, 4)
        logits = self.classifier(features).flatten()  # (B,)
        return logits, features
