"""Predictions through the HTTP API: fields, scores, verdicts, heatmaps and regions (real ONNX engine)."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from PIL import Image

from service.bundle import read_metadata, write_metadata
from service.engine import OnnxEngine, predict_images
from service.postprocess import image_scores
from tests.toy_bundle import make_toy_bundle

RESULT_FIELDS = {
    "filename", "anomaly_score", "residual_score", "discrimination_score", "is_anomalous", "calibrated",
    "threshold", "heatmap", "regions", "timings_ms", "model",
}  # fmt: skip


def decode_png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    img.load()
    return img


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def test_a_multipart_prediction_has_exactly_the_documented_fields(client, images):
    r = client.post("/v1/models/toy/predict", files=[("files", ("part.png", images.make(), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    (res,) = r.json()["results"]
    assert set(res) == RESULT_FIELDS
    version = read_metadata(client.app.state.settings.model_dir / "toy").version
    assert res["filename"] == "part.png"
    assert res["model"] == {"name": "toy", "version": version}
    assert 0.0 <= res["anomaly_score"] <= 1.0
    assert set(res["timings_ms"]) == {"decode", "inference", "postprocess"}
    assert all(v >= 0 for v in res["timings_ms"].values())
    assert res["heatmap"] is None  # heatmap=none is the default
    assert isinstance(res["regions"], list)  # regions=true is the default


def test_scores_are_the_offline_engines_scores_through_the_one_post_processing_path(client, images, toy_models):
    arrays = [images.array(80, 48, seed=1), images.array(80, 48, defect=False, seed=2)]
    files = [("files", (f"{i}.png", images.encode(a), "image/png")) for i, a in enumerate(arrays)]
    results = client.post("/v1/predict", files=files).json()["results"]

    engine = OnnxEngine(toy_models / "toy", providers=("cpu",))
    outs = predict_images(engine, [Image.fromarray(a) for a in arrays])
    r = np.array([o.residual_score for o in outs])
    d = np.array([o.discrimination_score for o in outs])
    expected = image_scores(engine.metadata, r, d, [80 / 48, 80 / 48])["normalized"]
    assert [res["filename"] for res in results] == ["0.png", "1.png"]  # upload order
    assert [res["residual_score"] for res in results] == pytest.approx(r.tolist(), rel=1e-5)
    assert [res["discrimination_score"] for res in results] == pytest.approx(d.tolist(), rel=1e-5)
    assert [res["anomaly_score"] for res in results] == pytest.approx(expected.tolist(), rel=1e-5)
    assert results[0]["anomaly_score"] > results[1]["anomaly_score"]
    assert results[0]["threshold"] == engine.metadata.normalization.image.threshold


def test_a_bundle_with_an_aspect_baseline_levels_parts_of_different_shapes(make_client, model_dir, images, caplog):
    """One flat grey part photographed square and twice as wide: the model sees the same square input, so
    the raw scores are equal, and the combined score differs by exactly the bundle's baseline."""
    meta = read_metadata(model_dir / "toy")
    stats = {**meta.score_stats, "residual": meta.score_stats["residual"].model_copy(update={"aspect_slope": -0.2})}
    write_metadata(model_dir / "toy", meta.model_copy(update={"score_stats": stats}))
    caplog.set_level(logging.INFO)
    client = make_client(model_dir=model_dir)
    assert "scores aspect-baselined" in caplog.text  # the operator sees it in the load line
    grey = np.full((48, 48, 3), 160, np.uint8)
    files = [("files", ("square.png", images.encode(grey), "image/png"))]
    files.append(("files", ("wide.png", images.encode(np.tile(grey, (1, 2, 1))), "image/png")))
    square, wide = client.post("/v1/predict", files=files).json()["results"]
    assert wide["residual_score"] == pytest.approx(square["residual_score"], rel=1e-6)  # raw, as the head gives
    norm, r = meta.normalization.image, meta.score_stats["residual"]
    lift = 0.2 * np.log(2) / r.std  # the wide part's baseline is 0.2 * log 2 lower: its score that much higher
    assert wide["anomaly_score"] - square["anomaly_score"] == pytest.approx(lift / (norm.max - norm.min), rel=1e-4)


@pytest.mark.parametrize("content_type", ["image/png", "image/x-anything", "application/octet-stream"])
def test_a_raw_image_body_is_scored_like_a_multipart_upload(client, images, content_type):
    png = images.make()
    raw = client.post("/v1/predict", content=png, headers={"Content-Type": content_type})
    multi = client.post("/v1/predict", files=[("files", ("x.png", png, "image/png"))])
    assert raw.status_code == 200, raw.text
    (a,), (b,) = raw.json()["results"], multi.json()["results"]
    assert a["filename"] is None
    assert a["anomaly_score"] == b["anomaly_score"] and a["regions"] == b["regions"]


def test_a_raw_body_takes_its_filename_from_content_disposition(client, images):
    headers = {"Content-Type": "image/png", "Content-Disposition": 'inline; filename="C:\\\\cam\\\\line-3.png"'}
    r = client.post("/v1/predict", content=images.make(), headers=headers)
    assert r.json()["results"][0]["filename"] == "line-3.png"  # the base name only


@pytest.mark.parametrize("mode", ["png", "overlay"])
@pytest.mark.parametrize(("width", "height"), [(97, 61), (40, 150), (64, 64)])
def test_heatmaps_decode_to_the_input_size(client, images, mode, width, height):
    r = client.post(f"/v1/predict?heatmap={mode}", files=[("files", ("a.png", images.make(width, height), "x"))])
    assert r.status_code == 200, r.text
    heat = decode_png(r.json()["results"][0]["heatmap"])
    assert heat.size == (width, height)
    assert heat.mode == "RGB"


def test_the_heatmap_is_hot_on_the_defect_and_the_overlay_shows_the_image(client, images):
    arr = images.array(128, 128)
    png = images.encode(arr)
    heat = np.asarray(
        decode_png(
            client.post("/v1/predict?heatmap=png", content=png, headers={"Content-Type": "image/png"}).json()[
                "results"
            ][0]["heatmap"]
        )
    )
    over = np.asarray(
        decode_png(
            client.post("/v1/predict?heatmap=overlay", content=png, headers={"Content-Type": "image/png"}).json()[
                "results"
            ][0]["heatmap"]
        )
    )
    x, y, w, h = images.box(128, 128)
    inside, outside = heat[y + 2 : y + h - 2, x + 2 : x + w - 2], heat[: y - 4, : x - 4]
    assert inside[..., 0].mean() > 120 and inside[..., 1:].mean() < 60  # jet's (dark) red on the defect
    assert outside[..., 2].mean() > outside[..., 0].mean()  # blue elsewhere
    assert not np.array_equal(over, heat)
    # The overlay paints only where the map is high: the normal surface keeps the image's own pixels,
    # the defect is pulled towards the heat colour.
    far = (slice(0, y - 8), slice(0, x - 8))
    np.testing.assert_array_equal(over[far], arr[far])
    over_in = over[y + 2 : y + h - 2, x + 2 : x + w - 2].astype(np.float32)
    arr_in = arr[y + 2 : y + h - 2, x + 2 : x + w - 2].astype(np.float32)
    assert np.abs(over_in - arr_in).mean() > 20
    assert np.abs(over_in - inside.astype(np.float32)).mean() < np.abs(arr_in - inside.astype(np.float32)).mean()


@pytest.mark.parametrize(("width", "height"), [(64, 64), (200, 120), (90, 300)])
def test_regions_overlap_the_injected_defect(client, images, width, height):
    r = client.post("/v1/predict", files=[("files", ("d.png", images.make(width, height), "image/png"))])
    regions = r.json()["results"][0]["regions"]
    assert len(regions) >= 1
    top = regions[0]
    assert set(top) == {"x", "y", "width", "height", "area", "peak_score"}
    box = (top["x"], top["y"], top["width"], top["height"])
    assert iou(box, images.box(width, height)) > 0.6
    assert 0.5 <= top["peak_score"] <= 1.0
    assert [g["area"] for g in regions] == sorted((g["area"] for g in regions), reverse=True)


def test_a_normal_image_has_no_regions_and_scores_below_a_defective_one(client, images):
    files = [("files", ("good.png", images.make(defect=False), "image/png")),
             ("files", ("bad.png", images.make(), "image/png"))]  # fmt: skip
    good, bad = client.post("/v1/predict", files=files).json()["results"]
    assert good["regions"] == []
    assert good["anomaly_score"] < 0.5 < bad["anomaly_score"]


def test_regions_false_and_heatmap_none_leave_them_null(client, images):
    r = client.post(
        "/v1/predict?regions=false&heatmap=none", content=images.make(), headers={"Content-Type": "image/png"}
    )
    res = r.json()["results"][0]
    assert res["regions"] is None and res["heatmap"] is None


def test_an_uncalibrated_model_gives_no_verdict_and_says_so(client, images):
    res = client.post("/v1/predict", content=images.make(), headers={"Content-Type": "image/png"}).json()["results"][0]
    assert res["is_anomalous"] is None
    assert res["calibrated"] is False


def test_a_calibrated_model_gives_verdicts_against_its_threshold(make_client, model_dir, images, calibrate_bundle):
    calibrate_bundle(model_dir / "toy", image_threshold=2.0)
    client = make_client(model_dir=model_dir)
    files = [("files", ("bad.png", images.make(), "image/png")),
             ("files", ("good.png", images.make(defect=False), "image/png"))]  # fmt: skip
    bad, good = client.post("/v1/predict", files=files).json()["results"]
    assert bad["calibrated"] is good["calibrated"] is True
    assert (bad["is_anomalous"], good["is_anomalous"]) == (True, False)
    assert bad["threshold"] == good["threshold"] == 2.0
    assert bad["anomaly_score"] > 0.5 > good["anomaly_score"]


def test_named_and_default_endpoints_use_the_same_model(client, images):
    png = images.make()
    a = client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"}).json()["results"][0]
    b = client.post("/v1/models/toy/predict", content=png, headers={"Content-Type": "image/png"}).json()["results"][0]
    assert a["model"] == b["model"] and a["anomaly_score"] == b["anomaly_score"]


def test_the_fake_engine_goes_through_the_same_pipeline(make_client, fake_engines, images):
    fakes = fake_engines()
    fake = make_client(engine_factory=fakes)
    real = make_client()
    png = images.make(70, 50)
    a = fake.post("/v1/predict", content=png, headers={"Content-Type": "image/png"}).json()["results"][0]
    b = real.post("/v1/predict", content=png, headers={"Content-Type": "image/png"}).json()["results"][0]
    assert a["anomaly_score"] == pytest.approx(b["anomaly_score"], abs=1e-6)
    assert a["regions"] == b["regions"]
    assert fakes.last.batches[-1] == 1


def test_models_list_and_detail(client):
    listing = client.get("/v1/models").json()
    assert listing["default_model"] == "toy"
    (m,) = listing["models"]
    assert m["name"] == "toy" and m["state"] == "ready" and m["default"] is True
    assert m["provider"] == "CPUExecutionProvider" and m["calibrated"] is False and m["error"] is None
    detail = client.get("/v1/models/toy").json()
    assert detail["thresholds"] == {"image": None, "pixel": None}
    assert detail["metadata"]["name"] == "toy" and detail["metadata"]["image_size"] == 32
    assert detail["batching"]["max_batch_size"] == 8 and detail["batching"]["in_flight"] == 0


def test_with_several_models_and_no_demo_the_default_endpoint_says_what_to_do(make_client, tmp_path, images):
    for name in ("alpha", "beta"):
        make_toy_bundle(tmp_path / name, name=name)
    client = make_client(model_dir=tmp_path)
    assert client.get("/v1/models").json()["default_model"] is None
    r = client.post("/v1/predict", content=images.make(), headers={"Content-Type": "image/png"})
    assert r.status_code == 404
    assert r.json()["detail"] == (
        "no default model is configured and 2 models are loaded (alpha, beta); POST to "
        "/v1/models/{name}/predict or set ANOSCOPE_DEFAULT_MODEL"
    )
    chosen = make_client(model_dir=tmp_path, default_model="beta")
    res = chosen.post("/v1/predict", content=images.make(), headers={"Content-Type": "image/png"}).json()
    assert res["results"][0]["model"]["name"] == "beta"


def test_a_model_dir_that_is_itself_a_bundle_serves_that_bundle(make_client, toy_models, images):
    client = make_client(model_dir=toy_models / "toy")
    assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["toy"]
    assert client.post("/v1/predict", content=images.make(), headers={"Content-Type": "image/png"}).status_code == 200


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and [m["name"] for m in ready.json()["models"]] == ["toy"]
