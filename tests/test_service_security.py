"""API keys: 401 before any work, several keys, constant-time comparison, never logged; CORS off by default."""

from __future__ import annotations

import logging

import pytest

from service.app import security

KEY_A = "k3y-alpha-0123456789abcdef"
KEY_B = "k3y-bravo-fedcba9876543210"
PROTECTED = [
    ("post", "/v1/predict"),
    ("post", "/v1/models/toy/predict"),
    ("get", "/v1/models"),
    ("get", "/v1/models/toy"),
    ("post", "/v1/models/toy/reload"),
    ("get", "/metrics"),
]


@pytest.fixture
def keyed(make_client, fake_engines):
    fakes = fake_engines()
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", engine_factory=fakes)
    client.fakes = fakes
    return client


def _call(client, method, path, images, headers=None):
    kwargs = {"headers": dict(headers or {})}
    if path.endswith("predict"):
        kwargs["content"] = images.make()
        kwargs["headers"]["Content-Type"] = "image/png"
    return getattr(client, method)(path, **kwargs)


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_without_a_key_every_protected_endpoint_is_401_and_does_no_work(keyed, images, method, path):
    runs_before = len(keyed.fakes.last.batches)
    r = _call(keyed, method, path, images)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
    assert r.json() == {
        "type": "urn:anoscope:problem:authentication",
        "title": "Unauthorized",
        "status": 401,
        "detail": "this endpoint needs an API key: send it in the X-API-Key header",
        "instance": path,
    }
    wrong = _call(keyed, method, path, images, {"X-API-Key": KEY_A[:-1] + "X"})
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == (
        "the X-API-Key header does not hold a valid API key; ask the service's operator for one"
    )
    assert len(keyed.fakes.last.batches) == runs_before  # nothing was scored
    assert len(keyed.fakes.engines) == 1  # nothing was reloaded


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_each_configured_key_is_accepted(keyed, images, key):
    for method, path in PROTECTED:
        r = _call(keyed, method, path, images, {"X-API-Key": key})
        assert r.status_code == 200, (path, r.text)


def test_an_unauthenticated_body_is_not_read(make_settings, images):
    """The key is checked before the body: a large unauthenticated upload is refused without reading it."""
    import asyncio

    import httpx

    from service.app.main import create_app

    app = create_app(make_settings(api_keys=KEY_A))
    sent = []

    async def chunks():
        for i in range(100):
            sent.append(i)
            yield b"\0" * 10_000

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/predict", content=chunks(), headers={"Content-Type": "image/png"})

    assert asyncio.run(go()).status_code == 401
    assert sent == []


def test_health_readiness_and_the_page_shell_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/", "/static/app.js"):
        assert keyed.get(path).status_code == 200, path


def test_keys_are_compared_in_constant_time_against_every_key(keyed, images, monkeypatch):
    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert _call(keyed, "get", "/v1/models", images, {"X-API-Key": KEY_A}).status_code == 200
    assert calls == [(32, 32), (32, 32)]  # digests of equal length, and no early exit on the first match


def test_keys_never_appear_in_logs(make_client, images, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(api_keys=f"{KEY_A},{KEY_B}", host="0.0.0.0")
    client.get("/v1/models", headers={"X-API-Key": KEY_A})
    client.get("/v1/models", headers={"X-API-Key": "wrong-key-wrong-key-wrong"})
    client.post("/v1/predict", content=images.make(), headers={"X-API-Key": KEY_B, "Content-Type": "image/png"})
    client.app.state.settings.model_dump()  # what a debug dump of the settings would show
    text = caplog.text + repr(client.app.state.settings) + str(client.app.state.settings.model_dump())
    assert "API keys: 2 configured" in caplog.text
    assert KEY_A not in text and KEY_B not in text and "wrong-key" not in text


def test_cors_is_off_unless_configured(make_client):
    plain = make_client()
    preflight = {"Origin": "http://hmi.local", "Access-Control-Request-Method": "POST"}
    r = plain.options("/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in plain.get("/healthz", headers={"Origin": "http://hmi.local"}).headers

    cors = make_client(cors_origins="http://hmi.local")
    r = cors.options("/v1/predict", headers={**preflight, "Access-Control-Request-Headers": "X-API-Key"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://hmi.local"
    assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
    other = cors.options("/v1/predict", headers={**preflight, "Origin": "http://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_clients_cannot_lift_the_limits(make_client, images):
    client = make_client(max_pixels=1000, max_files=1, max_body_bytes=50_000)
    q = "?max_pixels=0&max_files=100&max_body_bytes=999999999"
    headers = {"X-Max-Pixels": "0", "Content-Type": "image/png"}
    assert client.post("/v1/predict" + q, content=images.make(), headers=headers).status_code == 413
    two = [("files", ("a.png", images.make(8, 8), "image/png"))] * 2
    assert client.post("/v1/predict" + q, files=two).status_code == 413
