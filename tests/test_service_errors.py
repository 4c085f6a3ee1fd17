"""Bad input gets its exact 4xx problem-details body, and the next good request still succeeds."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

PNG = "image/png"
NAME_RULE = (
    "is not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
    "(no '/', '\\' or other path characters)"
)


def problem(status: int, slug: str, title: str, detail: str, instance: str = "/v1/predict") -> dict[str, Any]:
    return {"type": f"urn:anoscope:problem:{slug}", "title": title, "status": status, "detail": detail,
            "instance": instance}  # fmt: skip


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def one(name: str, data: bytes, ctype: str = PNG) -> dict[str, Any]:
    return {"files": [("files", (name, data, ctype))]}


def multipart(*parts: bytes, boundary: str = "XyZ") -> dict[str, Any]:
    return {"content": b"".join(parts), "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def part(name: str, filename: str, data: bytes, boundary: str = "XyZ") -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
    return head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"


# (request kwargs, settings overrides, expected problem); builders get the image factory.
CASES: dict[str, Callable[[Any], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]] = {
    "zero-byte upload": lambda im: (
        one("empty.png", b""),
        {},
        problem(
            422,
            "invalid-image",
            "Invalid image",
            "file 1 ('empty.png') is empty (0 bytes); send the image file's bytes",
        ),
    ),
    "zero-byte raw body": lambda im: (
        {"content": b"", "headers": {"Content-Type": PNG}},
        {},
        problem(422, "invalid-image", "Invalid image", "the image is empty (0 bytes); send the image file's bytes"),
    ),
    "not an image": lambda im: (
        one("notes.txt", b"this is a text file, not a picture"),
        {},
        problem(
            422,
            "invalid-image",
            "Invalid image",
            "file 1 ('notes.txt') is not an image anoscope can read; send PNG, JPEG, BMP or TIFF bytes",
        ),
    ),
    "truncated PNG": lambda im: (
        one("cut.png", im.make()[:300]),
        {},
        problem(
            422,
            "invalid-image",
            "Invalid image",
            "file 1 ('cut.png') could not be decoded (OSError: image "
            "file is truncated); the file may be truncated or corrupt",
        ),
    ),
    "truncated JPEG": lambda im: (
        one("cut.jpg", im.make(fmt="JPEG")[:300], "image/jpeg"),
        {},
        problem(
            422,
            "invalid-image",
            "Invalid image",
            "file 1 ('cut.jpg') could not be decoded (OSError: "
            "Truncated File Read); the file may be truncated or corrupt",
        ),
    ),
    "a bad file among good ones names the bad one": lambda im: (
        {"files": [("files", ("ok.png", im.make(), PNG)), ("files", ("bad.png", b"\x89PNG junk", PNG))]},
        {},
        problem(
            422,
            "invalid-image",
            "Invalid image",
            "file 2 ('bad.png') is not an image anoscope can read; send PNG, JPEG, BMP or TIFF bytes",
        ),
    ),
    "pixel count over the limit": lambda im: (
        one("big.png", im.make(100, 80)),
        {"max_pixels": 5000},
        problem(
            413,
            "image-too-large",
            "Image too large",
            "file 1 ('big.png') is 100x80 pixels (0.0 megapixels); "
            "the limit is 0.005 megapixels (operators: set ANOSCOPE_MAX_PIXELS to change it)",
        ),
    ),
    "decompression bomb (huge declared size, tiny file)": lambda im: (
        one("bomb.png", png_declaring(100_000, 100_000)),
        {},
        problem(
            413,
            "image-too-large",
            "Image too large",
            "file 1 ('bomb.png') is 100000x100000 pixels (10000.0 "
            "megapixels); the limit is 40 megapixels (operators: set ANOSCOPE_MAX_PIXELS to change it)",
        ),
    ),
    "body over the size limit (Content-Length)": lambda im: (
        {"content": b"\0" * 6000, "headers": {"Content-Type": PNG}},
        {"max_body_bytes": 5000},
        problem(
            413,
            "payload-too-large",
            "Payload too large",
            "the request body declares 6000 bytes; the limit is "
            "5000 bytes (0.005 MB). Send fewer or smaller images per request (operators: ANOSCOPE_MAX_BODY_BYTES)",
        ),
    ),
    "too many files": lambda im: (
        {"files": [("files", (f"{i}.png", im.make(), PNG)) for i in range(3)]},
        {"max_files": 2},
        problem(
            413,
            "too-many-files",
            "Too many files",
            "the request holds more than 2 files; send at most 2 images per request (operators: ANOSCOPE_MAX_FILES)",
        ),
    ),
    "unsupported content type": lambda im: (
        {"content": b'{"image": "..."}', "headers": {"Content-Type": "application/json"}},
        {},
        problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "Content-Type 'application/json' is not "
            "accepted; send multipart/form-data with images in the field 'files', or one image as the raw body "
            "with an image/* Content-Type",
        ),
    ),
    "no content type": lambda im: (
        {"content": im.make(), "headers": {"Content-Type": ""}},
        {},
        problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "Content-Type 'none' is not accepted; send "
            "multipart/form-data with images in the field 'files', or one image as the raw body with an image/* "
            "Content-Type",
        ),
    ),
    "multipart field with another name": lambda im: (
        {"files": [("file", ("a.png", im.make(), PNG))]},
        {},
        problem(
            400,
            "input",
            "Bad request",
            "multipart field 'file' is not accepted; send each image in a field named 'files'",
        ),
    ),
    "multipart without files": lambda im: (
        multipart(b"--XyZ--\r\n"),
        {},
        problem(
            400,
            "input",
            "Bad request",
            "the multipart body holds no files; send one or more images in the form field 'files'",
        ),
    ),
    "multipart without its closing boundary": lambda im: (
        multipart(part("files", "a.png", im.make())),
        {},
        problem(
            400,
            "input",
            "Bad request",
            "the multipart body ended before its closing boundary; the upload is truncated or malformed",
        ),
    ),
    "multipart without a boundary parameter": lambda im: (
        {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
        {},
        problem(
            400,
            "input",
            "Bad request",
            "the multipart Content-Type has no boundary parameter; let your HTTP client build the form",
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_problem_and_the_next_request_succeeds(make_client, images, case):
    request, overrides, expected = CASES[case](images)
    client = make_client(**overrides)
    r = client.post("/v1/predict", **request)
    assert r.status_code == expected["status"], r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json() == expected
    good = client.post("/v1/predict", files=[("files", ("good.png", images.make(40, 40), PNG))])
    assert good.status_code == 200, good.text


def stream_post(app: Any, chunks: AsyncIterator[bytes], content_type: str) -> httpx.Response:
    """POST a streamed body (no Content-Length) through httpx's ASGI transport, which pulls chunks lazily
    (TestClient reads the whole body first, so it cannot show when the service stops reading)."""

    async def go() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                r = await c.post("/v1/predict", content=chunks, headers={"Content-Type": content_type})
                assert "content-length" not in r.request.headers
                return r

    return asyncio.run(go())


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(make_settings):
    from service.app.main import create_app

    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(1000):  # 1 MB in all, 1 kB at a time
            sent.append(i)
            yield b"\0" * 1000

    r = stream_post(create_app(make_settings(max_body_bytes=10_000)), chunks(), PNG)
    assert r.status_code == 413
    assert r.json() == problem(413, "payload-too-large", "Payload too large", "the request body passed 10000 bytes "
                               "before it ended; the limit is 10000 bytes (0.01 MB). Send fewer or smaller images per "
                               "request (operators: ANOSCOPE_MAX_BODY_BYTES)")  # fmt: skip
    assert len(sent) == 11  # stopped reading at the limit, not after buffering the whole megabyte


def test_an_oversized_multipart_upload_is_refused_while_streaming(make_settings, images):
    from service.app.main import create_app

    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        yield part("files", "a.png", images.make())
        for i in range(500):
            sent.append(i)
            yield b"\0" * 1000

    r = stream_post(create_app(make_settings(max_body_bytes=20_000)), chunks(), "multipart/form-data; boundary=XyZ")
    assert r.status_code == 413 and r.json()["title"] == "Payload too large"
    assert len(sent) <= 20


def test_too_many_files_are_refused_before_the_rest_of_the_body_is_read(make_settings, images):
    from service.app.main import create_app

    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            sent.append(i)
            yield part("files", f"{i}.png", images.make())

    r = stream_post(create_app(make_settings(max_files=1)), chunks(), "multipart/form-data; boundary=XyZ")
    assert r.status_code == 413 and r.json()["title"] == "Too many files"
    assert len(sent) == 2  # the second part's headers were enough


def test_an_unknown_model_is_404_naming_the_models_there(client, images):
    for method, path in (("post", "/v1/models/nope/predict"), ("get", "/v1/models/nope"),
                         ("post", "/v1/models/nope/reload")):  # fmt: skip
        kwargs = {"content": images.make(), "headers": {"Content-Type": PNG}} if path.endswith("predict") else {}
        r = getattr(client, method)(path, **kwargs)
        assert r.json() == problem(404, "model-not-found", "Model not found",
                                   "no model named 'nope'; models here: toy (see GET /v1/models)", path)  # fmt: skip
    assert (
        client.post("/v1/models/toy/predict", content=images.make(), headers={"Content-Type": PNG}).status_code == 200
    )


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("%2E%2E", ".."), ("%2e", "."), (".hidden", ".hidden"), ("a%20b", "a b"), ("a%5Cb", "a\\b"),
     ("-lead", "-lead"), ("x" * 65, "x" * 65), ("a%00b", "(unprintable)"), ("toy%0A", "(unprintable)"),
     ("%C3%A9", "é")],
)  # fmt: skip
def test_a_model_name_with_path_characters_is_400_before_any_file_access(client, images, raw, shown):
    for suffix in ("/predict", "", "/reload"):
        path = f"/v1/models/{raw}{suffix}"
        method = client.get if suffix == "" else client.post
        kwargs = {"content": images.make(), "headers": {"Content-Type": PNG}} if suffix == "/predict" else {}
        r = method(path, **kwargs)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["detail"] == f"model name {shown!r} {NAME_RULE}"
        assert r.json()["type"] == "urn:anoscope:problem:invalid-model-name"
    assert (
        client.post("/v1/models/toy/predict", content=images.make(), headers={"Content-Type": PNG}).status_code == 200
    )


def test_an_encoded_slash_cannot_reach_outside_the_model_directory(client):
    r = client.post("/v1/models/..%2F..%2Fetc/reload")
    assert r.status_code == 404 and r.json()["type"] == "urn:anoscope:problem:not-found"


def test_bad_query_parameters_are_422_problems(client, images):
    r = client.post("/v1/predict?heatmap=jet&regions=maybe", content=images.make(), headers={"Content-Type": PNG})
    assert r.status_code == 422
    body = r.json()
    assert body["type"] == "urn:anoscope:problem:invalid-request" and body["title"] == "Invalid request"
    assert body["detail"] == (
        "query parameter 'heatmap': Input should be 'none', 'png' or 'overlay'; "
        "query parameter 'regions': Input should be a valid boolean, unable to interpret input"
    )


def _score(client: Any, data: bytes) -> float:
    r = client.post("/v1/predict", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["anomaly_score"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_odd_image_modes_are_converted_predictably(client, images):
    """The conversions documented in service/images.py and docs/api.md, checked by equal scores."""
    rgb = Image.fromarray(images.array(64, 64))
    grey = rgb.convert("L")
    grey_as_rgb = _png(grey.convert("RGB"))

    rgba = rgb.convert("RGBA")
    rgba.putalpha(7)  # alpha is dropped, not blended
    assert _score(client, _png(rgba)) == _score(client, _png(rgb))

    assert _score(client, _png(grey)) == _score(client, grey_as_rgb)  # grey is replicated to RGB

    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 16-bit: scaled by 1/257 to 8 bits
    assert sixteen.mode.startswith("I;16")
    assert _score(client, _png(sixteen)) == _score(client, grey_as_rgb)

    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    assert _score(client, _png(palette)) == _score(client, _png(palette.convert("RGB")))

    for mode, fmt in (("1", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF")):
        assert 0.0 <= _score(client, images.make(fmt=fmt, mode=mode)) <= 1.0
