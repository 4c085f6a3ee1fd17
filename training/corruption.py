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

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
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
        """(top, left, height, width) with sides drawn in [min_size, max_size] of the image side.

        With `cross_border` the box is `box()` cut to the image: shapes also touch the frame's edges
        (a chipped rim, a broken corner). Without it the box lies wholly inside, and a shape almost
        never reaches an edge: a model then never sees a defect there.
        """
        _, height, width = self.image.shape
        top, left, h, w = self.box()
        bottom, right = min(height, top + h), min(width, left + w)
        top, left = max(0, top), max(0, left)
        return top, left, bottom - top, right - left

    def box(self) -> tuple[int, int, int, int]:
        """Like `rectangle`, but not cut to the image: with `cross_border`, up to half of each side
        (rounded down) may lie outside it (top or left < 0, or top + height > the image's height)."""
        _, height, width = self.image.shape
        c = self.config
        h = max(1, round(self.uniform(c.min_size, c.max_size) * height))
        w = max(1, round(self.uniform(c.min_size, c.max_size) * width))
        centre = self.structured_centre()
        if centre is not None:
            top, left = centre[0] - h // 2, centre[1] - w // 2
            if not c.cross_border:
                top, left = min(max(top, 0), height - h), min(max(left, 0), width - w)
            return top, left, h, w
        if not c.cross_border:  # the draws of runs configured before the option existed
            return self.randint(0, height - h), self.randint(0, width - w), h, w
        return self.randint(-(h // 2), height - h + h // 2), self.randint(-(w // 2), width - w + w // 2), h, w

    def structured_centre(self) -> tuple[int, int] | None:
        """With probability `object_placement`, a shape's centre drawn in proportion to `structure`;
        otherwise None, and the caller draws its usual uniform position.

        Real defects sit on the part; a part photographed against a plain background fills a fraction
        of the frame, so uniformly placed shapes mostly land on the background, where any change is
        trivial to see. At 0 nothing is drawn, so runs configured before the option replay exactly.
        """
        share = self.config.object_placement
        if share <= 0 or self.uniform(0, 1) >= share:
            return None
        return self.point_on_structure()

    def point_on_structure(self) -> tuple[int, int]:
        """(y, x) drawn in proportion to `structure`."""
        index = int(torch.multinomial(self.structure, 1, generator=self.generator))
        width = self.image.shape[-1]
        return index // width, index % width

    @cached_property
    def structure(self) -> Tensor:
        """(H * W,) sampling weights: the grey image's gradient magnitude, box-smoothed over 1/16 of
        the side so that centres fall on and next to edges and texture, not only on the edge pixels,
        less its median, so that the plain background's own grain (most of the frame) draws nothing.

        On a textured surface the weight spreads over the busier half of it; a flat image is uniform.
        """
        grey = self.image.float().mean(dim=0)  # (H, W)
        grad = torch.zeros_like(grey)
        grad[:, 1:] += (grey[:, 1:] - grey[:, :-1]).abs()
        grad[1:, :] += (grey[1:, :] - grey[:-1, :]).abs()
        k = max(3, min(grey.shape) // 16) | 1  # odd, so the smoothing is centred
        smooth = F.avg_pool2d(grad[None, None], k, stride=1, padding=k // 2, count_include_pad=False)[0, 0]
        above = (smooth - smooth.median()).clamp_min(0).flatten()
        return above + 1e-6 * float(above.max().clamp_min(1e-6))


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


def perlin_noise(height: int, width: int, cells: int, generator: torch.Generator) -> Tensor:
    """2-D Perlin gradient noise (H, W), roughly in [-0.7, 0.7], with `cells` lattice cells along the longer side."""
    cy = max(1, round(cells * height / max(height, width)))
    cx = max(1, round(cells * width / max(height, width)))
    angles = 2 * math.pi * torch.rand(cy + 1, cx + 1, generator=generator)  # one gradient per lattice point
    grads = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (cy + 1, cx + 1, 2)
    ys = (torch.arange(height) + 0.5) * cy / height  # pixel centres in lattice units
    xs = (torch.arange(width) + 0.5) * cx / width
    y0, x0 = ys.floor().long().clamp(max=cy - 1), xs.floor().long().clamp(max=cx - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]  # (H, 1), (1, W)

    def corner(dy: int, dx: int) -> Tensor:
        g = grads[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)  # dot(gradient, offset): (H, W)

    def fade(t: Tensor) -> Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return top * (1 - v) + bottom * v  # (H, W)


def foreign_texture(ctx: CorruptionContext) -> Tensor:
    """The donor image moved and recoloured (C, H, W): rolled, maybe flipped/inverted, random gain and offset.

    DRAEM fills its anomaly shapes with textures from an outside data set; none ships here, so the
    foreign texture is another normal image made unlike its usual self.
    """
    _, height, width = ctx.donor.shape
    low, high = ctx.value_range
    tex = ctx.donor.roll((ctx.randint(0, height - 1), ctx.randint(0, width - 1)), dims=(1, 2))  # (C, H, W)
    if ctx.uniform(0, 1) < 0.5:
        tex = tex.flip(-1)
    if ctx.uniform(0, 1) < 0.5:
        tex = tex.flip(-2)
    mid = (low + high) / 2
    if ctx.uniform(0, 1) < 0.3:
        tex = 2 * mid - tex  # inverted
    # Grey images (all channels equal) stay grey: one gain and offset for every channel.
    n = 1 if bool((ctx.image == ctx.image[:1]).all()) else tex.shape[0]
    gain = torch.empty(n, 1, 1).uniform_(0.5, 1.5, generator=ctx.generator).to(tex)
    offset = torch.empty(n, 1, 1).uniform_(-0.4, 0.4, generator=ctx.generator).to(tex)
    return ((tex - mid) * gain + mid + offset * (high - low) / 2).clamp(low, high)


def _place(ctx: CorruptionContext, top: int, left: int, local: Tensor) -> Tensor:
    """A full-size (1, H, W) mask holding `local` (h, w) at (top, left); what falls outside is cut off."""
    mask = torch.zeros((1, *ctx.image.shape[1:]), dtype=ctx.image.dtype, device=ctx.image.device)
    _, height, width = mask.shape
    h, w = local.shape
    y0, x0 = max(0, -top), max(0, -left)  # rows / columns of `local` above / left of the image
    y1, x1 = min(h, height - top), min(w, width - left)
    mask[0, top + y0 : top + y1, left + x0 : left + x1] = local[y0:y1, x0:x1].to(mask)
    return mask


@register("perlin")
def perlin_blob(ctx: CorruptionContext) -> Proposal:
    """An irregular Perlin-noise blob inside a random rectangle, filled with a foreign texture (DRAEM).

    The blob is the noise above a random threshold; the texture is blended at an opacity in [0.4, 1].
    """
    top, left, h, w = ctx.box()  # with cross_border the blob is drawn whole and cut by the frame
    noise = perlin_noise(h, w, ctx.randint(1, 4), ctx.generator)  # (h, w)
    blob = noise > ctx.uniform(-0.1, 0.25)
    opacity = ctx.uniform(0.4, 1.0)
    mask = _place(ctx, top, left, blob.float() * opacity)
    if not mask.any():  # a threshold above the field, or the blob is all outside: keep the visible peak
        field = _place(ctx, top, left, noise - noise.min() + 1)  # > 0 exactly where the box is visible
        mask = (field >= field.max()).to(mask) * opacity
    return Proposal(mask, foreign_texture(ctx))


def _shade(ctx: CorruptionContext) -> Tensor:
    """The image darkened (70%) or brightened by a random amount: the content of thin and small defects."""
    low, high = ctx.value_range
    amount = ctx.uniform(0.15, 0.9) * (high - low)
    sign = -1.0 if ctx.uniform(0, 1) < 0.7 else 1.0
    return (ctx.image + sign * amount).clamp(low, high)  # (C, H, W)


@register("line")
def thin_line(ctx: CorruptionContext) -> Proposal:
    """A crack or scratch: a random polyline 1-2 px wide (at 64 px; wider at larger sizes), darker or brighter.

    Its length is drawn like a rectangle side, between `min_size` and twice `max_size` of the image side.
    """
    _, height, width = ctx.image.shape
    side = min(height, width)
    c = ctx.config
    length = ctx.uniform(c.min_size, 2 * c.max_size) * side
    segments = ctx.randint(1, 4)
    thickness = ctx.randint(1, max(1, round(2 * side / 64)))
    centre = ctx.structured_centre()
    y, x = map(float, centre) if centre else (ctx.uniform(0, height - 1), ctx.uniform(0, width - 1))
    angle = ctx.uniform(0, 2 * math.pi)
    points_y, points_x = [], []
    for _ in range(segments):
        angle += ctx.uniform(-0.8, 0.8)
        steps = max(2, round(2 * length / segments))  # half-pixel steps
        t = torch.arange(steps + 1) * (length / segments / steps)
        points_y.append(y + t * math.sin(angle))
        points_x.append(x + t * math.cos(angle))
        y, x = float(points_y[-1][-1]), float(points_x[-1][-1])
    py = torch.cat(points_y).round().long()
    px = torch.cat(points_x).round().long()
    line = torch.zeros(height + thickness, width + thickness)
    for dy in range(thickness):
        for dx in range(thickness):
            yy, xx = py + dy, px + dx
            ok = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            line[yy[ok], xx[ok]] = 1.0
    line = line[:height, :width]
    if not line.any():  # the walk left the image at once: mark its start so the shape is never empty
        line[min(height - 1, max(0, int(py[0]))), min(width - 1, max(0, int(px[0])))] = 1.0
    return Proposal(_place(ctx, 0, 0, line), _shade(ctx))


@register("spot")
def small_spot(ctx: CorruptionContext) -> Proposal:
    """A small dark or bright ellipse (a blowhole, a speck of dirt): radii from 1.5 px at 64 px up to
    a quarter of `max_size` of the image side."""
    _, height, width = ctx.image.shape
    side = min(height, width)
    r_min = 1.5 * side / 64
    r_max = max(r_min, ctx.config.max_size * side / 4)
    ry, rx = ctx.uniform(r_min, r_max), ctx.uniform(r_min, r_max)
    centre = ctx.structured_centre()
    cy, cx = map(float, centre) if centre else (ctx.uniform(0, height - 1), ctx.uniform(0, width - 1))
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    spot = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0  # (H, W)
    return Proposal(_place(ctx, 0, 0, spot.float()), _shade(ctx))


@register("stain")
def large_stain(ctx: CorruptionContext) -> Proposal:
    """A large, soft-edged Perlin region (a quarter of the image side up to all of it) where brightness
    and contrast change by a moderate amount: discolouration, uneven coating, a stain.

    Unlike the other kinds it ignores `min_size`/`max_size`: such defects are large by nature, and
    they are subtle: a gain of 0.7-1.3 and a shift of 5-25% of the value range.
    """
    _, height, width = ctx.image.shape
    low, high = ctx.value_range
    h = ctx.randint(max(1, height // 4), height)
    w = ctx.randint(max(1, width // 4), width)
    top, left = ctx.randint(0, height - h), ctx.randint(0, width - w)
    noise = perlin_noise(h, w, ctx.randint(1, 3), ctx.generator)  # (h, w)
    # Fade the field out towards the box's sides, so the region has no straight edges.
    window = torch.outer(
        torch.sin(math.pi * (torch.arange(h) + 0.5) / h), torch.sin(math.pi * (torch.arange(w) + 0.5) / w)
    )
    noise = noise - 0.7 * (1 - window)
    threshold = ctx.uniform(-0.35, -0.05)
    region = ((noise - threshold) / 0.1).clamp(0, 1)  # soft edge over 0.1 of noise amplitude
    region = torch.where(region >= 0.25, region, 0.0)  # no invisible fringe labelled as defect
    if not (region > 0).any():
        region = (noise >= noise.max()).float()
    mid = (low + high) / 2
    gain = ctx.uniform(0.7, 1.3)
    shift = ctx.uniform(0.05, 0.25) * (high - low) * (-1.0 if ctx.uniform(0, 1) < 0.5 else 1.0)
    content = ((ctx.image - mid) * gain + mid + shift).clamp(low, high)  # (C, H, W)
    return Proposal(_place(ctx, top, left, region), content)


def _band_region(ctx: CorruptionContext) -> Tensor:
    """(1, H, W) 0/1: the side of a straight edge, or the strip between two parallel ones, at any angle,
    from frame edge to frame edge, covering 1/8 to 1/2 of the image (the geometry of `band` and `finish`)."""
    _, height, width = ctx.image.shape
    angle = ctx.uniform(0, 2 * math.pi)
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    across = (xx * math.cos(angle) + yy * math.sin(angle)).flatten()  # (H * W): position across the band
    ranks = across.argsort().argsort().float() / across.numel()  # in [0, 1): quantiles give the area exactly
    area = ctx.uniform(1 / 8, 1 / 2)
    start = 1 - area if ctx.uniform(0, 1) < 0.5 else ctx.uniform(0, 1 - area)  # to the frame, or a strip
    return ((ranks >= start) & (ranks < start + area)).float().reshape(1, height, width).to(ctx.image)


@register("band")
def shading_band(ctx: CorruptionContext) -> Proposal:
    """A band of uneven finish across the image: the side of a straight edge, or the strip between two
    parallel ones, at any angle, brighter or darker and with its texture's contrast raised or lowered
    (uneven grinding or coating, a roller mark, a step in a surface's shading).

    `stain` covers soft-edged blotches inside the image; a band's edges are sharp, it runs from frame
    edge to frame edge, and its texture is kept: inside it every pixel goes through one gain about the
    band's own mean and one shift. Like `stain` it is large by nature and ignores `min_size` /
    `max_size`: it covers 1/8 to 1/2 of the image, a gain of 0.6-1.5 and a shift of 3-20% of the value
    range, so some bands are barely visible.
    """
    low, high = ctx.value_range
    region = _band_region(ctx)
    grey = ctx.image.float().mean(dim=0, keepdim=True)  # (1, H, W): one gain for all channels
    centre = float((grey * region).sum() / region.sum().clamp_min(1))
    gain = ctx.uniform(0.6, 1.5)
    shift = ctx.uniform(0.03, 0.2) * (high - low) * (-1.0 if ctx.uniform(0, 1) < 0.5 else 1.0)
    content = ((ctx.image - centre) * gain + centre + shift).clamp(low, high)  # (C, H, W)
    return Proposal(region, content)


@register("finish")
def finish_band(ctx: CorruptionContext) -> Proposal:
    """A band of another surface finish: `band`'s region (frame edge to frame edge), where the fine
    texture changes and the shading stays (grinding in another direction, coarser or finer, polished).

    The image splits into its shading (a 5-px box mean at 64 px, 1/13 of the side) and its fine detail;
    inside the band the detail is replaced by one of: the detail turned a quarter (the grinding's
    direction; square images only, others take a scaled detail instead), the detail scaled by 0.2-0.5
    (a finer finish) or 1.6-2.5 (a coarser one), or the donor's detail (another part's finish). `band`
    changes brightness and contrast; this changes only the texture, which a brightness-only residual
    cannot see. Not in the recommended list.
    """
    low, high = ctx.value_range
    region = _band_region(ctx)
    k = max(3, ctx.image.shape[-1] // 13) | 1

    def split(img: Tensor) -> tuple[Tensor, Tensor]:
        shading = F.avg_pool2d(img[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]
        return shading, img - shading

    shading, detail = split(ctx.image)  # (C, H, W) x2
    choice = ctx.uniform(0, 1)
    if choice < 0.3 and ctx.image.shape[-1] == ctx.image.shape[-2]:
        new_detail = detail.rot90(1, dims=(1, 2))
    elif choice < 0.65:
        scale = ctx.uniform(0.2, 0.5) if ctx.uniform(0, 1) < 0.5 else ctx.uniform(1.6, 2.5)
        new_detail = detail * scale
    else:
        new_detail = split(ctx.donor)[1]
    return Proposal(region, (shading + new_detail).clamp(low, high))


@register("warp")
def local_warp(ctx: CorruptionContext) -> Proposal:
    """A geometric defect: the image pushed sideways by a smooth bump (a dent, a bent tip or thread, a
    shifted edge), nothing added or recoloured.

    Bending a flat region changes nothing, so the bump is always centred on structure (drawn in
    proportion to `CorruptionContext.structure`, whatever `object_placement` says; a flat image is
    uniform). Its extent is drawn like a rectangle's sides, the displacement is a Gaussian bump (sigma
    a quarter of each side) in a random direction, 0.15-0.4 of the shorter side at its peak. The mask
    is where pixels moved by more than half a pixel and changed by more than 4% of the value range:
    what a person could see, not the invisible shifts of a smooth background.
    """
    _, height, width = ctx.image.shape
    c = ctx.config
    h = max(1, round(ctx.uniform(c.min_size, c.max_size) * height))
    w = max(1, round(ctx.uniform(c.min_size, c.max_size) * width))
    cy, cx = (v + 0.5 for v in ctx.point_on_structure())
    amplitude = ctx.uniform(0.15, 0.4) * min(h, w)
    angle = ctx.uniform(0, 2 * math.pi)
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    bump = torch.exp(-(((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 4)) ** 2) / 2)  # (H, W), 1 at the centre
    dy, dx = amplitude * math.sin(angle) * bump, amplitude * math.cos(angle) * bump  # pixels
    # Each output pixel samples the image at its position minus the displacement (align_corners=False).
    gy = (yy - dy + 0.5) / height * 2 - 1
    gx = (xx - dx + 0.5) / width * 2 - 1
    grid = torch.stack([gx.expand(height, width), gy.expand(height, width)], dim=-1)[None]  # (1, H, W, 2)
    image = ctx.image.float()[None]
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    low, high = ctx.value_range
    visible = (warped - image[0]).abs().amax(dim=0) > 0.04 * (high - low)  # (H, W)
    moved = ((dy**2 + dx**2 > 0.25) & visible).float()[None]  # (1, H, W)
    return Proposal(moved.to(ctx.image), warped.to(ctx.image))


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
    clean_fraction: float = _help(
        0.0, "probability that an image is left clean (its target is itself; the map discriminator sees normal pixels)"
    )
    cross_border: bool = _help(
        False, "rectangles and blobs may cross the image border (cut off there): defects also touch the frame's edges"
    )

    object_placement: float = _help(
        0.0,
        "share of shapes centred where the image has structure (edges, texture; chance in proportion to the "
        "smoothed gradient) instead of anywhere: on a part against a plain background, defects land on the part",
    )

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
        if not 0 <= self.object_placement <= 1:
            p.append(f"object_placement must be in [0, 1] (got {self.object_placement})")
        if not 0 <= self.clean_fraction < 1:
            p.append(f"clean_fraction must be in [0, 1) (got {self.clean_fraction})")
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

    Donors are other images of the same batch (the image itself when the batch has one image). With
    `clean_fraction` > 0 each image is left clean with that probability (its mask is all False).
    """
    batch = images.shape[0]
    out = images.clone()  # (B, C, H, W)
    region = torch.zeros_like(images[:, :1])  # (B, 1, H, W)
    for i in range(batch):
        shift = int(torch.randint(1, batch, (), generator=generator)) if batch > 1 else 0
        ctx = CorruptionContext(images[i], images[(i + shift) % batch], config, generator, value_range)
        if config.clean_fraction > 0 and ctx.uniform(0, 1) < config.clean_fraction:  # no draw when 0: old runs
            continue
        for _ in range(ctx.randint(config.min_count, config.max_count)):
            kind = config.kinds[ctx.randint(0, len(config.kinds) - 1)]
            mask, content = CORRUPTIONS[kind](ctx)  # (1, H, W), (C, H, W)
            out[i] = out[i] * (1 - mask) + content * mask
            region[i] = torch.maximum(region[i], mask)
    changed = (out != images).any(dim=1, keepdim=True)  # (B, 1, H, W)
    return Corrupted(out, images, (region > 0) & changed)
