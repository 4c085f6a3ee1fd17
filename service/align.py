"""Part alignment: turn a part shown at any angle and position to one pose before the model sees it.

A part that lies on a plain background at a random angle (a screw on a table, a bolt on a belt) shows
a detector a different picture in every image: the thread of one screw falls where the head of the
next one was. A reconstruction model then has to learn every pose, and what it learns of each is
blurred by all the others. With `align="principal-axis"` each image is first turned and shifted so
the part always lies the same way, and the model learns, and is scored on, one pose:

* the part: the pixels that differ from the background, taken to be the median of the image's border
  (a band `BORDER` of the side wide), by more than an Otsu threshold on that difference;
* its pose: the centroid and the principal axis of those pixels (image moments); the axis is turned
  to point down the image, and of its two directions the one toward the part's heavier end (the sign
  of the third moment along the axis, the head of a screw) is chosen, so a part and the same part
  turned half a circle end up alike;
* the image: turned by that angle and shifted so the middle of the part's extent lands at the centre
  of a frame of the image's own size, which is resized to the model's input in the same resampling
  (`Pose.render`); what comes in from outside the frame is filled with the background level;
* the crop (a bundle's `crop_box`, training's `--crop`): the frame may show only a box about its
  centre, a share of its width and height, so a long thin part fills the model's input; still the
  same single resampling;
* the map: the model's anomaly map, made in the aligned frame, is turned back with the inverse
  transform, so heatmaps, regions and pixel metrics stay in the input's own pixels. Input pixels that
  the aligned frame did not cover get the map's lowest value (no evidence of a defect there).

An image with no part to find (a blank frame: nothing differs from the border) is left as it is.
This is meant for one part on a plain background. A texture, or a part that fills the frame, has
no principal axis worth the name; `survey` measures which case a set of normal images is, and
training's `align="auto"` turns alignment on only for the first (`Survey.choice`).

Training, export, evaluation, calibration and the service all call these functions, so the network is
trained on the same poses it is scored on. No torch here: the service image carries none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from service.images import to_mode

#: How images are posed before pre-processing: as they come, or turned to their part's principal axis.
Align = Literal["none", "principal-axis"]
#: Width of the border band that gives the background level, as a share of the shorter side.
BORDER = 0.05
#: Below this share of the image, the "part" found is noise, and the image is left unaligned.
MIN_PART_FRACTION = 0.002
#: Pose is measured on a copy at most this many pixels on a side (moments do not need more).
_POSE_SIDE = 256
#: The aligned frame as it is: no crop (`crop_box`).
FULL_BOX = (1.0, 1.0)


@dataclass(frozen=True)
class Pose:
    """Where the part is and how it lies in one input image: the point that goes to the frame's centre
    (`cx`, `cy`, in input pixels) and the angle of its axis (degrees, counter-clockwise from pointing
    down the image), with the input's size and its background level (the fill). The identity changes
    nothing.

    Coordinates are continuous, pixel centres at i + 0.5, as PIL's transforms use them.
    """

    cx: float = 0.0
    cy: float = 0.0
    angle: float = 0.0
    width: int = 0
    height: int = 0
    fill: tuple[float, ...] = ()
    identity: bool = True
    #: The share of the input's width and height, across and along the part's axis, that the aligned
    #: frame shows (`crop_box`): (1, 1) is the whole frame; less magnifies the part in that direction.
    box: tuple[float, float] = FULL_BOX

    def _to_input(self) -> tuple[float, float, float, float, float, float]:
        """Aligned-frame point (x, y) -> input point (a x + b y + c, d x + e y + f): the frame has the
        input's size, is turned by the part's angle about `(cx, cy)`, has that point at its centre and
        shows `box` of the input's width and height."""
        t = math.radians(self.angle)
        cos, sin = math.cos(t), math.sin(t)
        ox, oy = self.width / 2.0, self.height / 2.0
        bx, by = self.box
        # input = (cx, cy) + R(angle) @ diag(box) @ (aligned - centre), y down
        a, b, d, e = cos * bx, -sin * by, sin * bx, cos * by
        return a, b, self.cx - a * ox - b * oy, d, e, self.cy - d * ox - e * oy

    def _to_aligned(self) -> tuple[float, float, float, float, float, float]:
        """The inverse: input point -> aligned-frame point."""
        t = math.radians(self.angle)
        cos, sin = math.cos(t), math.sin(t)
        ox, oy = self.width / 2.0, self.height / 2.0
        bx, by = self.box
        a, b, d, e = cos / bx, sin / bx, -sin / by, cos / by  # diag(1 / box) @ R(angle) transposed
        return a, b, ox - a * self.cx - b * self.cy, d, e, oy - d * self.cx - e * self.cy

    def render(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """The aligned frame of `img` (this pose's input), resized to `size`, in one resampling.

        Turning the full-resolution image and then resizing it costs ~100 ms for a 1-megapixel frame; a
        box reduction by the whole factor the resize leaves room for, then one bilinear affine to `size`,
        costs about 1 ms of the 2-5 ms alignment adds (docs/performance.md); the rest is measuring the pose.
        The corners brought in from outside the frame get the fill.
        """
        if self.identity:
            return img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)
        bx, by = self.box  # the frame shows this share of the input: the reduction leaves it its pixels
        factor = max(1, math.floor(min(img.width * bx / size[0], img.height * by / size[1])))
        src = img.reduce(factor) if factor > 1 else img
        sx, sy = self.width / size[0], self.height / size[1]  # output pixel -> aligned-frame point
        a, b, c, d, e, f = self._to_input()
        # output (u, v) -> aligned (u sx, v sy) -> input -> the reduced copy (/ factor)
        data = (a * sx / factor, b * sy / factor, c / factor, d * sx / factor, e * sy / factor, f / factor)
        fill = self.fill[0] if len(self.fill) == 1 else tuple(self.fill)
        fill_colour: float | tuple[int, ...] = (
            fill if img.mode == "F" else (round(fill) if isinstance(fill, float) else tuple(round(v) for v in fill))
        )
        return src.transform(size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=fill_colour)

    def to_input(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A map of the aligned frame (any resolution, e.g. the model's) -> the map over the input, at
        `size` (width, height; normally the input's own size), in one resampling.

        Input pixels the aligned frame did not cover get the map's minimum (no evidence of a defect).
        """
        mh, mw = amap.shape
        w, h = size
        src = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), mode="F")
        a, b, c, d, e, f = self._to_aligned()
        ix, iy = self.width / w, self.height / h  # output pixel -> input point
        mx, my = mw / self.width, mh / self.height  # aligned-frame point -> map pixel
        data = (a * ix * mx, b * iy * mx, c * mx, d * ix * my, e * iy * my, f * my)
        out = src.transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=float("nan"))
        arr = np.asarray(out, dtype=np.float32).copy()
        arr[np.isnan(arr)] = float(amap.min()) if amap.size else 0.0
        return arr


#: The pose that changes nothing (what `align="none"` and a blank frame get).
IDENTITY = Pose()


def _background(arr: np.ndarray) -> np.ndarray:
    """Median of the border band, per channel: shape (channels,)."""
    a = arr if arr.ndim == 3 else arr[..., None]
    h, w = a.shape[:2]
    k = max(1, round(BORDER * min(h, w)))
    band = np.concatenate(
        [
            a[:k].reshape(-1, a.shape[2]),
            a[-k:].reshape(-1, a.shape[2]),
            a[:, :k].reshape(-1, a.shape[2]),
            a[:, -k:].reshape(-1, a.shape[2]),
        ]
    )
    return np.median(band, axis=0)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of non-negative values (256 bins over their range)."""
    hi = float(values.max())
    if hi <= 0:
        return math.inf
    hist, edges = np.histogram(values, bins=256, range=(0.0, hi))
    p = hist.astype(np.float64) / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def _pixels(img: Image.Image) -> np.ndarray:
    """float32 pixels of an 'L', 'RGB' or 'F' image; any other mode as the service would read it in colour."""
    return np.asarray(img if img.mode in ("L", "RGB", "F") else to_mode(img, 3), dtype=np.float32)


def _differs(arr: np.ndarray, background: np.ndarray) -> np.ndarray:
    diff = np.abs(arr - background.astype(np.float32))
    if diff.ndim == 3:  # the largest channel; pairwise maxima are 3x faster than max(axis=2), same values
        diff = np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])
    return diff > _otsu(diff)


def part_mask(img: Image.Image) -> np.ndarray:
    """Boolean (H, W) mask of the pixels that differ from the border's background (module docstring)."""
    arr = _pixels(img)
    return _differs(arr, _background(arr))


def _thumbnail(img: Image.Image) -> tuple[Image.Image, int]:
    """The image box-reduced to at most about `_POSE_SIDE` on a side, and the factor: moments need no
    more pixels, and a box reduction is the cheapest way there. Reduced pixel i covers input pixels
    i * factor to (i + 1) * factor."""
    factor = math.ceil(max(img.size) / _POSE_SIDE)
    return (img.reduce(factor), factor) if factor > 1 else (img, 1)


def estimate_pose(img: Image.Image) -> Pose:
    """The part's pose in `img` (module docstring); the identity when no part stands out."""
    small, factor = _thumbnail(img)
    arr = _pixels(small)
    background = _background(arr)
    mask = _differs(arr, background)
    if mask.mean() < MIN_PART_FRACTION or mask.all():
        return IDENTITY
    ys, xs = np.nonzero(mask)
    xs = (xs.astype(np.float64) + 0.5) * factor
    ys = (ys.astype(np.float64) + 0.5) * factor
    cx, cy = xs.mean(), ys.mean()
    dx, dy = xs - cx, ys - cy
    theta = _axis(dx, dy)
    ux, uy = math.cos(theta), math.sin(theta)
    # Point the axis toward the heavier end: the long tail of the skew is the light end.
    if ((dx * ux + dy * uy) ** 3).mean() > 0:
        ux, uy = -ux, -uy
    # The part's extent along and across the axis is centred, not its centroid: a part heavier at one
    # end (a screw's head) would otherwise reach out of the frame at the other end (the tip).
    along, across = dx * ux + dy * uy, -dx * uy + dy * ux
    lo_a, hi_a = np.percentile(along, [0.5, 99.5])
    lo_c, hi_c = np.percentile(across, [0.5, 99.5])
    mid_a, mid_c = (lo_a + hi_a) / 2, (lo_c + hi_c) / 2
    # The angle that turns "down the image" (0, 1) onto the axis: the aligned frame's +y is the axis.
    angle = math.degrees(math.atan2(-ux, uy))
    centre_x, centre_y = cx + mid_a * ux - mid_c * uy, cy + mid_a * uy + mid_c * ux
    return Pose(
        cx=float(centre_x),
        cy=float(centre_y),
        angle=angle,
        width=img.width,
        height=img.height,
        fill=tuple(float(v) for v in background),
        identity=False,
    )


def _axis(dx: np.ndarray, dy: np.ndarray) -> float:
    """Direction (radians, image coordinates) of the major axis of points centred at 0."""
    mu20, mu02, mu11 = (dx * dx).mean(), (dy * dy).mean(), (dx * dy).mean()
    return 0.5 * math.atan2(2 * mu11, mu20 - mu02)


# ------------------------------------------------------------------ the label-free choice ("auto")
#: `auto` aligns when the typical training part is at least this much longer than wide (sqrt of the
#: ratio of its second moments): a round part has no axis to turn to, and a noisy one would spin it.
MIN_ELONGATION = 2.0
#: ... and lies clear of the frame: at most this share of the border band is part (textures and parts
#: that fill the frame are not one part on a background).
MAX_BORDER_SHARE = 0.01
#: ... and does not already lie one way: the axes' concentration (1 = all parallel, 0 = any angle) is
#: below this. Turning parts that already agree gains nothing and could flip a symmetric part end to end.
MAX_AXIS_CONCENTRATION = 0.9


@dataclass(frozen=True)
class Survey:
    """What the training normals look like to the alignment rule (medians over the images surveyed)."""

    images: int
    part_share: float  # of the image
    elongation: float
    border_share: float
    axis_concentration: float

    @property
    def choice(self) -> Align:
        aligned = (
            self.elongation >= MIN_ELONGATION
            and self.border_share <= MAX_BORDER_SHARE
            and self.axis_concentration < MAX_AXIS_CONCENTRATION
        )
        return "principal-axis" if aligned else "none"

    @property
    def roi_choice(self) -> Literal["none", "part"]:
        """`--roi auto`: a region of interest for a part on a plain background clear of the frame (any
        shape); none for textures and parts that fill the frame, where "the part" is the whole image."""
        return "part" if self.border_share <= MAX_BORDER_SHARE and self.part_share > 0 else "none"

    def describe(self) -> str:
        return (
            f"{self.images} normals: part {self.part_share:.0%} of the image, {self.elongation:.1f}x longer than "
            f"wide (aligns from {MIN_ELONGATION:g}), {self.border_share:.1%} of the border (at most "
            f"{MAX_BORDER_SHARE:.0%}), axis concentration {self.axis_concentration:.2f} (below "
            f"{MAX_AXIS_CONCENTRATION:g})"
        )


def survey(images: Sequence[Image.Image]) -> Survey:
    """Measure the parts in normal images for the `auto` choice (no labels: normal images only)."""
    shares, elongations, borders, doubled = [], [], [], []
    for img in images:
        mask = part_mask(_thumbnail(img)[0])
        h, w = mask.shape
        k = max(1, round(BORDER * min(h, w)))
        band = np.concatenate([mask[:k].ravel(), mask[-k:].ravel(), mask[:, :k].ravel(), mask[:, -k:].ravel()])
        shares.append(float(mask.mean()))
        borders.append(float(band.mean()))
        ys, xs = np.nonzero(mask)
        if len(xs) < 3 or mask.all():
            elongations.append(1.0)
            continue
        dx, dy = xs - xs.mean(), ys - ys.mean()
        eig = np.linalg.eigvalsh(np.cov(np.stack([dx, dy])))
        elongations.append(float(math.sqrt(eig[1] / max(eig[0], 1e-9))))
        doubled.append(2.0 * _axis(dx, dy))  # an axis has no direction: angles are compared doubled
    concentration = float(np.hypot(np.cos(doubled).mean(), np.sin(doubled).mean())) if doubled else 1.0
    return Survey(
        images=len(shares),
        part_share=float(np.median(shares)) if shares else 0.0,
        elongation=float(np.median(elongations)) if elongations else 1.0,
        border_share=float(np.median(borders)) if borders else 1.0,
        axis_concentration=concentration,
    )


def pose_for(img: Image.Image, mode: Align, box: tuple[float, float] = FULL_BOX) -> Pose:
    """The pose `mode` gives `img`: the identity for "none", else its part's pose, its frame showing
    `box` of the input's width and height (`crop_box`)."""
    if mode == "none":
        return IDENTITY
    if mode != "principal-axis":
        msg = f"align must be none or principal-axis here (got {mode!r}); training resolves 'auto' to one of them"
        raise ValueError(msg)
    pose = estimate_pose(img)
    return pose if pose.identity or box == FULL_BOX else replace(pose, box=box)


def align_image(img: Image.Image, mode: Align, box: tuple[float, float] = FULL_BOX) -> tuple[Image.Image, Pose]:
    """The image posed under `mode` at its own size, and its pose (for looking at what the model sees)."""
    pose = pose_for(img, mode, box)
    return pose.render(img, img.size), pose


# ------------------------------------------------------------------ the crop to the part ("crop_box")
#: Room left around the largest part on each side, as a share of the frame's half-side: a defect that
#: sticks out of a part's outline stays in view.
BOX_MARGIN = 1 / 16
#: A crop that would keep more than this share of the frame's area is not worth the distortion.
MAX_BOX_AREA = 0.8


def crop_box(images: Sequence[Image.Image]) -> tuple[float, float]:
    """The smallest box about the aligned frame's centre, as shares of its width and height, that holds
    the part of every normal image in `images` with `BOX_MARGIN` to spare (`FULL_BOX` when no part is
    found). Training's `crop="auto"` uses it where it keeps at most `MAX_BOX_AREA` of the frame.

    A part turned to one pose often fills the frame's length and a third of its width (a screw): the
    model's square input then spends two thirds of its pixels on the table. Cropped to the box and
    resized to the square, the part fills the input, every defect on it gets up to three times the
    pixels across, and the extra cost is nothing. The stretch is the same for every image, in training
    and in service, so the model learns the stretched part.
    """
    across, along = [], []
    for img in images:
        small = _thumbnail(img)[0]
        aligned, pose = align_image(small, "principal-axis")
        if pose.identity:
            continue
        ys, xs = np.nonzero(part_mask(aligned))
        if len(xs) == 0:
            continue
        half_w, half_h = aligned.width / 2.0, aligned.height / 2.0
        across.append(float(np.percentile(np.abs(xs + 0.5 - half_w), 99.5)) / half_w)
        along.append(float(np.percentile(np.abs(ys + 0.5 - half_h), 99.5)) / half_h)
    if not across:
        return FULL_BOX
    return round(min(1.0, max(across) + BOX_MARGIN), 3), round(min(1.0, max(along) + BOX_MARGIN), 3)
