"""Micro-batching: concurrent requests' images share inference batches, with a bounded queue.

    request --admit(n)--> Admission --run(batch)--> pending deque --collector task--> engine.run in the
    model's inference thread --> per-image futures --> request

* Admission bounds the images a model holds in flight (decoding, queued, in inference, post-processing)
  at `max_queue`; beyond it `admit` raises `OverloadedError` (503 + Retry-After) before any work is done.
* The collector takes up to `max_batch_size` rows (images, or tiles of a bundle that cuts images into
  tiles: admission counts images, batches count rows). Once it has one, it waits at most `max_wait_ms`
  for more, and only while admitted images are still being decoded: with nothing on its way, waiting
  cannot fill the batch, so it dispatches at once (no added latency for a lone camera).
* `engine.run` runs in a single-thread executor per model, never on the event loop; while it runs, new
  images queue up and form the next batch.
* A batch that takes longer than `timeout_s` fails with `InferenceTimeoutError` (503). Its call cannot be
  interrupted and holds the inference thread, so until it returns every later batch fails the same way
  at once instead of queueing behind it; when it does return, the model serves again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from service.app.metrics import Metrics
from service.engine import Engine, RawOutput
from service.errors import AnoscopeError, InferenceError, InferenceTimeoutError, ModelNotReadyError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class _Item:
    image: np.ndarray  # (C, S, S) float32
    future: asyncio.Future[tuple[float, float, np.ndarray]]


class MicroBatcher:
    """Batches one engine's images across requests. Create, `start()` inside a running loop, `aclose()`."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        max_batch_size: int = 8,
        max_wait_ms: float = 2.0,
        max_queue: int = 64,
        timeout_s: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            msg = f"invalid batching limits: batch {max_batch_size}, queue {max_queue}, wait {max_wait_ms} ms"
            raise ValueError(msg)
        self.engine = engine
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"anoscope-infer-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0  # admitted images not yet released
        self._on_the_way = 0  # admitted images not yet submitted (still decoding)
        self._batch_seconds = 0.05  # running estimate of one batch's duration, for Retry-After
        self._rows_per_image = 1.0  # running estimate of inference rows per image (tiles), for Retry-After
        self._stuck: asyncio.Future[RawOutput] | None = None  # a timed-out engine call still holding the thread
        self._stuck_since = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def aclose(self) -> None:
        """Stop admitting, answer everything already queued, then stop the inference thread."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=False)

    @property
    def stopped(self) -> bool:
        """True once `aclose` has answered everything and the collector has ended."""
        return self._task is not None and self._task.done()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._pending)

    # -- admission -------------------------------------------------------------------------------
    @property
    def rows_per_image(self) -> float:
        """Running estimate of model inputs per admitted image: 1, or more for a bundle that cuts tiles."""
        return self._rows_per_image

    def retry_after_s(self) -> int:
        # Admission counts images, batches count rows: a tiled image takes several rows of a batch.
        batches_ahead = math.ceil(max(self._in_flight, 1) * self._rows_per_image / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def check_room(self, n: int = 1) -> None:
        """Raise OverloadedError (or ModelNotReadyError when closed) unless `n` more images fit."""
        if self._closed:
            msg = f"model {self.name} is shutting down; retry on another instance or after the restart"
            raise ModelNotReadyError(msg)
        if self._in_flight + n > self.max_queue:
            if self._metrics is not None:
                self._metrics.rejected.labels(self.name).inc()
            msg = (
                f"model {self.name} has {self._in_flight} images in flight and {n} more would pass its queue "
                f"limit of {self.max_queue}; retry after the Retry-After delay"
            )
            raise OverloadedError(msg, retry_after_s=self.retry_after_s())

    def admit(self, n: int) -> Admission:
        """Reserve room for `n` images or raise OverloadedError; use as a context manager."""
        self.check_room(n)
        self._in_flight += n
        self._on_the_way += n
        self._gauge()
        return Admission(self, n)

    def _release(self, n: int, submitted: bool) -> None:
        self._in_flight -= n
        if not submitted:
            self._on_the_way -= n
            self._wakeup.set()  # the collector may be waiting for these
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.in_flight.labels(self.name).set(self._in_flight)
            self._metrics.queue_depth.labels(self.name).set(len(self._pending))

    # -- submission ------------------------------------------------------------------------------
    async def _submit(self, batch: np.ndarray, admitted: int) -> RawOutput:
        if self._task is None or self._task.done():
            msg = f"model {self.name} is not accepting images (its batcher is stopped); retry shortly"
            raise ModelNotReadyError(msg)
        loop = asyncio.get_running_loop()
        items = [_Item(batch[i], loop.create_future()) for i in range(len(batch))]
        self._on_the_way -= admitted  # counted in images; a tiled image brings several rows
        self._rows_per_image = 0.8 * self._rows_per_image + 0.2 * len(items) / admitted
        self._pending.extend(items)
        self._gauge()
        self._wakeup.set()
        results = await asyncio.gather(*(it.future for it in items), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        rows: list[tuple[float, float, np.ndarray]] = results  # type: ignore[assignment]
        return RawOutput(
            residual_score=np.array([r[0] for r in rows], dtype=np.float32),
            discrimination_score=np.array([r[1] for r in rows], dtype=np.float32),
            anomaly_map=stack_batch([r[2] for r in rows]),
        )

    # -- the collector ---------------------------------------------------------------------------
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = loop.time() + self.max_wait_s
            while len(self._pending) < self.max_batch_size and self._on_the_way > 0 and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            take = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            take = [it for it in take if not it.future.done()]  # a cancelled request's images are dropped
            self._gauge()
            if take:
                await self._run_batch(loop, take)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        # Every failure lands on this batch's futures: the collector itself must never die, or later
        # requests would wait forever.
        start = time.perf_counter()
        try:
            out = await self._infer(loop, [it.image for it in items])
            if len(out) != len(items) or out.anomaly_map.shape[0] != len(items):
                msg = f"model {self.name} returned {len(out)} results for a batch of {len(items)} images"
                raise InferenceError(msg)
        except Exception as exc:
            error = exc
            if not isinstance(exc, AnoscopeError):
                msg = f"inference failed on model {self.name}: {type(exc).__name__}: {exc}"
                error = InferenceError(msg)
                error.__cause__ = exc
                log.exception("model %s: engine raised %s", self.name, type(exc).__name__)
            for it in items:
                if not it.future.done():
                    it.future.set_exception(error)
            return
        finally:
            elapsed = time.perf_counter() - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            if self._metrics is not None:
                self._metrics.batch_size.labels(self.name).observe(len(items))
        for i, it in enumerate(items):
            if not it.future.done():
                it.future.set_result(
                    (float(out.residual_score[i]), float(out.discrimination_score[i]), out.anomaly_map[i])
                )

    async def _infer(self, loop: asyncio.AbstractEventLoop, images: list[np.ndarray]) -> RawOutput:
        """`engine.run` on the stacked images in the inference thread, failing after `timeout_s` (see the
        module docstring). Stacking happens there too: a batch's copy is no work for the event loop."""
        if self._stuck is not None and not self._stuck.done():
            msg = (
                f"model {self.name} is not answering: an inference batch has been running for "
                f"{time.monotonic() - self._stuck_since:.0f} s (the limit is {self.timeout_s:g} s); retry later, "
                "and if it persists reload the model or restart the service (operators: ANOSCOPE_INFERENCE_TIMEOUT_S)"
            )
            raise InferenceTimeoutError(msg)
        self._stuck = None
        call = loop.run_in_executor(self._executor, _stack_and_run, self.engine, images)
        if self.timeout_s is None:
            return await call
        try:
            return await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
        except asyncio.TimeoutError:
            self._stuck, self._stuck_since = call, time.monotonic() - self.timeout_s
            call.add_done_callback(_discard_result)
            log.error(
                "model %s: a batch of %d images ran past %g s; failing it", self.name, len(images), self.timeout_s
            )
            msg = (
                f"model {self.name} did not answer within {self.timeout_s:g} s; retry later, and if it persists "
                "reload the model or restart the service (operators: ANOSCOPE_INFERENCE_TIMEOUT_S)"
            )
            raise InferenceTimeoutError(msg) from None


def stack_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack same-shape arrays into a batch (B, ...); one array (one lone camera) becomes a view, not a copy."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _stack_and_run(engine: Engine, images: list[np.ndarray]) -> RawOutput:
    return engine.run(stack_batch(images))  # (B, C, S, S)


def _discard_result(call: asyncio.Future[RawOutput]) -> None:
    """Consume a timed-out call's late outcome, so asyncio does not report an exception nobody retrieved."""
    if not call.cancelled():
        call.exception()


class Admission:
    """Room for `n` images in a batcher; submit them once with `run`, release on exit."""

    def __init__(self, batcher: MicroBatcher, n: int) -> None:
        self._batcher = batcher
        self.n = n
        self._submitted = False
        self._released = False

    async def run(self, batch: np.ndarray) -> RawOutput:
        # A bundle that cuts images into tiles (service.tiles) sends one row per tile: at least `n` rows.
        if self._submitted or len(batch) < self.n:
            msg = f"an admission for {self.n} images was submitted twice or with {len(batch)} rows"
            raise InferenceError(msg)
        self._submitted = True
        return await self._batcher._submit(batch, self.n)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release(self.n, self._submitted)

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
