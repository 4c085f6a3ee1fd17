"""The API's surface: no third-party exception escapes unmapped, and the public API is pinned."""

from __future__ import annotations

import re

import pytest

import service.errors as errors
from service.app import pipeline

PNG = {"Content-Type": "image/png"}
KEY = "docs-page-key-0123456789"


def _third_party_errors() -> list[BaseException]:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    return [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("operands could not be broadcast together"),
        OSError(5, "Input/output error"),
        KeyError("anomaly_map"),
        MemoryError(),
        Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code"),
        InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT"),
        RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION"),
    ]


@pytest.mark.parametrize("exc", _third_party_errors(), ids=lambda e: type(e).__name__)
def test_engine_failures_become_inference_problems_and_the_service_recovers(make_client, fake_engines, images, exc):
    fakes = fake_engines()
    client = make_client(engine_factory=fakes)
    fakes.last.error = exc
    r = client.post("/v1/predict", content=images.make(), headers=PNG)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "urn:anoscope:problem:inference" and body["title"] == "Inference failed"
    assert body["detail"].startswith(f"inference failed on model toy: {type(exc).__name__}")
    fakes.last.error = None
    assert client.post("/v1/predict", content=images.make(), headers=PNG).status_code == 200


def test_an_unexpected_bug_is_a_generic_500_problem_without_internals(make_client, images, monkeypatch, caplog):
    client = make_client(raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise IndexError("secret internal detail")

    monkeypatch.setattr(pipeline, "find_regions", broken)
    r = client.post("/v1/predict", content=images.make(), headers=PNG)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == {
        "type": "urn:anoscope:problem:internal",
        "title": "Internal error",
        "status": 500,
        "detail": "the service hit an unexpected error and logged it; retry, and report it if it persists",
        "instance": "/v1/predict",
    }
    assert "IndexError: secret internal detail" in caplog.text  # logged for the operator, not sent to the client
    monkeypatch.undo()
    assert client.post("/v1/predict", content=images.make(), headers=PNG).status_code == 200
    assert client.app.state.registry.get("toy").batcher.in_flight == 0  # the failed request released its room


def test_framework_errors_are_problems_too(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == "no endpoint at /v2/nothing; the API is described at /docs and /openapi.json"
    r = client.delete("/v1/models")
    assert r.status_code == 405 and r.json()["title"] == "Method Not Allowed"
    assert r.json()["detail"] == "DELETE is not allowed on /v1/models; use GET"
    assert r.headers["allow"] == "GET"


def _domain_errors() -> list[type[errors.AnoscopeError]]:
    found, todo = [], [errors.AnoscopeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted({c for c in found if c.__module__ == "service.errors"}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _domain_errors(), ids=lambda c: c.__name__)
def test_every_domain_error_maps_to_its_status_and_title(make_client, cls):
    client = make_client(raise_server_exceptions=False)

    async def boom() -> None:
        if cls is errors.OverloadedError:
            raise cls("queue full", retry_after_s=3)
        if cls is errors.ReloadFailedError:
            raise cls("broken", model="toy", serving_version="v1")
        raise cls("what to do about it")

    client.app.add_api_route("/boom", boom)
    r = client.get("/boom")
    assert r.status_code == cls.status_code
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["title"] == cls.title and body["status"] == cls.status_code and body["instance"] == "/boom"
    assert body["type"].startswith("urn:anoscope:problem:")
    if cls is errors.OverloadedError:
        assert r.headers["retry-after"] == "3"


EXPECTED_OPERATIONS = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/v1/predict"),
    ("post", "/v1/models/{name}/predict"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{name}"),
    ("post", "/v1/models/{name}/reload"),
    ("get", "/metrics"),
}


def test_the_public_api_is_pinned(client):
    spec = client.get("/openapi.json").json()
    ops = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert ops == EXPECTED_OPERATIONS
    assert client.get("/").headers["content-type"].startswith("text/html")  # the page, outside the schema

    schemas = spec["components"]["schemas"]
    assert set(schemas["ImageResult"]["properties"]) == {
        "filename", "anomaly_score", "residual_score", "discrimination_score", "is_anomalous", "calibrated",
        "threshold", "heatmap", "regions", "timings_ms", "model",
    }  # fmt: skip
    assert set(schemas["Timings"]["properties"]) == {"decode", "inference", "postprocess"}
    assert set(schemas["RegionOut"]["properties"]) == {"x", "y", "width", "height", "area", "peak_score"}
    for name in ("ImageResult", "ModelSummary", "Problem"):
        assert schemas[name]["examples"], name

    predict = spec["paths"]["/v1/models/{name}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream"}
    assert {p["name"] for p in predict["parameters"]} == {"name", "heatmap", "regions"}
    assert {"400", "401", "404", "413", "415", "422", "500", "503"} <= set(predict["responses"])
    assert predict["security"] == [{"ApiKey": []}]
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "required when the service is configured with ANOSCOPE_API_KEYS",
    }
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_every_documented_error_body_is_a_problem(client):
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert response["content"] == {
                        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                    }, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_the_fake_engine_implements_the_real_engine_protocol(fake_engines, toy_models):
    from service.engine import Engine, OnnxEngine

    assert isinstance(fake_engines()(toy_models / "toy"), Engine)
    assert isinstance(OnnxEngine(toy_models / "toy", providers=("cpu",)), Engine)


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/models/toy/predict", "/v1/models", "/readyz", "/metrics"])
def test_no_dependency_of_a_route_is_run_in_a_worker_thread(client, images, monkeypatch, path):
    """FastAPI runs a plain `def` dependency through `run_in_threadpool`: a thread hop per dependency per
    request, which cost more CPU than the dependencies themselves (docs/performance.md). Keep them async."""
    import fastapi.dependencies.utils as fastapi_deps

    hops: list[str] = []
    real = fastapi_deps.run_in_threadpool

    async def spy(func, *args, **kwargs):
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fastapi_deps, "run_in_threadpool", spy)
    r = client.post(path, content=images.make(), headers=PNG) if path.endswith("predict") else client.get(path)
    assert r.status_code == 200, r.text
    assert hops == []


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_pages_load_every_script_from_the_service_itself(make_client, page):
    """A factory box has no internet: the pages must not name any other host, and what they name is served."""
    client = make_client(api_keys=KEY)
    assert client.get(page).status_code == 401, "the page is behind the API key like the API"
    html = client.get(page, headers={"X-API-Key": KEY}).text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
    urls = [u for pair in urls for u in pair if u]
    assert urls and not [u for u in urls if "//" in u], f"{page} names another host: {urls}"
    assets = [u for u in urls if u.startswith("/docs-assets/")]
    assert any(u.endswith(".js") for u in assets), urls
    for url in assets:  # plain library files: served without the key, like the operator page's shell
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url
