"""Shared dependencies, as `Annotated` aliases routes declare (tests override them via the app).

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a worker
thread, and three thread hops per request cost more CPU than reading `app.state` (docs/performance.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.app.metrics import Metrics
from service.app.pipeline import Predictor
from service.app.registry import ModelRegistry
from service.errors import ModelNotReadyError
from service.settings import Settings


def _state(request: Request, attr: str) -> object:
    value = getattr(request.app.state, attr, None)
    if value is None:
        msg = "the service is still starting (models are loading); retry in a moment"
        raise ModelNotReadyError(msg)
    return value


async def get_app_settings(request: Request) -> Settings:
    settings = _state(request, "settings")
    assert isinstance(settings, Settings)
    return settings


async def get_registry(request: Request) -> ModelRegistry:
    registry = _state(request, "registry")
    assert isinstance(registry, ModelRegistry)
    return registry


async def get_predictor(request: Request) -> Predictor:
    predictor = _state(request, "predictor")
    assert isinstance(predictor, Predictor)
    return predictor


async def get_metrics(request: Request) -> Metrics:
    metrics = _state(request, "metrics")
    assert isinstance(metrics, Metrics)
    return metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
