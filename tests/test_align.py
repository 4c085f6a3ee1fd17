"""Part alignment (`service.align`): one pose for a part fed at any angle, and maps back in input pixels."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.align import FULL_BOX, IDENTITY, MAX_BOX_AREA, align_image, crop_box, estimate_pose, pose_for, survey
from service.engine import OnnxEngine, predict_images, preprocess_for
from service.images import preprocess
from service.postprocess import resize_map
from service.tiles import map_to_input
from tests.toy_bundle import make_toy_bundle

BACKGROUND, PART, DEFECT = 100, 30, 250


def part_image(
    angle: float, *, size: int = 160, centre: tuple[float, float] = (80, 80), defect: bool = False
) -> Image.Image:
    """A dark "screw" on a plain grey background: a long shank with a wide head at one end, turned by
    `angle` degrees about `centre`; with `defect`, a bright spot on the shank near the tip."""
    canvas = Image.new("L", (size * 2, size * 2), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    c = size  # drawn upright about the big canvas' centre, head at the bottom
    draw.rectangle((c - 6, c - 50, c + 6, c + 40), fill=PART)  # shank
    draw.rectangle((c - 18, c + 40, c + 18, c + 52), fill=PART)  # head: the heavier end
    if defect:
        draw.rectangle((c - 3, c - 40, c + 3, c - 34), fill=DEFECT)
    turned = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=BACKGROUND)
    left, top = round(c - centre[0]), round(c - centre[1])
    return turned.crop((left, top, left + size, top + size))


def bright_centre(arr: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the bright defect: the mean over pixels above halfway to the peak, weighted."""
    weight = np.clip(arr - (arr.max() + BACKGROUND) / 2, 0, None)
    ys, xs = np.indices(arr.shape)
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


def test_a_part_at_any_angle_and_place_becomes_one_pose() -> None:
    poses = [(0, (80, 80)), (37, (70, 90)), (143, (90, 75)), (260, (85, 85)), (-100, (75, 80))]
    aligned = [
        np.asarray(align_image(part_image(a, centre=c), "principal-axis")[0], dtype=np.float32) for a, c in poses
    ]
    raw = [np.asarray(part_image(a, centre=c), dtype=np.float32) for a, c in poses]
    reference = aligned[0]
    for a, r in zip(aligned[1:], raw[1:], strict=True):
        assert np.abs(a - reference).mean() < 0.25 * np.abs(r - raw[0]).mean(), "aligned parts overlap"
        assert np.abs(a - reference).mean() < 4.0


def test_the_heavier_end_points_down_and_the_part_is_centred() -> None:
    for angle in (0, 90, 180, 225):
        img, pose = align_image(part_image(angle, centre=(70, 95)), "principal-axis")
        mask = np.asarray(img) < (BACKGROUND + PART) / 2
        ys, xs = np.nonzero(mask)
        widths = [mask[y].sum() for y in range(mask.shape[0])]
        head_row = int(np.argmax(widths))
        assert head_row > img.height / 2, f"the head (widest rows) is at the bottom after turning {angle} deg"
        assert abs((xs.min() + xs.max()) / 2 - img.width / 2) < 3, "centred across the axis"
        assert abs((ys.min() + ys.max()) / 2 - img.height / 2) < 3, "centred along the axis"
        assert not pose.identity


@pytest.mark.parametrize("box", [FULL_BOX, (0.4, 0.9)])
def test_a_map_made_in_the_aligned_frame_comes_back_to_the_input_pixels(box: tuple[float, float]) -> None:
    img = part_image(123, centre=(75, 88), defect=True)
    x0, y0 = bright_centre(np.asarray(img, dtype=np.float32))
    pose = pose_for(img, "principal-axis", box)
    for model_side in (160, 64, 40):  # the frame at the input's size, and at model resolutions below it
        # The aligned image itself as the "map": its bright spot is the defect, wherever it was turned to.
        aligned = pose.render(img, (model_side, model_side))
        back = pose.to_input(np.asarray(aligned, dtype=np.float32), img.size)
        x1, y1 = bright_centre(back)
        assert abs(x1 - x0) <= 1 and abs(y1 - y0) <= 1, f"the defect comes back to its place at {model_side} px"
        assert back.shape == (img.height, img.width)
        assert np.isfinite(back).all(), "pixels the aligned frame did not cover get a number, not NaN"
        assert back.min() == np.asarray(aligned).min(), "uncovered pixels get the map's minimum"


def test_a_blank_frame_and_align_none_leave_the_image_as_it_is() -> None:
    blank = Image.new("L", (64, 48), 120)
    assert estimate_pose(blank) == IDENTITY
    out, pose = align_image(blank, "principal-axis")
    assert pose == IDENTITY and out is blank
    img = part_image(45)
    out, pose = align_image(img, "none")
    assert out is img and pose == IDENTITY
    amap = np.random.default_rng(0).random((24, 32), dtype=np.float32)
    np.testing.assert_array_equal(map_to_input(amap, IDENTITY, (64, 48)), resize_map(amap, (64, 48)))


def test_colour_images_are_aligned_like_their_grey_version() -> None:
    grey = part_image(70, centre=(85, 76))
    pose_grey = estimate_pose(grey)
    pose_rgb = estimate_pose(grey.convert("RGB"))
    assert pose_rgb.angle == pytest.approx(pose_grey.angle, abs=0.5)
    assert (pose_rgb.cx, pose_rgb.cy) == pytest.approx((pose_grey.cx, pose_grey.cy), abs=0.5)
    rgb_aligned, _ = align_image(grey.convert("RGB"), "principal-axis")
    assert rgb_aligned.mode == "RGB" and rgb_aligned.size == grey.size
    # 16-bit files reach the survey undecoded-to-8-bit; it reads them as the service does
    deep = (np.asarray(grey).astype("<u2") * 257).tobytes()
    sixteen = Image.frombytes("I;16", grey.size, deep)
    assert survey([sixteen]) == survey([grey])


def test_pre_processing_aligns_only_when_the_bundle_says_so(tmp_path: Path) -> None:
    img = part_image(200, centre=(70, 85)).convert("RGB")
    plain = OnnxEngine(make_toy_bundle(tmp_path / "plain", image_size=32), providers=("cpu",))
    aligned = OnnxEngine(
        make_toy_bundle(tmp_path / "aligned", image_size=32, align="principal-axis"), providers=("cpu",)
    )
    tiles, grid = preprocess_for(plain.metadata, img)
    np.testing.assert_array_equal(tiles[0], preprocess(img, image_size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3))
    assert grid.pose == IDENTITY
    tiles, grid = preprocess_for(aligned.metadata, img)
    assert not grid.pose.identity
    # One resampling straight to the model's size gives what turning at full size and then resizing gives.
    upright = preprocess(
        align_image(img, "principal-axis")[0], image_size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3
    )
    unturned = preprocess(img, image_size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    assert np.abs(tiles[0] - upright).mean() < 0.25 * np.abs(tiles[0] - unturned).mean()
    assert np.abs(tiles[0] - upright).mean() < 0.05


def test_predicted_maps_of_an_aligned_bundle_are_in_the_input_pixels(tmp_path: Path) -> None:
    """The toy model flags bright pixels: the map's peak must be on the defect where the input has it."""
    engine = OnnxEngine(make_toy_bundle(tmp_path / "b", image_size=64, align="principal-axis"), providers=("cpu",))
    img = part_image(300, centre=(82, 77), defect=True).convert("RGB")
    (out,) = predict_images(engine, [img])
    assert out.anomaly_map.shape == (img.height, img.width)
    y0, x0 = np.unravel_index(np.argmax(np.asarray(img.convert("L"))), (img.height, img.width))
    y1, x1 = np.unravel_index(np.argmax(out.anomaly_map), out.anomaly_map.shape)
    assert abs(int(y1) - int(y0)) <= 4 and abs(int(x1) - int(x0)) <= 4


def test_the_service_answers_aligned_bundles_with_regions_in_input_pixels(
    tmp_path: Path, make_client: Any, fake_engines: Any
) -> None:
    models = tmp_path / "models"
    make_toy_bundle(models / "toy", image_size=64, align="principal-axis")
    client = make_client(model_dir=models, engine_factory=fake_engines())
    img = part_image(140, centre=(78, 84), defect=True).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    response = client.post("/v1/models/toy/predict", files=[("files", ("part.png", buf.getvalue(), "image/png"))])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    ys, xs = np.nonzero(np.asarray(img.convert("L")) > 200)
    (region,) = [r for r in result["regions"] if r["area"] > 4]
    centre = (region["x"] + region["width"] / 2, region["y"] + region["height"] / 2)
    assert abs(centre[0] - xs.mean()) <= 4 and abs(centre[1] - ys.mean()) <= 4, "the region is on the defect"
    (listed,) = client.get("/v1/models").json()["models"]
    assert listed["align"] == "principal-axis", "operators can see that the model turns parts"


def test_training_images_are_aligned_like_the_served_ones(tmp_path: Path) -> None:
    from models.config import ModelConfig
    from training.data import ImageDataset

    path = tmp_path / "part.png"
    part_image(33, centre=(72, 90)).convert("RGB").save(path)
    config = ModelConfig(family="skipganomaly", image_size=64, align="principal-axis")
    dataset = ImageDataset.for_model([path], config)
    engine_meta = OnnxEngine(make_toy_bundle(tmp_path / "b", image_size=64, align="principal-axis"), providers=("cpu",))
    served, _ = preprocess_for(engine_meta.metadata, Image.open(path))
    np.testing.assert_array_equal(dataset.images.numpy(), served)


def test_both_families_recommend_auto_and_the_plain_defaults_do_not_align() -> None:
    from training.config import TrainConfig, recommended

    assert recommended("skipganomaly").model.align == "auto"
    assert recommended("anogan").model.align == "auto"
    assert TrainConfig().model.align == "none", "checkpoints written before --align rebuild unaligned"


def test_an_unknown_align_mode_is_refused() -> None:
    from models.config import ModelConfig

    with pytest.raises(ValueError, match="align must be one of none, principal-axis"):
        ModelConfig(family="skipganomaly", align="pca")


def test_align_auto_is_chosen_from_the_training_normals_and_recorded(tmp_path: Path) -> None:
    """Parts at any angle on a plain background are aligned; a texture is not; a resume keeps the choice."""
    from training.checkpoint import load_trained
    from training.synthetic import generate_dataset
    from training.train import train

    lines: list[str] = []

    from tests.small_run import small_run

    config = partial(small_run, align="auto")

    parts = generate_dataset(
        tmp_path / "bolts", texture="part", n_train=12, n_test_good=1, n_test_defect=1, image_size=64, seed=0
    )
    train(config(parts, tmp_path / "run-parts"), log=lines.append)
    assert load_trained(tmp_path / "run-parts").model_config.align == "principal-axis"
    assert any(line.startswith("align: auto -> principal-axis (") and "longer than wide" in line for line in lines)
    recorded = (tmp_path / "run-parts" / "config.json").read_text()
    assert '"align": "principal-axis"' in recorded, "the run directory records what was used, not 'auto'"

    lines.clear()
    train(config(parts, tmp_path / "run-parts", epochs=2), resume=True, log=lines.append)
    assert "align: auto -> principal-axis (as the run was started)" in lines
    assert load_trained(tmp_path / "run-parts").model_config.align == "principal-axis"

    texture = generate_dataset(
        tmp_path / "fabric", texture="fabric", n_train=12, n_test_good=1, n_test_defect=1, image_size=64, seed=0
    )
    lines.clear()
    train(config(texture, tmp_path / "run-texture"), log=lines.append)
    assert load_trained(tmp_path / "run-texture").model_config.align == "none"
    assert any(line.startswith("align: auto -> none (") for line in lines)


def test_a_config_that_still_says_auto_cannot_be_used_to_pose_images() -> None:
    with pytest.raises(ValueError, match="resolves 'auto'"):
        align_image(part_image(10), "auto")  # type: ignore[arg-type]


def test_the_synthetic_part_dataset_is_what_auto_aligns_and_surfaces_are_not() -> None:
    from training.synthetic import TEXTURES, make_normal_image

    def images(texture: str) -> list[Image.Image]:
        return [Image.fromarray(make_normal_image(np.random.default_rng(i), texture, 96, 3)) for i in range(12)]

    assert survey(images("part")).choice == "principal-axis"
    assert survey(images("part")).roi_choice == "part"
    for texture in TEXTURES:
        assert survey(images(texture)).choice == "none", texture
        assert survey(images(texture)).roi_choice == "none", texture


def test_a_round_part_clear_of_the_frame_gets_a_region_but_is_not_turned() -> None:
    def disc(i: int) -> Image.Image:
        img = Image.new("L", (96, 96), BACKGROUND)
        ImageDraw.Draw(img).ellipse((20 + i % 3, 22, 74 + i % 3, 76), fill=PART)
        return img

    found = survey([disc(i) for i in range(8)])
    assert (found.choice, found.roi_choice) == ("none", "part"), "a bottle seen from above: no axis, but a region"


# ------------------------------------------------------------------------------ the crop to the part
def _part_columns(img: Image.Image) -> np.ndarray:
    return np.nonzero((np.asarray(img.convert("L")) < (BACKGROUND + PART) / 2).any(axis=0))[0]


def test_the_crop_box_holds_every_part_with_a_margin_and_the_part_fills_the_input() -> None:
    images = [part_image(a, centre=c) for a, c in [(0, (80, 80)), (37, (70, 90)), (143, (90, 75)), (260, (85, 85))]]
    box = crop_box(images)
    # the head is 37 px wide and the part 103 px long in a 160-px frame: across 18.5 / 80 + margin
    assert box[0] == pytest.approx(18.5 / 80 + 1 / 16, abs=0.03) and box[1] == pytest.approx(52 / 80 + 1 / 16, abs=0.03)
    assert box[0] * box[1] < MAX_BOX_AREA
    for img in images:
        uncropped, _ = align_image(img, "principal-axis")
        cropped, _ = align_image(img, "principal-axis", box)
        columns = _part_columns(cropped)
        assert columns.min() > 0 and columns.max() < cropped.width - 1, "the part stays in view, with room"
        assert len(columns) > 2.5 * len(_part_columns(uncropped)), "the part is magnified across its axis"
    assert crop_box([Image.new("L", (64, 64), BACKGROUND)]) == FULL_BOX, "no part: nothing to crop to"


def test_a_crop_box_needs_alignment_and_shares_of_the_frame() -> None:
    from models.config import ModelConfig

    with pytest.raises(ValueError, match="needs align 'principal-axis'"):
        ModelConfig(family="skipganomaly", crop_box=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"crop_box must be two shares of the aligned frame in \(0, 1\]"):
        ModelConfig(family="skipganomaly", align="principal-axis", crop_box=(0.0, 1.0))
    assert ModelConfig.from_dict({"align": "principal-axis", "crop_box": [0.5, 1]}).crop_box == (0.5, 1.0)


def test_crop_auto_is_chosen_from_the_training_normals_and_the_service_crops_alike(
    tmp_path: Path, make_client: Any
) -> None:
    """Bolts on a belt are cropped to the box their normals need; training, export, the bundle and the
    service all cut the image the same way; a resume keeps the box; a texture is not cropped."""
    from training.checkpoint import load_trained
    from training.synthetic import generate_dataset
    from training.train import survey_images, train

    lines: list[str] = []

    from tests.small_run import served_like_trained, small_run

    config = partial(small_run, align="auto", crop="auto")

    bolts = generate_dataset(
        tmp_path / "bolts", texture="part", n_train=12, n_test_good=1, n_test_defect=1, image_size=64, seed=0
    )
    run = tmp_path / "run"
    train(config(bolts, run), log=lines.append)
    trained = load_trained(run)
    box = crop_box(survey_images(bolts, val_fraction=0.25, seed=0))
    assert (trained.model_config.crop, trained.model_config.crop_box) == ("part", box)
    assert box[0] < 0.5, "a bolt is long and thin"
    assert any(f"crop: auto -> part {box[0]:g} x {box[1]:g} (" in line for line in lines)

    lines.clear()
    train(config(bolts, run, epochs=2), resume=True, log=lines.append)
    assert any(line.endswith("(as the run was started)") and f"crop: auto -> part {box[0]:g}" in line for line in lines)

    engine, path, _, grid = served_like_trained(run, tmp_path / "models" / "bolts", bolts)
    assert engine.metadata.crop_box == box
    assert grid.pose.box == box
    (out,) = predict_images(engine, [Image.open(path).convert("RGB")])
    assert out.anomaly_map.shape == Image.open(path).size[::-1], "maps come back in the input's pixels"
    (listed,) = make_client(model_dir=tmp_path / "models").get("/v1/models").json()["models"]
    assert listed["crop_box"] == list(box), "operators can see the crop"

    fabric = generate_dataset(
        tmp_path / "fabric", texture="fabric", n_train=12, n_test_good=1, n_test_defect=1, image_size=64, seed=0
    )
    lines.clear()
    train(config(fabric, tmp_path / "texture"), log=lines.append)
    assert load_trained(tmp_path / "texture").model_config.crop_box == FULL_BOX
    assert any("crop: auto -> none" in line for line in lines)
    with pytest.raises(ValueError, match="use --crop auto"):
        train(config(fabric, tmp_path / "refused", crop="part"), log=lines.append)
