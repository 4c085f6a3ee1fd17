"""The bundle format: validation, atomic writes, the ONNX mirror, calibration history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bundle import (
    METADATA_FILE,
    MODEL_FILE,
    Calibration,
    Normalization,
    NormalizationPair,
    Thresholds,
    read_metadata,
    read_onnx_metadata,
    utc_now,
    write_metadata,
)
from service.errors import BundleError, BundleSchemaError
from tests.toy_bundle import make_toy_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_toy_bundle(tmp_path / "toy")


def _calibration(t: float) -> Calibration:
    norm = Normalization(threshold=t, min=t - 1, max=t + 1, source="test")
    return Calibration(
        date=utc_now(),
        strategy="manual",
        thresholds=Thresholds(image=t, pixel=0.5),
        normalization=NormalizationPair(image=norm, pixel=Normalization(threshold=0.5, min=0, max=1, source="t")),
    )


def test_round_trip_and_onnx_mirror_agree(bundle: Path) -> None:
    meta = read_metadata(bundle)
    assert meta.name == "toy"
    assert meta.thresholds.image is None and not meta.calibrated
    assert read_onnx_metadata(bundle / MODEL_FILE) == meta


def test_calibration_moves_previous_one_to_history(bundle: Path) -> None:
    meta = read_metadata(bundle).with_calibration(_calibration(1.0))
    write_metadata(bundle, meta)
    meta = read_metadata(bundle).with_calibration(_calibration(2.0))
    write_metadata(bundle, meta)
    reread = read_metadata(bundle)
    assert reread.calibrated and reread.thresholds.image == 2.0
    assert reread.normalization.image.threshold == 2.0
    assert [c.thresholds.image for c in reread.calibration_history] == [1.0]
    assert read_onnx_metadata(bundle / MODEL_FILE) == reread


def test_failed_write_leaves_previous_files_intact(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {f: (bundle / f).read_bytes() for f in (METADATA_FILE, MODEL_FILE)}

    def boom(*_args: object, **_kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("service.bundle.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_metadata(bundle, read_metadata(bundle).with_calibration(_calibration(3.0)))
    assert {f: (bundle / f).read_bytes() for f in before} == before
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")], "temporary files were left behind"


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda b: (b / METADATA_FILE).unlink(), BundleError, "model.json is missing"),
        (lambda b: (b / MODEL_FILE).unlink(), BundleError, "model.onnx is missing"),
        (lambda b: (b / METADATA_FILE).write_text("{not json"), BundleError, "not valid JSON"),
        (lambda b: (b / METADATA_FILE).write_text("[]"), BundleError, "JSON object"),
    ],
)
def test_broken_bundles_say_what_is_wrong(bundle: Path, mutate, error, match) -> None:  # type: ignore[no-untyped-def]
    mutate(bundle)
    with pytest.raises(error, match=match):
        read_metadata(bundle)


def test_other_schema_version_is_refused_with_advice(bundle: Path) -> None:
    raw = json.loads((bundle / METADATA_FILE).read_text())
    raw["schema_version"] = 99
    (bundle / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleSchemaError, match=r"schema_version 99.*Re-export"):
        read_metadata(bundle)


def test_unknown_fields_are_refused(bundle: Path) -> None:
    raw = json.loads((bundle / METADATA_FILE).read_text())
    raw["surprise"] = 1
    (bundle / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleSchemaError, match="surprise"):
        read_metadata(bundle)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        read_metadata(tmp_path / "nope")


def test_rewrites_keep_files_readable_by_other_users(bundle: Path) -> None:
    write_metadata(bundle, read_metadata(bundle).with_calibration(_calibration(1.0)))
    for name in (METADATA_FILE, MODEL_FILE):
        assert (bundle / name).stat().st_mode & 0o044 == 0o044, f"{name} is not group/other readable"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(bundle: Path) -> None:
    import os
    import time

    old = bundle / ".model.json.abc123.tmp"  # what a writer killed mid-write leaves behind
    fresh = bundle / ".model.json.def456.tmp"  # a writer at work right now
    other = bundle / ".notes.txt.abc123.tmp"  # a file this write does not touch
    for f in (old, fresh, other):
        f.write_text("partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    write_metadata(bundle, read_metadata(bundle))
    assert not old.exists()
    assert fresh.exists() and other.exists()
