"""Loading and reloading bundles: atomic swaps, broken bundles leave the old model serving."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.bundle import read_metadata, write_metadata
from tests.toy_bundle import make_toy_bundle

PNG = {"Content-Type": "image/png"}


def _predict(client, images, name="toy"):
    return client.post(f"/v1/models/{name}/predict", content=images.make(), headers=PNG)


def _bump_version(bundle, version):
    write_metadata(bundle, read_metadata(bundle).model_copy(update={"version": version}))


def test_a_good_reload_swaps_in_the_new_version(make_client, model_dir, images):
    client = make_client(model_dir=model_dir)
    old = client.get("/v1/models/toy").json()["version"]
    _bump_version(model_dir / "toy", "v2-test")
    assert _predict(client, images).json()["results"][0]["model"]["version"] == old  # not before the reload

    r = client.post("/v1/models/toy/reload")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["previous_version"] == old
    assert body["model"]["version"] == "v2-test" and body["model"]["state"] == "ready"
    assert _predict(client, images).json()["results"][0]["model"]["version"] == "v2-test"
    assert client.get("/v1/models/toy").json()["version"] == "v2-test"


def _corrupt_onnx(bundle):
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes()[:100])


def _drop_json(bundle):
    (bundle / "model.json").unlink()


def _future_schema(bundle):
    meta = json.loads((bundle / "model.json").read_text())
    meta["schema_version"] = 99
    (bundle / "model.json").write_text(json.dumps(meta))


BREAKAGES = {
    "truncated model.onnx": (_corrupt_onnx, "could not be loaded by ONNX Runtime"),
    "missing model.json": (_drop_json, "is not a bundle: model.json is missing (create one with `anoscope export`)"),
    "incompatible schema version": (_future_schema, "has schema_version 99; this anoscope reads version 1"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_bundle_leaves_the_old_model_serving_with_a_clear_error(make_client, model_dir, images, breakage):
    client = make_client(model_dir=model_dir)
    old = client.get("/v1/models/toy").json()["version"]
    before = _predict(client, images).json()["results"][0]
    breaker, message = BREAKAGES[breakage]
    breaker(model_dir / "toy")

    r = client.post("/v1/models/toy/reload")
    assert r.status_code == 409
    body = r.json()
    assert body["type"] == "urn:anoscope:problem:reload-failed" and body["title"] == "Reload failed"
    assert body["model"] == "toy" and body["serving_version"] == old
    assert body["detail"].startswith(
        f"reloading model toy from {model_dir / 'toy'} failed, version {old} keeps serving: "
    )
    assert message in body["detail"]

    after = _predict(client, images)
    assert after.status_code == 200
    assert after.json()["results"][0]["anomaly_score"] == before["anomaly_score"]
    assert after.json()["results"][0]["model"]["version"] == old
    assert client.get("/readyz").status_code == 200
    assert 'anoscope_model_reload_failures_total{model="toy"} 1.0' in client.get("/metrics").text


def test_requests_in_flight_during_a_reload_all_succeed(make_client, model_dir, images, fake_engines):
    """A reload under load: every request answers 200, from the old or the new version."""
    fakes = fake_engines(delay_s=0.01)
    client = make_client(model_dir=model_dir, engine_factory=fakes)
    old = client.get("/v1/models/toy").json()["version"]
    old_entry = client.app.state.registry.get("toy")
    _bump_version(model_dir / "toy", "v2-test")
    stop = threading.Event()

    def camera():
        statuses, versions = [], set()
        while not stop.is_set():
            r = _predict(client, images)
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.add(r.json()["results"][0]["model"]["version"])
        return statuses, versions

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(camera) for _ in range(4)]
        time.sleep(0.2)
        assert client.post("/v1/models/toy/reload").status_code == 200
        time.sleep(0.2)
        stop.set()
        results = [f.result() for f in futures]
    statuses = [s for st, _ in results for s in st]
    versions = set().union(*(v for _, v in results))
    assert statuses and set(statuses) == {200}
    assert versions == {old, "v2-test"}
    deadline = time.time() + 5
    while not old_entry.batcher.stopped and time.time() < deadline:
        time.sleep(0.01)
    assert old_entry.batcher.stopped  # the old model was closed once its last request was answered
    assert old_entry.active == 0 and old_entry.retired


def test_one_broken_bundle_at_start_up_does_not_take_the_others_down(make_client, tmp_path, images, caplog):
    caplog.set_level(logging.INFO)
    make_toy_bundle(tmp_path / "good")
    make_toy_bundle(tmp_path / "bad")
    _corrupt_onnx(tmp_path / "bad")
    (tmp_path / "notabundle").mkdir()
    client = make_client(model_dir=tmp_path, default_model="good")

    assert _predict(client, images, "good").status_code == 200
    listing = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listing["good"]["state"] == "ready"
    assert listing["bad"]["state"] == "failed" and "could not be loaded by ONNX Runtime" in listing["bad"]["error"]
    assert listing["notabundle"]["error"].endswith("is not a bundle: model.json is missing (create one with "
                                                   "`anoscope export`)")  # fmt: skip
    r = _predict(client, images, "bad")
    assert r.status_code == 503 and r.json()["title"] == "Model not ready"
    assert r.json()["detail"].startswith("model bad failed to load: ")
    assert r.json()["detail"].endswith("Fix the bundle, then POST /v1/models/bad/reload")
    assert client.get("/v1/models/bad").json()["state"] == "failed"
    ready = client.get("/readyz").json()
    assert [m["name"] for m in ready["models"]] == ["good"] and ready["failed"] == ["bad", "notabundle"]

    assert "model good loaded: version" in caplog.text and "provider CPUExecutionProvider" in caplog.text
    assert "model bad failed to load from" in caplog.text

    # Fix the bundle on disk; a reload brings it up without a restart.
    make_toy_bundle(tmp_path / "bad", name="bad")
    fixed = client.post("/v1/models/bad/reload")
    assert fixed.status_code == 200 and fixed.json()["previous_version"] is None
    assert _predict(client, images, "bad").status_code == 200


def test_a_new_bundle_dropped_in_can_be_loaded_by_reload(make_client, model_dir, images):
    client = make_client(model_dir=model_dir)
    assert _predict(client, images, "late").status_code == 404
    make_toy_bundle(model_dir / "late", name="late")
    assert client.post("/v1/models/late/reload").status_code == 200
    assert _predict(client, images, "late").status_code == 200


def test_no_loadable_model_means_not_ready(make_client, tmp_path):
    make_toy_bundle(tmp_path / "only")
    _corrupt_onnx(tmp_path / "only")
    client = make_client(model_dir=tmp_path)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["detail"] == (
        "no model is loaded and warm yet; failed to load: only. GET /v1/models says why; fix the bundles and "
        "reload them"
    )
    assert client.get("/healthz").status_code == 200


def test_a_missing_model_directory_fails_the_start_up(make_settings, tmp_path):
    from fastapi.testclient import TestClient

    from service.app.main import create_app
    from service.errors import BundleError

    app = create_app(make_settings(model_dir=tmp_path / "nowhere"))
    with (
        pytest.raises(BundleError, match="model directory .*nowhere does not exist; point ANOSCOPE_MODEL_DIR"),
        TestClient(app),
    ):
        pass


def test_models_are_warmed_up_at_load(make_client, fake_engines):
    fakes = fake_engines()
    make_client(engine_factory=fakes, max_batch_size=4)
    assert fakes.last.batches == [1, 4]  # batch 1 and the largest batch, before the first request


def test_a_model_whose_warm_up_hangs_is_reported_and_the_service_starts_without_it(make_client, fake_engines):
    stuck = threading.Event()  # never set during the test: the provider hangs in the warm-up run
    fakes = fake_engines(gate=stuck)
    start = time.monotonic()
    try:
        client = make_client(engine_factory=fakes, load_timeout_s=0.5)
        assert time.monotonic() - start < 10, "start-up waited for the stuck load"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        toy = client.get("/v1/models/toy").json()
        assert toy["state"] == "failed"
        assert "took longer than 0.5 s (ANOSCOPE_LOAD_TIMEOUT_S)" in toy["error"], toy
    finally:
        stuck.set()  # let the abandoned thread end


def test_a_reload_that_hangs_answers_409_in_time_and_the_old_version_keeps_serving(
    make_client, model_dir, images, fake_engines
):
    fakes = fake_engines()
    client = make_client(model_dir=model_dir, engine_factory=fakes, load_timeout_s=0.5)
    stuck = threading.Event()
    fakes.options["gate"] = stuck  # the next engine made, the reload's, hangs in its warm-up
    try:
        start = time.monotonic()
        r = client.post("/v1/models/toy/reload")
        assert time.monotonic() - start < 10, "the reload waited for the stuck load"
        assert r.status_code == 409, r.text
        assert "took longer than 0.5 s" in r.json()["detail"]
        assert _predict(client, images).status_code == 200  # the old engine, never gated, still answers
    finally:
        stuck.set()
