"""Faults: a hung engine, CUDA missing, broken bundles at start-up. The rest of the fault list is proven
elsewhere: broken reloads and the metric (test_service_reload.py), reload under load against a real
server (test_reliability_load.py), client disconnects and SIGTERM draining (test_service_serve.py)."""

from __future__ import annotations

import threading
import time

import pytest

PNG = {"Content-Type": "image/png"}
TIMEOUT_S = 0.5


def _post(client, images):
    start = time.perf_counter()
    r = client.post("/v1/predict", content=images.make(), headers=PNG)
    return r, time.perf_counter() - start


def test_a_hung_engine_fails_requests_after_the_timeout_and_the_service_recovers(make_client, fake_engines, images):
    fakes = fake_engines()
    client = make_client(engine_factory=fakes, inference_timeout_s=TIMEOUT_S)
    engine = fakes.last
    engine.delay_s = 3.0  # warm-up is done; from now on every batch sleeps far past the timeout

    r, took = _post(client, images)
    assert r.status_code == 503, r.text
    assert TIMEOUT_S <= took < TIMEOUT_S + 2.0
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "type": "urn:anoscope:problem:inference-timeout",
        "title": "Inference timed out",
        "status": 503,
        "detail": "model toy did not answer within 0.5 s; retry later, and if it persists reload the model or "
        "restart the service (operators: ANOSCOPE_INFERENCE_TIMEOUT_S)",
        "instance": "/v1/predict",
    }

    # While the stuck call still holds the inference thread, later requests fail at once, not after queueing.
    r, took = _post(client, images)
    assert r.status_code == 503 and took < TIMEOUT_S
    assert r.json()["detail"].startswith("model toy is not answering: an inference batch has been running for ")
    assert client.get("/healthz").status_code == 200  # the event loop never waited on the engine
    assert client.app.state.registry.get("toy").batcher.in_flight == 0  # failed requests released their room

    engine.delay_s = 0.0
    deadline = time.monotonic() + 10
    while (r := _post(client, images)[0]).status_code != 200:  # the stuck call returns after its 3 s
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert 'route="/v1/predict",status="503"}' in client.get("/metrics").text


def test_shutdown_does_not_wait_for_a_hung_engine(make_settings, fake_engines, images):
    from fastapi.testclient import TestClient

    from service.app.main import create_app

    gate = threading.Event()
    fakes = fake_engines()
    client = TestClient(create_app(make_settings(inference_timeout_s=TIMEOUT_S), engine_factory=fakes))
    try:
        with client:
            fakes.last.gate = gate  # holds every batch until set
            assert _post(client, images)[0].status_code == 503
            start = time.perf_counter()
        assert time.perf_counter() - start < 5  # the lifespan closed the batcher without the engine returning
    finally:
        gate.set()  # let the held thread end, so the interpreter can exit


def test_the_timeout_is_a_setting_that_must_be_positive(make_settings, monkeypatch):
    from pydantic import ValidationError

    from service.settings import load_settings

    assert make_settings().inference_timeout_s == 30.0
    monkeypatch.setenv("ANOSCOPE_INFERENCE_TIMEOUT_S", "2.5")
    assert load_settings().inference_timeout_s == 2.5
    monkeypatch.setenv("ANOSCOPE_INFERENCE_TIMEOUT_S", "0")
    with pytest.raises(ValidationError, match="inference_timeout_s"):
        load_settings()
