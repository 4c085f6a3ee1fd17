"""Export: ONNX parity with PyTorch (random and trained weights), metadata round trip, batch axis, failures."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from models import ModelConfig, build_model  # noqa: E402
from service.bundle import (  # noqa: E402
    MODEL_FILE,
    NormalizationPair,
    ScoreStats,
    ScoreWeights,
    read_metadata,
    read_onnx_metadata,
)
from service.engine import OnnxEngine, RawOutput  # noqa: E402
from training import export as export_mod  # noqa: E402
from training.export import (  # noqa: E402
    ExportError,
    ParityError,
    Tolerance,
    compare_outputs,
    export_bundle,
    load_images,
    torch_outputs,
)
from training.synthetic import make_normal_image  # noqa: E402

SIZE = 64


@dataclass
class FakeTrained:
    """Stands in for training.checkpoint.TrainedModel (same attributes)."""

    model_config: ModelConfig
    model: Any
    train_config: dict[str, Any] = field(default_factory=lambda: {"data": "synthetic", "epochs": 0})
    score_stats: dict[str, ScoreStats] = field(
        default_factory=lambda: {
            "residual": ScoreStats(mean=0.5, std=0.1),
            "discrimination": ScoreStats(mean=0.01, std=0.005),
        }
    )
    score_weights: ScoreWeights = field(default_factory=lambda: ScoreWeights(residual=1.0, discrimination=0.5))
    normalization: NormalizationPair | None = None
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    provenance: dict[str, Any] = field(default_factory=lambda: {"made_by": "tests/test_export.py"})
    val_paths: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)


def _tiny_config(family: str, **kw: Any) -> ModelConfig:
    return ModelConfig(family=family, image_size=SIZE, channels=3, base_width=8, latent_dim=16, **kw)


def _write_normals(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(make_normal_image(np.random.default_rng([seed, i]), "fabric", SIZE, 3)).save(p)
        paths.append(str(p))
    return paths


def _batch(paths: list[str]) -> np.ndarray:
    return load_images(paths, image_size=SIZE, channels=3, mean=[0.5] * 3, std=[0.5] * 3, limit=len(paths))


def _train_briefly(model: Any, images: np.ndarray, steps: int = 6) -> None:
    """A few optimiser steps in train mode, so BatchNorm running statistics move far from their init."""
    torch.manual_seed(0)
    x = torch.from_numpy(images)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - x).abs().mean()
        loss.backward()
        opt.step()
    model.eval()


def _assert_engine_matches_torch(bundle: Path, model: Any, images: np.ndarray) -> None:
    engine = OnnxEngine(bundle, providers=("cpu",))
    ref = torch_outputs(model.scoring_head().eval(), images)
    for batch in (images[:1], images):
        out = engine.run(batch)
        n = len(batch)
        got = (out.residual_score, out.discrimination_score, out.anomaly_map)
        report = compare_outputs([r[:n] for r in ref], got, Tolerance())
        assert report.passed, report.failures


@pytest.fixture(scope="module")
def normals(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _write_normals(tmp_path_factory.mktemp("normals"), 9)


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory, normals: list[str]) -> tuple[Path, FakeTrained]:
    torch.manual_seed(1)
    cfg = _tiny_config("anogan")
    trained = FakeTrained(cfg, build_model(cfg).eval(), val_paths=normals)
    out = tmp_path_factory.mktemp("bundles") / "random-anogan"
    export_bundle(trained, out)
    return out, trained


@pytest.mark.slow
def test_random_weights_export_matches_pytorch_at_batch_1_and_7(
    random_bundle: tuple[Path, FakeTrained], normals: list[str]
) -> None:
    bundle, trained = random_bundle
    images = _batch(_write_normals(bundle.parent / "fresh", 7, seed=5))  # not the parity images
    _assert_engine_matches_torch(bundle, trained.model, images)


@pytest.mark.slow
def test_metadata_round_trip_and_contents(random_bundle: tuple[Path, FakeTrained]) -> None:
    bundle, trained = random_bundle
    meta = read_metadata(bundle)
    assert read_onnx_metadata(bundle / MODEL_FILE) == meta, "model.json is mirrored into the ONNX metadata_props"
    assert meta.name == "random-anogan" and meta.family == "anogan"
    assert (meta.image_size, meta.channels, meta.mean, meta.std) == (SIZE, 3, [0.5] * 3, [0.5] * 3)
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", meta.version)
    assert meta.network == trained.model_config.to_dict()
    assert ModelConfig.from_dict(meta.network) == trained.model_config
    assert meta.score_stats == trained.score_stats and meta.score_weights == trained.score_weights
    assert meta.thresholds.image is None and meta.thresholds.pixel is None and not meta.calibrated
    # No normalisation in the checkpoint: fitted on the validation normals through the exported graph.
    assert "validation normals at export (9 images)" in meta.normalization.image.source
    prov = meta.provenance
    assert prov["made_by"] == "tests/test_export.py" and prov["data"] == "synthetic"
    assert prov["train_config"] == {"data": "synthetic", "epochs": 0}
    assert {"exported", "export_git_revision", "torch", "onnx", "onnxruntime", "opset"} <= set(prov)
    assert prov["parity"]["passed"] and prov["parity"]["n_images"] == 9
    assert set(prov["parity"]["max_abs_diff"]) == {"residual_score", "discrimination_score", "anomaly_map"}
    assert sorted(p.name for p in bundle.iterdir()) == ["model.json", "model.onnx"], "no temporary files left"
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "staging folders removed"


@pytest.mark.slow
def test_briefly_trained_model_with_batchnorm_matches_pytorch(tmp_path: Path, normals: list[str]) -> None:
    torch.manual_seed(2)
    cfg = _tiny_config("skipganomaly", spectral_norm=False)  # without spectral norm, D has BatchNorm too
    model = build_model(cfg)
    _train_briefly(model, _batch(normals))
    running = [m.running_mean.abs().max().item() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert running and max(running) > 1e-2, "BatchNorm running statistics must be non-trivial for this test"
    norm = NormalizationPair.model_validate(
        {k: {"threshold": 1.0, "min": 0.0, "max": 2.0, "source": "checkpoint"} for k in ("image", "pixel")}
    )
    trained = FakeTrained(cfg, model, val_paths=normals, normalization=norm)
    meta = export_bundle(trained, tmp_path / "trained", name="trained-skip")
    assert meta.normalization == norm, "a checkpoint's own normalisation is kept"
    assert not model.training, "the caller's model is left as it was"
    _assert_engine_matches_torch(tmp_path / "trained", model, _batch(_write_normals(tmp_path / "fresh", 7, 9)))


@pytest.mark.slow
def test_map_discriminator_with_attention_exports_and_matches_pytorch(tmp_path: Path, normals: list[str]) -> None:
    torch.manual_seed(3)
    cfg = _tiny_config("skipganomaly", discriminator_map=True, map_attention=True, map_source="mean")
    model = build_model(cfg).eval()
    attention = model.map_discriminator.attention
    attention.gamma.data.fill_(2.0)  # at 0 the block is the identity and the graph would not test it
    export_bundle(FakeTrained(cfg, model, val_paths=normals), tmp_path / "attention")
    _assert_engine_matches_torch(tmp_path / "attention", model, _batch(_write_normals(tmp_path / "fresh", 7, 4)))


def _fast_export(monkeypatch: pytest.MonkeyPatch, bundle: Path) -> None:
    """Skip the (slow) exporter: reuse the graph already exported for the same model."""
    monkeypatch.setattr(
        export_mod, "export_onnx", lambda head, ex, path, opset=18: shutil.copy(bundle / MODEL_FILE, path)
    )


@pytest.mark.slow
def test_parity_failure_fails_loudly_and_writes_nothing(
    random_bundle: tuple[Path, FakeTrained], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, trained = random_bundle
    _fast_export(monkeypatch, bundle)
    real_run = OnnxEngine.run

    def perturbed(self: OnnxEngine, batch: np.ndarray) -> RawOutput:
        out = real_run(self, batch)
        return RawOutput(out.residual_score, out.discrimination_score, out.anomaly_map * 1.01 + 1e-3)

    monkeypatch.setattr(OnnxEngine, "run", perturbed)
    out = tmp_path / "bad"
    with pytest.raises(ParityError, match="anomaly_map differs by up to") as exc:
        export_bundle(trained, out)
    assert exc.value.report.max_abs_diff["anomaly_map"] > 1e-3
    assert exc.value.report.max_abs_diff["residual_score"] < 1e-5
    assert not out.exists() and list(tmp_path.iterdir()) == [], "no bundle and no staging folder left behind"


@pytest.mark.slow
def test_cli_parity_failure_exits_non_zero(
    random_bundle: tuple[Path, FakeTrained],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("training.checkpoint")
    from anoscope import cli

    bundle, trained = random_bundle
    _fast_export(monkeypatch, bundle)
    monkeypatch.setattr("training.checkpoint.load_trained", lambda path: trained)
    monkeypatch.setattr(export_mod, "check_parity", _failing_parity)
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    out = tmp_path / "bundle"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    assert "differ from PyTorch's; no bundle was written" in capsys.readouterr().err
    assert not out.exists()


def _failing_parity(head: Any, engine: Any, images: np.ndarray, tol: Tolerance) -> Any:
    return compare_outputs([np.zeros(2)] * 3, [np.ones(2)] * 3, tol, n_images=2, batch_sizes=[2])


@pytest.mark.slow
def test_overwrite_and_dry_run(
    random_bundle: tuple[Path, FakeTrained], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, trained = random_bundle
    _fast_export(monkeypatch, bundle)
    out = tmp_path / "b"
    export_bundle(trained, out, dry_run=True)
    assert not out.exists(), "a dry run writes nothing"
    first = export_bundle(trained, out).version
    with pytest.raises(ExportError, match="--overwrite"):
        export_bundle(trained, out)
    export_bundle(trained, out, overwrite=True, name="again")
    assert read_metadata(out).name == "again" and first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_compare_outputs_pass_fail_and_nan() -> None:
    ref = [np.array([1.0, 2.0]), np.array([1e-3, 0.0]), np.ones((2, 4, 4))]
    ok = compare_outputs(ref, [r + 1e-7 for r in ref], Tolerance())
    assert ok.passed and ok.max_abs_diff["anomaly_map"] == pytest.approx(1e-7)
    bad = compare_outputs(ref, [ref[0] * 1.1, ref[1], ref[2]], Tolerance())
    assert not bad.passed and bad.failures[0].startswith("residual_score differs by up to 0.2")
    assert compare_outputs(ref, [ref[0], ref[1], ref[2] * np.nan], Tolerance()).failures[0].startswith("anomaly_map")


def test_refuses_bad_inputs_before_exporting(tmp_path: Path, normals: list[str]) -> None:
    cfg = _tiny_config("skipganomaly")
    model = build_model(cfg).eval()
    with pytest.raises(ExportError, match="--parity-data"):
        export_bundle(FakeTrained(cfg, model, val_paths=[]), tmp_path / "a")
    with pytest.raises(ExportError, match="gone"):
        export_bundle(FakeTrained(cfg, model, val_paths=[str(tmp_path / "nope.png")]), tmp_path / "a")
    with pytest.raises(ExportError, match="bundle name"):
        export_bundle(FakeTrained(cfg, model, val_paths=normals), tmp_path / "a", name="../evil")
    with pytest.raises(ExportError, match="channel"):
        export_bundle(FakeTrained(cfg, model, val_paths=normals, mean=[0.5], std=[0.5]), tmp_path / "a")
    unresolved = _tiny_config("skipganomaly", align="auto")  # training records none or principal-axis
    with pytest.raises(ExportError, match="align is 'auto'"):
        export_bundle(FakeTrained(unresolved, model, val_paths=normals), tmp_path / "a")
    unresolved = _tiny_config("skipganomaly", roi="auto")  # training records none or part
    with pytest.raises(ExportError, match="roi is 'auto'"):
        export_bundle(FakeTrained(unresolved, model, val_paths=normals), tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_bundle(FakeTrained(cfg, model, val_paths=normals), tmp_path / "full")
    with pytest.raises(ExportError, match="opset"):
        export_mod.export_onnx(model.scoring_head(), _batch(normals[:2]), tmp_path / "m.onnx", opset=17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("training.checkpoint")
    from anoscope import cli

    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["squash", "tiles"])
def test_real_train_run_exports_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str], resize: str) -> None:
    """generate -> train (1 tiny epoch) -> export -> evaluate, all through the `anoscope` command; with
    tiles, on a dataset whose images are 2:1, so every step cuts two tiles per image."""
    pytest.importorskip("training.train")
    from anoscope import cli
    from training.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", n_train=12, n_test_good=3, n_test_defect=1, image_size=SIZE)
    if resize == "tiles":
        for path in data.rglob("*.png"):
            arr = np.asarray(Image.open(path))
            Image.fromarray(np.concatenate([arr, arr[:, ::-1] * ("_mask" not in path.name)], axis=1)).save(path)
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train = ["train", "--data", str(data), "--out", str(run), "--image-size", str(SIZE), "--base-width", "8"]
    options = ["--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--no-progress", "--resize", resize]
    assert cli.main([*train, *options]) == 0
    if resize == "tiles":
        assert "(27 and 9 tiles)" in capsys.readouterr().err, "9 training and 3 validation images, 3 tiles each"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(bundle), "--name", "e2e"]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out
    meta = read_metadata(bundle)
    assert meta.name == "e2e" and meta.provenance["parity"]["passed"] and meta.resize == resize
    assert meta.provenance["checkpoint"].endswith(("last.pt", "best.pt")) and meta.provenance["train_config"]
    assert ModelConfig.from_dict(meta.network).image_size == SIZE
    assert oct((bundle / MODEL_FILE).stat().st_mode & 0o777) == "0o644", "readable by a service user"
    report = tmp_path / "report"
    assert cli.main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(report)]) == 0
    assert (report / "report.json").is_file()
    assert cli.main(["calibrate", "--bundle", str(bundle), "--normals", str(data), "--target-fpr", "0.5"]) == 0
    assert read_metadata(bundle).calibrated, "the threshold is set on whole images, tiled or not"


def _parts(folder: Path, shapes: list[tuple[int, int, int]]) -> list[str]:
    """PNG parts of (width, height, grey) with a little noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h, grey) in enumerate(shapes):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.clip(rng.normal(grey, 6, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_aspect_baseline_is_fitted_on_training_normals_and_refits_the_image_threshold(tmp_path, toy_models):
    """Wide parts photographed brighter: the toy model's scores rise with the width, so export fits a
    baseline for both scores and refits the provisional image threshold on the validation normals;
    parts of one shape get none and keep everything as it was."""
    from tests.conftest import FakeEngine

    meta = read_metadata(toy_models / "toy")
    engine = FakeEngine(meta)
    widths = np.linspace(24, 120, 40).round().astype(int)
    train = _parts(tmp_path / "train", [(int(w), 48, 80 + int(w)) for w in widths])
    val = _parts(tmp_path / "val", [(48, 48, 128)] * 8)
    trained = FakeTrained(
        _tiny_config("skipganomaly"),
        None,
        score_stats=dict(meta.score_stats),
        score_weights=meta.score_weights,
        train_paths=train,
        val_paths=val,
    )
    stats, norm, note = export_mod._aspect_baseline(engine, trained, meta.normalization)
    assert stats["residual"].aspect_slope > 0 and stats["discrimination"].aspect_slope > 0
    assert stats["residual"].mean == meta.score_stats["residual"].mean  # the z-scoring stays the training's
    assert note["images"] == 40
    assert norm.pixel == meta.normalization.pixel
    assert norm.image.source.startswith("validation normals at export (8 images)")

    same_shape = _parts(tmp_path / "square", [(48, 48, 80 + int(w)) for w in widths])
    trained.train_paths = same_shape
    stats, norm, note = export_mod._aspect_baseline(engine, trained, meta.normalization)
    assert stats == dict(meta.score_stats) and norm == meta.normalization
    assert note["slopes"] == {"residual": 0.0, "discrimination": 0.0}

    trained.train_paths = [str(tmp_path / "moved" / Path(p).name) for p in train]  # the run's images moved
    stats, norm, note = export_mod._aspect_baseline(engine, trained, meta.normalization)
    assert note["images"] == 0 and stats == dict(meta.score_stats) and norm == meta.normalization
    assert "only 0 of 40" in export_mod._unread_warning(note)


def test_export_warns_of_unreadable_training_images_only_when_they_cost_the_aspect_baseline():
    assert export_mod._unread_warning(None) is None  # a bundle exported without the baseline
    assert export_mod._unread_warning({"images": 10, "unreadable": 0}) is None  # a small run, all read
    assert export_mod._unread_warning({"images": 150, "unreadable": 50}) is None  # enough were read to fit
    assert "only 3 of 40" in export_mod._unread_warning({"images": 3, "unreadable": 37})
