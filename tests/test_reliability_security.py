"""Security: every route but the open five (health, readiness, the operator page's shell, the API pages'
scripts) needs a key; keys stay out of a real server's logs; model names and symlinks cannot reach
outside the model directory; clients cannot lift the limits.

Complements test_service_security.py (401 bodies, constant-time comparison, CORS) and the model-name
cases of test_service_errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_service_serve import Server, service_env
from tests.toy_bundle import make_toy_bundle

KEY = "rel-key-0123456789abcdef-A"
OTHER = "rel-key-0123456789abcdef-B"
OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/"), ("GET", "/static"), ("GET", "/docs-assets")}
PNG = {"Content-Type": "image/png"}


def operations(app) -> Iterator[tuple[str, str]]:
    """(method, path) of every route the app serves, read from the app itself so a new route is covered."""
    for route in app.routes:
        router = getattr(route, "original_router", None)
        if router is None:  # the static mount
            yield "GET", route.path
            continue
        for r in router.routes:
            for method in sorted(r.methods - {"HEAD"}):
                yield method, r.path


def _concrete(path: str) -> str:
    mounts = {"/static": "/static/app.js", "/docs-assets": "/docs-assets/swagger-ui-bundle.js"}
    return mounts.get(path, path.replace("{name}", "toy"))


def test_only_health_readiness_and_the_page_shell_are_open_when_keys_are_set(make_client, fake_engines, images):
    fakes = fake_engines()
    client = make_client(api_keys=KEY, engine_factory=fakes)
    ops = set(operations(client.app))
    assert {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/metrics")} <= ops
    assert ops >= OPEN
    for method, template in sorted(ops):
        path = _concrete(template)
        kwargs = {"content": images.make(), "headers": dict(PNG)} if method == "POST" else {"headers": {}}
        if (method, template) in OPEN:
            assert client.request(method, path, **kwargs).status_code == 200, path
            continue
        for headers in ({}, {"X-API-Key": OTHER}, {"X-API-Key": ""}, {"X-API-Key": KEY + " "}, {"x-api-key": KEY[:-1]}):
            r = client.request(method, path, **{**kwargs, "headers": {**kwargs["headers"], **headers}})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
        # the key is only accepted in its header: not as a query parameter, a cookie or basic auth
        for extra in ({"params": {"api_key": KEY, "X-API-Key": KEY}}, {"auth": (KEY, KEY)}):
            assert client.request(method, path, **kwargs, **extra).status_code == 401, (path, extra)
        client.cookies.set("X-API-Key", KEY)
        assert client.request(method, path, **kwargs).status_code == 401, (path, "cookie")
        client.cookies.clear()
        r = client.request(method, path, **{**kwargs, "headers": {**kwargs["headers"], "X-API-Key": KEY}})
        assert r.status_code == 200, (method, path, r.text)
    assert len(fakes.engines) == 2  # only the keyed reload built an engine


def test_the_api_description_is_open_without_keys(client):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 200, path


@pytest.mark.slow
def test_keys_never_reach_a_real_servers_log_even_at_debug_level(tmp_path, images):
    make_toy_bundle(tmp_path / "models" / "toy")
    env = service_env(ANOSCOPE_API_KEYS=f"{KEY},{OTHER}", ANOSCOPE_LOG_LEVEL="debug")
    srv = Server(["--model-dir", str(tmp_path / "models")], env, cwd=tmp_path)
    wrong = "rel-key-0123456789abcdef-Z"
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
            assert c.post("/v1/predict", content=images.make(), headers={**PNG, "X-API-Key": OTHER}).status_code == 200
            assert c.get("/metrics", headers={"X-API-Key": wrong}).status_code == 401
            assert c.get("/openapi.json", headers={"X-API-Key": KEY[:20]}).status_code == 401
            assert c.post("/v1/models/toy/reload", headers={"X-API-Key": KEY}).status_code == 200
    finally:
        srv.stop()
    out = srv.output
    assert "API keys: 2 configured" in out and '"GET /v1/models HTTP/1.1" 200' in out  # it did log requests
    for secret in (KEY, OTHER, wrong, KEY[:20]):
        assert secret not in out


# -- model names and the model directory ----------------------------------------------------------------


@pytest.fixture
def recording(fake_engines):
    """An engine factory that records every bundle path it is asked to open."""
    fakes = fake_engines()
    opened: list[Path] = []

    def factory(path: Path):
        opened.append(Path(path))
        return fakes(path)

    factory.opened = opened
    return factory


TRAVERSALS = [
    "/v1/models/..%2F..%2F..%2Fetc%2Fpasswd/predict",
    "/v1/models/%2Fetc%2Fpasswd/predict",
    "/v1/models//etc/passwd/predict",
    "/v1/models/%2e%2e/reload",
    "/v1/models/%252e%252e%252fetc/reload",  # double-encoded: arrives as '%2e%2e%2fetc', invalid characters
    "/v1/models/..%5C..%5Cwindows/reload",
    "/v1/models/C:%5Cmodels/reload",
    "/v1/models/%EF%BC%8E%EF%BC%8E/reload",  # fullwidth full stops
    "/v1/models/toy%00.onnx/reload",
    "/v1/models/toy%2F..%2F..%2Fother/reload",
    "/v1/models/.%2E/reload",
    "/v1/models/~root/reload",
    "/v1/models/%7E/reload",
]


def test_no_model_name_reaches_outside_the_model_directory(make_client, model_dir, recording, images):
    client = make_client(model_dir=model_dir, engine_factory=recording)
    for path in TRAVERSALS:
        kwargs = {"content": images.make(), "headers": PNG} if path.endswith("predict") else {}
        r = client.post(path, **kwargs)
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert client.get(path.removesuffix("/reload").removesuffix("/predict")).status_code in (400, 404), path
    root = model_dir.resolve()
    assert recording.opened == [model_dir / "toy"]  # start-up only
    assert all(p.resolve().is_relative_to(root) for p in recording.opened)
    assert client.post("/v1/models/toy/predict", content=images.make(), headers=PNG).status_code == 200


def test_symlinks_out_of_the_model_directory_are_refused_and_links_within_it_work(
    make_client, model_dir, recording, images, tmp_path
):
    outside = make_toy_bundle(tmp_path / "elsewhere" / "secret", name="secret")
    os.symlink(outside, model_dir / "linked")  # a folder link to a bundle outside
    half = make_toy_bundle(model_dir / "half", name="half")
    (half / "model.onnx").unlink()
    os.symlink(outside / "model.onnx", half / "model.onnx")  # a file link out of a bundle inside
    make_toy_bundle(model_dir / ".releases" / "v7", name="current")
    os.symlink(model_dir / ".releases" / "v7", model_dir / "current")  # the release pattern: a link within

    client = make_client(model_dir=model_dir, engine_factory=recording)
    listing = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listing["current"]["state"] == "ready" and listing["toy"]["state"] == "ready"
    for name, link in (("linked", model_dir / "linked"), ("half", model_dir / "half" / "model.onnx")):
        assert listing[name]["state"] == "failed"
        assert listing[name]["error"] == (
            f"{link} resolves to {link.resolve()}, outside the model directory {model_dir.resolve()}; copy the "
            "bundle into the model directory (a symlink may point within it, e.g. to a folder under .releases/)"
        )
        assert client.post(f"/v1/models/{name}/predict", content=images.make(), headers=PNG).status_code == 503
        r = client.post(f"/v1/models/{name}/reload")
        assert r.status_code == 409 and "outside the model directory" in r.json()["detail"]

    os.symlink(outside, model_dir / "late")  # added after start-up, then reloaded by name
    r = client.post("/v1/models/late/reload")
    assert r.status_code == 409 and "outside the model directory" in r.json()["detail"]
    assert client.post("/v1/models/current/predict", content=images.make(), headers=PNG).status_code == 200
    assert not [p for p in recording.opened if not p.resolve().is_relative_to(model_dir.resolve())]


# -- limits ----------------------------------------------------------------------------------------------


def _raw_asgi(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes], query: bytes = b"") -> tuple[int, int]:
    """Drive the app with a hand-made ASGI request; returns (status, chunks the app pulled)."""
    pulled = 0
    status = 0

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "",
             "query_string": query, "headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80)}  # fmt: skip

    async def go():
        async with app.router.lifespan_context(app) as state:
            await app({**scope, "state": dict(state or {})}, receive, send)

    asyncio.run(go())
    return status, pulled


@pytest.mark.parametrize(
    "declared",
    [b"10", b"0", b"-1", b"+99", b"1e9", b"99999999999999999999999999", b"abc", None],
)
def test_a_lying_or_odd_content_length_cannot_lift_the_body_limit(make_settings, declared):
    from service.app.main import create_app

    app = create_app(make_settings(max_body_bytes=10_000))
    headers = [(b"content-type", b"image/png")] + ([(b"content-length", declared)] if declared is not None else [])
    status, pulled = _raw_asgi(app, headers, [b"\0" * 4000] * 50)  # 200 kB really sent
    assert status == 413
    assert pulled <= 3  # the count of bytes actually received decides, not the header


def test_no_header_or_query_parameter_lifts_the_pixel_or_file_limits(make_client, images):
    client = make_client(max_pixels=2000, max_files=1)
    sneaky = {"X-Max-Pixels": "0", "X-Anoscope-Max-Pixels": "999999999", "Max-Files": "100",
              "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "X-Debug": "1"}  # fmt: skip
    query = "?max_pixels=999999999&ANOSCOPE_MAX_PIXELS=999999999&max_files=99&limits=off&debug=true"
    r = client.post("/v1/predict" + query, content=images.make(64, 64), headers={**sneaky, **PNG})
    assert r.status_code == 413 and r.json()["type"] == "urn:anoscope:problem:image-too-large"
    two = [("files", ("a.png", images.make(8, 8), "image/png"))] * 2
    r = client.post("/v1/predict" + query, files=two, headers=sneaky)
    assert r.status_code == 413 and r.json()["type"] == "urn:anoscope:problem:too-many-files"
    settings = client.app.state.settings
    assert (settings.max_pixels, settings.max_files) == (2000, 1)


def test_no_log_line_carries_a_key_in_process(make_client, images, caplog):
    """The in-process variant at DEBUG with every logger, including failed and refused requests."""
    caplog.set_level(logging.DEBUG)
    client = make_client(api_keys=KEY)
    client.post("/v1/predict", content=b"junk", headers={**PNG, "X-API-Key": KEY})  # a 422, logged or not
    client.post("/v1/models/..%2e/reload", headers={"X-API-Key": KEY})
    client.get("/docs", headers={"X-API-Key": OTHER})
    assert KEY not in caplog.text and OTHER not in caplog.text
