"""POST /v1/models/{name}/predict and POST /v1/predict: score images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from service.app.deps import PredictorDep, RegistryDep, SettingsDep
from service.app.pipeline import HeatmapMode, PredictOptions
from service.app.schemas import PredictResponse, problem_responses
from service.app.security import require_api_key
from service.app.uploads import read_uploads

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

_BINARY = {"type": "string", "format": "binary"}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "Either multipart/form-data with one or more images in the field `files`, or one image as the "
            "raw body with an image/* (or application/octet-stream) Content-Type."
        ),
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                }
            },
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}
_ERRORS = problem_responses(400, 401, 404, 413, 415, 422, 500, 503)

HeatmapQuery = Annotated[
    HeatmapMode,
    Query(description="none; png: the colour-mapped anomaly map; overlay: that map blended over the image"),
]
RegionsQuery = Annotated[bool, Query(description="include the defect regions (connected components)")]


async def _predict(
    name: str | None,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    options: PredictOptions,
) -> Response:
    async with registry.use(name) as entry:
        entry.batcher.check_room()  # refuse (503) before reading the body when the queue is already full
        uploads = await read_uploads(request, max_body_bytes=settings.max_body_bytes, max_files=settings.max_files)
        results = await predictor.predict(entry, uploads, options)
    body = PredictResponse(results=results).model_dump_json()
    return Response(body, media_type="application/json")


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=REQUEST_BODY,
    summary="Score images with a named model",
)
async def predict_named(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    heatmap: HeatmapQuery = HeatmapMode.none,
    regions: RegionsQuery = True,
) -> Response:
    options = PredictOptions(heatmap=heatmap, regions=regions)
    return await _predict(name, request, registry, settings, predictor, options)


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=REQUEST_BODY,
    summary="Score images with the default model",
)
async def predict_default(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    heatmap: HeatmapQuery = HeatmapMode.none,
    regions: RegionsQuery = True,
) -> Response:
    options = PredictOptions(heatmap=heatmap, regions=regions)
    return await _predict(None, request, registry, settings, predictor, options)
