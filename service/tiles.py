"""Aspect-preserving tiles: how an image that is not square becomes square model inputs, and back.

A detector's input is a fixed square. The default pre-processing ("squash") resizes every image to it,
which distorts an elongated part: a 2.5:1 tile loses 2.5x more resolution along its long side than
along its short one, and the same texture appears at a different scale in every image. With
`resize="tiles"` the image is resized so that it splits into a row or column of square tiles with
little distortion, each tile is scored as one model input, and the outputs are put back together:

* the grid: the image is resized to `n = round(long side / short side)` squares along its long side
  (at most `MAX_TILES`), so an image up to 1.5:1 stays one tile (a 4:3 camera frame costs what it
  did) and the remaining stretch or squash is at most 1.5x (1.33x once the image reaches 1.5:1);
* the tiles: those n squares and the n - 1 squares centred on the seams between them (a stride of half
  a tile), so every point of the image is near the centre of some tile: 2n - 1 model inputs;
* image scores: the maximum over the image's tiles, for the residual and the discrimination score
  each (a defect anywhere makes the image anomalous); the combined score is taken from those two, so the
  three numbers the API reports stay consistent;
* the anomaly map: the tiles' maps blended with a triangular weight (1 at a tile's centre, near 0 at
  its edges). A detector sees less context near its input's edges, so its map there is less to be
  trusted; with the half-tile stride the weights of overlapping tiles sum to one and every seam falls
  on the centre of another tile (docs/quality.md measures what the overlap changed).

A square image is one tile under either mode, pixel for pixel the same input.

With `align="principal-axis"` the image is first posed (`service.align`) and then cut as above; the
grid keeps the pose, so the merged map can be turned back into the input's pixels (`Merged.map_at`).

Training, export, evaluation, calibration and the service all call these functions, so the tiles a
network learns from are cut the way the line's images are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from service.align import FULL_BOX, IDENTITY, Align, Pose, pose_for
from service.bundle import Resize
from service.images import normalise_array, to_mode
from service.postprocess import resize_map

#: The most tiles one image becomes (its cost in inference); longer images are squashed into this many.
MAX_TILES = 8


@dataclass(frozen=True)
class Grid:
    """How an image was cut: posed by `pose` (the identity unless aligned), resized to `columns` x `rows`
    squares (one of them is 1), then cut into `count` tiles at a stride of half a square along the long side."""

    columns: int = 1
    rows: int = 1
    pose: Pose = IDENTITY

    @property
    def squares(self) -> int:
        return self.columns * self.rows

    @property
    def count(self) -> int:
        """Model inputs: the squares and one tile on each seam between them."""
        return 2 * self.squares - 1

    def offsets(self, size: int) -> list[int]:
        """Start of each tile along the long side, in pixels of the resized image (tile side `size`)."""
        return [i * size // 2 for i in range(self.count)]


def _weights(size: int) -> np.ndarray:
    """Triangular blending weight along a tile (size,): 1 at the centre, small but positive at the edges."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return 1.0 - np.abs(2.0 * t - 1.0)


def tile_grid(width: int, height: int, resize: Resize = "tiles") -> Grid:
    """The grid an image of `width` x `height` is cut into: 1x1 for squash, else along the long side."""
    if resize == "squash" or width <= 0 or height <= 0:
        return Grid()
    long_side, short_side = max(width, height), min(width, height)
    # floor(x + 0.5), not round(): Python rounds 2.5 to 2.
    n = min(MAX_TILES, max(1, math.floor(long_side / short_side + 0.5)))
    return Grid(columns=n) if width >= height else Grid(rows=n)


def preprocess_tiles(
    img: Image.Image,
    *,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: Resize = "squash",
    align: Align = "none",
    crop_box: tuple[float, float] = FULL_BOX,
    exposure: tuple[float, float] | None = None,
) -> tuple[np.ndarray, Grid]:
    """Decoded image -> normalised float32 tiles (n, C, S, S) and the grid they came from.

    `exposure`, where given, is the (mean, std) the image's pixels are standardised to after the
    resize, over the whole image before it is cut, so an image's tiles share one gain.
    With one tile, no alignment and no `exposure` this is exactly `service.images.preprocess` (the same
    resize, the same numbers).
    """
    img = to_mode(img, channels)
    pose = pose_for(img, align, crop_box)
    grid = replace(tile_grid(img.width, img.height, resize), pose=pose)
    target = (grid.columns * image_size, grid.rows * image_size)
    img = pose.render(img, target)  # the squash or tile resize; aligned first when the pose says so
    arr = normalise_array(img, mean, std, exposure)  # (C, rows*S, columns*S)
    if grid.squares == 1:
        return arr[None], grid
    s = image_size
    if grid.columns > 1:
        tiles = [arr[:, :, o : o + s] for o in grid.offsets(s)]
    else:
        tiles = [arr[:, o : o + s, :] for o in grid.offsets(s)]
    return np.stack(tiles), grid


def stitch(maps: np.ndarray, grid: Grid) -> np.ndarray:
    """Tiles' maps (n, S, S) -> one map (rows*S, columns*S): the overlapping tiles blended by
    triangular weights (module docstring), normalised by the weights' sum."""
    n, s, _ = maps.shape
    if n != grid.count:
        msg = f"{n} tile maps for a grid of {grid.columns}x{grid.rows}"
        raise ValueError(msg)
    if n == 1:
        return maps[0]
    if grid.rows > 1:  # blend along the first axis by transposing to columns and back
        return stitch(maps.transpose(0, 2, 1), Grid(columns=grid.rows)).T
    # The weight is floored so the image's outer edges, covered by one tile at weight ~0, keep its value.
    w = np.maximum(_weights(s), 1e-3)
    total = np.zeros((s, grid.columns * s), dtype=np.float32)
    weight = np.zeros(grid.columns * s, dtype=np.float32)
    for m, o in zip(maps, grid.offsets(s), strict=True):
        total[:, o : o + s] += m * w
        weight[o : o + s] += w
    return total / weight


@dataclass(frozen=True)
class Merged:
    """One image's outputs put back together from its tiles (the map at model resolution per tile)."""

    residual_score: float
    discrimination_score: float
    anomaly_map: np.ndarray  # (rows*S, columns*S) float32, in the aligned frame when the image was aligned
    pose: Pose = IDENTITY

    def map_at(self, size: tuple[int, int]) -> np.ndarray:
        """The anomaly map at the input's `size` (width, height), in the input's own pixels."""
        return map_to_input(self.anomaly_map, self.pose, size)


def map_to_input(amap: np.ndarray, pose: Pose, size: tuple[int, int]) -> np.ndarray:
    """A merged map (model resolution, in the posed frame) -> the map over the input image at `size`."""
    return resize_map(amap, size) if pose.identity else pose.to_input(amap, size)


def merge(residual: np.ndarray, discrimination: np.ndarray, maps: np.ndarray, grids: Sequence[Grid]) -> list[Merged]:
    """Per-tile outputs of a batch, in the order of `grids`, -> per-image outputs (max scores, stitched map)."""
    total = sum(g.count for g in grids)
    if len(residual) != total or len(discrimination) != total or len(maps) != total:
        msg = f"{len(residual)} outputs for {total} tiles of {len(grids)} images"
        raise ValueError(msg)
    counts = [g.count for g in grids]
    r, d = image_maxima(residual, counts), image_maxima(discrimination, counts)
    out, start = [], 0
    for i, g in enumerate(grids):
        out.append(Merged(float(r[i]), float(d[i]), stitch(np.asarray(maps[start : start + g.count]), g), g.pose))
        start += g.count
    return out


def image_maxima(values: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-tile values -> each image's maximum, the images given by their tile counts in order."""
    if not counts:
        return np.zeros(0, dtype=np.asarray(values).dtype)
    return np.maximum.reduceat(np.asarray(values), np.cumsum([0, *counts[:-1]]))
