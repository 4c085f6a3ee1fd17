"""`anoscope serve`: a real uvicorn process on 127.0.0.1 with concurrent clients, start-up errors, SIGTERM."""

from __future__ import annotations

import base64
import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.localserver import LocalServer, free_port, service_environment

ROOT = Path(__file__).resolve().parents[1]


def service_env(**extra: str) -> dict[str, str]:
    return service_environment({"ANOSCOPE_PROVIDERS": "cpu", "ANOSCOPE_INTRA_OP_THREADS": "1", **extra})


class Server(LocalServer):
    """`python -m anoscope serve` in a subprocess (service.localserver); not ready = a test failure."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        super().__init__(args, env=env, cwd=cwd)

    def wait_ready(self, timeout: float = 60) -> None:
        try:
            super().wait_ready(timeout)
        except RuntimeError as exc:
            pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.toy_bundle import make_toy_bundle

    models = tmp_path_factory.mktemp("served")
    make_toy_bundle(models / "toy")
    env = service_env(ANOSCOPE_MAX_BODY_BYTES="300000", ANOSCOPE_MAX_BATCH_WAIT_MS="5")
    srv = Server(["--model-dir", str(models)], env, cwd=tmp_path_factory.mktemp("cwd"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_start_up_logs_each_model_with_its_version_and_provider(server):
    out = server.output
    assert "model toy loaded: version " in out and "provider CPUExecutionProvider" in out
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in out
    http, loop = serve_http_and_loop()
    assert f"HTTP parser {http}, event loop {loop}" in out


def serve_http_and_loop() -> tuple[str, str]:
    from service.serve import http_and_loop

    return http_and_loop()


def test_serve_uses_httptools_and_uvloop_when_installed_and_falls_back_without(monkeypatch):
    import importlib.util

    from service import serve

    assert importlib.util.find_spec("httptools") is not None, "the service extra installs httptools"
    if sys.platform != "win32":
        assert importlib.util.find_spec("uvloop") is not None, "the service extra installs uvloop"
        assert serve.http_and_loop() == ("httptools", "uvloop")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("httptools", "uvloop") else real(name, *a)
    )
    assert serve.http_and_loop() == ("h11", "asyncio")


@pytest.mark.slow
def test_concurrent_cameras_against_a_real_server(server, images):
    """16 clients, 4 requests each, mixed options: every answer is a complete 200."""

    def camera(i: int) -> list[tuple[int, tuple[int, int] | None]]:
        out = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for j in range(4):
                w, h = 48 + 8 * (i % 4), 40 + 8 * j
                png = images.make(w, h, seed=i * 10 + j)
                if j % 2:
                    r = c.post("/v1/models/toy/predict?heatmap=overlay", files=[("files", (f"{i}-{j}.png", png))])
                else:
                    r = c.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})
                size = None
                if r.status_code == 200 and r.json()["results"][0]["heatmap"]:
                    heat = Image.open(io.BytesIO(base64.b64decode(r.json()["results"][0]["heatmap"])))
                    size = heat.size
                    assert size == (w, h)
                out.append((r.status_code, size))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [x for chunk in pool.map(camera, range(16)) for x in chunk]
    assert [status for status, _ in results] == [200] * 64
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'anoscope_images_total{model="toy"}' in metrics


@pytest.mark.slow
def test_a_real_server_refuses_an_oversized_chunked_upload_early(server):
    """Chunked upload without Content-Length: the 413 arrives while the client is still sending."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"\0" * 64 * 1024)
        try:
            for _ in range(160):  # up to 10 MB
                sock.sendall(chunk)
                sent += 64 * 1024
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"application/problem+json" in reply
    assert sent < 10 * 1024 * 1024  # the server stopped taking bytes long before the end
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.slow
def test_clients_that_disconnect_mid_upload_do_not_disturb_the_service(server, images):
    heads = [
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n400\r\n",
    ]
    for head in heads:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head + b"\0" * 1000)
            time.sleep(0.1)  # gone before the body is complete
    r = httpx.post(f"{server.url}/v1/predict", content=images.make(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert "Traceback" not in server.output


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_exits_cleanly(tmp_path, images):
    from tests.toy_bundle import make_toy_bundle

    make_toy_bundle(tmp_path / "models" / "toy")
    srv = Server(["--model-dir", str(tmp_path / "models")], service_env(), cwd=tmp_path)
    big = images.make(1600, 1200, fmt="JPEG")  # with an overlay heatmap, a few hundred ms of work each
    try:
        srv.wait_ready()
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(
                    httpx.post, f"{srv.url}/v1/predict?heatmap=overlay", content=big,
                    headers={"Content-Type": "image/jpeg"}, timeout=60,
                )
                for _ in range(4)
            ]  # fmt: skip
            deadline = time.monotonic() + 30
            while 'anoscope_images_in_flight{model="toy"} 4.0' not in httpx.get(f"{srv.url}/metrics").text:
                assert time.monotonic() < deadline, "the four requests never were in flight together"
                time.sleep(0.01)
            srv.proc.send_signal(signal.SIGTERM)  # all four accepted and being worked on
            statuses = [f.result().status_code for f in futures]
        code = srv.proc.wait(timeout=30)
    finally:
        srv.stop()
    assert statuses == [200] * 4
    # uvicorn re-raises the signal once it has drained, so supervisors see the usual 128+15.
    assert code in (0, -signal.SIGTERM), srv.output
    assert "Application shutdown complete" in srv.output and "Finished server process" in srv.output


def _serve(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "anoscope", "serve", *args]
    return subprocess.run(cmd, env=env or service_env(), cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_missing_model_directory_is_a_clear_start_up_error(tmp_path):
    r = _serve("--model-dir", str(tmp_path / "nowhere"), "--port", str(free_port()))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"anoscope serve: model directory {tmp_path / 'nowhere'} does not exist; point ANOSCOPE_MODEL_DIR (or "
        "--model-dir) at a folder of bundles made by `anoscope export` (one sub-folder per model, each with "
        "model.onnx and model.json)"
    )


def test_invalid_settings_are_a_clear_start_up_error(tmp_path):
    r = _serve("--model-dir", str(tmp_path), env=service_env(ANOSCOPE_MAX_FILES="0", ANOSCOPE_API_KEYS="tiny"))
    assert r.returncode == 2
    assert "anoscope serve: invalid settings:" in r.stderr
    assert "ANOSCOPE_MAX_FILES: Input should be greater than or equal to 1" in r.stderr
    assert "ANOSCOPE_API_KEYS: API key #1 is too weak" in r.stderr
    assert "tiny" not in r.stderr


def test_serve_help_lists_the_flags():
    from anoscope import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0


def test_flags_override_the_environment(monkeypatch):
    import argparse

    from service import serve

    parser = argparse.ArgumentParser()
    serve.build_parser(parser)
    args = parser.parse_args(["--port", "9001", "--providers", "cpu"])
    assert serve._overrides(args) == {"port": 9001, "providers": "cpu"}  # unset flags do not mask ANOSCOPE_*


def test_the_harness_reports_a_server_that_exits_instead_of_waiting(tmp_path):
    srv = LocalServer(["--model-dir", str(tmp_path / "nowhere")], env=service_env(), cwd=tmp_path)
    with srv, pytest.raises(RuntimeError, match="exited with code 2") as exc:
        srv.wait_ready(timeout=60)
    assert "model directory" in str(exc.value) and "does not exist" in str(exc.value)  # its output comes along
