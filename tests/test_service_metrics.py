"""GET /metrics: request counts by status, stage latencies, batch sizes, queue depth, anomalies per model."""

from __future__ import annotations

import re

PNG = {"Content-Type": "image/png"}


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text exposition, or None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return None


def test_metrics_count_requests_stages_batches_and_anomalies(make_client, model_dir, images, calibrate_bundle):
    calibrate_bundle(model_dir / "toy")
    client = make_client(model_dir=model_dir)
    fresh = client.get("/metrics").text
    for name in (
        "anoscope_images_total",
        "anoscope_anomalies_total",
        "anoscope_overload_rejections_total",
        "anoscope_model_reload_failures_total",
        "anoscope_queue_depth",
        "anoscope_images_in_flight",
        "anoscope_anomaly_score_count",
    ):
        assert sample(fresh, name, model="toy") == 0, name  # every per-model series exists from the start
    files = [("files", ("bad.png", images.make(), "image/png")),
             ("files", ("good.png", images.make(defect=False), "image/png"))]  # fmt: skip
    assert client.post("/v1/models/toy/predict", files=files).status_code == 200
    assert client.post("/v1/predict", content=images.make(), headers=PNG).status_code == 200
    assert client.post("/v1/predict", content=b"junk", headers=PNG).status_code == 422
    assert client.post("/v1/models/nope/predict", content=b"x", headers=PNG).status_code == 404

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    route = "/v1/models/{name}/predict"  # the route template, never the raw path
    assert sample(text, "anoscope_http_requests_total", method="POST", route=route, status="200") == 1
    assert sample(text, "anoscope_http_requests_total", method="POST", route=route, status="404") == 1
    assert sample(text, "anoscope_http_requests_total", method="POST", route="/v1/predict", status="200") == 1
    assert sample(text, "anoscope_http_requests_total", method="POST", route="/v1/predict", status="422") == 1
    assert "nope" not in text
    assert sample(text, "anoscope_http_request_duration_seconds_count", route=route) == 2
    for stage in ("decode", "inference", "postprocess"):
        assert sample(text, "anoscope_stage_duration_seconds_count", model="toy", stage=stage) == 3
    assert sample(text, "anoscope_images_total", model="toy") == 3
    assert sample(text, "anoscope_anomalies_total", model="toy") == 2  # the two defect images
    assert sample(text, "anoscope_batch_size_sum", model="toy") >= 3
    assert sample(text, "anoscope_queue_depth", model="toy") == 0
    assert sample(text, "anoscope_images_in_flight", model="toy") == 0
    version = client.get("/v1/models/toy").json()["version"]
    assert sample(text, "anoscope_model_info", model="toy", version=version, provider="CPUExecutionProvider") == 1
    assert sample(text, "anoscope_ready") == 1


def test_the_score_histogram_holds_every_answered_anomaly_score(make_client, model_dir, images, calibrate_bundle):
    calibrate_bundle(model_dir / "toy")
    client = make_client(model_dir=model_dir)
    uploads = [images.make(defect=d, seed=i) for i, d in enumerate([True, False, True, False, False])]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(uploads)]
    results = client.post("/v1/models/toy/predict", files=files).json()["results"]
    scores = [r["anomaly_score"] for r in results]
    assert any(s > 0.5 for s in scores) and any(s <= 0.5 for s in scores)  # both sides of the threshold

    text = client.get("/metrics").text
    assert sample(text, "anoscope_anomaly_score_count", model="toy") == len(scores)
    assert abs(sample(text, "anoscope_anomaly_score_sum", model="toy") - sum(scores)) < 1e-9
    flagged = sum(r["is_anomalous"] for r in results)
    # the bucket at the threshold: every image the service did not flag, and none it did
    assert sample(text, "anoscope_anomaly_score_bucket", model="toy", le="0.5") == len(scores) - flagged
    assert sample(text, "anoscope_anomaly_score_bucket", model="toy", le="+Inf") == len(scores)


def test_each_app_has_its_own_registry(make_client, images):
    a, b = make_client(), make_client()
    a.post("/v1/predict", content=images.make(), headers=PNG)
    assert sample(a.get("/metrics").text, "anoscope_images_total", model="toy") == 1
    assert sample(b.get("/metrics").text, "anoscope_images_total", model="toy") == 0


def test_a_reload_replaces_the_model_info_series(make_client, model_dir):
    from service.bundle import read_metadata, write_metadata

    client = make_client(model_dir=model_dir)
    write_metadata(model_dir / "toy", read_metadata(model_dir / "toy").model_copy(update={"version": "v2"}))
    client.post("/v1/models/toy/reload")
    text = client.get("/metrics").text
    assert [line for line in text.splitlines() if line.startswith("anoscope_model_info{")] == [
        'anoscope_model_info{model="toy",provider="CPUExecutionProvider",version="v2"} 1.0'
    ]


def test_the_calibration_state_follows_a_reload(make_client, model_dir, calibrate_bundle):
    client = make_client(model_dir=model_dir)
    assert sample(client.get("/metrics").text, "anoscope_model_calibrated", model="toy") == 0  # verdicts are null
    calibrate_bundle(model_dir / "toy")
    assert client.post("/v1/models/toy/reload").status_code == 200
    assert sample(client.get("/metrics").text, "anoscope_model_calibrated", model="toy") == 1
