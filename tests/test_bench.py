"""`anoscope bench accuracy` and `bench latent-search`: what they run, what they write, what they reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SIZE = 64


@pytest.fixture(scope="module")
def anogan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data, run, bundle): a tiny AnoGAN trained two tiny epochs (GAN, then encoder) on generated data and exported."""
    from anoscope import cli
    from training.synthetic import generate_dataset

    tmp = tmp_path_factory.mktemp("latent")
    data = generate_dataset(tmp / "data", n_train=12, n_test_good=3, n_test_defect=3, image_size=SIZE)
    run, bundle = tmp / "run", tmp / "bundle"
    train = ["train", "--data", str(data), "--out", str(run), "--model", "anogan", "--image-size", str(SIZE)]
    common = ["--base-width", "8", "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.25"]
    assert cli.main([*train, *common, "--no-progress", "--threads", "1", "--seed", "0"]) == 0
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(bundle)]) == 0
    return data, run, bundle


def test_rows_share_the_images_and_the_encoder_agrees_across_runtimes(anogan_run: tuple[Path, Path, Path]) -> None:
    from training.latent_bench import run_latent_bench

    data, _, bundle = anogan_run
    rows = run_latent_bench(bundle, data, steps=(3,), inits=("encoder", "random"), log=lambda _: None)
    assert [r.scorer for r in rows] == [
        "encoder (ONNX Runtime)",
        "encoder (PyTorch)",
        "search 3 (encoder init)",
        "search 3 (random init)",
    ]
    from training.evaluate import load_samples

    assert {r.n_images for r in rows} == {len(load_samples(data))}
    onnx, eager = rows[0], rows[1]
    # Same head, same images: the ONNX graph and eager PyTorch rank the images identically.
    for field in ("image_auroc", "image_auroc_residual", "image_auroc_discrimination", "pixel_auroc"):
        assert getattr(onnx, field) == pytest.approx(getattr(eager, field), abs=1e-6), field
    for r in rows:
        assert r.seconds > 0 and r.image_auroc_residual is not None and 0 <= r.image_auroc_residual <= 1


def test_search_scorer_is_the_reference_search_and_random_init_is_seeded(anogan_run: tuple[Path, Path, Path]) -> None:
    import torch

    from models.anogan import latent_search
    from service.bundle import read_metadata
    from training.checkpoint import load_trained
    from training.export import load_images
    from training.latent_bench import TorchScorer

    _, run, bundle = anogan_run
    trained, meta = load_trained(run), read_metadata(bundle)
    images = load_images(trained.val_paths, image_size=SIZE, channels=3, mean=trained.mean, std=trained.std, limit=3)
    head = TorchScorer(trained.model, meta).run(images)
    search = TorchScorer(trained.model, meta, steps=5, lr=0.05, init="encoder").run(images)
    assert head.anomaly_map.shape == search.anomaly_map.shape == (len(images), SIZE, SIZE)
    expected = latent_search(trained.model, torch.from_numpy(images), steps=5, lr=0.05)
    for got, want in zip(
        (search.residual_score, search.discrimination_score, search.anomaly_map), expected, strict=True
    ):
        np.testing.assert_allclose(
            got, want.squeeze(1).numpy() if want.ndim == 4 else want.numpy(), rtol=1e-5, atol=1e-6
        )
    assert not np.array_equal(head.anomaly_map, search.anomaly_map), "the search must move z away from E(x)"

    def random(seed: int) -> np.ndarray:
        return TorchScorer(trained.model, meta, steps=2, init="random", seed=seed).run(images).residual_score

    np.testing.assert_array_equal(random(1), random(1))
    assert not np.array_equal(random(1), random(2))


def test_cli_writes_the_table_and_refuses_other_families(
    anogan_run: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anoscope import cli

    data, _, bundle = anogan_run
    doc, out = tmp_path / "bench.md", tmp_path / "out"
    doc.write_text("# Benchmarks\n\n<!-- bench:latent -->\nold\n<!-- /bench:latent -->\n\nafter\n")
    argv = ["bench", "latent-search", "--bundle", str(bundle), "--data", str(data), "--steps", "2", "--inits", "random"]
    assert cli.main([*argv, "--limit", "4", "--out", str(out), "--write-docs", str(doc), "--section", "latent"]) == 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n")
    assert "| search 2 (random init) |" in text and "| encoder (ONNX Runtime) |" in text
    assert [r["n_images"] for r in json.loads((out / "latent.json").read_text())] == [4, 4, 4]

    meta = json.loads((bundle / "model.json").read_text())
    other = tmp_path / "skip"
    other.mkdir()
    shutil.copy(bundle / "model.onnx", other / "model.onnx")
    (other / "model.json").write_text(json.dumps({**meta, "family": "skipganomaly"}))
    capsys.readouterr()
    assert cli.main(["bench", "latent-search", "--bundle", str(other), "--data", str(data)]) == 2
    assert "only for AnoGAN" in capsys.readouterr().err

    bad = ["--steps", "-1", "--limit", "1", "--batch-size", "0"]
    assert cli.main(["bench", "latent-search", "--bundle", str(bundle), "--data", str(data), *bad]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 0" in err and "--limit must be >= 2" in err and "--batch-size must be >= 1" in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ("--residual foo", "invalid choice: 'foo'"),
        ("--no-such-flag 3", "unrecognized"),
        ("--no-such-flag", "unrecognized"),  # one flag alone reaches the check, not argparse's "expected one argument"
        ("--w-struct 'x", "quotation"),
        ("--w-struct -1", "w_struct must not be negative"),  # a bad value, not only a bad flag
        ("--resume --out runs/x", "--resume (use bench's --out"),  # was a traceback: no checkpoint in runs/x
        ("--seed 3", "--seed (use bench's --seed)"),  # would silently win over the bench's own --seed
        ("--mod anogan", "--model (use bench's --families)"),  # an abbreviation is the same flag
        ("--seed 0", "--seed (use bench's --seed)"),  # 0 equals False: still given
        ("--dry-run", "--dry-run (a dry run trains nothing to evaluate)"),
    ],
)
def test_bench_accuracy_refuses_bad_train_args_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: str, says: str
) -> None:
    from anoscope import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "accuracy", "--train-args", flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--train-args" in err and says in err
    assert not (tmp_path / "out").exists()


def test_bench_accuracy_refuses_an_input_size_no_model_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anoscope import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "accuracy", "--image-size", "100", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--image-size: invalid choice: 100" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_accuracy_trains_exports_evaluates_and_reuses_finished_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accuracy bench end to end on a generated category, then again from its results.json."""
    from anoscope import cli
    from training.synthetic import generate_dataset

    generate_dataset(tmp_path / "sets" / "synth", n_train=12, n_test_good=3, n_test_defect=2, image_size=SIZE)
    out, doc = tmp_path / "out", tmp_path / "bench.md"
    argv = ["bench", "accuracy", "--datasets", str(tmp_path / "sets"), "--categories", "synth"]
    argv += ["--families", "skipganomaly", "--image-size", str(SIZE), "--budget", "3", "--threads", "1"]
    argv += ["--out", str(out), "--write-docs", str(doc), "--section", "acc"]
    argv += ["--train-args", "--w-struct 5 --residual l1+msgms"]  # an ablation's flags reach every run
    assert cli.main(argv) == 0
    config = json.loads((out / "runs" / f"synth-skipganomaly-default-{SIZE}" / "config.json").read_text())
    assert config["w_struct"] == 5 and config["model"]["residual"] == "l1+msgms"
    (row,) = json.loads((out / "results.json").read_text())
    assert row["error"] is None and 0 <= row["image_auroc"] <= 1 and row["pixel_auroc"] is not None
    assert 0 <= row["aupro"] <= 1
    assert 0 <= row["brightness_auroc"] <= 1, "the shortcut check is in every row"
    assert row["epochs"] >= 1 and 1 <= row["best_epoch"] <= row["epochs"] and 0 < row["best_s"] <= row["train_s"]
    assert row["device"] == "cpu (threads: 1)", "the device the run recorded"
    table = doc.read_text()
    assert "trained on: cpu (threads: 1)." in table
    assert f"| synth | skipganomaly | default | {SIZE} |" in table and "<!-- /bench:acc -->" in table

    log = out / f"synth-skipganomaly-default-{SIZE}.log"
    trained_once = log.read_text()
    capsys.readouterr()
    assert cli.main(argv) == 0, "a finished row is reused, not retrained"
    assert log.read_text() == trained_once

    # A results.json from before the shortcut column: the row is re-evaluated, not retrained.
    (out / "results.json").write_text(json.dumps([{**row, "brightness_auroc": None}]))
    assert cli.main(argv) == 0
    added = log.read_text()[len(trained_once) :]
    assert " anoscope evaluate " in added and " train " not in added
    assert json.loads((out / "results.json").read_text())[0]["brightness_auroc"] == row["brightness_auroc"]
    assert f"{row['epochs']} ({row['best_epoch']} at {row['best_s']:.0f})" in capsys.readouterr().out

    # A row on a lighting shortcut without its brightness-matched AUROC (older results): re-evaluated too.
    (out / "results.json").write_text(json.dumps([{**row, "brightness_auroc": 0.95}]))
    before = log.read_text()
    assert cli.main(argv) == 0
    assert " anoscope evaluate " in log.read_text()[len(before) :]

    # A results.json from before the device was recorded: read from the bundle, nothing rerun.
    (out / "results.json").write_text(json.dumps([{k: v for k, v in row.items() if k != "device"}]))
    before = log.read_text()
    assert cli.main(argv) == 0
    assert log.read_text() == before and json.loads((out / "results.json").read_text())[0]["device"] == row["device"]

    # A results.json from before the AUPRO column (no such key at all): re-evaluated, the column filled.
    old = {k: v for k, v in row.items() if k != "aupro"}
    (out / "results.json").write_text(json.dumps([old]))
    before = log.read_text()
    assert cli.main(argv) == 0
    assert " anoscope evaluate " in log.read_text()[len(before) :]
    assert json.loads((out / "results.json").read_text())[0]["aupro"] == pytest.approx(row["aupro"])

    # Without --image-size each family runs at its recommended size: here SIZE, so the row is reused.
    from training import bench

    monkeypatch.setattr(bench, "recommended_image_size", lambda family: SIZE)
    before = log.read_text()
    i = argv.index("--image-size")
    assert cli.main(argv[:i] + argv[i + 2 :]) == 0
    assert log.read_text() == before

    # A finished row of another size (its run folders are named by that size) is not this size's result.
    for folder in ("runs", "bundles", "reports"):
        shutil.rmtree(out / folder)
    (out / "results.json").write_text(json.dumps([{**row, "image_size": SIZE // 2}]))
    assert cli.main(argv) == 0
    assert " train " in log.read_text()[len(before) :]


def test_accuracy_table_shows_the_brightness_matched_auroc_and_an_honest_mean() -> None:
    from training.bench import AccuracyRow, accuracy_table

    rows = [
        AccuracyRow("bottle", "anogan", "default", 128, 600, image_auroc=0.9, brightness_auroc=0.4),
        AccuracyRow("screw", "anogan", "default", 128, 600, image_auroc=0.8, brightness_auroc=1.0, matched_auroc=0.5),
    ]
    table = accuracy_table(rows, "anoscope bench accuracy")
    screw = next(line for line in table.splitlines() if line.startswith("| screw "))
    assert "| 1.000 | 0.500 |" in screw
    bottle = next(line for line in table.splitlines() if line.startswith("| bottle "))
    assert "| 0.400 | – |" in bottle, "not measured where brightness does not separate the classes"
    mean = next(line for line in table.splitlines() if line.startswith("| **mean** "))
    assert "| 0.850 |" in mean and "| 0.700 ³ |" in mean, "the plain mean, and the mean with screw's matched AUROC"
    assert all(line.count("|") == 15 for line in table.splitlines() if line.startswith("|"))
    assert "trained on: not recorded." in table, "no row says what trained it: the table does not guess CPU"


def test_accuracy_table_names_the_devices_its_rows_were_trained_on() -> None:
    from training.bench import AccuracyRow, accuracy_table

    gpu, cpu = "cuda (NVIDIA H100 80GB HBM3)", "cpu (threads: 1)"
    rows = [AccuracyRow(c, "skipganomaly", "default", 256, 1800, device=gpu) for c in ("bottle", "screw")]
    assert f"trained on: {gpu}. Command" in accuracy_table(rows, "anoscope bench accuracy")
    rows.append(AccuracyRow("magnetic_tile", "skipganomaly", "default", 64, 600, device=cpu))
    assert f"trained on: {cpu}, {gpu}. Command" in accuracy_table(rows, "anoscope bench accuracy")


def test_holdout_rules_choose_without_the_held_out_kind_and_score_it() -> None:
    """Two kinds only the residual sees and one only the discrimination sees: every rule, choosing on
    the other kinds, picks the residual for the third kind's hold-out and loses there."""
    from service.postprocess import fit_score_stats
    from training.selection_bench import FIXED_RULES, RULES, holdout

    rng = np.random.default_rng(0)
    negatives = (rng.normal(0, 1, 200), rng.normal(0, 1, 200))
    stats = fit_score_stats(*negatives)

    def kind(residual_shift: float, discrimination_shift: float) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(residual_shift, 1, 100), rng.normal(discrimination_shift, 1, 100)

    per_kind = {"a": kind(4, 0), "b": kind(4, 0), "c": kind(0, 4)}
    out = holdout(per_kind, negatives, stats)
    assert set(out) == set(RULES) and all(len(v) == 3 for v in out.values())
    pooled = {k: (w, a) for k, w, a in out["pooled"]}
    assert pooled["c"][0] == "1,0" and pooled["c"][1] < 0.6, "chosen on a and b, the residual misses c"
    assert pooled["a"][0] in ("1,1", "2,1", "1,2") and pooled["a"][1] > 0.9, "b and c together want both scores"
    for rule in FIXED_RULES:
        assert {w for _, w, _ in out[rule]} == {rule}
    both = np.mean([a for _, _, a in out["1,1"]])
    assert both > np.mean([a for _, _, a in out["1,0"]]) and both > np.mean([a for _, _, a in out["0,1"]])


def test_selection_bench_writes_every_rule_for_a_run(anogan_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from anoscope import cli
    from training.selection_bench import RULES

    _, run, _ = anogan_run
    out, doc = tmp_path / "rows.json", tmp_path / "bench.md"
    argv = ["bench", "selection", str(run), "--copies", "1", "--threads", "1", "--out", str(out)]
    assert cli.main([*argv, "--write-docs", str(doc)]) == 0
    rows = json.loads(out.read_text())
    assert [r["rule"] for r in rows] == list(RULES)
    from training.selection import SELECTION_KINDS

    for r in rows:
        assert set(r["chosen"]) == set(SELECTION_KINDS) and 0 <= r["min_auroc"] <= r["mean_auroc"] <= 1
    text = doc.read_text()
    assert "<!-- bench:selection-holdout -->" in text and f"| {run.name} |" in text
    assert cli.main(["bench", "selection", str(tmp_path)]) == 2, "a folder without checkpoints is refused"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert cli.main(["bench", "selection", str(tmp_path / "empty")]) == 2, "a run with no checkpoint file is an error"


def test_reduction_bench_rescores_every_reduction_as_the_run_selected(
    anogan_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from anoscope import cli
    from training.checkpoint import load_trained
    from training.reduction_bench import REDUCTIONS, study_run

    data, run, _ = anogan_run
    rows = study_run(run, batch_size=8, data=data)
    assert [r.reduction for r in rows] == list(REDUCTIONS)
    for r in rows:
        assert 0 <= r.synthetic_auroc <= 1 and 0 <= r.test_auroc <= 1
        assert r.weights in {"1/0", "0/1", "1/1", "2/1", "1/2"}
    exported = load_trained(run)
    same = next(r for r in rows if r.reduction == exported.model_config.score_reduction)
    # Under the run's own reduction the bench rebuilds the run's selection: same set, same choice, same AUROC.
    assert same.weights == f"{exported.score_weights.residual:g}/{exported.score_weights.discrimination:g}"
    assert same.synthetic_auroc == pytest.approx(exported.provenance["selection"]["image_auroc"], abs=1e-6)
    # A margin no gain can clear keeps both scores under every reduction (--margin-z overrides the run's).
    assert {r.weights for r in study_run(run, batch_size=8, data=data, margin_z=1e9)} == {"1/1"}
    out, doc = tmp_path / "rows.json", tmp_path / "bench.md"
    argv = ["bench", "reduction", str(run), "--data", str(data), "--threads", "1", "--out", str(out)]
    assert cli.main([*argv, "--write-docs", str(doc)]) == 0
    assert [r["reduction"] for r in json.loads(out.read_text())] == list(REDUCTIONS)
    assert "<!-- bench:reduction -->" in doc.read_text()
    assert cli.main(["bench", "reduction", str(tmp_path)]) == 2, "a folder without checkpoints is refused"


def test_studies_of_a_run_without_validation_normals_say_why_they_cannot_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from training.train import validation_normals

    no_normals = SimpleNamespace(val_paths=[])
    with pytest.raises(ValueError, match=r"run kept no validation normals \(--val-fraction 0\)"):
        validation_normals(no_normals, tmp_path / "run")  # type: ignore[arg-type]
