"""What a run writes besides checkpoints: the loss log (CSV) and a PNG grid per epoch."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service.bundle import atomic_write_bytes
from service.postprocess import colorize, encode_png


class LossLog:
    """`losses.csv`: one row per epoch; a resumed run drops rows past the checkpoint it resumes from."""

    def __init__(self, path: Path, columns: Sequence[str], *, resume_epoch: int | None = None) -> None:
        self.path, self.columns = path, list(columns)
        if resume_epoch is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= resume_epoch]
        else:
            rows = []
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)

    def append(self, row: Mapping[str, object]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: _fmt(v) for k, v in row.items()}
            )


def read_losses(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def to_uint8_rgb(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, C, S, S) normalised -> (N, S, S, 3) uint8."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    pixels = np.clip(images * s + m, 0.0, 1.0)  # (N, C, S, S) in [0, 1]
    pixels = np.repeat(pixels, 3, axis=1) if pixels.shape[1] == 1 else pixels
    return (pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def sample_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    residual_max: float | None = None,
) -> np.ndarray:
    """One labelled row per entry: images (N, C, S, S) or maps (N, 1, S, S) named 'residual...'.

    Maps are shown with the jet colour map, scaled by `residual_max` (default: their max).
    """
    label_w, pad = 96, 2
    tiles: list[tuple[str, np.ndarray]] = []
    for name, arr in rows:
        if name.startswith("residual"):
            top = residual_max if residual_max else float(arr.max()) or 1.0
            tiles.append((name, colorize(np.clip(arr[:, 0] / top, 0, 1))))  # (N, S, S, 3)
        else:
            tiles.append((name, to_uint8_rgb(arr, mean, std)))
    n = max(t.shape[0] for _, t in tiles)
    size = tiles[0][1].shape[1]
    canvas = Image.new("RGB", (label_w + n * (size + pad), len(tiles) * (size + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, t) in enumerate(tiles):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), name, fill=(0, 0, 0))
        for i in range(t.shape[0]):
            canvas.paste(Image.fromarray(t[i]), (label_w + i * (size + pad), y))
    return np.asarray(canvas)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_png(rgb, compress_level=6))
