"""Run the inspection REST service (uvicorn) on the bundles of a model directory.

Settings come from ANOSCOPE_* environment variables and an optional settings file
(ANOSCOPE_SETTINGS_FILE, else ./.env); the flags below override them. With no configuration it serves
the packaged demo model on http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from pydantic import ValidationError

from service.settings import PACKAGED_MODEL_DIR, Settings, load_settings

log = logging.getLogger("service.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.argument_default = argparse.SUPPRESS  # unset flags fall through to the environment and settings file
    parser.add_argument("--model-dir", help="folder of bundles (ANOSCOPE_MODEL_DIR); default: the packaged demo")
    parser.add_argument("--default-model", help="model served by POST /v1/predict (ANOSCOPE_DEFAULT_MODEL)")
    parser.add_argument("--host", help="address to bind (ANOSCOPE_HOST); default 127.0.0.1")
    parser.add_argument("--port", type=int, help="port (ANOSCOPE_PORT); default 8000")
    parser.add_argument("--providers", help="execution providers in order, e.g. cuda,cpu (ANOSCOPE_PROVIDERS)")
    parser.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], help="(ANOSCOPE_LOG_LEVEL)"
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("model_dir", "default_model", "host", "port", "providers", "log_level")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        env = f"ANOSCOPE_{field.upper()}" if field != "settings" else "settings"
        lines.append(f"  {env}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "invalid settings:\n" + "\n".join(lines)


def check_model_dir(settings: Settings) -> str | None:
    """A start-up error message when the model directory is unusable, else None."""
    path = settings.model_dir
    if path.is_dir():
        return None
    if path == PACKAGED_MODEL_DIR:
        return (
            f"the packaged default model directory {path} is missing from this installation; "
            "point ANOSCOPE_MODEL_DIR (or --model-dir) at a folder of bundles made by `anoscope export`"
        )
    return (
        f"model directory {path} does not exist; point ANOSCOPE_MODEL_DIR (or --model-dir) at a folder of "
        "bundles made by `anoscope export` (one sub-folder per model, each with model.onnx and model.json)"
    )


def http_and_loop() -> tuple[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop when installed, else h11 and asyncio.

    httptools (C) and uvloop (libuv) spend less CPU per request than the pure-Python h11 parser and the
    stock asyncio loop (measured in docs/performance.md); both come with the `service` extra, and a
    service installed without them still runs.
    """
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return http, loop


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(**_overrides(args))
    except ValidationError as exc:
        print(f"anoscope serve: {_settings_error(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, TypeError) as exc:
        print(f"anoscope serve: {exc}", file=sys.stderr)
        return 2
    problem = check_model_dir(settings)
    if problem is not None:
        print(f"anoscope serve: {problem}", file=sys.stderr)
        return 2

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, force=True)
    # Malformed multipart bodies are answered with a 400 problem; the parser's own warning would only repeat it.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    import uvicorn  # imported late: `anoscope serve --help` stays instant

    from service.app.main import create_app

    http, loop = http_and_loop()
    log.info("HTTP parser %s, event loop %s", http, loop)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=http,
        loop=loop,
        log_level=settings.log_level,
        log_config=None,  # our basicConfig formats uvicorn's lines too
        timeout_graceful_shutdown=30,  # SIGTERM: stop accepting, answer what is in flight
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        log.error("the service did not start (see the errors above)")
        return 1
    return 0
