"""Prometheus metrics, one `CollectorRegistry` per app so several apps (tests) never share counters.

Request counts and latency are recorded by `MetricsMiddleware`, a plain ASGI middleware (cheap: no
per-request task or body copy), labelled by the route *template* so paths cannot blow up cardinality.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# anomaly_score is 0..1 with 0.5 at the threshold: finer near it, where a drifting line shows first
_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """The service's instruments, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "anoscope_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "anoscope_http_request_duration_seconds",
            "Whole-request latency by route template",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "anoscope_stage_duration_seconds",
            "Per-image time in each stage: decode (incl. pre-processing), inference (queue wait + batch), postprocess",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "anoscope_batch_size", "Images per inference batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("anoscope_queue_depth", "Images waiting for an inference batch", ["model"], registry=r)
        self.in_flight = Gauge(
            "anoscope_images_in_flight",
            "Admitted images not yet answered (bounded by max_queue)",
            ["model"],
            registry=r,
        )
        self.images = Counter("anoscope_images", "Images scored", ["model"], registry=r)
        self.anomalies = Counter(
            "anoscope_anomalies", "Images flagged anomalous (calibrated models only)", ["model"], registry=r
        )
        self.scores = Histogram(
            "anoscope_anomaly_score",
            "Per-image anomaly_score (0.5 = the threshold): its distribution drifting up on a line of good parts "
            "warns of false alarms before they come",
            ["model"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.archived = Counter(
            "anoscope_archived_images",
            "Images written to the archive (ANOSCOPE_ARCHIVE_DIR), by folder: flagged, passed, unjudged",
            ["model", "folder"],
            registry=r,
        )
        self.archive_dropped = Counter(
            "anoscope_archive_dropped",
            "Images not archived because the archive's queue was full (the disk is slower than the line)",
            ["model"],
            registry=r,
        )
        self.archive_failures = Counter(
            "anoscope_archive_failures",
            "Images the archive failed to write (disk full, permissions)",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "anoscope_overload_rejections",
            "Requests refused with 503 because the queue was full",
            ["model"],
            registry=r,
        )
        self.reload_failures = Counter(
            "anoscope_model_reload_failures", "Reloads that left the old model serving", ["model"], registry=r
        )
        self.load_failures = Counter(
            "anoscope_model_load_failures", "Bundles that failed to load at start-up", ["model"], registry=r
        )
        self.model_info = Gauge(
            "anoscope_model_info",
            "Loaded models (value 1) with version and provider",
            ["model", "version", "provider"],
            registry=r,
        )
        self.calibrated = Gauge(
            "anoscope_model_calibrated",
            "1 when the model has a calibrated threshold; 0 when it answers is_anomalous null",
            ["model"],
            registry=r,
        )
        self.ready = Gauge("anoscope_ready", "1 when models are loaded and warm", registry=r)
        self._info: dict[str, tuple[str, str]] = {}

    def init_model(self, name: str) -> None:
        """Create a model's series at zero, so dashboards and alerts see them before the first event."""
        for series in (
            self.images,
            self.anomalies,
            self.scores,
            self.rejected,
            self.reload_failures,
            self.archive_dropped,
            self.archive_failures,
        ):
            series.labels(name)
        self.queue_depth.labels(name).set(0)
        self.in_flight.labels(name).set(0)

    def set_model(self, name: str, version: str, provider: str, *, calibrated: bool) -> None:
        """Replace the info series of `name` (a reload changes the version) and its calibration state."""
        old = self._info.pop(name, None)
        if old is not None:
            self.model_info.remove(name, *old)
        self._info[name] = (version, provider)
        self.model_info.labels(name, version, provider).set(1)
        self.calibrated.labels(name).set(int(calibrated))


class MetricsMiddleware:
    """Counts every HTTP response by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status["code"])).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - start)


def _route_template(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("path", "").startswith("/static/"):
        return "/static"
    return "unmatched"
