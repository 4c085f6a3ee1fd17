"""Response models of the REST API, with the examples shown in the OpenAPI schema (/docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_VERSION = "20260101T120000Z-3f2a9c1d"


class ModelRef(BaseModel):
    name: str = Field(description="the model's name in this service (its bundle folder)")
    version: str = Field(description="the bundle's export identifier")


class Timings(BaseModel):
    decode: float = Field(description="ms decoding and pre-processing this image")
    inference: float = Field(description="ms from submitting the request's images to their scores (queue + batch)")
    postprocess: float = Field(description="ms for this image's regions and heatmap")


class RegionOut(BaseModel):
    x: int = Field(description="left edge, input-image pixels")
    y: int = Field(description="top edge, input-image pixels")
    width: int
    height: int
    area: int = Field(description="pixels above the pixel threshold in this region")
    peak_score: float = Field(description="highest pixel score in the region, normalised like anomaly_score")


class ImageResult(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "filename": "cam1-000123.png",
                    "anomaly_score": 0.83,
                    "residual_score": 0.412,
                    "discrimination_score": 0.057,
                    "is_anomalous": True,
                    "calibrated": True,
                    "threshold": 2.7,
                    "heatmap": None,
                    "regions": [{"x": 120, "y": 64, "width": 31, "height": 18, "area": 402, "peak_score": 0.97}],
                    "timings_ms": {"decode": 3.1, "inference": 7.8, "postprocess": 1.9},
                    "model": {"name": "demo", "version": _VERSION},
                }
            ]
        },
    )

    filename: str | None = Field(description="the part's filename (multipart) or the Content-Disposition filename")
    anomaly_score: float = Field(ge=0, le=1, description="combined score mapped to [0, 1]; 0.5 is the threshold")
    residual_score: float = Field(description="raw reconstruction score (larger = more anomalous)")
    discrimination_score: float = Field(description="raw discriminator score (larger = more anomalous)")
    is_anomalous: bool | None = Field(description="the verdict; null while the model is uncalibrated")
    calibrated: bool = Field(description="whether `anoscope calibrate` has set the model's thresholds")
    threshold: float = Field(
        description="combined-score threshold that anomaly_score 0.5 stands for (provisional while uncalibrated)"
    )
    heatmap: str | None = Field(description="base64 PNG at the input's size when heatmap=png|overlay, else null")
    regions: list[RegionOut] | None = Field(description="defect regions, largest first; null when regions=false")
    timings_ms: Timings
    model: ModelRef


class PredictResponse(BaseModel):
    results: list[ImageResult] = Field(description="one result per image, in upload order")


class ModelSummary(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "name": "demo",
                    "state": "ready",
                    "default": True,
                    "version": _VERSION,
                    "family": "skipganomaly",
                    "image_size": 128,
                    "channels": 3,
                    "resize": "squash",
                    "align": "none",
                    "roi": "none",
                    "crop_box": [1.0, 1.0],
                    "exposure": None,
                    "precision": "fp32",
                    "provider": "CPUExecutionProvider",
                    "calibrated": False,
                    "loaded_at": "2026-01-01T12:00:00Z",
                    "error": None,
                }
            ]
        },
    )

    name: str
    state: Literal["ready", "failed"] = Field(description="failed: the bundle could not be loaded (see error)")
    default: bool = Field(description="served by POST /v1/predict")
    version: str | None = None
    family: str | None = None
    image_size: int | None = None
    channels: int | None = None
    resize: str | None = Field(default=None, description="squash, or tiles: elongated images are cut into tiles")
    align: str | None = Field(
        default=None, description="none, or principal-axis: each image's part is turned to one pose before scoring"
    )
    roi: str | None = Field(
        default=None,
        description="none, or part: scores and map count only where the part lies in the training normals",
    )
    crop_box: list[float] | None = Field(
        default=None,
        description="the share of the aligned frame's width and height the model sees ([1, 1]: all of it); less "
        "crops to where the part lies, before the image is resized to the model's input",
    )
    exposure: list[float] | None = Field(
        default=None,
        description="the mean and std of 0-1 pixels every image is brought to before scoring (one gain and "
        "offset per image, for products photographed at varying exposure); null: images are scored as they come",
    )
    precision: str | None = None
    provider: str | None = Field(default=None, description="the ONNX Runtime execution provider it runs on")
    calibrated: bool | None = None
    loaded_at: str | None = None
    error: str | None = Field(default=None, description="why loading failed, and what to do")


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float
    max_queue: int
    in_flight: int = Field(description="images admitted and not yet answered")


class ModelDetail(ModelSummary):
    thresholds: dict[str, float | None] | None = Field(default=None, description="image and pixel thresholds")
    load_seconds: float | None = Field(default=None, description="load + warm-up time")
    batching: BatchingInfo | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="the bundle's model.json")


class ModelList(BaseModel):
    default_model: str | None = Field(description="the model POST /v1/predict uses, if any")
    models: list[ModelSummary]


class ReloadResult(BaseModel):
    model: ModelDetail
    previous_version: str | None = Field(description="the version it replaced; null if it was not loaded")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[ModelRef] = Field(description="models loaded and warm")
    failed: list[str] = Field(description="models that failed to load (the service still serves the others)")


class Problem(BaseModel):
    """RFC 9457 problem details; every error response has this shape (media type application/problem+json)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:anoscope:problem:image-too-large",
                    "title": "Image too large",
                    "status": 413,
                    "detail": "file 1 ('big.png') is 60000x60000 pixels (3600.0 megapixels); the limit is 40 "
                    "megapixels (operators: set ANOSCOPE_MAX_PIXELS to change it)",
                    "instance": "/v1/predict",
                }
            ]
        },
    )

    type: str = Field(description="stable URN naming the kind of problem, e.g. urn:anoscope:problem:invalid-image")
    title: str
    status: int
    detail: str = Field(description="what went wrong and what to do about it")
    instance: str | None = Field(default=None, description="the request path")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the listed error statuses."""
    descriptions = {
        400: "bad request (invalid model name, malformed multipart body)",
        401: "API keys are configured and the X-API-Key header is missing or wrong",
        404: "no such model",
        409: "the reload failed; the old version keeps serving",
        413: "body, image or file count over a limit",
        415: "body is neither multipart/form-data nor an image",
        422: "not a decodable image, or invalid query parameters",
        500: "inference failed",
        503: "model not ready, the queue is full (see Retry-After), or inference timed out",
    }
    return {s: {"model": Problem, "description": descriptions.get(s, "error")} for s in statuses}
