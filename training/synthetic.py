"""Write a synthetic textured-surface dataset with injected defects, in the MVTec AD layout.

    <out>/train/good/000.png                       normal images
    <out>/test/good/000.png                        normal test images
    <out>/test/<defect>/000.png                    defective test images
    <out>/ground_truth/<defect>/000_mask.png       their masks (255 = defect, 0 = good)

Textures: "brushed" (brushed metal), "fabric" (plain-weave cloth), "grid" (a regular printed grid),
"random" (one of those per image), and "part": not a surface but a brushed-metal bolt (a shank and a
wider head) lying at a random angle and place on a plain belt, the case `--align` is for. Every
image is a fresh random instance of its texture (phase, period, streaks, pose, slight illumination
gradient), so normals vary like real parts do.
Defects: "scratch" (a thin bright or dark line), "spot" (an irregular stain), "crack" (a dark
random-walk line, sometimes branched), "missing" (a patch replaced by a flat colour or a foreign
texture). A mask marks exactly the pixels that were changed: every mask pixel differs from the clean
image by at least `MIN_DELTA` grey levels in some channel, and no pixel outside it differs at all.

Numpy and PIL only (no torch): the service's tests generate data with it too. Everything is
deterministic from the seed, and each image has its own random stream, so adding images to a split
does not change the ones already there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TEXTURES = ("brushed", "fabric", "grid")
TEXTURE_CHOICES = (*TEXTURES, "part", "random")
DEFECTS = ("scratch", "spot", "crack", "missing")
#: Smallest change, in 8-bit grey levels, of any defect pixel in at least one channel.
MIN_DELTA = 12
#: Sizes and widths below are tuned at this resolution and scale with the image.
_REF_SIZE = 128
_SPLIT_CODES = {"train": 0, "test": 1}

# Colour of each texture for RGB images (grayscale images use the field alone).
_TINTS = {
    "brushed": (0.93, 0.96, 1.0),
    "fabric": (1.0, 0.86, 0.68),
    "grid": (0.78, 0.96, 0.82),
    "part": (0.97, 0.97, 1.0),
}


# ---------------------------------------------------------------------------------------- textures
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)  # (S, S) each
    return x, y


def _box_blur_1d(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Mean over a sliding window of `k` along `axis` (output shorter by k - 1)."""
    c = np.cumsum(a, axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = a.shape[axis]
    return ((np.take(c, range(k, n + 1), axis=axis) - np.take(c, range(0, n - k + 1), axis=axis)) / k).astype(
        np.float32
    )


def _brushed(rng: np.random.Generator, s: int) -> np.ndarray:
    """Brushed metal: long horizontal streaks of varying brightness over fine grain."""
    k = max(3, s // 3)
    noise = rng.normal(0.0, 1.0, (s, s + k - 1)).astype(np.float32)
    streaks = _box_blur_1d(noise, k, axis=1)  # (S, S), long along x
    streaks /= streaks.std() + 1e-6
    rows = _box_blur_1d(rng.normal(0.0, 1.0, (s + 2, 1)).astype(np.float32), 3, axis=0)  # (S, 1) banding
    grain = rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
    return 0.58 + 0.055 * streaks + 0.05 * rows + 0.012 * grain


def _fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    """Plain-weave cloth: alternating warp and weft threads, each with its own brightness, plus fibres."""
    scale = s / _REF_SIZE
    period = max(4.0, rng.uniform(7.0, 9.0) * scale)
    x, y = _coords(s)
    x = x + rng.uniform(0, 2 * period)
    y = y + rng.uniform(0, 2 * period)
    i, j = np.floor(x / period).astype(int), np.floor(y / period).astype(int)
    fx, fy = x / period - i, y / period - j
    warp_on_top = (i + j) % 2 == 0
    profile = np.where(warp_on_top, np.sin(np.pi * fx), np.sin(np.pi * fy))  # bright thread centres
    n_threads = int(s / period) + 4
    warp_b = rng.uniform(0.85, 1.15, n_threads)[np.clip(i, 0, n_threads - 1)]
    weft_b = rng.uniform(0.85, 1.15, n_threads)[np.clip(j, 0, n_threads - 1)]
    thread = np.where(warp_on_top, warp_b, weft_b)
    fibres = rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
    return (0.3 + 0.38 * profile * thread + 0.03 * fibres).astype(np.float32)


def _grid(rng: np.random.Generator, s: int) -> np.ndarray:
    """A printed grid: thin dark lines at a regular pitch on a slightly mottled background."""
    scale = s / _REF_SIZE
    pitch = max(6.0, rng.uniform(14.0, 18.0) * scale)
    width = max(1.0, round(2 * scale))
    x, y = _coords(s)
    ox, oy = rng.uniform(0, pitch, 2)
    lines = (((x + ox) % pitch) < width) | (((y + oy) % pitch) < width)
    mottle = _box_blur_1d(_box_blur_1d(rng.normal(0.0, 1.0, (s + 6, s + 6)), 7, axis=0), 7, axis=1)
    grain = rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
    return (0.62 - 0.24 * lines + 0.08 * mottle + 0.015 * grain).astype(np.float32)


def _part(rng: np.random.Generator, s: int) -> np.ndarray:
    """A brushed-metal bolt, darker than the light belt it lies on, at a random angle and place; soft edges."""
    metal = 0.62 * _brushed(rng, s)
    x, y = _coords(s)
    cx, cy = rng.uniform(0.42, 0.58, 2) * s
    t = rng.uniform(0, 2 * np.pi)
    u = (x + 0.5 - cx) * np.cos(t) + (y + 0.5 - cy) * np.sin(t)  # along the bolt
    v = np.abs(-(x + 0.5 - cx) * np.sin(t) + (y + 0.5 - cy) * np.cos(t))  # across it
    length, shank, head, head_len = 0.36 * s, 0.05 * s, 0.11 * s, 0.08 * s
    # signed distance inside each rectangle (positive inside), 0.5 px of soft edge either side
    in_shank = np.minimum(shank - v, np.minimum(u + length, length - head_len - u))
    in_head = np.minimum(head - v, np.minimum(u - (length - head_len), length - u))
    alpha = np.clip(np.maximum(in_shank, in_head) + 0.5, 0.0, 1.0)
    belt = 0.8 + 0.01 * rng.normal(0.0, 1.0, (s, s)).astype(np.float32)
    return (belt * (1 - alpha) + metal * alpha).astype(np.float32)


_TEXTURE_FUNCS = {"brushed": _brushed, "fabric": _fabric, "grid": _grid, "part": _part}


def _resolve_texture(rng: np.random.Generator, texture: str) -> str:
    if texture == "random":
        return str(rng.choice(TEXTURES))
    if texture not in _TEXTURE_FUNCS:
        msg = f"unknown texture {texture!r}; choose one of {', '.join(TEXTURE_CHOICES)}"
        raise ValueError(msg)
    return texture


def _texture_float(rng: np.random.Generator, texture: str, size: int, channels: int) -> np.ndarray:
    """(S, S, C) float32 in [0, 1]: a random instance of a (resolved) texture under slight uneven light."""
    field = _TEXTURE_FUNCS[texture](rng, size)  # (S, S)
    x, y = _coords(size)
    angle = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.0, 0.12)
    light = 1.0 + slope * ((x * np.cos(angle) + y * np.sin(angle)) / size - 0.5) + rng.uniform(-0.05, 0.05)
    field = field * light
    if channels == 1:
        img = field[..., None]  # (S, S, 1)
    else:
        tint = np.asarray(_TINTS[texture], dtype=np.float32) * rng.uniform(0.97, 1.03, 3)
        img = field[..., None] * tint  # (S, S, 3)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _check_shape(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 16:
        msg = f"image_size must be an int of at least 16 pixels (got {image_size!r})"
        raise ValueError(msg)
    if channels not in (1, 3):
        msg = f"channels must be 1 (grayscale) or 3 (RGB) (got {channels!r})"
        raise ValueError(msg)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """(S, S, C) float in [0, 1] -> uint8 (S, S) for grayscale or (S, S, 3) for RGB."""
    out = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def make_normal_image(rng: np.random.Generator, texture: str, image_size: int, channels: int) -> np.ndarray:
    """A defect-free image: uint8 (S, S) for channels=1, (S, S, 3) for channels=3."""
    _check_shape(image_size, channels)
    resolved = _resolve_texture(rng, texture)
    return _to_uint8(_texture_float(rng, resolved, image_size, channels))


# ---------------------------------------------------------------------------------------- defects
def _interior_point(rng: np.random.Generator, s: int, margin: float = 0.18) -> tuple[float, float]:
    lo, hi = margin * s, (1 - margin) * s
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _line_width(rng: np.random.Generator, s: int, lo: float, hi: float) -> int:
    return max(1, round(rng.uniform(lo, hi) * s / _REF_SIZE))


def _draw_mask(s: int, draw: Callable[[ImageDraw.ImageDraw], object]) -> np.ndarray:
    """Bool (S, S) mask of what `draw` paints on a black canvas."""
    canvas = Image.new("L", (s, s), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 127


def _scratch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A thin, slightly bent line, brighter (polished) or darker (dirt in the groove) than the surface."""
    s = img.shape[0]
    cx, cy = _interior_point(rng, s)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.55) * s
    bend = rng.uniform(-0.08, 0.08) * s
    points = []
    for t in np.linspace(-0.5, 0.5, 9):
        off = bend * (1 - 4 * t * t)  # a shallow arc
        points.append(
            (
                cx + t * length * np.cos(angle) - off * np.sin(angle),
                cy + t * length * np.sin(angle) + off * np.cos(angle),
            )
        )
    width = _line_width(rng, s, 1.0, 2.5)
    mask = _draw_mask(s, lambda d: d.line(points, fill=255, width=width, joint="curve"))
    sign = 1 if rng.random() < 0.6 else -1
    strength = rng.uniform(0.22, 0.38) * rng.uniform(0.8, 1.0, (s, 1, 1))  # uneven along its length
    return np.clip(img + sign * strength, 0, 1), mask, sign


def _spot(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """An irregular stain: darker (often rust- or oil-coloured) or a lighter residue."""
    s = img.shape[0]
    cx, cy = _interior_point(rng, s)
    radius = max(2.5, rng.uniform(0.035, 0.08) * s)
    aspect, rot = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    theta = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    wobble = 1 + 0.25 * np.convolve(np.tile(rng.normal(0, 1, 32), 3), np.ones(5) / 5, "same")[32:64]
    rx, ry = radius * wobble * np.cos(theta), aspect * radius * wobble * np.sin(theta)
    points = list(zip(cx + rx * np.cos(rot) - ry * np.sin(rot), cy + rx * np.sin(rot) + ry * np.cos(rot), strict=True))
    mask = _draw_mask(s, lambda d: d.polygon(points, fill=255))
    x, y = _coords(s)
    falloff = np.clip(1.0 - np.hypot(x - cx, y - cy) / (1.6 * radius), 0.3, 1.0)[..., None]  # darker core
    sign = -1 if rng.random() < 0.7 else 1
    color = np.ones(img.shape[-1], dtype=np.float32)
    if img.shape[-1] == 3:
        color = np.asarray((0.6, 0.85, 1.0) if sign < 0 else (1.0, 1.0, 0.8), dtype=np.float32)
    strength = rng.uniform(0.2, 0.35)
    return np.clip(img + sign * strength * falloff * color, 0, 1), mask, sign


def _walk(
    rng: np.random.Generator, start: tuple[float, float], angle: float, length: float, step: float
) -> list[tuple[float, float]]:
    """Points of a random walk whose heading drifts a little at each step."""
    points = [start]
    x, y = start
    for _ in range(max(2, int(length / step))):
        angle += rng.normal(0.0, 0.35)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        points.append((x, y))
    return points


def _crack(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A dark random-walk line, sometimes with a branch."""
    s = img.shape[0]
    step = max(1.5, s / 64)
    main = _walk(rng, _interior_point(rng, s, 0.25), rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * s, step)
    paths = [main]
    if rng.random() < 0.5:
        root = main[int(rng.integers(1, len(main)))]
        paths.append(_walk(rng, root, rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.2) * s, step))
    width = _line_width(rng, s, 1.0, 2.2)
    mask = _draw_mask(s, lambda d: [d.line(p, fill=255, width=width, joint="curve") for p in paths])
    return img * rng.uniform(0.3, 0.55), mask, -1


def _missing(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A (rotated) rectangle of surface replaced by a flat colour or by a patch of a foreign texture."""
    s, c = img.shape[0], img.shape[-1]
    cx, cy = _interior_point(rng, s)
    w, h = rng.uniform(0.1, 0.22, 2) * s / 2
    rot = rng.uniform(0, np.pi)
    corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
    points = [(cx + a * np.cos(rot) - b * np.sin(rot), cy + a * np.sin(rot) + b * np.cos(rot)) for a, b in corners]
    mask = _draw_mask(s, lambda d: d.polygon(points, fill=255))
    sign = 1 if rng.random() < 0.5 else -1
    if rng.random() < 0.5:
        flat = img.reshape(-1, c).mean(axis=0) + sign * rng.uniform(0.15, 0.28)
        patch = np.broadcast_to(flat, img.shape)
    else:
        foreign = str(rng.choice(TEXTURES))
        patch = _texture_float(rng, foreign, s, c)
        patch = np.rot90(patch, k=int(rng.integers(1, 4)))  # turned, so even the same texture looks foreign
        patch = patch + sign * 0.08
    return np.clip(patch, 0, 1), mask, sign


_DEFECT_FUNCS = {"scratch": _scratch, "spot": _spot, "crack": _crack, "missing": _missing}


def add_defect(rng: np.random.Generator, image: np.ndarray, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """Inject one defect into a uint8 image; returns (new uint8 image, bool (S, S) mask of changed pixels).

    Every mask pixel differs from `image` by at least `MIN_DELTA` grey levels in some channel; no pixel
    outside the mask changes.
    """
    if defect not in _DEFECT_FUNCS:
        msg = f"unknown defect {defect!r}; choose from {', '.join(DEFECTS)}"
        raise ValueError(msg)
    clean = image[..., None] if image.ndim == 2 else image  # (S, S, C)
    if clean.shape[0] != clean.shape[1]:
        msg = f"add_defect expects a square image, got {clean.shape[1]}x{clean.shape[0]}"
        raise ValueError(msg)
    base = clean.astype(np.float32) / 255.0
    for _ in range(10):  # a defect drawn off the image (very rare) is drawn again
        target, mask, sign = _DEFECT_FUNCS[defect](rng, base)
        if mask.sum() >= 3:
            break
    out = np.where(mask[..., None], _to_uint8(target).reshape(clean.shape), clean).astype(np.int16)
    # Guarantee a visible change everywhere in the mask: push weak pixels MIN_DELTA away from the clean
    # value, in the defect's direction unless that would leave [0, 255].
    diff = np.abs(out - clean).max(axis=-1)
    weak = mask & (diff < MIN_DELTA)
    if weak.any():
        c = clean[weak].astype(np.int16)  # (N, C)
        pushed = c + sign * MIN_DELTA
        pushed = np.where((pushed < 0) | (pushed > 255), c - sign * MIN_DELTA, pushed)
        out[weak] = pushed
    result = out.astype(np.uint8)
    return (result[..., 0] if image.ndim == 2 else result), mask


def make_defect_image(
    rng: np.random.Generator, texture: str, image_size: int, channels: int, defect: str
) -> tuple[np.ndarray, np.ndarray]:
    """A defective image and its bool (S, S) mask.

    The clean surface is drawn first from `rng`, so `make_normal_image` on a generator in the same
    state returns exactly the image the defect was injected into.
    """
    clean = make_normal_image(rng, texture, image_size, channels)
    return add_defect(rng, clean, defect)


# ---------------------------------------------------------------------------------------- dataset
def _image_rng(seed: int, split: str, group: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], group, index])


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 0:
            msg = f"{name} must be a non-negative int (got {value!r})"
            raise ValueError(msg)


def generate_dataset(
    root: str | Path,
    *,
    texture: str = "fabric",
    n_train: int = 60,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    image_size: int = 128,
    channels: int = 3,
    seed: int = 0,
    defects: Sequence[str] = DEFECTS,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MVTec-layout dataset under `root` and return `root`.

    `n_test_defect` images are written per defect type. An existing non-empty `root` is refused unless
    `overwrite`, which removes its train/, test/ and ground_truth/ first (nothing else).
    """
    _check_shape(image_size, channels)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    if texture not in TEXTURE_CHOICES:
        msg = f"unknown texture {texture!r}; choose one of {', '.join(TEXTURE_CHOICES)}"
        raise ValueError(msg)
    defects = tuple(defects)
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown or len(set(defects)) != len(defects):
        msg = f"defects must be distinct names from {', '.join(DEFECTS)} (got {', '.join(defects)})"
        raise ValueError(msg)
    out = Path(root)
    if out.exists() and not out.is_dir():
        msg = f"{out} exists and is not a directory; choose another --out"
        raise FileExistsError(msg)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            msg = f"{out} is not empty; choose another --out, or pass --overwrite to replace the dataset in it"
            raise FileExistsError(msg)
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(out / sub, ignore_errors=True)

    folders = [out / "train" / "good", out / "test" / "good"]
    folders += [out / "test" / d for d in defects] + [out / "ground_truth" / d for d in defects]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(max(n_train, n_test_good, n_test_defect, 1) - 1)))

    for split, n in (("train", n_train), ("test", n_test_good)):
        for i in range(n):
            img = make_normal_image(_image_rng(seed, split, 0, i), texture, image_size, channels)
            _save(img, out / split / "good" / f"{i:0{digits}d}.png")
    for d in defects:
        group = 1 + DEFECTS.index(d)  # the stream depends on the defect's name, not its position in `defects`
        for i in range(n_test_defect):
            img, mask = make_defect_image(_image_rng(seed, "test", group, i), texture, image_size, channels, d)
            stem = f"{i:0{digits}d}"
            _save(img, out / "test" / d / f"{stem}.png")
            _save(mask.astype(np.uint8) * 255, out / "ground_truth" / d / f"{stem}_mask.png")

    info = {
        "generator": "anoscope generate (training/synthetic.py)",
        "texture": texture,
        "image_size": image_size,
        "channels": channels,
        "seed": seed,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_test_defect,
        "defects": list(defects),
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------- command
def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a synthetic textured-surface dataset in the MVTec AD layout: normal images in train/good and "
        "test/good, defective ones in test/<defect>, masks in ground_truth/<defect>/<name>_mask.png "
        "(255 = defect). Deterministic from --seed."
    )
    parser.epilog = "example: anoscope generate --out data/fabric --texture fabric --n-train 200 --image-size 128"
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    parser.add_argument(
        "--texture",
        default="fabric",
        choices=TEXTURE_CHOICES,
        help="surface; 'random' picks one per image; 'part' is a bolt at any angle on a plain belt (for --align)",
    )
    parser.add_argument("--n-train", type=int, default=60, help="normal training images (train/good)")
    parser.add_argument("--n-test-good", type=int, default=10, help="normal test images (test/good)")
    parser.add_argument("--n-test-defect", type=int, default=10, help="test images per defect type")
    parser.add_argument(
        "--defects",
        default=",".join(DEFECTS),
        help=f"comma-separated defect types, from: {', '.join(DEFECTS)}",
    )
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images, in pixels")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 = grayscale, 3 = RGB")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same images")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")


def main(args: argparse.Namespace) -> int:
    defects = tuple(d.strip() for d in args.defects.split(",") if d.strip())
    n_defect_total = args.n_test_defect * len(defects)
    total = args.n_train + args.n_test_good + n_defect_total
    plan = (
        f"{total} {args.image_size}x{args.image_size} {'RGB' if args.channels == 3 else 'grayscale'} "
        f"'{args.texture}' images ({args.n_train} train, {args.n_test_good} test good, "
        f"{n_defect_total} defective: {args.n_test_defect} each of {', '.join(defects)}) with seed {args.seed}"
    )
    if args.dry_run:
        print(f"would write {plan} to {args.out}")
        return 0
    try:
        out = generate_dataset(
            args.out,
            texture=args.texture,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            image_size=args.image_size,
            channels=args.channels,
            seed=args.seed,
            defects=defects,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"anoscope generate: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {plan} to {out}")
    return 0


__all__ = [
    "DEFECTS",
    "MIN_DELTA",
    "TEXTURES",
    "TEXTURE_CHOICES",
    "add_defect",
    "build_parser",
    "generate_dataset",
    "main",
    "make_defect_image",
    "make_normal_image",
]
