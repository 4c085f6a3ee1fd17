"""Shared fixtures.

Service fixtures (tests/test_service_*.py): a toy bundle folder, settings and TestClient factories,
an image factory that injects a known defect, and a fake engine implementing `service.engine.Engine`.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bundle import BundleMetadata, Calibration, Thresholds, read_metadata, utc_now, write_metadata
from service.engine import RawOutput
from tests.toy_bundle import make_toy_bundle

# -- service: bundles and settings --------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only model folder holding one toy bundle named `toy`. Copy it (model_dir) to change it."""
    root = tmp_path_factory.mktemp("models")
    make_toy_bundle(root / "toy")
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model folder of this test's own, with the toy bundle `toy`; tests may add or break bundles."""
    root = tmp_path / "models"
    make_toy_bundle(root / "toy")
    return root


@pytest.fixture
def calibrate_bundle() -> Callable[..., None]:
    """`calibrate_bundle(bundle_dir, image_threshold=2.0)`: real thresholds, as `anoscope calibrate` writes."""

    def apply(bundle: Path, image_threshold: float = 2.0) -> None:
        meta = read_metadata(bundle)
        image_norm = meta.normalization.image.model_copy(update={"threshold": image_threshold})
        calibration = Calibration(
            date=utc_now(),
            strategy="test",
            thresholds=Thresholds(image=image_threshold, pixel=meta.normalization.pixel.threshold),
            normalization=meta.normalization.model_copy(update={"image": image_norm}),
        )
        write_metadata(bundle, meta.with_calibration(calibration))

    return apply


@pytest.fixture
def make_settings(toy_models: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Settings for tests: toy models, CPU, no settings file, no ANOSCOPE_* from the outside; keywords override."""
    from service.settings import Settings

    for name in list(os.environ):
        if name.upper().startswith("ANOSCOPE_"):
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"model_dir": toy_models, "providers": ("cpu",), "intra_op_threads": 1}
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Start an app (lifespan included) and return its TestClient; closed at teardown.

    `make_client(engine_factory=..., raise_server_exceptions=..., **settings_overrides)`.
    """
    from fastapi.testclient import TestClient

    from service.app.main import create_app

    opened: list[Any] = []

    def make(*, engine_factory: Any = None, raise_server_exceptions: bool = True, **overrides: Any) -> TestClient:
        app = create_app(make_settings(**overrides), engine_factory=engine_factory)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    """A TestClient of the real app on the toy bundle with ONNX Runtime (CPU)."""
    return make_client()


# -- images ---------------------------------------------------------------------------------------


class ImageFactory:
    """Generated inputs: a dark noisy texture (what the toy model calls normal) with a bright defect."""

    DEFECT = (0.5, 0.25, 0.125, 0.125)  # x, y, width, height as fractions of the image

    def box(self, width: int = 64, height: int = 64) -> tuple[int, int, int, int]:
        """The injected defect's box (x, y, w, h) in pixels for an image of this size."""
        fx, fy, fw, fh = self.DEFECT
        return int(width * fx), int(height * fy), max(1, int(width * fw)), max(1, int(height * fh))

    def array(self, width: int = 64, height: int = 64, *, defect: bool = True, seed: int = 0) -> np.ndarray:
        """(H, W, 3) uint8."""
        rng = np.random.default_rng(seed)
        img = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
        if defect:
            x, y, w, h = self.box(width, height)
            img[y : y + h, x : x + w] = 250
        return img

    def encode(self, arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
        from PIL import Image

        img = Image.fromarray(arr)
        if mode is not None:
            img = img.convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    def make(
        self,
        width: int = 64,
        height: int = 64,
        *,
        defect: bool = True,
        fmt: str = "PNG",
        mode: str | None = None,
        seed: int = 0,
    ) -> bytes:
        return self.encode(self.array(width, height, defect=defect, seed=seed), fmt, mode)


@pytest.fixture(scope="session")
def images() -> ImageFactory:
    """`images.make(w, h, defect=True, fmt="PNG", mode=None)` (bytes), `images.array(...)`, `images.box(w, h)`."""
    return ImageFactory()


# -- a fake engine --------------------------------------------------------------------------------


class FakeEngine:
    """Implements `service.engine.Engine` with the toy model's maths in numpy, plus test controls.

    `gate` (a threading.Event) holds every `run` until set; `error` makes `run` raise; `delay_s` sleeps.
    """

    def __init__(
        self,
        metadata: BundleMetadata,
        *,
        gate: threading.Event | None = None,
        error: BaseException | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self._metadata = metadata
        self.gate = gate
        self.error = error
        self.delay_s = delay_s
        self.batches: list[int] = []  # batch sizes seen, warm-up included
        self.running = threading.Event()

    @property
    def metadata(self) -> BundleMetadata:
        return self._metadata

    @property
    def provider(self) -> str:
        return "FakeExecutionProvider"

    def run(self, batch: np.ndarray) -> RawOutput:
        self.batches.append(len(batch))
        self.running.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        amap = np.maximum(batch.mean(axis=1), 0).astype(np.float32)  # (B, S, S)
        return RawOutput(
            residual_score=amap.max(axis=(1, 2)), discrimination_score=amap.mean(axis=(1, 2)), anomaly_map=amap
        )


class FakeEngines:
    """An engine factory for `create_app(engine_factory=...)` that keeps the engines it made."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.engines: list[FakeEngine] = []

    def __call__(self, path: Path) -> FakeEngine:
        engine = FakeEngine(read_metadata(path), **self.options)
        self.engines.append(engine)
        return engine

    @property
    def last(self) -> FakeEngine:
        return self.engines[-1]


@pytest.fixture
def fake_engines() -> Callable[..., FakeEngines]:
    """`fake_engines(gate=..., error=..., delay_s=...)` -> a factory of FakeEngine."""
    return FakeEngines
