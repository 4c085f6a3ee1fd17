"""Detection-quality machinery: label-free selection (synthetic defects on validation normals, score
weights, best checkpoint), and that nothing in training can see test data.

Runs are tiny (64 px, width 0.25, one CPU thread) on a generated data set; no real data set is needed.
"""

from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models import Detector, ModelConfig, build_model
from models.scoring import residual_map, smooth
from service.bundle import ScoreStats, ScoreWeights
from training import data as data_module
from training import train as train_module
from training.checkpoint import BEST, CHECKPOINT_DIR, LAST, load_checkpoint, load_trained, trained_path
from training.config import TrainConfig
from training.corruption import CORRUPTIONS, CorruptionConfig
from training.data import ImageDataset
from training.loops.artifacts import read_losses
from training.loops.engine import score_images
from training.metrics import auroc
from training.position_stats import fit_position_statistics, reset_position_statistics
from training.selection import WEIGHT_CANDIDATES, assess, choose_weights, selection_copies, synthetic_defects
from training.synthetic import generate_dataset
from training.train import TrainResult, train

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("quality") / "fabric",
        texture="fabric",
        n_train=24,
        n_test_good=3,
        n_test_defect=3,
        image_size=SIZE,
        seed=2,
    )


def tiny(data: Path, out: Path, **kw: object) -> TrainConfig:
    model = ModelConfig(**{"image_size": SIZE, "width_mult": 0.25, **kw.pop("model", {})})  # type: ignore[arg-type]
    base = {"epochs": 3, "batch_size": 4, "val_fraction": 0.25, "progress": False, "threads": 1}
    return TrainConfig(data=str(data), out=str(out), model=model, **{**base, **kw})  # type: ignore[arg-type]


def run(cfg: TrainConfig) -> TrainResult:
    return train(cfg, log=lambda _: None)


# ---------------------------------------------------------------------------------------- the pieces
def stats_of(residual: np.ndarray, discrimination: np.ndarray) -> dict[str, ScoreStats]:
    return {
        "residual": ScoreStats(mean=float(residual.mean()), std=float(residual.std())),
        "discrimination": ScoreStats(mean=float(discrimination.mean()), std=float(discrimination.std())),
    }


def test_choose_weights_takes_the_separating_score_and_prefers_the_residual_on_ties():
    rng = np.random.default_rng(0)
    normal = (rng.normal(0, 1, 50), rng.normal(0, 1, 50))
    defective = (rng.normal(0, 1, 50), rng.normal(5, 1, 50))  # only the discrimination score separates
    weights, aurocs = choose_weights(normal, defective, stats_of(*normal))
    assert weights == ScoreWeights(residual=0.0, discrimination=1.0)
    assert set(aurocs) == {f"{r:g},{d:g}" for r, d in WEIGHT_CANDIDATES} and aurocs["0,1"] > 0.99
    same = (np.arange(4.0), np.arange(4.0))
    weights, _ = choose_weights(same, (same[0] + 10, same[1] + 10), stats_of(*same))
    assert weights == ScoreWeights(residual=1.0, discrimination=0.0), "every candidate scores 1.0: keep the first"


def test_gated_choice_keeps_both_scores_unless_another_weighting_wins_clearly():
    rng = np.random.default_rng(0)
    n = 120
    # Two equally good views of one defect strength: any weighting but 1/1 that wins here wins on noise.
    strength = (rng.normal(0, 1, n), rng.normal(2.5, 1, n))  # normals, defects
    normal, defective = ((s + rng.normal(0, 0.5, n), s + rng.normal(0, 0.5, n)) for s in strength)
    plain, aurocs = choose_weights(normal, defective, stats_of(*normal))
    gated, _ = choose_weights(normal, defective, stats_of(*normal), margin_z=1.645)
    assert plain == ScoreWeights(residual=1.0, discrimination=2.0) and aurocs["1,2"] - aurocs["1,1"] < 0.001
    assert gated == ScoreWeights(residual=1.0, discrimination=1.0)
    # Only the discrimination score separates: the gain over 1/1 is far beyond the noise, so it is taken.
    clear = (rng.normal(0, 1, n), rng.normal(4, 1, n))
    gated, aurocs = choose_weights(normal, clear, stats_of(*normal), margin_z=1.645)
    assert gated == ScoreWeights(residual=0.0, discrimination=1.0) and aurocs["0,1"] > aurocs["1,1"] + 0.05
    assert choose_weights(normal, clear, stats_of(*normal))[0] == gated


def test_assess_measures_image_and_pixel_auroc_on_the_synthetic_masks():
    masks = np.zeros((2, 1, 8, 8), dtype=bool)
    masks[:, :, 2:4, 2:4] = True
    normal_maps = np.zeros((2, 1, 8, 8))
    defect_maps = masks.astype(float)  # a perfect map
    normal = (np.array([0.0, 0.1]), np.array([0.0, 0.2]), normal_maps)
    defective = (np.array([1.0, 2.0]), np.array([0.1, 0.0]), defect_maps)
    sel = assess(normal, defective, masks, stats_of(normal[0], normal[1]))
    assert sel.weights == ScoreWeights(residual=1.0, discrimination=0.0)
    assert sel.image_auroc == 1.0 and sel.pixel_auroc == 1.0 and sel.score == 1.0
    assert json.loads(json.dumps(sel.to_dict()))["weights"] == {"residual": 1.0, "discrimination": 0.0}


def test_assess_picks_the_map_with_the_best_pixel_auroc_and_keeps_the_first_on_ties():
    masks = np.zeros((2, 1, 8, 8), dtype=bool)
    masks[:, :, 2:4, 2:4] = True
    quiet = np.zeros((2, 1, 8, 8))
    perfect, inverted = masks.astype(float), 1.0 - masks.astype(float)
    normal = (np.array([0.0, 0.1]), np.array([0.0, 0.2]), quiet)
    defective = (np.array([1.0, 2.0]), np.array([0.1, 0.0]), inverted)
    stats = stats_of(normal[0], normal[1])
    candidates = {"discrimination": (quiet, inverted), "mean": (quiet, perfect), "residual": (quiet, perfect)}
    sel = assess(normal, defective, masks, stats, candidates)
    assert sel.map_source == "mean" and sel.pixel_auroc == 1.0
    assert sel.map_candidates is not None and sel.map_candidates["discrimination"] < 0.5
    assert sel.to_dict()["map_source"] == "mean"
    assert assess(normal, defective, masks, stats).map_source is None  # without candidates: the head's map


def test_lighting_drift_changes_global_brightness_only_within_its_strength_and_is_seeded():
    from training.augment import lighting_drift

    images = torch.rand(64, 3, SIZE, SIZE) * 1.4 - 0.8  # in [-0.8, 0.6]: no drift of 0.1 reaches the clamp
    before = images.clone()
    assert lighting_drift(images, 0.0, torch.Generator().manual_seed(0)) is images  # off: no draw, no copy
    a = lighting_drift(images, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(images, before)
    assert torch.equal(a, lighting_drift(images, 0.1, torch.Generator().manual_seed(0)))
    # per image one affine map of the pixel values: (a - low) = gain * (x - low) + offset, same gain everywhere
    low = -1.0
    for x, y in zip(images, a, strict=True):
        design = torch.stack([(x - low).flatten(), torch.ones(x.numel())], dim=1)
        gain, offset = torch.linalg.lstsq(design, (y - low).flatten()[:, None]).solution.flatten().tolist()
        assert 0.9 - 1e-4 <= gain <= 1.1 + 1e-4 and abs(offset) <= 0.1 + 1e-4
        assert torch.allclose(y, (x - low) * gain + low + offset, atol=1e-4)
    gains = (a + 1).mean((1, 2, 3)) / (images + 1).mean((1, 2, 3))
    assert float(gains.std()) > 0.02, "each image gets its own lighting"


def test_quarter_turns_rotate_each_image_exactly_and_reach_every_angle():
    from training.augment import random_rot90

    images = torch.rand(64, 3, SIZE, SIZE)
    turned = random_rot90(images, torch.Generator().manual_seed(0))
    assert torch.equal(turned, random_rot90(images, torch.Generator().manual_seed(0))), "seeded"
    angles = []
    for x, y in zip(images, turned, strict=True):
        (k,) = [k for k in range(4) if torch.equal(y, x.rot90(k, dims=(-2, -1)))]  # exactly one turn, no resampling
        angles.append(k)
    assert sorted(set(angles)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="square"):
        random_rot90(torch.rand(2, 3, SIZE, SIZE + 2), torch.Generator().manual_seed(0))


def test_rotate_reaches_the_training_steps_and_replays_from_its_seed(data: Path, tmp_path: Path):
    """`--rotate` is in what the loop trains on (not only in the config), and a rotating run is seeded."""
    from training.loops import engine

    seen: list[torch.Tensor] = []
    real = engine.random_rot90

    def spy(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = real(images, generator)
        seen.append(out)
        return out

    engine.random_rot90 = spy
    try:
        for name in ("a", "b"):
            run(tiny(data, tmp_path / name, epochs=1, val_fraction=0.5, rotate=True))
        run(tiny(data, tmp_path / "plain", epochs=1, val_fraction=0.5))
    finally:
        engine.random_rot90 = real
    assert len(seen) == 6, "three steps of 4 images per rotating run, none without --rotate"
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:], strict=True))


def test_the_selection_prefers_the_score_that_ignores_a_lighting_change():
    # residual: separates defects a little and ignores lighting; discrimination: separates the defects
    # perfectly but fires on every relit normal. With relit normals in the validation set the residual wins.
    rng = np.random.default_rng(0)
    n = 40
    normal_r, relit_r, defect_r = rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(1.5, 1, n)
    normal_d, relit_d, defect_d = rng.normal(0, 1, n), rng.normal(6, 1, n), rng.normal(4, 1, n)
    stats = stats_of(normal_r, normal_d)
    without, _ = choose_weights((normal_r, normal_d), (defect_r, defect_d), stats)
    with_relit, aurocs = choose_weights(
        (np.r_[normal_r, relit_r], np.r_[normal_d, relit_d]), (defect_r, defect_d), stats
    )
    assert without.discrimination > 0  # on defects alone the discrimination score helps
    assert (with_relit.residual, with_relit.discrimination) == (1.0, 0.0), aurocs


def test_synthetic_defects_add_relit_normals_only_when_asked():
    normals = torch.rand(6, 3, SIZE, SIZE) * 2 - 1
    cfg = CorruptionConfig(kinds=("patch",))
    assert synthetic_defects(normals, cfg, seed=0).relit is None
    relit = synthetic_defects(normals, cfg, seed=0, lighting_drift=0.2).relit
    assert relit is not None and relit.shape == normals.shape and not torch.equal(relit, normals)
    same = synthetic_defects(normals, cfg, seed=0, lighting_drift=0.2)
    assert torch.equal(relit, same.relit)  # the same set at every epoch


def test_selection_copies_reach_the_requested_number_of_defects():
    assert [selection_copies(n, 200) for n in (21, 76, 200, 300)] == [10, 3, 1, 1]
    assert selection_copies(21, 0) == 1 and selection_copies(0, 200) == 1


def test_several_copies_each_get_their_own_exact_defects():
    normals = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    cfg = CorruptionConfig(kinds=("patch",))
    one = synthetic_defects(normals, cfg, seed=0, lighting_drift=0.2)
    three = synthetic_defects(normals, cfg, seed=0, lighting_drift=0.2, copies=3)
    assert three.images.shape == (12, 3, SIZE, SIZE) and three.masks.shape == (12, 1, SIZE, SIZE)
    assert three.relit is not None and three.relit.shape == normals.shape  # the normals once, not per copy
    changed = (three.images != normals.repeat(3, 1, 1, 1)).any(dim=1, keepdim=True)
    assert torch.equal(changed, three.masks)  # the masks mark exactly what differs from each copy's normal
    assert all(three.masks[i].any() for i in range(12))  # no clean copy in a validation set
    assert not torch.equal(three.masks[:4], three.masks[4:8])  # copies differ from each other
    again = synthetic_defects(normals, cfg, seed=0, copies=1)
    assert torch.equal(again.images, one.images)  # one copy: the draws of runs before the option


def test_synthetic_defects_use_every_kind_a_seed_of_their_own_and_leave_the_normals_alone():
    normals = torch.rand(12, 3, SIZE, SIZE) * 2 - 1
    before = normals.clone()
    cfg = CorruptionConfig(kinds=("patch",), clean_fraction=0.5)  # neither may leak into validation
    a = synthetic_defects(normals, cfg, seed=0)
    b = synthetic_defects(normals, cfg, seed=0)
    assert torch.equal(normals, before)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks), "the same set every epoch"
    assert torch.equal(a.masks, (a.images != normals).any(dim=1, keepdim=True))
    assert bool(a.masks.flatten(1).any(dim=1).all()), "every copy carries a defect"
    assert not torch.equal(a.images, synthetic_defects(normals, cfg, seed=1).images)
    # not only pasted rectangles: some defect is not its own bounding box
    boxes = [m[0].any(dim=1).sum() * m[0].any(dim=0).sum() for m in a.masks]
    assert any(int(m.sum()) < int(box) for m, box in zip(a.masks, boxes, strict=True))
    assert len(CORRUPTIONS) >= 5


def test_selection_functions_take_no_paths_or_labels():
    """Structural: selection gets tensors of normal images, configs and scores, never a path or a test label."""
    allowed = {
        "Tensor",  # images of the training split
        "CorruptionConfig",
        "int",  # the seed
        "float",  # the lighting drift strength
        "dict[str, ScoreStats]",  # fitted on the validation normals
        "tuple[np.ndarray, np.ndarray]",  # scores
        "tuple[np.ndarray, np.ndarray, np.ndarray]",  # scores and maps
        "np.ndarray",  # the synthetic masks
        "tuple[tuple[float, float], ...]",  # weight candidates
        "dict[str, tuple[np.ndarray, np.ndarray]] | None",  # candidate maps
    }
    for fn in (synthetic_defects, assess, choose_weights):
        for name, param in inspect.signature(fn).parameters.items():
            assert not any(word in name for word in ("path", "dir", "data", "label", "test")), (fn.__name__, name)
            assert param.annotation in allowed, (fn.__name__, name, param.annotation)


# ---------------------------------------------------------------------------------------- in training
def test_training_reads_only_the_train_split_and_selects_on_its_validation_normals(data, tmp_path, monkeypatch):
    read: list[Path] = []
    load = data_module.load_image_file

    def spy(path):  # every image training decodes goes through this function
        read.append(Path(path).resolve())
        return load(path)

    monkeypatch.setattr(data_module, "load_image_file", spy)
    seen: list[torch.Tensor] = []
    make = train_module.synthetic_defects

    def record(normals, corruption, seed, lighting_drift=0.0, copies=1):
        seen.append(normals.clone())
        made = make(normals, corruption, seed, lighting_drift, copies)
        sizes.append(made.images.shape[0])
        return made

    sizes: list[int] = []
    monkeypatch.setattr(train_module, "synthetic_defects", record)
    cfg = tiny(data, tmp_path / "run", epochs=2, select_weights=True, select_checkpoint=True, select_defects=20)
    result = run(cfg)

    good = (data / "train" / "good").resolve()
    assert read and all(p.parent == good for p in read), "training opened a file outside train/good"
    assert not any("test" in p.parts or "ground_truth" in p.parts for p in read)
    trained = load_trained(result.run_dir)
    (normals,) = seen
    assert torch.equal(normals, ImageDataset(trained.val_paths, image_size=SIZE, channels=3).images)
    assert not set(trained.val_paths) & set(load_checkpoint(result.run_dir)["train_paths"])
    assert len(normals) == 6 and sizes == [24]  # --select-defects 20: four defective copies of 6 normals


def test_select_margin_reaches_the_runs_choice(data, tmp_path):
    """A margin no synthetic gain can clear: every epoch, and so the exported checkpoint, keeps 1/1."""
    cfg = tiny(data, tmp_path / "gated", epochs=2, select_weights=True, select_margin=1e9)
    result = run(cfg)
    assert {r["sel_weights"] for r in read_losses(result.run_dir / "losses.csv")} == {"1/1"}
    assert load_trained(result.run_dir).score_weights == ScoreWeights(residual=1.0, discrimination=1.0)


@pytest.fixture(scope="module")
def selected(data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    cfg = tiny(
        data,
        tmp_path_factory.mktemp("sel") / "run",
        model={"discriminator_map": True},
        epochs=4,
        select_weights=True,
        select_map=True,
        select_checkpoint=True,
    )
    return run(cfg)


def test_select_checkpoint_keeps_the_best_epoch_and_export_loads_it(selected):
    rows = read_losses(selected.run_dir / "losses.csv")
    scores = []
    for r in rows:
        image, pixel = float(r["sel_image_auroc"]), float(r["sel_pixel_auroc"])
        scores.append((image + pixel) / 2)
    best_epoch = int(np.argmax(scores)) + 1  # first of equal maxima: only a strictly better epoch replaces
    best = load_checkpoint(selected.run_dir / CHECKPOINT_DIR / BEST)
    assert best["progress"]["epoch"] == best_epoch == selected.progress.best_epoch
    assert best["progress"]["best_score"] == pytest.approx(max(scores), abs=1e-5)
    assert trained_path(selected.run_dir) == selected.run_dir / CHECKPOINT_DIR / BEST
    assert load_trained(selected.run_dir).provenance["epochs_done"] == best_epoch
    assert load_checkpoint(selected.run_dir)["progress"]["epoch"] == 4, "--resume continues from last.pt"
    assert (selected.run_dir / CHECKPOINT_DIR / LAST).is_file()


def test_select_weights_go_into_the_checkpoint_and_the_bundle(selected, tmp_path):
    from training.export import export_bundle

    trained = load_trained(selected.run_dir)
    sel = trained.provenance["selection"]
    assert trained.score_weights.model_dump() == sel["weights"]
    assert sel["candidates"][f"{trained.score_weights.residual:g},{trained.score_weights.discrimination:g}"] == max(
        sel["candidates"].values()
    )
    export_bundle(trained, tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert meta["score_weights"] == sel["weights"]
    assert meta["provenance"]["selection"]["epoch"] == selected.progress.best_epoch
    assert meta["network"]["discriminator_map"] is True


def test_select_map_sets_the_exported_map_source_of_the_selected_epoch(selected):
    trained = load_trained(selected.run_dir)
    sel = trained.provenance["selection"]
    assert sel["map_source"] in ("discrimination", "mean", "residual")
    assert trained.model_config.map_source == sel["map_source"]
    assert sel["pixel_auroc"] == max(sel["map_candidates"].values())
    rows = read_losses(selected.run_dir / "losses.csv")
    assert rows[sel["epoch"] - 1]["sel_map"] == sel["map_source"]
    assert TrainConfig.from_dict(trained.train_config).model.map_source == "auto", "the run's config is unchanged"


def test_selection_off_keeps_the_configured_weights_and_writes_no_best(data, tmp_path):
    result = run(tiny(data, tmp_path / "plain", epochs=1, score_weight_discrimination=0.5))
    assert not (result.run_dir / CHECKPOINT_DIR / BEST).exists()
    trained = load_trained(result.run_dir)
    assert trained.score_weights == ScoreWeights(residual=1.0, discrimination=0.5)
    assert "selection" not in trained.provenance
    assert read_losses(result.run_dir / "losses.csv")[0]["sel_image_auroc"] == ""


def test_select_from_scores_only_the_late_epochs_and_best_is_one_of_them(data, tmp_path):
    cfg = tiny(data, tmp_path / "late", epochs=4, select_weights=True, select_checkpoint=True, select_from=0.6)
    result = run(cfg)
    rows = read_losses(result.run_dir / "losses.csv")
    scored = [int(r["epoch"]) for r in rows if r["sel_image_auroc"] != ""]
    assert scored == [3, 4], "epochs 1-2 end at 25% and 50% of the phase, before 60%"
    assert all(r["val_residual"] != "" for r in rows), "the normals are still scored every epoch"
    assert result.progress.best_epoch in scored
    assert load_checkpoint(result.run_dir / CHECKPOINT_DIR / BEST)["progress"]["epoch"] == result.progress.best_epoch


def test_select_from_skips_anogans_gan_phase_whose_encoder_is_untrained(data, tmp_path):
    cfg = tiny(
        data,
        tmp_path / "ano",
        model={"family": "anogan"},
        epochs=4,
        encoder_share=0.5,
        select_weights=True,
        select_checkpoint=True,
        select_from=0.1,
    )
    rows = read_losses(run(cfg).run_dir / "losses.csv")
    assert [(r["phase"], r["sel_image_auroc"] != "") for r in rows] == [
        ("gan", False),
        ("gan", False),
        ("encoder", True),
        ("encoder", True),
    ]


def test_select_from_must_leave_part_of_the_phase():
    with pytest.raises(ValueError, match="select_from must be in"):
        TrainConfig(data="x", select_from=1.0)


def test_lighting_drift_reaches_every_training_batch_and_the_selection(data, tmp_path, monkeypatch):
    from training.loops import engine as engine_module

    strengths: list[float] = []
    relit_sets: list[torch.Tensor | None] = []
    drift, make = engine_module.lighting_drift, train_module.synthetic_defects

    def spy_drift(images, strength, generator):
        strengths.append(strength)
        return drift(images, strength, generator)

    def spy_make(normals, corruption, seed, lighting_drift=0.0, copies=1):
        out = make(normals, corruption, seed, lighting_drift, copies)
        relit_sets.append(out.relit)
        return out

    monkeypatch.setattr(engine_module, "lighting_drift", spy_drift)
    monkeypatch.setattr(train_module, "synthetic_defects", spy_make)
    result = run(tiny(data, tmp_path / "run", epochs=1, select_weights=True, lighting_drift=0.1))
    assert strengths and set(strengths) == {0.1}, "every batch goes through the drift at the configured strength"
    (relit,) = relit_sets
    assert relit is not None, "the selection scores relit validation normals"
    assert load_trained(result.run_dir).train_config["lighting_drift"] == 0.1


def test_one_pass_map_variants_are_what_the_head_computes_for_each_map_source(selected):
    """fit_scores scores once for every candidate map; each must equal the head with that map source."""
    from dataclasses import replace

    from training.loops.engine import score_images, score_variants

    trained = load_trained(selected.run_dir)
    model, cpu = trained.model, torch.device("cpu")
    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    residual, discrimination, maps = score_variants(model, images, 2, cpu)
    assert set(maps) == {"discrimination", "mean", "residual"}
    for source, amap in maps.items():
        model.config = replace(model.config, map_source=source)
        r, d, m = score_images(model, images, 3, cpu)
        np.testing.assert_allclose(residual, r, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(discrimination, d, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(amap, m, rtol=1e-6, atol=1e-7, err_msg=source)


# ---------------------------------------------------------------------------------------- per-pixel statistics
class EdgeBlind(Detector):
    """A detector that restores any image to `template`, except the top rows, which it never gets right:
    every good part leaves the same residual band there, brighter than a small defect's residual."""

    def __init__(self, config: ModelConfig, template: torch.Tensor) -> None:
        super().__init__(config)
        self.generator = torch.nn.Identity()
        self.discriminator = lambda x: (x.mean(dim=(1, 2, 3)), x[:, :, :4, :4])
        self.register_buffer("template", template)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.template.expand_as(x).clone()
        x_hat[..., :6, :] = -1.0
        return x_hat


def edge_blind_images(n: int, seed: int, defect: bool = False) -> tuple[EdgeBlind, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    template = torch.rand(1, 1, SIZE, SIZE, generator=g) * 0.4 + 0.3  # the part, away from -1
    model = EdgeBlind(ModelConfig(image_size=SIZE, channels=1, position_statistics=True), template).eval()
    g = torch.Generator().manual_seed(seed)
    images = template + 0.02 * torch.randn(n, 1, SIZE, SIZE, generator=g)  # good parts: the template + noise
    if defect:
        images[:, :, 30:36, 30:36] += 0.4  # a small, faint defect: far less residual than the top band
    return model, images


def test_identity_statistics_leave_every_head_output_unchanged():
    for family, dmap in itertools.product(("skipganomaly", "anogan"), (False, True)):
        config = ModelConfig(family=family, image_size=SIZE, base_width=8, latent_dim=16, discriminator_map=dmap)
        torch.manual_seed(0)
        plain = build_model(config).eval()
        with_stats = build_model(replace(config, position_statistics=True)).eval()
        missing = with_stats.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert sorted(missing) == ["position_mean", "position_scale"], "only the statistics are new keys"
        x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
        with torch.no_grad():
            for a, b in zip(plain.scoring_head()(x), with_stats.scoring_head()(x), strict=True):
                torch.testing.assert_close(a, b)


def test_a_residual_every_good_part_leaves_stops_deciding_the_score():
    model, reference = edge_blind_images(40, seed=1)
    _, normals = edge_blind_images(12, seed=2)
    _, defective = edge_blind_images(12, seed=3, defect=True)
    labels = np.r_[np.zeros(12), np.ones(12)]
    images = torch.cat([normals, defective])
    with torch.no_grad():
        raw, _, raw_map = model.scoring_head()(images)
        summary = fit_position_statistics(model, reference, 16, torch.device("cpu"))
        scored, _, shown = model.scoring_head()(images)
    assert auroc(labels, raw.numpy()) < 0.8, "the top band should decide the raw max"
    assert auroc(labels, scored.numpy()) == 1.0
    torch.testing.assert_close(shown, raw_map)  # the exported map is not standardised
    assert summary["images"] == 40 and summary["fitted"] and "discrimination" not in summary


def test_statistics_are_the_per_pixel_mean_and_std_with_the_median_as_floor():
    model, reference = edge_blind_images(30, seed=4)
    fit_position_statistics(model, reference, 7, torch.device("cpu"))  # batches that do not divide 30
    maps = residual_map(reference, model.reconstruct(reference), "l1")
    maps = smooth(maps, model.config.smoothing_kernel).double()  # (N, 1, S, S)
    mean, std = maps.mean(dim=0), maps.std(dim=0)
    torch.testing.assert_close(model.position_mean[0].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.position_scale[0].double(), std.clamp_min(std.median()), rtol=1e-4, atol=1e-6)
    assert torch.equal(model.position_mean[1], torch.zeros_like(model.position_mean[1])), "no map discriminator"
    reset_position_statistics(model)
    assert model.position_mean.abs().max() == 0 and bool((model.position_scale == 1).all())


def position_run(data: Path, out: Path) -> TrainConfig:
    model = {"discriminator_map": True, "position_statistics": True}
    return tiny(data, out, model=model, epochs=3, select_weights=True, select_map=True, select_checkpoint=True)


def test_training_fits_the_statistics_into_the_exported_checkpoint_and_they_export(data, tmp_path):
    from training.export import export_bundle

    cfg = position_run(data, tmp_path / "run")
    result = run(cfg)
    exported = trained_path(result.run_dir)
    state = load_checkpoint(exported)
    summary = state["provenance"]["position_statistics"]
    assert summary["fitted"] and summary["images"] == len(state["train_paths"])
    # the label-free choice: the first best of none, residual, discrimination, both (fewer maps on ties)
    tried = summary["selection_score"]
    assert list(tried) == ["none", "residual", "discrimination", "residual+discrimination"]
    chosen = "+".join(summary["standardised"]) or "none"
    assert chosen == max(tried, key=lambda k: tried[k]) and summary["kept"] == (chosen != "none")
    fitted = [bool(state["model"]["position_mean"][i].abs().max() > 0) for i in range(2)]
    assert fitted == [name in summary["standardised"] for name in ("residual", "discrimination")]
    assert (state["model"]["position_scale"] > 0).all()
    assert state["provenance"]["selection"]["score"] == tried[chosen]
    # the exported map is the chosen candidate's map choice, not the last candidate's
    assert state["model_config"]["map_source"] == state["provenance"]["selection"]["map_source"]
    if exported.name == BEST:  # last.pt is what --resume continues: it keeps identity statistics
        assert load_checkpoint(result.run_dir / CHECKPOINT_DIR / LAST)["model"]["position_mean"].abs().max() == 0
    # The score statistics are those of the head as exported, on the validation normals.
    trained = load_trained(result.run_dir)
    images = ImageDataset(trained.val_paths, image_size=SIZE, channels=3).images
    r, d, _ = score_images(trained.model, images, 8, torch.device("cpu"))
    assert trained.score_stats["residual"].mean == pytest.approx(float(r.mean()), rel=1e-5)
    assert trained.score_stats["discrimination"].mean == pytest.approx(float(d.mean()), rel=1e-5)
    assert json.loads((result.run_dir / "normalization.json").read_text())["position_statistics"] == summary
    if not summary["kept"]:  # export's parity check must also cover fitted statistics
        fit_position_statistics(trained.model, images, 8, torch.device("cpu"))
    export_bundle(trained, tmp_path / "bundle")  # raises ParityError if ONNX does not match PyTorch
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert meta["network"]["position_statistics"] is True
    # A resumed run starts again from identity statistics and decides again at its end.
    resumed = train(replace(cfg, epochs=4), resume=True, log=lambda _: None)
    assert resumed.progress.epoch == 4
    assert load_checkpoint(trained_path(result.run_dir))["provenance"]["position_statistics"]["fitted"]


def test_statistics_that_lower_the_selection_score_are_left_out(data, tmp_path, monkeypatch):
    from training.loops import engine as engine_module

    def scrambled(model, images, batch_size, device):
        summary = fit_position_statistics(model, images, batch_size, device)
        g = torch.Generator().manual_seed(0)
        model.position_mean.copy_(torch.rand(model.position_mean.shape, generator=g) * 50)  # noise decides the max
        return summary

    monkeypatch.setattr(engine_module, "fit_position_statistics", scrambled)
    result = run(position_run(data, tmp_path / "run"))
    state = load_checkpoint(trained_path(result.run_dir))
    summary = state["provenance"]["position_statistics"]
    tried = summary["selection_score"]
    assert summary["standardised"] == [] and not summary["kept"]
    others = [score for name, score in tried.items() if name != "none"]
    assert max(others) <= tried["none"] and min(others) < tried["none"], "ties go to the raw scores"
    assert state["model"]["position_mean"].abs().max() == 0, "the raw scores are exported"
    assert state["provenance"]["selection"]["score"] == tried["none"]


def test_without_a_selection_set_every_map_is_standardised(data, tmp_path):
    model = {"discriminator_map": True, "position_statistics": True}
    result = run(tiny(data, tmp_path / "run", model=model, epochs=2))  # selection off: nothing to choose on
    state = load_checkpoint(trained_path(result.run_dir))
    summary = state["provenance"]["position_statistics"]
    assert summary["standardised"] == ["residual", "discrimination"] and "selection_score" not in summary
    assert all(state["model"]["position_mean"][i].abs().max() > 0 for i in range(2))
