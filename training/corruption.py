"""Synthetic corruption of normal images: the input side of the "corruption" training recipe.

The generator is trained to restore a corrupted normal image to the clean one (FINDINGS.md: on bottle
this lifted Skip-GANomaly's image AUROC from ~0.6 to ~0.9, where the paper's plain reconstruction
learns to copy defects). The same function can make synthetic defects for label-free validation.

Each corruption *kind* is a function registered in `CORRUPTIONS` that, given one clean image, a donor
image and a random generator, proposes a soft region mask and the content to blend in there; the
batch function composes 1..N of them and returns the untouched clean target and the mask of the
pixels that really changed. New kinds (Perlin blobs, thin lines, ...) register with `@register("name")`
and become available to `--corruption-kinds` without touching the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Proposal(NamedTuple):
    """A kind's output for one image: where (soft mask in [0, 1]) and what to blend in."""

    mask: Tensor  # (1, H, W) float in [0, 1]
    content: Tensor  # (C, H, W), same value range as the image


@dataclass(frozen=True)
class CorruptionContext:
    """What a kind may use: the image, another training image, the config and the seeded generator."""

    image: Tensor  # (C, H, W), clean, must not be modified
    donor: Tensor  # (C, H, W), another image of the batch, must not be modified
    config: CorruptionConfig
    generator: torch.Generator  # CPU generator: every random draw goes through it (reproducible runs)
    value_range: tuple[float, float]

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def randint(self, low: int, high: int) -> int:
        """Uniform int in [low, high] (inclusive)."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def rectangle(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) with sides drawn in [min_size, max_size] of the image side."""
        _, height, width = self.image.shape
        c = self.config
        h = max(1, round(self.uniform(c.min_size, c.max_size) * height))
        w = max(1, round(self.uniform(c.min_size, c.max_size) * width))
        return self.randint(0, height - h), self.randint(0, width - w), h, w


CorruptionFn = Callable[[CorruptionContext], Proposal]
CORRUPTIONS: dict[str, CorruptionFn] = {}


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Decorator adding a corruption kind under `name` (usable in `CorruptionConfig.kinds`)."""

    def add(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS[name] = fn
        return fn

    return add


def _rect_mask(image: Tensor, top: int, left: int, h: int, w: int) -> Tensor:
    mask = torch.zeros((1, *image.shape[1:]), dtype=image.dtype, device=image.device)  # (1, H, W)
    mask[:, top : top + h, left : left + w] = 1.0
    return mask


@register("patch")
def patch_from_donor(ctx: CorruptionContext) -> Proposal:
    """A rectangle of another training image (taken from a random place) pasted at a random place."""
    top, left, h, w = ctx.rectangle()
    _, height, width = ctx.donor.shape
    src_top, src_left = ctx.randint(0, height - h), ctx.randint(0, width - w)
    content = torch.zeros_like(ctx.image)  # (C, H, W)
    content[:, top : top + h, left : left + w] = ctx.donor[:, src_top : src_top + h, src_left : src_left + w]
    return Proposal(_rect_mask(ctx.image, top, left, h, w), content)


@register("colour")
def flat_colour(ctx: CorruptionContext) -> Proposal:
    """A rectangle of one random colour (uniform over the value range, per channel)."""
    top, left, h, w = ctx.rectangle()
    low, high = ctx.value_range
    colour = low + (high - low) * torch.rand(ctx.image.shape[0], generator=ctx.generator)  # (C,)
    content = colour.to(ctx.image).view(-1, 1, 1).expand_as(ctx.image)  # (C, H, W)
    return Proposal(_rect_mask(ctx.image, top, left, h, w), content)


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class CorruptionConfig:
    """How many shapes of which kinds, and how large (as a fraction of the image side)."""

    kinds: tuple[str, ...] = _help(("patch", "colour"), "corruption kinds drawn uniformly for each shape")
    min_count: int = _help(1, "fewest shapes per image")
    max_count: int = _help(3, "most shapes per image")
    min_size: float = _help(1 / 16, "smallest shape side, as a fraction of the image side")
    max_size: float = _help(1 / 4, "largest shape side, as a fraction of the image side")

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        p = []
        unknown = [k for k in self.kinds if k not in CORRUPTIONS]
        if not self.kinds or unknown:
            p.append(f"kinds must be a non-empty list of {', '.join(sorted(CORRUPTIONS))} (got {list(self.kinds)})")
        if not 1 <= self.min_count <= self.max_count:
            p.append(f"need 1 <= min_count <= max_count (got {self.min_count}, {self.max_count})")
        if not 0 < self.min_size <= self.max_size <= 1:
            p.append(f"need 0 < min_size <= max_size <= 1 (got {self.min_size}, {self.max_size})")
        if p:
            msg = "invalid corruption config: " + "; ".join(p)
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorruptionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"unknown CorruptionConfig keys: {', '.join(unknown)}"
            raise ValueError(msg)
        return cls(**dict(data))


class Corrupted(NamedTuple):
    corrupted: Tensor  # (B, C, H, W): the training input
    target: Tensor  # (B, C, H, W): the clean images, the very tensor passed in, unmodified
    mask: Tensor  # (B, 1, H, W) bool: True exactly where `corrupted` differs from `target`


def corrupt_batch(
    images: Tensor,
    config: CorruptionConfig,
    generator: torch.Generator,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Corrupted:
    """Corrupt each image of a batch with `min_count..max_count` shapes; never touches `images`.

    Donors are other images of the same batch (the image itself when the batch has one image).
    """
    batch = images.shape[0]
    out = images.clone()  # (B, C, H, W)
    region = torch.zeros_like(images[:, :1])  # (B, 1, H, W)
    for i in range(batch):
        shift = int(torch.randint(1, batch, (), generator=generator)) if batch > 1 else 0
        ctx = CorruptionContext(images[i], images[(i + shift) % batch], config, generator, value_range)
        for _ in range(ctx.randint(config.min_count, config.max_count)):
            kind = config.kinds[ctx.randint(0, len(config.kinds) - 1)]
            mask, content = CORRUPTIONS[kind](ctx)  # (1, H, W), (C, H, W)
            out[i] = out[i] * (1 - mask) + content * mask
            region[i] = torch.maximum(region[i], mask)
    changed = (out != images).any(dim=1, keepdim=True)  # (B, 1, H, W)
    return Corrupted(out, images, (region > 0) & changed)
