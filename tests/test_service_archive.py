"""ANOSCOPE_ARCHIVE_DIR: flagged images (and every Nth other one) kept with their answers, in folders
`anoscope calibrate` reads, bounded on disk, and never in the way of an answer."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from tests.test_service_metrics import sample

PNG = {"Content-Type": "image/png"}


def post(client, *uploads: bytes, model: str = "toy") -> list[dict]:
    files = [("files", (f"part-{i}.img", data, "application/octet-stream")) for i, data in enumerate(uploads)]
    r = client.post(f"/v1/models/{model}/predict", files=files)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def drained(client) -> None:
    assert client.app.state.predictor.archive.drain(timeout=10)


def kept(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix != ".json") if folder.is_dir() else []


def test_flagged_images_are_kept_byte_for_byte_with_their_answers(
    make_client, model_dir, images, calibrate_bundle, tmp_path
):
    from service.calibration_data import resolve_data

    calibrate_bundle(model_dir / "toy")
    archive = tmp_path / "archive"
    client = make_client(model_dir=model_dir, archive_dir=archive)
    bad_png, bad_jpeg, good = images.make(seed=1), images.make(fmt="JPEG", seed=2), images.make(defect=False)
    results = post(client, bad_png, good, bad_jpeg)
    assert [r["is_anomalous"] for r in results] == [True, False, True]
    drained(client)

    flagged = kept(archive / "toy" / "flagged")
    assert [p.suffix for p in flagged] == [".png", ".jpg"]  # in the order answered, named by time
    assert [p.read_bytes() for p in flagged] == [bad_png, bad_jpeg]
    for path, result in zip(flagged, (results[0], results[2]), strict=True):
        record = json.loads(path.with_suffix(".json").read_text())
        assert record["filename"] == result["filename"] and record["anomaly_score"] == result["anomaly_score"]
        assert record["is_anomalous"] is True and "heatmap" not in record and record["archived_at"]
    assert not (archive / "toy" / "passed").exists(), "only flagged images unless archive_passed_every is set"
    text = client.get("/metrics").text
    assert sample(text, "anoscope_archived_images_total", model="toy", folder="flagged") == 2

    # the folders are what `anoscope calibrate` reads: the flagged ones as defects once reviewed
    normals = tmp_path / "normals"
    normals.mkdir()
    (normals / "good.png").write_bytes(good)
    data = resolve_data(normals, archive / "toy" / "flagged", None)
    assert sorted(s.path for s in data.defects) == flagged


def test_every_nth_other_image_is_kept_as_passed_or_unjudged(
    make_client, model_dir, images, calibrate_bundle, tmp_path
):
    archive = tmp_path / "archive"
    client = make_client(model_dir=model_dir, archive_dir=archive, archive_passed_every=2)
    goods = [images.make(defect=False, seed=i) for i in range(5)]
    assert all(r["is_anomalous"] is None for r in post(client, *goods))  # not calibrated yet
    drained(client)
    assert [p.read_bytes() for p in kept(archive / "toy" / "unjudged")] == [goods[0], goods[2], goods[4]]
    assert not (archive / "toy" / "flagged").exists() and not (archive / "toy" / "passed").exists()

    calibrate_bundle(model_dir / "toy")
    assert client.post("/v1/models/toy/reload").status_code == 200
    assert all(r["is_anomalous"] is False for r in post(client, *goods[:2]))
    drained(client)
    assert [p.read_bytes() for p in kept(archive / "toy" / "passed")] == [goods[1]]  # the count runs on


def test_each_folder_keeps_at_most_max_files_the_oldest_going_first(
    make_client, model_dir, images, calibrate_bundle, tmp_path
):
    calibrate_bundle(model_dir / "toy")
    archive = tmp_path / "archive"
    (archive / "toy" / "flagged").mkdir(parents=True)
    (archive / "toy" / "flagged" / "00000000T000000000000Z-000001.png").write_bytes(images.make())  # a past run's
    (archive / "toy" / "flagged" / "20990101T000000000000Z-000009.png.part").write_bytes(b"cut short")
    client = make_client(model_dir=model_dir, archive_dir=archive, archive_max_files=2)
    uploads = [images.make(seed=i) for i in range(3)]
    for data in uploads:
        post(client, data)
    drained(client)
    folder = archive / "toy" / "flagged"
    assert [p.read_bytes() for p in kept(folder)] == uploads[1:]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [p.name for p in kept(folder)] + [p.with_suffix(".json").name for p in kept(folder)]
    ), "no answer without its image, no part-written file"


def test_a_stuck_disk_drops_images_instead_of_delaying_answers(
    make_client, model_dir, images, calibrate_bundle, tmp_path, monkeypatch
):
    from service.app import archive as archive_module

    calibrate_bundle(model_dir / "toy")
    stuck = threading.Event()
    monkeypatch.setattr(archive_module, "_write_atomic", lambda path, data: stuck.wait(10))
    monkeypatch.setattr(archive_module, "QUEUE_IMAGES", 2)
    client = make_client(model_dir=model_dir, archive_dir=tmp_path / "archive")
    start = time.perf_counter()
    for i in range(10):
        post(client, images.make(seed=i))
    assert time.perf_counter() - start < 3, "answers must not wait for the disk"
    dropped = sample(client.get("/metrics").text, "anoscope_archive_dropped_total", model="toy")
    assert dropped >= 7  # one being written, two queued, the rest dropped
    stuck.set()
    drained(client)


def test_the_queue_is_bounded_in_bytes_as_well_as_images(
    make_client, model_dir, images, calibrate_bundle, tmp_path, monkeypatch
):
    from service.app import archive as archive_module

    calibrate_bundle(model_dir / "toy")
    stuck = threading.Event()
    monkeypatch.setattr(archive_module, "_write_atomic", lambda path, data: stuck.wait(10))
    uploads = [images.make(seed=i) for i in range(6)]
    monkeypatch.setattr(archive_module, "QUEUE_BYTES", 2 * max(map(len, uploads)))  # room for two at most
    client = make_client(model_dir=model_dir, archive_dir=tmp_path / "archive")
    archive = client.app.state.predictor.archive
    for data in uploads:
        post(client, data)
    assert sample(client.get("/metrics").text, "anoscope_archive_dropped_total", model="toy") >= 4
    stuck.set()
    drained(client)
    assert archive._queued_bytes == 0, "every byte counted in is counted out once written"


def test_a_failing_disk_is_counted_and_the_writer_goes_on(
    make_client, model_dir, images, calibrate_bundle, tmp_path, monkeypatch
):
    from service.app import archive as archive_module

    calibrate_bundle(model_dir / "toy")
    real = archive_module._write_atomic
    calls = {"n": 0}

    def full_once(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first image, after its answer was written
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(archive_module, "_write_atomic", full_once)
    archive = tmp_path / "archive"
    client = make_client(model_dir=model_dir, archive_dir=archive)
    post(client, images.make(seed=1))
    post(client, images.make(seed=2))
    drained(client)
    text = client.get("/metrics").text
    assert sample(text, "anoscope_archive_failures_total", model="toy") == 1
    assert sample(text, "anoscope_archived_images_total", model="toy", folder="flagged") == 1
    assert [p.read_bytes() for p in kept(archive / "toy" / "flagged")] == [images.make(seed=2)]
    assert len(list((archive / "toy" / "flagged").glob("*.json"))) == 1, "the failed image's answer is gone too"


def test_an_unwritable_archive_folder_leaves_the_service_answering(
    make_client, model_dir, images, tmp_path, caplog: pytest.LogCaptureFixture
):
    not_a_folder = tmp_path / "archive"
    not_a_folder.write_text("a file where the folder should be")
    with caplog.at_level(logging.ERROR, logger="service.app"):
        client = make_client(model_dir=model_dir, archive_dir=not_a_folder)
        assert client.post("/v1/predict", content=images.make(), headers=PNG).status_code == 200
    assert client.app.state.predictor.archive is None
    assert any("archiving is off" in r.message and "ANOSCOPE_ARCHIVE_DIR" in r.message for r in caplog.records)


def test_formats_calibrate_does_not_list_are_kept_as_png(make_client, model_dir, images, calibrate_bundle, tmp_path):
    import io

    from PIL import Image

    calibrate_bundle(model_dir / "toy")
    archive = tmp_path / "archive"
    client = make_client(model_dir=model_dir, archive_dir=archive)
    webp = images.make(fmt="WEBP")
    post(client, webp)
    drained(client)
    (path,) = kept(archive / "toy" / "flagged")
    assert path.suffix == ".png"
    with Image.open(path) as stored, Image.open(io.BytesIO(webp)) as sent:
        assert stored.size == sent.size and stored.format == "PNG"
