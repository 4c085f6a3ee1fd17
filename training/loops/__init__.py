"""Training loops: one `Loop` per family (its phases, optimisers and step) and the engine that runs it."""

from __future__ import annotations

from models import Detector
from training.config import TrainConfig
from training.runtime import Precision

from .anogan import AnoGANLoop
from .base import Loop
from .skipganomaly import SkipGANomalyLoop

__all__ = ["AnoGANLoop", "Loop", "SkipGANomalyLoop", "make_loop"]


def make_loop(model: Detector, config: TrainConfig, precision: Precision) -> Loop:
    """The loop of `config.model.family` (config must be `resolved()`)."""
    cls = AnoGANLoop if config.model.family == "anogan" else SkipGANomalyLoop
    return cls(model, config, precision)
