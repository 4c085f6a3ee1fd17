"""Aspect-preserving tiles (`service.tiles`): the grid, the cut, the way back, and every caller agreeing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.engine import OnnxEngine, predict_images, preprocess_for
from service.images import preprocess
from service.tiles import MAX_TILES, Grid, image_maxima, merge, preprocess_tiles, stitch, tile_grid
from tests.toy_bundle import make_toy_bundle

NORM = {"mean": [0.5] * 3, "std": [0.5] * 3}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 90, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((100, 100), Grid()),
        ((133, 100), Grid()),  # a 4:3 camera frame stays one tile: it costs what it did
        ((149, 100), Grid()),
        ((150, 100), Grid(columns=2)),  # 1.5:1 rounds up (Python's round() would give 2 here too, not at 2.5)
        ((250, 100), Grid(columns=3)),  # 2.5 -> 3, where round() would give 2
        ((100, 260), Grid(rows=3)),
        ((100, 10_000), Grid(rows=MAX_TILES)),  # a line-scan strip is capped
    ],
)
def test_grid_follows_the_aspect_ratio(size: tuple[int, int], grid: Grid) -> None:
    assert tile_grid(*size) == grid
    assert tile_grid(*size, resize="squash") == Grid(), "squash never cuts"


@pytest.mark.parametrize("size", [(64, 64), (80, 60), (300, 100)])
def test_one_tile_is_exactly_the_squashed_input(size: tuple[int, int]) -> None:
    img = noise(*size)
    squashed = preprocess(img, image_size=32, channels=3, **NORM)
    tiles, grid = preprocess_tiles(img, image_size=32, channels=3, **NORM, resize="squash")
    assert grid == Grid() and tiles.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(tiles[0], squashed)
    if size[0] / size[1] < 1.5:  # too close to square to cut: identical under "tiles" too
        np.testing.assert_array_equal(
            preprocess_tiles(img, image_size=32, channels=3, **NORM, resize="tiles")[0][0], squashed
        )


@pytest.mark.parametrize("size", [(96, 32), (32, 96)])
def test_tiles_are_cut_in_order_and_stitch_back(size: tuple[int, int]) -> None:
    arr = np.full((size[1], size[0], 3), 60, dtype=np.uint8)
    arr[-8:, -8:] = 250  # a bright corner in the last third
    img = Image.fromarray(arr)
    tiles, grid = preprocess_tiles(img, image_size=32, channels=3, **NORM, resize="tiles")
    # Three squares and a tile on each of the two seams, at a stride of half a tile.
    assert grid.squares == 3 and grid.count == 5 and tiles.shape == (5, 3, 32, 32)
    assert grid.offsets(32) == [0, 16, 32, 48, 64]
    bright = [bool(t.max() > tiles[0].min() + 1) for t in tiles]
    assert bright == [False, False, False, False, True], "the bright corner is only in the last tile"
    # No distortion at an exact 3:1: each tile is a window of the image, unscaled, and the blend of
    # overlapping windows gives the image back.
    whole = np.asarray(img, dtype=np.float32)[..., 0] / 255 * 2 - 1
    np.testing.assert_allclose(stitch(tiles[:, 0], grid), whole, atol=1e-6)


def test_stitched_maps_have_no_seam() -> None:
    """A map that is weaker near its tile's edges (as detectors' maps are) stitches without dips at the
    seams between squares: another tile is centred there."""
    s, grid = 32, Grid(columns=3)
    edge_weak = np.broadcast_to(1.0 - np.abs(np.linspace(-1, 1, s, dtype=np.float32)) / 2, (s, s))  # 0.5 .. 1
    stitched = stitch(np.stack([edge_weak] * grid.count), grid)[0]
    inner = stitched[s // 4 : -s // 4]  # away from the image's own two outer edges
    assert inner.min() > 0.7, f"a dip to {inner.min():.2f} inside the image"
    side_by_side = np.concatenate([edge_weak[0]] * 3)[s // 4 : -s // 4]
    assert side_by_side.min() < 0.55, "without the seam tiles the same maps dip at each seam"


def test_merge_takes_each_images_maximum_and_stitched_map() -> None:
    grids = [Grid(columns=2), Grid(), Grid(rows=2)]  # 3, 1 and 3 tiles
    residual = np.array([1.0, 5.0, 0.0, 2.0, 0.0, 7.0, 3.0], dtype=np.float32)
    discrimination = np.array([9.0, 1.0, 0.0, 4.0, 6.0, 0.0, 2.0], dtype=np.float32)
    maps = np.stack([np.full((4, 4), i, dtype=np.float32) for i in range(7)])
    merged = merge(residual, discrimination, maps, grids)
    assert [(m.residual_score, m.discrimination_score) for m in merged] == [(5, 9), (2, 4), (7, 6)]
    assert merged[0].anomaly_map.shape == (4, 8) and merged[2].anomaly_map.shape == (8, 4)
    first, last = merged[2].anomaly_map[0, 0], merged[2].anomaly_map[-1, 0]
    assert first == pytest.approx(4) and last == pytest.approx(6), "the outer ends come from the outer tiles"
    seam = merged[0].anomaly_map[0, 3:5]  # the two columns either side of the squares' seam
    assert np.abs(seam - 1).max() <= 0.25, "the seam comes mostly from the tile centred on it"
    assert image_maxima(residual, [3, 1, 3]).tolist() == [5, 2, 7], "the same maxima for a bench's tile counts"
    with pytest.raises(ValueError, match="7 outputs for 8 tiles"):
        merge(residual, discrimination, maps, [*grids, Grid()])


@pytest.fixture(scope="module")
def tiled_engine(tmp_path_factory: pytest.TempPathFactory) -> OnnxEngine:
    return OnnxEngine(make_toy_bundle(tmp_path_factory.mktemp("tiles") / "toy", resize="tiles"), providers=("cpu",))


def test_predict_images_scores_an_elongated_image_per_tile(tiled_engine: OnnxEngine, images: Any) -> None:
    """The toy model flags bright pixels; squashed, a small defect in a 4:1 strip is averaged away."""
    arr = images.array(256, 64, defect=False)
    arr[20:28, 200:206] = 250  # 6 px wide: under 2 px once squashed to 32
    strip = Image.fromarray(arr)
    (tiled,) = predict_images(tiled_engine, [strip])
    assert tiled.anomaly_map.shape == (64, 256)
    peak = np.unravel_index(np.argmax(tiled.anomaly_map), tiled.anomaly_map.shape)
    assert 16 <= peak[0] <= 32 and 192 <= peak[1] <= 212, "the map's peak is where the defect is"
    tiles, grid = preprocess_for(tiled_engine.metadata, strip)
    assert grid == Grid(columns=4) and len(tiles) == 7
    raw = tiled_engine.run(tiles)
    assert tiled.residual_score == pytest.approx(float(raw.residual_score.max()))
    assert tiled.discrimination_score == pytest.approx(float(raw.discrimination_score.max()))
    squashed = tiled_engine.run(preprocess(strip, image_size=32, channels=3, **NORM)[None])
    assert tiled.residual_score > float(squashed.residual_score[0]) + 0.1, "tiles keep the defect's contrast"


def test_batches_of_mixed_grids_match_one_by_one(tiled_engine: OnnxEngine, images: Any) -> None:
    pictures = [Image.fromarray(images.array(w, h, seed=i)) for i, (w, h) in enumerate([(96, 32), (40, 40), (30, 90)])]
    together = predict_images(tiled_engine, pictures, batch_size=2)  # batches split inside an image's tiles
    for picture, out in zip(pictures, together, strict=True):
        (alone,) = predict_images(tiled_engine, [picture])
        assert out.residual_score == pytest.approx(alone.residual_score)
        assert out.discrimination_score == pytest.approx(alone.discrimination_score)
        np.testing.assert_allclose(out.anomaly_map, alone.anomaly_map, atol=1e-6)


def test_the_service_answers_for_tiles_and_batches_rows(
    tmp_path: Path, make_client: Any, fake_engines: Any, images: Any
) -> None:
    models = tmp_path / "models"
    make_toy_bundle(models / "toy", resize="tiles")
    engines = fake_engines()
    client = make_client(model_dir=models, engine_factory=engines)
    files = [
        ("files", ("wide.png", images.make(192, 64), "image/png")),
        ("files", ("square.png", images.make(64, 64), "image/png")),
    ]
    response = client.post("/v1/models/toy/predict", files=files)
    assert response.status_code == 200, response.text
    wide, square = response.json()["results"]
    x, y, w, h = images.box(192, 64)
    (region,) = [r for r in wide["regions"] if r["area"] > 20]
    box = (region["x"], region["y"], region["width"], region["height"])
    assert np.abs(np.subtract(box, (x, y, w, h))).max() <= 6, "region boxes are in the wide image's pixels"
    assert square["residual_score"] > 0
    assert engines.last.batches[-1] == 6, "two images, six rows: five tiles (three squares, two seams) and one"
    (listed,) = client.get("/v1/models").json()["models"]
    assert listed["resize"] == "tiles", "operators can see that the model cuts tiles"


def test_training_datasets_hold_one_item_per_tile(tmp_path: Path) -> None:
    from models.config import ModelConfig
    from training.data import ImageDataset

    paths = []
    for i, size in enumerate([(96, 32), (32, 32), (40, 30)]):
        paths.append(tmp_path / f"{i}.png")
        noise(*size, seed=i).save(paths[-1])
    config = ModelConfig(image_size=64, resize="tiles")
    data = ImageDataset.for_model(paths, config)
    assert data.paths == paths and data.tiles_per_image == [5, 1, 1] and len(data) == 7
    assert data.images.shape == (7, 3, 64, 64)
    expected = preprocess_tiles(Image.open(paths[0]), image_size=64, channels=3, **NORM, resize="tiles")[0]
    np.testing.assert_array_equal(data.images[:5].numpy(), expected)
    assert len(ImageDataset.for_model(paths, ModelConfig(image_size=64))) == 3, "squash: one item per image"


def test_an_unknown_resize_mode_is_refused() -> None:
    from models.config import ModelConfig

    with pytest.raises(ValueError, match="resize must be one of squash, tiles"):
        ModelConfig(resize="crop")  # type: ignore[arg-type]
