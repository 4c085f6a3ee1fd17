"""Inference engines. The service depends on the `Engine` protocol; `OnnxEngine` implements it.

`OnnxEngine` loads a bundle into an ONNX Runtime session, preferring the providers asked for (CUDA
first by default) and falling back to the CPU; `provider` says which one actually runs.

GPU paths (docs/performance.md): the CUDA provider searches cuDNN convolution algorithms exhaustively
once per input shape; the TensorRT provider (when asked for and installed) gets an optimisation profile
for the bundle's input (batch 1 to `TRT_MAX_BATCH`), its precision (FP16/INT8 bundles), and an engine
cache on disk so a restart does not rebuild engines. Reduced-precision bundles keep float32 inputs and
outputs, so nothing else changes. IO binding is available (`io_binding=True`) but off by default: with
inputs and outputs in host memory it saves no copy, and it has not been measured on a GPU yet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from service.bundle import MODEL_FILE, BundleMetadata, read_metadata
from service.errors import BundleError, InferenceError, InvalidImageError
from service.images import load_image_file
from service.tiles import Grid, Merged, merge, preprocess_tiles

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: Largest batch the TensorRT optimisation profile covers (the service batches 8 by default).
TRT_MAX_BATCH = 64
TRT_OPT_BATCH = 8


@dataclass(frozen=True)
class RawOutput:
    """The scoring head's outputs for a batch, as the graph computed them."""

    residual_score: np.ndarray  # (B,)
    discrimination_score: np.ndarray  # (B,)
    anomaly_map: np.ndarray  # (B, S, S) float32, model resolution

    def __len__(self) -> int:
        return len(self.residual_score)


@dataclass(frozen=True)
class ImageOutput:
    """One image's raw outputs with the anomaly map at the image's own size."""

    residual_score: float
    discrimination_score: float
    anomaly_map: np.ndarray  # (H, W) float32, input resolution


@runtime_checkable
class Engine(Protocol):
    """What the service needs from a model: metadata, the active provider, and batched inference."""

    @property
    def metadata(self) -> BundleMetadata: ...

    @property
    def provider(self) -> str: ...

    def run(self, batch: np.ndarray) -> RawOutput:
        """Score a pre-processed batch (B, C, S, S) float32."""
        ...


def provider_chain(
    preference: Sequence[str],
    available: Sequence[str],
    *,
    tensorrt: Mapping[str, str] | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime provider list for a preference like ("cuda", "cpu"), keeping only available ones.

    The CPU provider always ends the chain, so a box without a GPU still serves. `tensorrt` holds the
    TensorRT provider's options (see `tensorrt_options`).
    """
    chain: list[str | tuple[str, dict[str, Any]]] = []
    for key in preference:
        name = PROVIDER_NAMES.get(key.lower().strip())
        if name is None:
            msg = f"unknown execution provider {key!r}; choose from {', '.join(PROVIDER_NAMES)}"
            raise ValueError(msg)
        if name not in available or any((c if isinstance(c, str) else c[0]) == name for c in chain):
            continue
        if name == "CUDAExecutionProvider":
            # Fixed input shapes: one exhaustive cuDNN search per batch size pays off on every later call.
            chain.append((name, {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "1"}))
        elif name == "TensorrtExecutionProvider" and tensorrt:
            chain.append((name, dict(tensorrt)))
        else:
            chain.append(name)
    if "CPUExecutionProvider" not in [c if isinstance(c, str) else c[0] for c in chain]:
        chain.append("CPUExecutionProvider")
    return chain


def tensorrt_cache_dir(meta: BundleMetadata) -> Path:
    """Where TensorRT engines of a bundle version are cached: $XDG_CACHE_HOME/anoscope/tensorrt/<version>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "anoscope" / "tensorrt" / f"{meta.name}-{meta.version}"


def tensorrt_options(meta: BundleMetadata, *, cache_dir: Path | None = None) -> dict[str, str]:
    """TensorRT provider options for a bundle: an optimisation profile over the batch axis, the bundle's
    precision, and engine + timing caches (building an engine takes minutes; loading one, seconds)."""
    shape = f"{meta.channels}x{meta.image_size}x{meta.image_size}"
    cache = str(cache_dir or tensorrt_cache_dir(meta))
    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": f"{meta.input_name}:1x{shape}",
        "trt_profile_opt_shapes": f"{meta.input_name}:{TRT_OPT_BATCH}x{shape}",
        "trt_profile_max_shapes": f"{meta.input_name}:{TRT_MAX_BATCH}x{shape}",
    }
    if meta.precision == "fp16":
        options["trt_fp16_enable"] = "True"
    elif meta.precision == "int8":
        options["trt_int8_enable"] = "True"  # explicit quantisation: the QDQ nodes carry the scales
    return options


class OnnxEngine:
    """A bundle loaded into an ONNX Runtime session."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        *,
        providers: Sequence[str] = ("cuda", "cpu"),
        intra_op_threads: int | None = None,
        io_binding: bool = False,
    ) -> None:
        import onnxruntime as ort  # imported here so `service.engine` can be imported for its types cheaply

        self.bundle_dir = Path(bundle_dir)
        self._metadata = read_metadata(self.bundle_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ORT's pool threads spin after each run waiting for the next one; between a service's requests
        # that is pure CPU burnt (measured: ~9 ms per request at one client, 128 px; docs/performance.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # ORT's own warnings (e.g. missing CUDA libs) are summarised by us
        chain = provider_chain(providers, ort.get_available_providers(), tensorrt=tensorrt_options(self._metadata))
        self._chain = chain
        # ORT prints a red provider-library error when CUDA is absent; we log one clear line instead.
        ort.set_default_logger_severity(4)
        try:
            self._session = ort.InferenceSession(
                str(self.bundle_dir / MODEL_FILE), sess_options=options, providers=chain
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            msg = f"{self.bundle_dir / MODEL_FILE} could not be loaded by ONNX Runtime: {exc}"
            raise BundleError(msg) from exc
        finally:
            ort.set_default_logger_severity(3)
        self._provider = self._session.get_providers()[0]
        wanted = PROVIDER_NAMES.get(str(providers[0]).lower(), "") if providers else ""
        if wanted and wanted != self._provider:
            log.warning(
                "model %s: %s was asked for but is unavailable here; running on %s",
                self._metadata.name,
                wanted,
                self._provider,
            )
        inputs = self._session.get_inputs()
        outputs = [o.name for o in self._session.get_outputs()]
        if [i.name for i in inputs] != [self._metadata.input_name] or outputs != list(self._metadata.output_names):
            msg = (
                f"{self.bundle_dir}: model.onnx has inputs {[i.name for i in inputs]} and outputs {outputs}, "
                f"but model.json promises {[self._metadata.input_name]} and {self._metadata.output_names}; "
                "re-export the bundle"
            )
            raise BundleError(msg)
        self._input_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        self._io_binding = io_binding

    @property
    def metadata(self) -> BundleMetadata:
        return self._metadata

    @property
    def provider(self) -> str:
        return self._provider

    def run(self, batch: np.ndarray) -> RawOutput:
        m = self._metadata
        expected = (m.channels, m.image_size, m.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            msg = f"batch has shape {batch.shape}; model {m.name} expects (B, {', '.join(map(str, expected))})"
            raise InferenceError(msg)
        feed = {m.input_name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        try:
            if self._io_binding:
                residual, discrimination, amap = self._run_bound(feed)
            else:
                residual, discrimination, amap = self._session.run(None, feed)
        except Exception as exc:
            msg = f"ONNX Runtime failed on model {m.name} ({self._provider}): {exc}"
            raise InferenceError(msg) from exc
        return RawOutput(
            residual_score=np.asarray(residual, dtype=np.float32).reshape(-1),
            discrimination_score=np.asarray(discrimination, dtype=np.float32).reshape(-1),
            anomaly_map=np.asarray(amap, dtype=np.float32)[:, 0],
        )

    @property
    def providers_requested(self) -> list[str | tuple[str, dict[str, Any]]]:
        """The provider chain (with options) the session was created with."""
        return list(self._chain)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """`session.run` through IO binding: input copied to the device once, outputs bound in host memory."""
        binding = self._session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name in self._metadata.output_names:
            binding.bind_output(name)
        self._session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run dummy batches so the first real request does not pay for allocation and kernel search."""
        m = self._metadata
        for b in batch_sizes:
            self.run(np.zeros((b, m.channels, m.image_size, m.image_size), dtype=np.float32))


def preprocess_for(meta: BundleMetadata, img: Image.Image) -> tuple[np.ndarray, Grid]:
    """Pre-process a decoded image for the model described by `meta`: its tiles (n, C, S, S) and their grid."""
    return preprocess_tiles(
        img,
        image_size=meta.image_size,
        channels=meta.channels,
        mean=meta.mean,
        std=meta.std,
        resize=meta.resize,
        align=meta.align,
        crop_box=meta.crop_box,
        exposure=meta.exposure,
    )


def run_tiles(
    engine: Engine, tiles: Sequence[np.ndarray], grids: Sequence[Grid], *, batch_size: int = 16
) -> list[Merged]:
    """Score images given as tile stacks, at most `batch_size` tiles per engine call; one `Merged` per image."""
    rows = np.concatenate(tiles) if len(tiles) > 1 else tiles[0]
    raw = run_rows(engine, rows, batch_size=batch_size)
    return merge(raw.residual_score, raw.discrimination_score, raw.anomaly_map, grids)


def run_rows(engine: Engine, rows: np.ndarray, *, batch_size: int = 16) -> RawOutput:
    """Model inputs (N, C, S, S) through the engine at most `batch_size` at a time, outputs joined."""
    outs = [engine.run(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
    if len(outs) == 1:
        return outs[0]
    return RawOutput(
        np.concatenate([o.residual_score for o in outs]),
        np.concatenate([o.discrimination_score for o in outs]),
        np.concatenate([o.anomaly_map for o in outs]),
    )


def predict_images(engine: Engine, images: Sequence[Image.Image], *, batch_size: int = 16) -> list[ImageOutput]:
    """Score decoded images in batches; anomaly maps come back at each image's own size."""
    meta = engine.metadata
    results: list[ImageOutput] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        cut = [preprocess_for(meta, im) for im in chunk]
        merged = run_tiles(engine, [t for t, _ in cut], [g for _, g in cut], batch_size=batch_size)
        for im, m in zip(chunk, merged, strict=True):
            results.append(
                ImageOutput(
                    residual_score=m.residual_score,
                    discrimination_score=m.discrimination_score,
                    anomaly_map=m.map_at(im.size),
                )
            )
    return results


def score_files(
    engine: Engine,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 16,
    on_error: Callable[[int, InvalidImageError], None] | None = None,
) -> Iterator[tuple[int, Image.Image, ImageOutput]]:
    """Decode and score image files in batches, yielding `(index, image, output)` in file order.

    The one loop `evaluate` and `calibrate` share. An unreadable file raises its InvalidImageError
    (which names it), unless `on_error` is given: then it receives the index and error and the file is
    skipped.
    """
    for start in range(0, len(paths), batch_size):
        indices, images = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(load_image_file(paths[i]))
            except InvalidImageError as exc:
                if on_error is None:
                    raise
                on_error(i, exc)
                continue
            indices.append(i)
        if images:
            yield from zip(indices, images, predict_images(engine, images, batch_size=batch_size), strict=True)
