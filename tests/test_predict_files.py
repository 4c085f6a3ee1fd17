"""`anoscope predict`: files scored offline give the service's own answer, and a folder's bad files are
reported without stopping the rest."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest

from anoscope import cli
from service import predict_files
from service.datasets import DatasetError


@pytest.fixture
def parts(tmp_path: Path, images) -> Path:
    """A folder of three images of different sizes (two defective) and one file that is no image."""
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a-defect.png").write_bytes(images.make(64, 48, defect=True, seed=1))
    (folder / "b-good.png").write_bytes(images.make(80, 80, defect=False, seed=2))
    (folder / "c-broken.png").write_bytes(b"not an image at all")
    (folder / "d-defect.jpg").write_bytes(images.make(40, 72, defect=True, fmt="JPEG", seed=3))
    return folder


def _predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_records_are_the_services_answers(make_client, model_dir, calibrate_bundle, parts, capsys, tmp_path):
    bundle = model_dir / "toy"
    calibrate_bundle(bundle, image_threshold=0.5)
    out = tmp_path / "out"
    code, _, err = _predict(
        capsys, "--bundle", str(bundle), str(parts), "--out", str(out), "--heatmap", "overlay", "--providers", "cpu"
    )
    assert code == 1, err  # the broken file is reported, the rest scored
    records = [json.loads(line) for line in (out / predict_files.JSONL_FILE).read_text().splitlines()]
    assert [Path(r["filename"]).name for r in records] == ["a-defect.png", "b-good.png", "c-broken.png", "d-defect.jpg"]
    assert "not an image" in records[2]["error"]

    # the same images through the HTTP API of a service on the same bundle
    api = make_client(model_dir=model_dir)
    for record in (records[0], records[1], records[3]):
        path = Path(record["filename"])
        r = api.post(
            "/v1/models/toy/predict?heatmap=overlay&regions=true", files=[("files", (path.name, path.read_bytes()))]
        )
        assert r.status_code == 200, r.text
        served = r.json()["results"][0]
        for key in ("anomaly_score", "residual_score", "discrimination_score", "is_anomalous", "threshold"):
            assert record[key] == pytest.approx(served[key], rel=1e-6), key
        assert record["regions"] == served["regions"]
        assert record["model"] == served["model"]
        assert (out / record["heatmap"]).read_bytes() == base64.b64decode(served["heatmap"])
    assert records[0]["is_anomalous"] is True and records[1]["is_anomalous"] is False

    rows = list(csv.DictReader((out / predict_files.CSV_FILE).open(encoding="utf-8")))
    assert [r["error"] != "" for r in rows] == [False, False, True, False]
    assert rows[0]["is_anomalous"] == "true" and int(rows[0]["regions"]) >= 1
    assert rows[0]["largest_region"] == " ".join(
        str(records[0]["regions"][0][k]) for k in ("x", "y", "width", "height")
    )
    assert "2 anomalous" in err and "1 file could not be scored" in err and "c-broken.png" in err


def test_batches_do_not_change_the_answers(toy_models, parts, capsys):
    bundle = str(toy_models / "toy")
    runs = []
    for batch in ("1", "3", "16"):
        code, out, _ = _predict(capsys, "--bundle", bundle, str(parts), "--batch-size", batch, "--providers", "cpu")
        assert code == 1
        runs.append([{k: v for k, v in json.loads(line).items() if k != "timings_ms"} for line in out.splitlines()])
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0]["is_anomalous"] is None  # uncalibrated: no verdict, and stderr says how to get one


def test_uncalibrated_bundle_says_how_to_calibrate(toy_models, images, tmp_path, capsys):
    path = tmp_path / "one.png"
    path.write_bytes(images.make())
    code, out, err = _predict(capsys, "--bundle", str(toy_models / "toy"), str(path), "--providers", "cpu")
    assert code == 0
    assert json.loads(out)["calibrated"] is False
    assert "anoscope calibrate" in err and "no verdicts" in err


def test_collect_orders_deduplicates_and_descends_only_when_asked(tmp_path, images):
    top = tmp_path / "line"
    (top / "cam2").mkdir(parents=True)
    for name in ("b.png", "a.PNG", "notes.txt"):
        (top / name).write_bytes(images.make())
    (top / "cam2" / "a.png").write_bytes(images.make())
    flat = predict_files.collect([top, top / "b.png"])
    assert [i.path.name for i in flat] == ["a.PNG", "b.png"]  # b.png named twice, scored once
    deep = predict_files.collect([top], recursive=True)
    assert [i.name.as_posix() for i in deep] == ["line/a.PNG", "line/b.png", "line/cam2/a.png"]


def test_heatmap_names_stay_unique(tmp_path):
    items = [predict_files.Item(tmp_path / d / "x.png", Path("x.png")) for d in ("1", "2", "3")]
    names = [n.as_posix() for n in predict_files.heatmap_names(items)]
    assert names == ["heatmaps/x.png", "heatmaps/x-2.png", "heatmaps/x-3.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{empty}"], "--recursive"),
        (["{image}", "--heatmap", "png"], "needs --out"),
        (["{image}", "--batch-size", "0"], "at least 1"),
    ],
)
def test_usage_errors_exit_2_and_say_what_to_fix(toy_models, tmp_path, images, capsys, argv, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.png").write_bytes(images.make())
    (tmp_path / "x.png").write_bytes(images.make())
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "image": tmp_path / "x.png"}
    argv = [a.format(**paths) for a in argv]
    code, _, err = _predict(capsys, "--bundle", str(toy_models / "toy"), *argv)
    assert code == 2
    assert message in err


def test_a_folder_without_images_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="holds no image files"):
        predict_files.collect([tmp_path])


def test_an_image_over_the_pixel_limit_is_skipped_with_the_option_to_raise_it(toy_models, parts, capsys):
    code, out, err = _predict(
        capsys, "--bundle", str(toy_models / "toy"), str(parts), "--max-pixels", "3500", "--providers", "cpu"
    )
    assert code == 1
    records = {Path(r["filename"]).name: r for r in map(json.loads, out.splitlines())}
    assert "--max-pixels" in records["b-good.png"]["error"]  # 80 x 80 = 6400 pixels
    assert "anomaly_score" in records["a-defect.png"] and "anomaly_score" in records["d-defect.jpg"]  # 3072, 2880
    assert "2 files could not be scored" in err


def test_a_tiling_bundle_answers_as_the_service_does(make_client, tmp_path, images, capsys):
    """Long images cut into several tiles: batches of model inputs no longer match images one to one."""
    from tests.toy_bundle import make_toy_bundle

    models = tmp_path / "models"
    make_toy_bundle(models / "tiles", resize="tiles")
    folder = tmp_path / "long"
    folder.mkdir()
    for i, (w, h) in enumerate([(160, 40), (40, 40), (48, 150)]):
        (folder / f"{i}.png").write_bytes(images.make(w, h, defect=bool(i % 2 == 0), seed=i))
    code, out, _ = _predict(
        capsys, "--bundle", str(models / "tiles"), str(folder), "--batch-size", "2", "--providers", "cpu"
    )
    assert code == 0
    api = make_client(model_dir=models)
    for record in map(json.loads, out.splitlines()):
        path = Path(record["filename"])
        r = api.post("/v1/models/tiles/predict?regions=true", files=[("files", (path.name, path.read_bytes()))])
        served = r.json()["results"][0]
        assert record["anomaly_score"] == pytest.approx(served["anomaly_score"], rel=1e-6)
        assert record["regions"] == served["regions"]


def test_the_score_plot_has_one_histogram_per_folder_given(toy_models, parts, images, tmp_path, capsys):
    loose = tmp_path / "loose.png"
    loose.write_bytes(images.make(defect=False))
    assert [i.group for i in predict_files.collect([parts, loose])] == ["parts"] * 4 + [predict_files.FILES_GROUP]
    out = tmp_path / "out"
    _predict(capsys, "--bundle", str(toy_models / "toy"), str(parts), str(loose), "--out", str(out))
    assert (out / predict_files.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    labels = predict_files.plot_scores(
        tmp_path / "p.png", {"good": [0.1, 0.2, 0.5], "crack": [0.7, 0.4]}, calibrated=False, title="t"
    )
    assert labels == [
        "good: 3 images, 1 at or above the threshold",
        "crack: 2 images, 1 at or above the threshold",
        "provisional threshold (bundle not calibrated)",
    ]


def test_an_interrupted_run_keeps_what_it_scored(toy_models, parts, tmp_path, capsys, monkeypatch):
    real = predict_files.predict_items

    def interrupted(*args, **kwargs):
        outcomes = real(*args, **kwargs)
        yield next(outcomes)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_files, "predict_items", interrupted)
    out = tmp_path / "out"
    code, _, err = _predict(capsys, "--bundle", str(toy_models / "toy"), str(parts), "--out", str(out))
    assert code == 130 and "interrupted" in err and str(out / predict_files.JSONL_FILE) in err
    lines = (out / predict_files.JSONL_FILE).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["filename"].endswith("a-defect.png")
