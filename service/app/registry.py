"""The model registry: every bundle under the model directory, each with its engine and batcher.

* Start-up loads every bundle; one that fails is recorded (and reported by `GET /v1/models`) without
  taking the others down.
* `reload` builds and warms the new engine off the event loop while the old one keeps serving, then
  swaps it in with one assignment. Requests that already hold the old entry finish on it; it is closed
  once the last of them is done. A broken bundle leaves the old entry serving and raises
  `ReloadFailedError`.
* Model names are checked against `MODEL_NAME_PATTERN` before any path is built from them, and a bundle
  whose folder or files resolve outside the model directory (a symlink pointing elsewhere) is refused,
  so nothing outside `model_dir` is ever loaded. Symlinks within it (`line3 -> .releases/v7`) work.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.app.batching import MicroBatcher
from service.app.metrics import Metrics
from service.bundle import METADATA_FILE, MODEL_FILE, BundleMetadata, utc_now
from service.engine import Engine
from service.errors import (
    AnoscopeError,
    BundleError,
    InvalidModelNameError,
    ModelNotFoundError,
    ModelNotReadyError,
    ReloadFailedError,
)

log = logging.getLogger(__name__)

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(MODEL_NAME_PATTERN)
EngineFactory = Callable[[Path], Engine]


def validate_model_name(name: str) -> str:
    """Return `name` if it is a safe model name, else raise InvalidModelNameError (before any file access)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 80 and name.isprintable() else "(unprintable)"
        msg = (
            f"model name {shown!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', '\\' or other path characters)"
        )
        raise InvalidModelNameError(msg)
    return name


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    timeout_s: float | None = None


@dataclass
class ModelEntry:
    """A loaded model: engine, batcher, and the requests currently using it."""

    name: str
    path: Path
    engine: Engine
    batcher: MicroBatcher
    loaded_at: str
    load_seconds: float
    active: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metadata(self) -> BundleMetadata:
        return self.engine.metadata


@dataclass(frozen=True)
class LoadFailure:
    name: str
    path: Path
    error: str
    at: str


class ModelRegistry:
    """Loads, serves and reloads the bundles of one model directory."""

    def __init__(
        self,
        model_dir: Path,
        *,
        engine_factory: EngineFactory,
        batching: BatchConfig = BatchConfig(),
        metrics: Metrics | None = None,
        default_model: str = "demo",
        default_explicit: bool = False,
        load_timeout_s: float | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self._load_timeout_s = load_timeout_s
        self._factory = engine_factory
        self._batching = batching
        self._metrics = metrics or Metrics()
        self._default = default_model
        self._default_explicit = default_explicit
        self._entries: dict[str, ModelEntry] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.started = False

    # -- discovery -------------------------------------------------------------------------------
    def _single_bundle(self) -> bool:
        return (self.model_dir / METADATA_FILE).is_file()

    def _single_name(self) -> str:
        name = self.model_dir.resolve().name
        return name if _NAME_RE.fullmatch(name) else "model"

    def discover(self) -> dict[str, Path]:
        """Bundle folders by model name: the sub-folders of the model directory, or the directory itself."""
        if not self.model_dir.is_dir():
            msg = (
                f"model directory {self.model_dir} does not exist; point ANOSCOPE_MODEL_DIR (or --model-dir) "
                "at a folder of bundles made by `anoscope export`"
            )
            raise BundleError(msg)
        if self._single_bundle():
            return {self._single_name(): self.model_dir}
        found = {}
        for child in sorted(self.model_dir.iterdir()):
            if not child.is_dir() or child.name.startswith((".", "_")):
                continue
            if not _NAME_RE.fullmatch(child.name):
                log.warning("skipping %s: its name is not a valid model name (%s)", child, MODEL_NAME_PATTERN)
                continue
            found[child.name] = child
        return found

    def _path_for(self, name: str) -> Path:
        if self._single_bundle() and name == self._single_name():
            return self.model_dir
        return self.model_dir / name  # `name` is validated: no separators, no '..'

    # -- loading ---------------------------------------------------------------------------------
    def _check_confined(self, path: Path) -> None:
        root = self.model_dir.resolve()
        for p in (path, path / MODEL_FILE, path / METADATA_FILE):
            real = p.resolve()
            if real != root and not real.is_relative_to(root):
                msg = (
                    f"{p} resolves to {real}, outside the model directory {root}; copy the bundle into the model "
                    "directory (a symlink may point within it, e.g. to a folder under .releases/)"
                )
                raise BundleError(msg)

    def _build(self, name: str, path: Path) -> tuple[Engine, float]:
        """Load and warm one engine (runs in a worker thread)."""
        start = time.perf_counter()
        self._check_confined(path)
        engine = self._factory(path)
        meta = engine.metadata
        for b in sorted({1, self._batching.max_batch_size}):
            engine.run(np.zeros((b, meta.channels, meta.image_size, meta.image_size), dtype=np.float32))
        return engine, time.perf_counter() - start

    async def _load(self, name: str, path: Path) -> tuple[Engine, float]:
        """`_build` in a daemon thread of its own, awaited for at most the load timeout.

        Not `asyncio.to_thread`: a load stuck in a driver (a CUDA provider that hangs, a TensorRT build
        that never ends) cannot be cancelled, and a stuck worker of the default executor would also hold
        up the interpreter's exit. A daemon thread is abandoned instead, and its engine, should it ever
        finish, is dropped; the service goes on without the model.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[Engine, float]] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():  # the wait timed out and gave up on this load
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            try:
                result, error = self._build(name, path), None
            except BaseException as exc:  # handed to the awaiting task, which reports it
                result, error = None, exc
            with suppress(RuntimeError):  # the event loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name=f"anoscope-load-{name}", daemon=True).start()
        try:
            return await asyncio.wait_for(done, self._load_timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            msg = (
                f"loading and warming up model {name} took longer than {self._load_timeout_s:g} s "
                "(ANOSCOPE_LOAD_TIMEOUT_S); the execution provider may be stuck, or still building its engine "
                "(a first TensorRT build can take minutes: raise the limit)"
            )
            raise BundleError(msg) from None

    def _entry(self, name: str, path: Path, engine: Engine, seconds: float) -> ModelEntry:
        batcher = MicroBatcher(
            engine,
            name=name,
            max_batch_size=self._batching.max_batch_size,
            max_wait_ms=self._batching.max_wait_ms,
            max_queue=self._batching.max_queue,
            timeout_s=self._batching.timeout_s,
            metrics=self._metrics,
        )
        batcher.start()
        self._metrics.init_model(name)
        self._metrics.set_model(name, engine.metadata.version, engine.provider, calibrated=engine.metadata.calibrated)
        return ModelEntry(name, path, engine, batcher, utc_now(), round(seconds, 3))

    async def start(self) -> None:
        """Load and warm every bundle; failures are recorded and logged, never raised (except a missing dir)."""
        for name, path in self.discover().items():
            try:
                engine, seconds = await self._load(name, path)
            except Exception as exc:
                self._failures[name] = LoadFailure(name, path, _describe(exc), utc_now())
                self._metrics.load_failures.labels(name).inc()
                log.error("model %s failed to load from %s: %s", name, path, _describe(exc))
                continue
            self._entries[name] = self._entry(name, path, engine, seconds)
            meta = engine.metadata
            log.info(
                "model %s loaded: version %s, %s %dpx%s%s%s%s%s%s %s, provider %s, %s, warm in %.2fs",
                name,
                meta.version,
                meta.family,
                meta.image_size,
                " tiles" if meta.resize == "tiles" else "",
                " aligned" if meta.align != "none" else "",
                " cropped {:g} x {:g}".format(*meta.crop_box) if meta.crop_box != (1.0, 1.0) else "",
                " part-region" if meta.roi != "none" else "",
                " exposure standardised to {:g} / {:g}".format(*meta.exposure) if meta.exposure else "",
                " scores aspect-baselined" if meta.aspect_baseline else "",
                meta.precision,
                engine.provider,
                "calibrated" if meta.calibrated else "uncalibrated (verdicts null until `anoscope calibrate`)",
                seconds,
            )
        if not self._entries:
            log.error(
                "no model loaded from %s; /readyz answers 503 until one is (POST /v1/models/{name}/reload)",
                self.model_dir,
            )
        default = self.default_name()
        if default is not None and self._default_explicit and default not in self._entries:
            log.warning(
                "the default model %s (ANOSCOPE_DEFAULT_MODEL) is not loaded; POST /v1/predict will fail until it is",
                default,
            )
        elif default is None:
            log.warning("no default model: POST /v1/predict answers 404; set ANOSCOPE_DEFAULT_MODEL")
        else:
            log.info("default model: %s", default)
        self.started = True
        self._metrics.ready.set(1 if self.ready else 0)

    async def reload(self, name: str) -> tuple[ModelEntry, str | None]:
        """Re-read a bundle from disk; returns the new entry and the version it replaced."""
        validate_model_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self._entries.get(name)
            path = old.path if old is not None else self._path_for(name)
            if old is None and name not in self._failures and not path.is_dir():
                raise ModelNotFoundError(self._not_found_message(name))
            try:
                engine, seconds = await self._load(name, path)
            except Exception as exc:
                self._metrics.reload_failures.labels(name).inc()
                serving = old.metadata.version if old is not None else None
                keeps = f"version {serving} keeps serving" if serving else "the model stays unavailable"
                msg = f"reloading model {name} from {path} failed, {keeps}: {_describe(exc)}"
                log.error("%s", msg)
                raise ReloadFailedError(msg, model=name, serving_version=serving) from exc
            new = self._entry(name, path, engine, seconds)
            self._entries[name] = new  # the swap: new requests get the new entry from here on
            self._failures.pop(name, None)
            log.info(
                "model %s reloaded: version %s (was %s), provider %s",
                name,
                engine.metadata.version,
                old.metadata.version if old else "not loaded",
                engine.provider,
            )
            if old is not None:
                task = asyncio.get_running_loop().create_task(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            self._metrics.ready.set(1 if self.ready else 0)
            return new, (old.metadata.version if old else None)

    async def _retire(self, entry: ModelEntry) -> None:
        entry.retired = True
        if entry.active:
            await entry.idle.wait()
        await entry.batcher.aclose()

    async def aclose(self) -> None:
        """Answer what is queued, then stop every batcher."""
        entries = list(self._entries.values())
        self._entries.clear()
        await asyncio.gather(*(e.batcher.aclose() for e in entries), *list(self._retiring))
        self._metrics.ready.set(0)

    # -- lookup ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.started and bool(self._entries)

    def default_name(self) -> str | None:
        if self._default in self._entries or self._default in self._failures or self._default_explicit:
            return self._default
        if len(self._entries) + len(self._failures) == 1:
            return next(iter([*self._entries, *self._failures]))
        return None

    def _not_found_message(self, name: str) -> str:
        known = sorted([*self._entries, *self._failures])
        listing = ", ".join(known) if known else "none"
        return f"no model named {name!r}; models here: {listing} (see GET /v1/models)"

    def get(self, name: str) -> ModelEntry:
        validate_model_name(name)
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        failure = self._failures.get(name)
        if failure is not None:
            msg = f"model {name} failed to load: {failure.error}. Fix the bundle, then POST /v1/models/{name}/reload"
            raise ModelNotReadyError(msg)
        raise ModelNotFoundError(self._not_found_message(name))

    def get_default(self) -> ModelEntry:
        name = self.default_name()
        if name is None:
            known = ", ".join(sorted(self._entries)) or "none"
            msg = (
                f"no default model is configured and {len(self._entries)} models are loaded ({known}); "
                "POST to /v1/models/{name}/predict or set ANOSCOPE_DEFAULT_MODEL"
            )
            raise ModelNotFoundError(msg)
        return self.get(name)

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[ModelEntry]:
        """Hold a model for one request: a reload waits for its holders before closing the old engine."""
        entry = self.get_default() if name is None else self.get(name)
        entry.active += 1
        entry.idle.clear()
        try:
            yield entry
        finally:
            entry.active -= 1
            if entry.active == 0:
                entry.idle.set()

    def entries(self) -> Sequence[ModelEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def failures(self) -> Sequence[LoadFailure]:
        return [self._failures[n] for n in sorted(self._failures) if n not in self._entries]

    def failure(self, name: str) -> LoadFailure | None:
        """The load failure of a model that is not serving, if any."""
        validate_model_name(name)
        return None if name in self._entries else self._failures.get(name)


def _describe(exc: BaseException) -> str:
    """A one-line description of a load failure; domain errors already say what to do."""
    if isinstance(exc, AnoscopeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
