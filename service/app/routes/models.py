"""GET /v1/models, GET /v1/models/{name}, POST /v1/models/{name}/reload."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.app.deps import RegistryDep, SettingsDep
from service.app.registry import LoadFailure, ModelEntry, ModelRegistry
from service.app.schemas import BatchingInfo, ModelDetail, ModelList, ModelSummary, ReloadResult, problem_responses
from service.app.security import require_api_key
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


def _summary(entry: ModelEntry, default: str | None) -> dict[str, object]:
    meta = entry.metadata
    return {
        "name": entry.name,
        "state": "ready",
        "default": entry.name == default,
        "version": meta.version,
        "family": meta.family,
        "image_size": meta.image_size,
        "channels": meta.channels,
        "resize": meta.resize,
        "align": meta.align,
        "roi": meta.roi,
        "crop_box": list(meta.crop_box),
        "exposure": list(meta.exposure) if meta.exposure else None,
        "precision": meta.precision,
        "provider": entry.engine.provider,
        "calibrated": meta.calibrated,
        "loaded_at": entry.loaded_at,
    }


def _failed(failure: LoadFailure, default: str | None) -> dict[str, object]:
    return {"name": failure.name, "state": "failed", "default": failure.name == default, "error": failure.error}


def _detail(entry: ModelEntry, registry: ModelRegistry, settings: Settings) -> ModelDetail:
    meta = entry.metadata
    return ModelDetail(
        **_summary(entry, registry.default_name()),  # type: ignore[arg-type]
        thresholds={"image": meta.thresholds.image, "pixel": meta.thresholds.pixel},
        load_seconds=entry.load_seconds,
        batching=BatchingInfo(
            max_batch_size=settings.max_batch_size,
            max_batch_wait_ms=settings.max_batch_wait_ms,
            max_queue=settings.max_queue,
            in_flight=entry.batcher.in_flight,
        ),
        metadata=meta.model_dump(mode="json"),
    )


@router.get("", response_model=ModelList, responses=problem_responses(401), summary="List the models")
async def list_models(registry: RegistryDep) -> ModelList:
    default = registry.default_name()
    models = [ModelSummary(**_summary(e, default)) for e in registry.entries()]  # type: ignore[arg-type]
    models += [ModelSummary(**_failed(f, default)) for f in registry.failures()]  # type: ignore[arg-type]
    models.sort(key=lambda m: m.name)
    return ModelList(default_model=default, models=models)


@router.get(
    "/{name}",
    response_model=ModelDetail,
    responses=problem_responses(400, 401, 404),
    summary="A model's metadata, provider and calibration state",
)
async def get_model(name: str, registry: RegistryDep, settings: SettingsDep) -> ModelDetail:
    failure = registry.failure(name)
    if failure is not None:
        return ModelDetail(**_failed(failure, registry.default_name()))  # type: ignore[arg-type]
    return _detail(registry.get(name), registry, settings)


@router.post(
    "/{name}/reload",
    response_model=ReloadResult,
    responses=problem_responses(400, 401, 404, 409),
    summary="Re-read a bundle from disk; the old version serves until the new one is warm",
)
async def reload_model(name: str, registry: RegistryDep, settings: SettingsDep) -> ReloadResult:
    entry, previous = await registry.reload(name)
    return ReloadResult(model=_detail(entry, registry, settings), previous_version=previous)
