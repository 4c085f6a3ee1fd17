"""Building blocks shared by the generators, discriminators and encoders.

Convolutions are initialised as in DCGAN (weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02)) before
spectral normalisation is attached, so the power iteration starts from the initialised weight.
Convs followed by BatchNorm have no bias: BatchNorm removes it, and it would never get a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def _init_conv(module: nn.Conv2d | nn.ConvTranspose2d) -> None:
    nn.init.normal_(module.weight, 0.0, INIT_STD)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    *,
    bias: bool = True,
    spectral: bool = False,
) -> nn.Module:
    """A DCGAN-initialised `nn.Conv2d`, spectrally normalised when `spectral` is set."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=bias)
    _init_conv(conv)
    return _spectral_norm(conv) if spectral else conv


def conv_transpose2d(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *, bias: bool) -> nn.Module:
    """A DCGAN-initialised `nn.ConvTranspose2d`."""
    conv = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride, padding, bias=bias)
    _init_conv(conv)
    return conv


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with DCGAN's initialisation."""
    bn = nn.BatchNorm2d(channels)
    nn.init.normal_(bn.weight, 1.0, INIT_STD)
    nn.init.zeros_(bn.bias)
    return bn


def down_block(in_ch: int, out_ch: int, *, norm: bool, spectral: bool = False) -> nn.Sequential:
    """Halve the resolution: conv 4x4 stride 2 [+ BatchNorm] + LeakyReLU(0.2)."""
    layers: list[nn.Module] = [conv2d(in_ch, out_ch, 4, 2, 1, bias=not norm, spectral=spectral)]
    if norm:
        layers.append(batch_norm(out_ch))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return nn.Sequential(*layers)


def up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Double the resolution: transposed conv 4x4 stride 2 + BatchNorm + ReLU."""
    return nn.Sequential(conv_transpose2d(in_ch, out_ch, 4, 2, 1, bias=False), batch_norm(out_ch), nn.ReLU(True))


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): x + gamma * attention(x), with gamma starting at 0.

    Starting at 0 makes the block the identity at initialisation; the network learns how much
    non-local evidence to mix in.
    """

    def __init__(self, channels: int, *, spectral: bool = False) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = conv2d(channels, inner, 1, bias=False, spectral=spectral)
        self.key = conv2d(channels, inner, 1, bias=False, spectral=spectral)
        self.value = conv2d(channels, channels, 1, bias=False, spectral=spectral)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        q = self.query(x).flatten(2)  # (B, C', N), N = H * W
        k = self.key(x).flatten(2)  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N): row i = weights of query pixel i
        out = (v @ attn.transpose(1, 2)).view_as(x)  # (B, C, H, W)
        return x + self.gamma * out
