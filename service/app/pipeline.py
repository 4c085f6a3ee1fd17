"""One prediction request: decode -> batched inference -> post-processing, off the event loop.

Decoding/pre-processing and post-processing run in worker threads (bounded by a capacity limiter, which
also bounds their memory); inference goes through the model's micro-batcher. Every number comes from
`service.postprocess`, the same functions `evaluate` and `calibrate` use.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import anyio
import numpy as np
from PIL import Image

from service.app.archive import Archive
from service.app.metrics import Metrics
from service.app.registry import ModelEntry
from service.app.schemas import ImageResult, ModelRef, RegionOut, Timings
from service.app.uploads import Upload
from service.bundle import BundleMetadata
from service.engine import RawOutput, preprocess_for
from service.images import decode_image, to_rgb_array
from service.postprocess import colorize, combine_scores, encode_png, find_regions, normalize, overlay
from service.tiles import Grid, map_to_input, merge


class HeatmapMode(str, Enum):
    none = "none"
    png = "png"
    overlay = "overlay"


@dataclass(frozen=True)
class PredictOptions:
    heatmap: HeatmapMode = HeatmapMode.none
    regions: bool = True


@dataclass
class Decoded:
    """One image ready for inference."""

    filename: str | None
    size: tuple[int, int]  # (width, height)
    tiles: np.ndarray  # (n, C, S, S): one square model input per tile (n = 1 unless the bundle cuts tiles)
    grid: Grid
    image: Image.Image | None  # kept only when an overlay is asked for
    seconds: float


def _what(i: int, upload: Upload, count: int) -> str:
    if count == 1 and upload.filename is None:
        return "the image"
    name = f" ({upload.filename!r})" if upload.filename else ""
    return f"file {i + 1}{name}"


def decode(upload: Upload, meta: BundleMetadata, *, max_pixels: int, keep: bool, what: str) -> Decoded:
    """Decode and pre-process one image; `keep` holds on to the decoded image (for an overlay)."""
    start = time.perf_counter()
    img = decode_image(upload.data, max_pixels=max_pixels, what=what)
    tiles, grid = preprocess_for(meta, img)
    return Decoded(upload.filename, img.size, tiles, grid, img if keep else None, time.perf_counter() - start)


def decode_all(uploads: Sequence[Upload], meta: BundleMetadata, max_pixels: int, keep: bool) -> list[Decoded]:
    return [
        decode(up, meta, max_pixels=max_pixels, keep=keep, what=_what(i, up, len(uploads)))
        for i, up in enumerate(uploads)
    ]


def _heatmap_png(amap: np.ndarray, meta: BundleMetadata, d: Decoded, mode: HeatmapMode) -> str:
    # Normalised at model resolution, then resized: the same picture as resizing first, at a fraction of the cost.
    heat01 = map_to_input(normalize(amap, meta.normalization.pixel).astype(np.float32), d.grid.pose, d.size)
    if mode is HeatmapMode.overlay and d.image is not None:
        rgb = overlay(to_rgb_array(d.image), heat01)
    else:
        rgb = colorize(heat01)
    return base64.b64encode(encode_png(rgb)).decode("ascii")


def postprocess(
    meta: BundleMetadata,
    model: ModelRef,
    decoded: Sequence[Decoded],
    raw: RawOutput,
    inference_ms: float,
    options: PredictOptions,
) -> list[tuple[ImageResult, float]]:
    merged = merge(raw.residual_score, raw.discrimination_score, raw.anomaly_map, [d.grid for d in decoded])
    residual = np.array([m.residual_score for m in merged])
    discrimination = np.array([m.discrimination_score for m in merged])
    maps = [m.anomaly_map for m in merged]
    aspect = [d.size[0] / d.size[1] for d in decoded]
    combined = combine_scores(residual, discrimination, meta.score_stats, meta.score_weights, aspect)
    normalized = normalize(combined, meta.normalization.image)
    calibrated = meta.calibrated
    results = []
    for i, d in enumerate(decoded):
        start = time.perf_counter()
        regions = None
        if options.regions:
            full = merged[i].map_at(d.size)  # raw map at the input's size: region boxes in input pixels
            regions = [RegionOut(**r.to_dict()) for r in find_regions(full, meta.normalization.pixel)]
        heatmap = None
        if options.heatmap is not HeatmapMode.none:
            heatmap = _heatmap_png(maps[i], meta, d, options.heatmap)
        seconds = time.perf_counter() - start
        image_threshold = meta.thresholds.image
        verdict = bool(combined[i] >= image_threshold) if calibrated and image_threshold is not None else None
        results.append(
            (
                ImageResult(
                    filename=d.filename,
                    anomaly_score=float(normalized[i]),
                    residual_score=float(residual[i]),
                    discrimination_score=float(discrimination[i]),
                    is_anomalous=verdict,
                    calibrated=calibrated,
                    threshold=float(meta.normalization.image.threshold),
                    heatmap=heatmap,
                    regions=regions,
                    timings_ms=Timings(
                        decode=round(d.seconds * 1000, 3),
                        inference=round(inference_ms, 3),
                        postprocess=round(seconds * 1000, 3),
                    ),
                    model=model,
                ),
                seconds,
            )
        )
    return results


class Predictor:
    """Runs prediction requests against registry entries; one per app."""

    def __init__(self, *, max_pixels: int, worker_threads: int, metrics: Metrics, archive: Archive | None = None):
        self.max_pixels = max_pixels
        self.metrics = metrics
        self.archive = archive
        self._limiter = anyio.CapacityLimiter(worker_threads)

    async def predict(self, entry: ModelEntry, uploads: Sequence[Upload], options: PredictOptions) -> list[ImageResult]:
        meta = entry.metadata
        model = ModelRef(name=entry.name, version=meta.version)
        keep = options.heatmap is HeatmapMode.overlay
        with entry.batcher.admit(len(uploads)) as admission:
            decoded = await anyio.to_thread.run_sync(
                decode_all, uploads, meta, self.max_pixels, keep, limiter=self._limiter
            )
            start = time.perf_counter()
            rows = np.concatenate([d.tiles for d in decoded]) if len(decoded) > 1 else decoded[0].tiles
            raw = await admission.run(rows)
            inference_s = time.perf_counter() - start
            scored = await anyio.to_thread.run_sync(
                postprocess,
                meta,
                model,
                decoded,
                raw,
                inference_s * 1000,
                options,
                limiter=self._limiter,
            )
        m = self.metrics
        for d, (result, post_s) in zip(decoded, scored, strict=True):
            m.stage_latency.labels(entry.name, "decode").observe(d.seconds)
            m.stage_latency.labels(entry.name, "inference").observe(inference_s)
            m.stage_latency.labels(entry.name, "postprocess").observe(post_s)
            m.scores.labels(entry.name).observe(result.anomaly_score)
            if result.is_anomalous:
                m.anomalies.labels(entry.name).inc()
        m.images.labels(entry.name).inc(len(decoded))
        results = [r for r, _ in scored]
        if self.archive is not None:
            self.archive.submit(entry.name, uploads, results)
        return results
