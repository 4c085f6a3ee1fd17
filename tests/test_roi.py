"""The region of interest (`--roi part`): a part's defects count only where the part lies in the normals."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import build_model
from models.config import ModelConfig
from models.scoring import score_triple
from service.align import part_mask
from service.engine import OnnxEngine
from service.postprocess import fit_score_stats
from tests.small_run import small_run
from training.checkpoint import load_trained
from training.config import TrainConfig, recommended
from training.data import ImageDataset
from training.export import export_bundle
from training.loops.engine import fit_scores
from training.position_stats import reset_position_statistics
from training.prune import prune_model
from training.roi import MIN_SHARE, fit_roi, margin, part_masks, region
from training.selection import within_region
from training.synthetic import generate_dataset
from training.train import selection_set, train, validation_normals

SIZE = 64


@pytest.fixture(scope="module")
def bolts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bolts at any angle on a plain belt: the synthetic part dataset `--roi auto` picks "part" for."""
    root = tmp_path_factory.mktemp("bolts") / "data"
    return generate_dataset(root, texture="part", n_train=16, n_test_good=2, n_test_defect=1, image_size=SIZE, seed=3)


def test_the_region_is_where_the_part_lies_widened_by_a_margin_without_rare_specks() -> None:
    masks = np.zeros((200, SIZE, SIZE), dtype=bool)
    masks[:, 20:40, 28:36] = True  # the part, in every image
    masks[0, 5, 5] = True  # a speck in one image of 200: below MIN_SHARE
    assert MIN_SHARE > 1 / 200
    roi = region(masks)
    k = margin(SIZE)
    expected = np.zeros((SIZE, SIZE), dtype=bool)
    expected[20 - k : 40 + k, 28 - k : 36 + k] = True
    np.testing.assert_array_equal(roi, expected)


def test_the_fitted_region_covers_every_aligned_part_and_leaves_the_belt_out(bolts: Path) -> None:
    config = ModelConfig(family="skipganomaly", image_size=SIZE, base_width=8, align="principal-axis", roi="part")
    model = build_model(config)
    images = ImageDataset.for_model(sorted((bolts / "train" / "good").iterdir()), config).images
    summary = fit_roi(model, images)
    roi = model.roi_mask[0, 0].bool().numpy()
    assert summary["fitted"] and summary["part_found"]
    assert summary["share"] == pytest.approx(roi.mean(), abs=1e-4)
    assert 0.05 < roi.mean() < 0.4, "aligned bolts lie in one narrow band of the frame"
    for mask in part_masks(images):
        assert not (mask & ~roi).any(), "every part pixel of every normal is inside the region"
    assert not roi[0].any() and not roi[-1].any(), "the belt at the frame's edges is outside"


def test_without_any_part_everywhere_counts() -> None:
    model = build_model(ModelConfig(family="skipganomaly", image_size=SIZE, base_width=8, roi="part"))
    summary = fit_roi(model, torch.zeros(4, 3, SIZE, SIZE))  # plain grey frames
    assert summary["fitted"] and not summary["part_found"]
    assert bool(model.roi_mask.eq(1).all())


def _left_half(model) -> None:
    model.roi_mask.zero_()
    model.roi_mask[..., : SIZE // 2] = 1.0


def test_what_lies_outside_the_region_neither_raises_the_score_nor_shows_in_the_map() -> None:
    torch.manual_seed(0)
    config = ModelConfig(family="skipganomaly", image_size=SIZE, base_width=8, roi="part")
    model = build_model(config).eval()
    _left_half(model)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    x_hat = x + 0.01 * torch.randn_like(x)
    far_right = x_hat.clone()
    far_right[..., 20:30, 50:60] += 1.5  # a blob well away from the region's edge (wider than the smoothing)
    inside = x_hat.clone()
    inside[..., 20:30, 5:15] += 1.5

    def head(reconstruction: torch.Tensor, roi: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return score_triple(config, model.discriminator, x, reconstruction, None, model.position, roi)

    base = head(x_hat, model.roi)
    outside = head(far_right, model.roi)
    torch.testing.assert_close(outside[0], base[0])
    torch.testing.assert_close(outside[2], base[2])
    assert bool(base[2][..., SIZE // 2 :].eq(0).all()), "the map is zero outside the region"
    assert bool((head(inside, model.roi)[0] > base[0] + 0.5).all()), "a defect inside still raises the score"
    assert bool((head(far_right, None)[0] > head(x_hat, None)[0] + 0.5).all()), "without a region it would count"


def test_with_a_map_discriminator_the_region_changes_nothing_inside_it() -> None:
    torch.manual_seed(0)
    config = ModelConfig(family="skipganomaly", image_size=SIZE, base_width=8, discriminator_map=True, roi="part")
    model = build_model(config).eval()
    plain = build_model(replace(config, roi="none")).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    _left_half(model)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        _, _, amap = model.scoring_head()(x)
        _, _, everywhere = plain.scoring_head()(x)
    torch.testing.assert_close(amap[..., : SIZE // 2], everywhere[..., : SIZE // 2])
    assert bool(amap[..., SIZE // 2 :].eq(0).all())
    assert bool(everywhere[..., SIZE // 2 :].gt(0).any())


def test_pruning_keeps_the_region() -> None:
    config = ModelConfig(family="skipganomaly", image_size=SIZE, base_width=16, width_mult=0.5, roi="part")
    source = build_model(config).eval()
    _left_half(source)
    pruned = prune_model(source, replace(config, width_mult=0.25))
    torch.testing.assert_close(pruned.roi_mask, source.roi_mask)


def test_roi_auto_is_chosen_fitted_and_exported_with_the_scores_it_gives(
    bolts: Path, tmp_path: Path, make_client: Any
) -> None:
    lines: list[str] = []

    config = partial(
        small_run,
        discriminator_map=True,
        align="auto",
        roi="auto",
        position_statistics=True,
        train={"select_weights": True},  # the label-free choice between raw and standardised maps runs
    )

    run = tmp_path / "run"
    train(config(bolts, run), log=lines.append)
    assert any(line.startswith("align: auto -> principal-axis, roi: auto -> part (") for line in lines)
    trained = load_trained(run)
    assert trained.model_config.roi == "part"
    summary = trained.provenance["roi"]
    assert summary["fitted"] and 0.05 < summary["share"] < 0.4
    # the raw maps' candidate was scored again within the region, not taken from training
    raw = trained.model
    reset_position_statistics(raw)
    cfg = TrainConfig.from_dict(trained.train_config)
    normals = validation_normals(trained, run)
    inside = within_region(selection_set(normals, cfg), raw.roi_mask)
    cpu = torch.device("cpu")
    rescored = fit_scores(raw, normals, trained.score_weights, 8, cpu, "training-validation", inside, True)
    assert rescored.selection is not None
    tried = trained.provenance["position_statistics"]["selection_score"]
    assert tried["none"] == pytest.approx(rescored.selection.score, abs=1e-9)
    trained = load_trained(run)

    # the score statistics describe the scores the head gives within the region
    head = trained.model.scoring_head().eval()
    with torch.no_grad():
        r, d, _ = head(validation_normals(trained, run))
    stats = fit_score_stats(r.numpy(), d.numpy())
    assert stats["residual"].mean == pytest.approx(trained.score_stats["residual"].mean, rel=1e-4)
    assert stats["discrimination"].mean == pytest.approx(trained.score_stats["discrimination"].mean, rel=1e-4)

    lines.clear()
    train(config(bolts, run, epochs=2), resume=True, log=lines.append)
    assert "align: auto -> principal-axis, roi: auto -> part (as the run was started)" in lines
    assert load_trained(run).model_config.roi == "part"

    bundle = tmp_path / "models" / "bolts"
    export_bundle(load_trained(run), bundle)
    engine = OnnxEngine(bundle, providers=("cpu",))
    assert engine.metadata.roi == "part"
    roi = load_trained(run).model.roi_mask[0, 0].bool().numpy()
    inputs = ImageDataset.for_model(sorted((bolts / "test").rglob("*.png")), trained.model_config).images
    maps = engine.run(inputs.numpy()).anomaly_map  # (N, S, S)
    assert (maps[:, ~roi] == 0).all() and (maps[:, roi] > 0).any()

    client = make_client(model_dir=tmp_path / "models")
    (listed,) = client.get("/v1/models").json()["models"]
    assert (listed["align"], listed["roi"]) == ("principal-axis", "part"), "operators can see both choices"


def test_textures_get_no_region(tmp_path: Path) -> None:
    fabric = generate_dataset(tmp_path / "fabric", texture="fabric", n_train=12, n_test_good=1, n_test_defect=1,
                              image_size=SIZE, seed=0)  # fmt: skip
    model = ModelConfig(image_size=SIZE, width_mult=0.25, roi="auto")
    cfg = TrainConfig(data=str(fabric), out=str(tmp_path / "run"), model=model, epochs=1, batch_size=8,
                      val_fraction=0.25, progress=False)  # fmt: skip
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert load_trained(tmp_path / "run").model_config.roi == "none"
    assert any(line.startswith("roi: auto -> none (") for line in lines)


def test_both_families_recommend_auto_and_the_plain_defaults_score_everywhere() -> None:
    assert recommended("skipganomaly").model.roi == "auto"
    assert recommended("anogan").model.roi == "auto"
    assert TrainConfig().model.roi == "none", "checkpoints written before --roi rebuild scoring everywhere"
    with pytest.raises(ValueError, match="roi must be one of none, part, auto"):
        ModelConfig(family="skipganomaly", roi="box")


def test_part_masks_read_model_inputs_as_the_survey_reads_images() -> None:
    from PIL import Image

    img = np.full((SIZE, SIZE, 3), 100, dtype=np.uint8)
    img[20:40, 28:36] = 30
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]  # as normalised
    np.testing.assert_array_equal(part_masks(x)[0], part_mask(Image.fromarray(img)))


def test_the_selection_set_keeps_only_defects_the_region_can_show() -> None:
    from training.selection import SyntheticDefects, within_region

    images = torch.zeros(3, 3, SIZE, SIZE)
    masks = torch.zeros(3, 1, SIZE, SIZE, dtype=torch.bool)
    masks[0, :, 10:20, 5:15] = True  # inside the left half
    masks[1, :, 10:20, 40:50] = True  # wholly outside
    masks[2, :, 30:40, 25:40] = True  # across the edge
    roi = torch.zeros(1, 1, SIZE, SIZE)
    roi[..., : SIZE // 2] = 1
    kept = within_region(SyntheticDefects(images, masks), roi)
    assert kept.images.shape[0] == 2
    assert int(kept.masks[0].sum()) == 100 and int(kept.masks[1].sum()) == 10 * 7, "masks cut to the region"
