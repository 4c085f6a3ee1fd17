"""Exposure (`service.exposure`, `service.images.standardise_exposure`): good images taken at different
brightness and contrast are brought to one level, chosen from the training normals, the same way in
training and in the service."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.config import ModelConfig
from service.exposure import MAX_SPREAD, measure, survey
from service.images import standardise_exposure
from service.tiles import preprocess_tiles
from tests.small_run import served_like_trained, small_run

NORM = {"mean": [0.5] * 3, "std": [0.5] * 3}


def texture(seed: int = 0, size: int = 96) -> np.ndarray:
    """A grey 0-1 texture with mean 0.5 and std about 0.1 (H, W)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.0, (size // 8, size // 8))
    smooth = np.kron(noise, np.ones((8, 8))) + 0.5 * rng.normal(0.0, 1.0, (size, size))
    return (0.5 + 0.1 * (smooth - smooth.mean()) / smooth.std()).astype(np.float32)


def exposed(arr: np.ndarray, gain: float, offset: float) -> Image.Image:
    """The texture as a camera at another exposure would give it: an 8-bit RGB image."""
    grey = np.clip((arr - 0.5) * gain + offset, 0, 1)
    return Image.fromarray((grey * 255).round().astype(np.uint8)).convert("RGB")


def test_standardised_pixels_have_the_target_mean_and_std() -> None:
    arr = texture()[None] * 0.6 + 0.1
    out = standardise_exposure(arr, (0.4, 0.12))
    assert out.dtype == np.float32
    assert out.mean() == pytest.approx(0.4, abs=1e-4)
    assert out.std() == pytest.approx(0.12, abs=1e-4)
    assert np.corrcoef(out.ravel(), arr.ravel())[0, 1] == pytest.approx(1.0, abs=1e-4), "structure is kept"


def test_one_gain_for_all_channels_keeps_the_colour_balance() -> None:
    base = texture()
    rgb = np.stack([base, base * 0.8, base * 0.5 + 0.2])
    out = standardise_exposure(rgb, (0.5, 0.1))
    gain = (out[0] - out[1]).std() / (rgb[0] - rgb[1]).std()
    assert (out[0] - out[2]).std() / (rgb[0] - rgb[2]).std() == pytest.approx(gain, rel=1e-4)


def test_exposure_measured_on_a_part_gives_that_part_the_target() -> None:
    arr = texture()[None] * 0.4 + 0.2
    arr[:, :8] = 0.0  # a dark strip that would pull the mean of the whole image down
    rest = arr[:, 8:]
    out = standardise_exposure(arr, (0.5, 0.1), measured_on=rest)
    assert out[:, 8:].mean() == pytest.approx(0.5, abs=1e-3)
    assert out[:, 8:].std() == pytest.approx(0.1, abs=1e-3)
    whole = standardise_exposure(arr, (0.5, 0.1))
    assert abs(whole[:, 8:].mean() - 0.5) > 0.02, "measured on everything, the strip moves the rest"


def test_a_blank_frame_is_not_stretched_into_noise() -> None:
    flat = np.full((3, 32, 32), 0.8, dtype=np.float32)
    flat[0, 0, 0] = 0.801
    out = standardise_exposure(flat, (0.4, 0.1))
    assert out.mean() == pytest.approx(0.4, abs=1e-3)
    assert out.max() - out.min() < 0.05, "the gain is capped (uncapped, the one odd pixel would span 0-1)"
    assert np.all(out >= 0) and np.all(out <= 1)


def test_the_same_scene_at_two_exposures_becomes_the_same_input() -> None:
    arr = texture(1)
    dark, bright = exposed(arr, 0.5, 0.25), exposed(arr, 1.6, 0.6)
    kw: dict[str, Any] = {"image_size": 64, "channels": 3, **NORM}
    a, _ = preprocess_tiles(dark, **kw, exposure=(0.45, 0.1))
    b, _ = preprocess_tiles(bright, **kw, exposure=(0.45, 0.1))
    assert np.abs(a - b).mean() < 0.02, "standardised, only rounding and clipping differ"
    raw_a, _ = preprocess_tiles(dark, **kw)
    raw_b, _ = preprocess_tiles(bright, **kw)
    assert np.abs(raw_a - raw_b).mean() > 0.3, "as they come, the two inputs differ"


def test_an_images_tiles_share_one_gain() -> None:
    strip = exposed(np.concatenate([texture(2), texture(3) * 0.3 + 0.35], axis=1), 1.0, 0.5)  # 96 x 192
    kw: dict[str, Any] = {"image_size": 32, "channels": 3, **NORM, "resize": "tiles"}
    tiles, grid = preprocess_tiles(strip, **kw, exposure=(0.5, 0.1))
    assert grid.columns == 2
    whole, _ = preprocess_tiles(strip.resize((64, 32), Image.Resampling.BILINEAR), **kw, exposure=(0.5, 0.1))
    np.testing.assert_allclose(tiles, whole, atol=1e-6)
    left_half_std = (tiles[0] * 0.5 + 0.5).std()
    right_half_std = (tiles[2] * 0.5 + 0.5).std()
    assert left_half_std > 2 * right_half_std, "the flat half is not stretched to the busy half's contrast"


def test_the_survey_standardises_only_normals_whose_exposure_varies() -> None:
    arr = texture(4)
    steady = [exposed(arr, 1.0, 0.5 + 0.01 * i) for i in range(8)]
    varied = [exposed(arr, g, o) for g, o in [(0.5, 0.25), (1.0, 0.5), (1.5, 0.7), (0.8, 0.4), (1.2, 0.6)]]
    calm, lively = survey(steady, 3), survey(varied, 3)
    assert calm.choice == "none" and calm.brightness_spread < MAX_SPREAD
    assert lively.choice == "standardise" and lively.brightness_spread > MAX_SPREAD
    means, stds = zip(*(measure(img, 3) for img in varied), strict=True)
    assert lively.target == (round(float(np.median(means)), 3), round(float(np.median(stds)), 3))
    assert "brightness varies" in lively.describe() and "standardises above 15%" in lively.describe()
    contrast_only = [exposed(arr, g, 0.5) for g in (0.4, 0.8, 1.2, 1.6)]
    assert survey(contrast_only, 3).choice == "standardise", "contrast alone varying counts too"


def test_the_exposure_settings_are_validated_and_travel_as_json() -> None:
    with pytest.raises(ValueError, match="exposure must be one of none, standardise, auto"):
        ModelConfig(exposure="bright")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"exposure_target must be a mean in \(0, 1\) and a std in \(0, 0.5\]"):
        ModelConfig(exposure="standardise", exposure_target=(0.5, 0.0))
    config = ModelConfig(exposure="standardise", exposure_target=(0.42, 0.12))
    assert config.exposure_standard == (0.42, 0.12)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["exposure_target"] == [0.42, 0.12]
    assert ModelConfig(exposure_target=(0.42, 0.12)).exposure_standard is None, "only 'standardise' applies it"


def vary_exposure(folder: Path) -> None:
    """Re-expose the images of `folder` in place, each at its own brightness and contrast (0.4-1.6x)."""
    for i, path in enumerate(sorted(folder.glob("*.png"))):
        arr = np.asarray(Image.open(path), dtype=np.float32) / 255.0
        gain, level = 0.4 + 0.3 * (i % 5), 0.3 + 0.1 * (i % 4)
        out = np.clip((arr - arr.mean()) * gain + level, 0, 1)
        Image.fromarray((out * 255).round().astype(np.uint8)).save(path)


def test_exposure_auto_is_chosen_from_the_normals_and_the_service_standardises_alike(
    tmp_path: Path, make_client: Any
) -> None:
    """Fabric photographed at varying exposure is standardised to its normals' level: training, export,
    the bundle and the service prepare an image alike; a resume keeps the level; steady fabric is not."""
    from training.checkpoint import load_trained
    from training.synthetic import generate_dataset
    from training.train import survey_images, train

    lines: list[str] = []

    config = partial(small_run, exposure="auto")

    fabric = generate_dataset(
        tmp_path / "fabric", texture="fabric", n_train=12, n_test_good=1, n_test_defect=1, image_size=64, seed=0
    )
    steady = tmp_path / "steady"
    train(config(fabric, steady), log=lines.append)
    assert load_trained(steady).model_config.exposure == "none"
    assert any("exposure: auto -> none (" in line for line in lines)

    vary_exposure(fabric / "train" / "good")
    run = tmp_path / "run"
    lines.clear()
    train(config(fabric, run), log=lines.append)
    trained = load_trained(run)
    level = survey(survey_images(fabric, val_fraction=0.25, seed=0), 3).target
    assert (trained.model_config.exposure, trained.model_config.exposure_target) == ("standardise", level)
    assert any(f"exposure: auto -> standardise to mean {level[0]:g}, std {level[1]:g} (" in line for line in lines)

    lines.clear()
    train(config(fabric, run, epochs=2), resume=True, log=lines.append)
    assert any(line.endswith("(as the run was started)") and "exposure: auto -> standardise" in line for line in lines)

    engine, _, served, _ = served_like_trained(run, tmp_path / "models" / "fabric", fabric)
    assert engine.metadata.exposure == level
    pixels = served * 0.5 + 0.5  # back to 0-1
    assert pixels.mean() == pytest.approx(level[0], abs=0.01), "the service brings the image to the level"
    (listed,) = make_client(model_dir=tmp_path / "models").get("/v1/models").json()["models"]
    assert listed["exposure"] == list(level), "operators can see the level"
