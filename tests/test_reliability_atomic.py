"""Nothing lost: bundle writes are atomic. A process killed (SIGKILL) at random moments while it rewrites a
bundle, a calibration killed mid-run, and a final write that fails all leave a bundle that loads, serves
and holds one whole version; a service reloading during continuous rewrites never sees a torn bundle.

Complements test_bundle.py (os.replace failing inside write_metadata) and test_calibrate.py (refused
runs leave the bundle byte-identical)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.bundle import Calibration, Thresholds, read_metadata, read_onnx_metadata, utc_now, write_metadata
from service.engine import OnnxEngine
from tests.toy_bundle import make_toy_bundle, toy_image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "service" / "assets" / "models" / "demo"

# Rewrites the bundle for ever: version "w<i>" always carries image threshold i, so a torn model.json shows.
WRITER = """
import sys
from pathlib import Path
from service.bundle import Calibration, Thresholds, read_metadata, utc_now, write_metadata
bundle = Path(sys.argv[1])
meta = read_metadata(bundle)
print("ready", flush=True)
i = int(sys.argv[2])
while True:
    i += 1
    cal = Calibration(date=utc_now(), strategy="kill-test", thresholds=Thresholds(image=float(i), pixel=0.5),
                      normalization=meta.normalization)
    write_metadata(bundle, meta.model_copy(update={"version": f"w{i}"}).with_calibration(cal))
"""


def assert_whole_and_loadable(bundle: Path) -> str:
    """The bundle parses, its model.json is one whole write, its ONNX mirror parses, and ONNX Runtime runs it."""
    meta = read_metadata(bundle)
    if meta.version.startswith("w"):
        assert meta.thresholds.image == float(meta.version[1:]), "model.json mixes two writes"
        assert meta.calibration is not None and meta.calibration.thresholds.image == meta.thresholds.image
    mirror = read_onnx_metadata(bundle / "model.onnx")
    assert mirror is not None  # written first: the same version as model.json or one ahead of it
    engine = OnnxEngine(bundle, providers=("cpu",), intra_op_threads=1)
    out = engine.run(np.zeros((1, meta.channels, meta.image_size, meta.image_size), np.float32))
    assert np.isfinite(out.residual_score).all()
    return meta.version


#: Kills before the test gives up on landing one inside a write: a kill lands inside one only some of the
#: time, and 60 misses in a row would mean the writes no longer go through temporary files.
MAX_KILLS = 60


@pytest.mark.slow
def test_sigkill_in_the_middle_of_bundle_writes_leaves_a_whole_loadable_bundle(tmp_path):
    bundle = tmp_path / "demo"
    shutil.copytree(DEMO, bundle)  # a 2 MB model.onnx: each rewrite takes long enough to be hit mid-way
    original = read_metadata(bundle).version
    rng = random.Random(8)
    seen = {original}
    # At least 10 kills, and on until one has landed inside a write (a kill between two writes leaves no
    # temporary file): how often one does depends on the disk and the load, not on the code under test.
    for kill in range(MAX_KILLS):
        if kill >= 10 and any(p.name.endswith(".tmp") for p in bundle.iterdir()):
            break
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(bundle), str(kill * 1000)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        seen.add(assert_whole_and_loadable(bundle))
    assert len(seen) >= 3  # writes completed between the kills
    leftovers = [p.name for p in bundle.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "no kill landed in the middle of a write"
    assert all(p.startswith((".model.json.", ".model.onnx.")) for p in leftovers), leftovers


@pytest.mark.slow
def test_a_service_reloading_during_continuous_rewrites_never_sees_a_torn_bundle(make_client, tmp_path, images):
    models = tmp_path / "models"
    make_toy_bundle(models / "toy")
    client = make_client(model_dir=models)
    meta = read_metadata(models / "toy")
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            cal = Calibration(date=utc_now(), strategy="reload-test", thresholds=Thresholds(image=float(i), pixel=0.5),
                              normalization=meta.normalization)  # fmt: skip
            write_metadata(models / "toy", meta.model_copy(update={"version": f"w{i}"}).with_calibration(cal))
            written.append(f"w{i}")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not written and time.monotonic() < deadline:  # reloads below compare against written versions
            time.sleep(0.01)
        versions = set()
        for _ in range(30):
            r = client.post("/v1/models/toy/reload")
            assert r.status_code == 200, r.text  # never a torn read: every reload finds one whole bundle
            model = r.json()["model"]
            assert model["thresholds"]["image"] == float(model["version"][1:])
            versions.add(model["version"])
            p = client.post("/v1/models/toy/predict", content=images.make(), headers={"Content-Type": "image/png"})
            assert p.status_code == 200 and p.json()["results"][0]["model"]["version"] == model["version"]
    finally:
        stop.set()
        thread.join()
    assert len(versions) > 5 and versions <= set(written)


def _normals(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(toy_image(48, defect=False, seed=i)).save(folder / f"n{i:04d}.png")
    return folder


@pytest.mark.slow
def test_calibrate_killed_at_random_moments_leaves_the_bundle_whole(tmp_path):
    bundle = make_toy_bundle(tmp_path / "toy", image_size=32)
    normals = _normals(tmp_path / "normals", 200)
    before = read_metadata(bundle)
    cmd = [sys.executable, "-m", "anoscope", "calibrate", "--bundle", str(bundle), "--normals", str(normals),
           "--providers", "cpu", "--no-plots", "--report-dir", str(tmp_path / "report")]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    full_s = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    calibrated = read_metadata(bundle)
    assert calibrated.calibrated and not before.calibrated
    rng = random.Random(3)
    for _ in range(6):
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * full_s)  # the write comes at the very end of a run
        proc.kill()
        proc.wait(timeout=30)
        after = read_metadata(bundle)
        assert_whole_and_loadable(bundle)
        assert after.calibrated and after.thresholds == calibrated.thresholds  # the same data calibrates the same
        assert len(after.calibration_history) >= len(calibrated.calibration_history)


def test_a_failing_final_write_keeps_the_previous_calibration_serving(tmp_path, monkeypatch, make_client, images):
    from anoscope import cli
    from service import bundle as bundle_module

    models = tmp_path / "models"
    bundle = make_toy_bundle(models / "toy", image_size=32)
    normals = _normals(tmp_path / "normals", 200)
    before = (bundle / "model.json").read_bytes()
    real_replace = bundle_module.os.replace

    def full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("model.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bundle_module.os, "replace", full_disk)
    code = cli.main(["calibrate", "--bundle", str(bundle), "--normals", str(normals), "--providers", "cpu",
                     "--no-plots", "--report-dir", str(tmp_path / "report")])  # fmt: skip
    monkeypatch.undo()
    assert code == 2
    assert (bundle / "model.json").read_bytes() == before  # the source of truth is untouched
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]
    assert_whole_and_loadable(bundle)
    client = make_client(model_dir=models)
    r = client.post("/v1/models/toy/predict", content=images.make(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["calibrated"] is False
