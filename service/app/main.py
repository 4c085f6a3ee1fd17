"""The app factory: settings in, a wired FastAPI app out. Models load in the lifespan, not at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from anoscope import __version__
from service.app import problems
from service.app.archive import Archive
from service.app.metrics import Metrics, MetricsMiddleware
from service.app.pipeline import Predictor
from service.app.registry import BatchConfig, EngineFactory, ModelRegistry
from service.app.routes import docs, health, metrics, models, predict, ui
from service.app.schemas import Problem
from service.app.security import HEADER, key_digests
from service.engine import Engine, OnnxEngine
from service.settings import Settings, get_settings, settings_file, unknown_names

log = logging.getLogger("service.app")

DESCRIPTION = """\
Visual anomaly detection for inspection cameras. POST images; get back an anomaly score in [0, 1]
(0.5 = the calibrated threshold), a verdict once the model is calibrated, an optional heatmap and the
defect regions. Errors are RFC 9457 problem details (`application/problem+json`).
"""


def _openapi_with_problems(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema with every 4xx/5xx body declared as application/problem+json `Problem`.

    FastAPI files error models under application/json and adds its own 422 schema; both would
    misdescribe what `problems.py` actually sends.
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                if status[:1] in ("4", "5"):
                    response["content"] = {problems.PROBLEM_MEDIA_TYPE: problem}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    app.openapi_schema = schema
    return schema


def onnx_engine_factory(settings: Settings) -> EngineFactory:
    """Engines as `anoscope serve` builds them: ONNX Runtime with the configured providers and threads."""

    def build(path: Path) -> Engine:
        return OnnxEngine(path, providers=settings.providers, intra_op_threads=settings.intra_op_threads)

    return build


def _start_archive(settings: Settings, metrics: Metrics) -> Archive | None:
    """The archive ANOSCOPE_ARCHIVE_DIR asks for; None (with an error logged) where it cannot be written:
    a line must not stop because its archive folder is wrong."""
    if settings.archive_dir is None:
        return None
    archive = Archive(
        settings.archive_dir,
        passed_every=settings.archive_passed_every,
        max_files=settings.archive_max_files,
        metrics=metrics,
    )
    try:
        archive.start()
    except OSError as exc:
        log.error(
            "archiving is off: cannot write to ANOSCOPE_ARCHIVE_DIR=%s (%s); create the folder and let the "
            "service's user write to it, then restart",
            settings.archive_dir,
            exc,
        )
        return None
    every = f", and one in {settings.archive_passed_every} other images" if settings.archive_passed_every else ""
    log.info(
        "archiving flagged images%s under %s (at most %d per model and folder)",
        every,
        settings.archive_dir,
        settings.archive_max_files,
    )
    return archive


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the service. `engine_factory(bundle_dir) -> Engine` defaults to ONNX Runtime (tests pass fakes)."""
    settings = settings or get_settings()
    factory = engine_factory or onnx_engine_factory(settings)
    metrics_ = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.warnings():
            log.warning("%s", warning)
        for name in unknown_names(settings_file()):
            log.warning("%s matches no setting and is ignored; check its spelling", name)
        log.info(
            "anoscope %s: models from %s, providers %s, batches of <= %d (wait <= %g ms), queue %d, API keys: %s",
            __version__,
            settings.model_dir,
            ",".join(settings.providers),
            settings.max_batch_size,
            settings.max_batch_wait_ms,
            settings.max_queue,
            f"{len(settings.api_keys)} configured" if settings.api_keys else "off",
        )
        registry = ModelRegistry(
            settings.model_dir,
            engine_factory=factory,
            batching=BatchConfig(
                settings.max_batch_size, settings.max_batch_wait_ms, settings.max_queue, settings.inference_timeout_s
            ),
            metrics=metrics_,
            default_model=settings.default_model,
            default_explicit=settings.default_model_explicit,
            load_timeout_s=settings.load_timeout_s,
        )
        await registry.start()
        app.state.registry = registry
        archive = _start_archive(settings, metrics_)
        app.state.predictor = Predictor(
            max_pixels=settings.max_pixels, worker_threads=settings.worker_threads, metrics=metrics_, archive=archive
        )
        try:
            yield
        finally:
            app.state.registry = None
            await registry.aclose()
            if archive is not None:
                await anyio.to_thread.run_sync(archive.close)

    app = FastAPI(
        title="anoscope",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own /openapi.json, /docs and /redoc take no dependencies; routes/docs.py serves them
        # behind the API key instead.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {"name": "predict", "description": "score images"},
            {"name": "models", "description": "loaded models, their metadata and reloads"},
            {"name": "health", "description": "liveness and readiness probes (no API key needed)"},
            {"name": "operations", "description": "metrics"},
        ],
    )
    app.state.settings = settings
    app.state.metrics = metrics_
    app.state.registry = None
    app.state.predictor = None
    app.state.api_key_digests = key_digests(settings.api_key_bytes())

    problems.install(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(docs.router)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=ui.STATIC_DIR), name="static")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=[HEADER, "Content-Type", "Content-Disposition"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics_)  # added last: outermost, sees every response
    app.openapi = partial(_openapi_with_problems, app)  # type: ignore[method-assign]
    return app
