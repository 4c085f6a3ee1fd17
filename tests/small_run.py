"""A training run that finishes in seconds, for the end-to-end tests of the `auto` pre-processing choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.config import ModelConfig
from training.config import TrainConfig


def small_run(
    data: Path, out: Path, *, epochs: int = 1, train: dict[str, Any] | None = None, **model: Any
) -> TrainConfig:
    """64 px, width 0.25, batches of 8, a quarter of the normals held out, no progress bars; `model` sets
    ModelConfig fields and `train` further TrainConfig fields."""
    return TrainConfig(
        data=str(data),
        out=str(out),
        model=ModelConfig(image_size=64, width_mult=0.25, **model),
        epochs=epochs,
        batch_size=8,
        val_fraction=0.25,
        progress=False,
        **(train or {}),
    )
