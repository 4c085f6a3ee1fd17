"""Shared dependencies, as `Annotated` aliases routes declare (tests override them via the app)."""

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


def get_app_settings(request: Request) -> Settings:
    settings = _state(request, "settings")
    assert isinstance(settings, Settings)
    return settings


def get_registry(request: Request) -> ModelRegistry:
    registry = _state(request, "registry")
    assert isinstance(registry, ModelRegistry)
    return registry


def get_predictor(request: Request) -> Predictor:
    predictor = _state(request, "predictor")
    assert isinstance(predictor, Predictor)
    return predictor


def get_metrics(request: Request) -> Metrics:
    metrics = _state(request, "metrics")
    assert isinstance(metrics, Metrics)
    return metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
