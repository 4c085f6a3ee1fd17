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


def served_like_trained(run: Path, bundle: Path, data: Path) -> tuple[Any, Path, Any, Any]:
    """Export `run` to `bundle`, load it in the ONNX engine, and pre-process `data`'s first test image as
    the service does, checking that training's dataset gives the very same input: (engine, path, input,
    grid)."""
    import numpy as np
    from PIL import Image

    from service.engine import OnnxEngine, preprocess_for
    from training.checkpoint import load_trained
    from training.data import ImageDataset
    from training.export import export_bundle

    trained = load_trained(run)
    export_bundle(trained, bundle)
    engine = OnnxEngine(bundle, providers=("cpu",))
    path = sorted((data / "test").rglob("*.png"))[0]
    served, grid = preprocess_for(engine.metadata, Image.open(path))
    np.testing.assert_array_equal(ImageDataset.for_model([path], trained.model_config).images.numpy(), served)
    return engine, path, served, grid
