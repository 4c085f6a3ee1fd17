"""Keeping what the line sends: every image the service flags, and a sample of the rest, with its answer.

A quality engineer wants to look at what was rejected, and a recalibration wants fresh good parts from
the line (`anoscope calibrate --normals ... --defects ...`). The archive gives both, as plain folders
that `calibrate` reads as they are:

    ARCHIVE_DIR/<model>/flagged/    images answered is_anomalous: true (false alarms included: review them)
    ARCHIVE_DIR/<model>/passed/     every Nth image answered is_anomalous: false
    ARCHIVE_DIR/<model>/unjudged/   every Nth image of an uncalibrated model (is_anomalous: null)

Each image is the uploaded file byte for byte, next to a `.json` with the answer (no heatmap). Files
are written on one background thread behind a bounded queue, so a slow or full disk never delays an
answer: when the queue is full (256 images or 256 MB) an image is dropped and counted, not waited
for. Each folder keeps at most `max_files` images; the oldest go first, so the disk cannot fill.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from service.app.metrics import Metrics
from service.app.schemas import ImageResult
from service.app.uploads import Upload
from service.images import FORMATS

log = logging.getLogger("service.archive")

FLAGGED, PASSED, UNJUDGED = "flagged", "passed", "unjudged"
#: File suffix per Pillow format; every one is a suffix `anoscope calibrate` reads (service.datasets).
#: Formats the service decodes but `calibrate` does not list (GIF, WebP, PPM) are kept as PNG.
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}
_LOG_EVERY_S = 60.0
#: Most images the writer's queue holds, and most upload bytes (256 images of 20 MB would be 5 GB).
QUEUE_IMAGES = 256
QUEUE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class _Item:
    model: str
    folder: str
    data: bytes
    record: dict


class Archive:
    """Decides what to keep (on the event loop, without blocking) and writes it (on its own thread)."""

    def __init__(self, root: Path, *, passed_every: int, max_files: int, metrics: Metrics):
        self.root = Path(root)
        self.passed_every = passed_every
        self.max_files = max_files
        self.metrics = metrics
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=QUEUE_IMAGES)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._seen: dict[str, int] = {}  # per model: images not flagged so far, for the every-Nth sample
        self._kept: dict[Path, deque[Path]] = {}  # per folder: its images, oldest first
        self._seq = 0
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._run, name="anoscope-archive", daemon=True)

    def start(self) -> None:
        """Create the root (an error here says what to fix) and start the writer."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".anoscope-write-test"
        probe.write_bytes(b"")
        probe.unlink()
        self._thread.start()

    def submit(self, model: str, uploads: Sequence[Upload], results: Sequence[ImageResult]) -> None:
        """Queue what this request's answers say to keep; never blocks."""
        for upload, result in zip(uploads, results, strict=True):
            folder = self._folder(model, result)
            if folder is None:
                continue
            if not self._reserve(len(upload.data)):
                self.metrics.archive_dropped.labels(model).inc()
                continue
            record = result.model_dump(mode="json", exclude={"heatmap"})
            record["archived_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            try:
                self._queue.put_nowait(_Item(model, folder, upload.data, record))
            except queue.Full:
                self._release(len(upload.data))
                self.metrics.archive_dropped.labels(model).inc()

    def _reserve(self, size: int) -> bool:
        """Count `size` bytes into the queue's budget, or say there is no room for them."""
        with self._bytes_lock:
            if self._queued_bytes + size > QUEUE_BYTES:
                return False
            self._queued_bytes += size
            return True

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def _folder(self, model: str, result: ImageResult) -> str | None:
        if result.is_anomalous:
            return FLAGGED
        if self.passed_every < 1:
            return None
        seen = self._seen.get(model, 0)
        self._seen[model] = seen + 1
        if seen % self.passed_every:
            return None
        return UNJUDGED if result.is_anomalous is None else PASSED

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (or dropped on an error); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued for at most `timeout` seconds in all (inside `docker stop`'s 10-s grace),
        then stop the writer; what is left is dropped with the process."""
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        if not self.drain(timeout):
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # a last request came in after the drain: the daemon thread ends with the process
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(item)
                self.metrics.archived.labels(item.model, item.folder).inc()
            except Exception as exc:  # a full or read-only disk must never stop the writer
                self.metrics.archive_failures.labels(item.model).inc()
                now = time.monotonic()
                if now - self._last_log > _LOG_EVERY_S:
                    self._last_log = now
                    log.warning("archiving an image of model %s under %s failed: %s", item.model, self.root, exc)
            finally:
                self._release(len(item.data))
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, item: _Item) -> None:
        folder = self.root / item.model / item.folder
        folder.mkdir(parents=True, exist_ok=True)
        kept = self._kept.get(folder)
        if kept is None:  # first image in this folder since start-up: pick up what earlier runs left
            for part in folder.glob("*.part"):  # a write a crash cut short
                part.unlink(missing_ok=True)
            kept = self._kept[folder] = deque(sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES.values()))
        data, suffix = _as_stored(item.data)
        self._seq += 1
        stem = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{self._seq:06d}"
        image = folder / f"{stem}{suffix}"
        # each written under a name calibrate does not read, then renamed: a crash never leaves half an image
        answer = folder / f"{stem}.json"
        _write_atomic(answer, json.dumps(item.record, indent=1).encode())
        try:
            _write_atomic(image, data)
        except OSError:
            answer.unlink(missing_ok=True)  # no answer without its image
            raise
        kept.append(image)
        while len(kept) > self.max_files:
            old = kept.popleft()
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def _as_stored(data: bytes) -> tuple[bytes, str]:
    """The upload's bytes and suffix, or a PNG of it where `calibrate` would not read its format."""
    img = Image.open(io.BytesIO(data), formats=FORMATS)  # the service decoded it already: header only
    if img.format in SUFFIXES:
        return data, SUFFIXES[img.format]
    img.load()
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue(), ".png"


def _write_atomic(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as fh:
        fh.write(data)
    os.replace(part, path)
