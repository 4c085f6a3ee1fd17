"""Micro-batching and back-pressure: batches across requests, a bounded queue, a free event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.app.batching import MicroBatcher, stack_batch
from service.errors import InferenceError, OverloadedError


@pytest.fixture
def engine(toy_models, fake_engines):
    return fake_engines()(toy_models / "toy")


def _images(n: int, size: int = 32) -> np.ndarray:
    """n distinct pre-processed images: image i is constant (i+1)/10, so its residual score is (i+1)/10."""
    return np.stack([np.full((3, size, size), (i + 1) / 10, dtype=np.float32) for i in range(n)])


async def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_concurrent_requests_share_batches_and_get_their_own_results(engine):
    async def main():
        engine.gate = threading.Event()
        b = MicroBatcher(engine, name="toy", max_batch_size=8, max_wait_ms=1, max_queue=64)
        b.start()
        imgs = _images(6)

        async def one(i):
            with b.admit(1) as adm:
                return await adm.run(imgs[i : i + 1])

        first = asyncio.create_task(one(0))
        await _wait_until(engine.running.is_set)  # batch [0] is in the engine, held by the gate
        rest = [asyncio.create_task(one(i)) for i in range(1, 6)]
        await _wait_until(lambda: b.queued == 5)
        engine.gate.set()
        outs = await asyncio.gather(first, *rest)
        await b.aclose()
        return outs

    outs = asyncio.run(main())
    assert engine.batches == [1, 5]
    assert [float(o.residual_score[0]) for o in outs] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert all(o.anomaly_map.shape == (1, 32, 32) for o in outs)


def test_batches_never_exceed_the_maximum_size(engine):
    async def main():
        engine.gate = threading.Event()
        b = MicroBatcher(engine, name="toy", max_batch_size=8, max_wait_ms=0, max_queue=64)
        b.start()
        with b.admit(1) as adm:
            first = asyncio.create_task(adm.run(_images(1)))
            await _wait_until(engine.running.is_set)
            with b.admit(19) as big:
                task = asyncio.create_task(big.run(_images(19)))
                await _wait_until(lambda: b.queued == 19)
                engine.gate.set()
                out = await task
            await first
        await b.aclose()
        return out

    out = asyncio.run(main())
    assert engine.batches == [1, 8, 8, 3]
    assert out.residual_score.tolist() == pytest.approx([(i + 1) / 10 for i in range(19)])


def test_retry_after_counts_the_rows_tiled_images_take(engine):
    """Admission counts images; a bundle that cuts tiles sends several rows per image, so the wait a
    refusal announces grows with the rows per image the batcher has seen."""

    async def main():
        plain = MicroBatcher(engine, name="plain", max_batch_size=4, max_wait_ms=0, max_queue=64)
        tiled = MicroBatcher(engine, name="tiled", max_batch_size=4, max_wait_ms=0, max_queue=64)
        for b, rows in ((plain, 2), (tiled, 10)):
            b.start()
            for _ in range(10):
                with b.admit(2) as adm:
                    await adm.run(_images(rows))
            b._batch_seconds = 1.0  # the same measured batch time for both, so only the rows differ
            held = b.admit(40)
            yield b.rows_per_image, b.retry_after_s()
            held.release()
            await b.aclose()

    async def collect():
        return [pair async for pair in main()]

    (plain_rows, plain_wait), (tiled_rows, tiled_wait) = asyncio.run(collect())
    assert plain_rows == pytest.approx(1.0) and tiled_rows == pytest.approx(5.0, rel=0.15)
    assert plain_wait == 10, "40 images, 4 per batch, 1 s a batch"
    assert tiled_wait >= 4 * plain_wait, "five rows an image: about five times the batches ahead"


def test_the_queue_is_bounded_and_refusal_says_when_to_retry(engine):
    async def main():
        b = MicroBatcher(engine, name="toy", max_batch_size=2, max_wait_ms=0, max_queue=4)
        b.start()
        held = b.admit(3)
        with pytest.raises(OverloadedError) as err:
            b.admit(2)
        assert err.value.retry_after_s >= 1
        assert "has 3 images in flight and 2 more would pass its queue limit of 4" in str(err.value)
        b.admit(1).release()  # exactly full is fine
        held.release()
        with b.admit(4):
            assert b.in_flight == 4
        assert b.in_flight == 0
        await b.aclose()

    asyncio.run(main())


def test_it_waits_for_images_on_their_way_but_not_for_nothing(engine):
    async def main():
        b = MicroBatcher(engine, name="toy", max_batch_size=8, max_wait_ms=500, max_queue=64)
        b.start()
        # Nothing else admitted: a lone image is dispatched at once despite the 500 ms window.
        start = time.perf_counter()
        with b.admit(1) as adm:
            await adm.run(_images(1))
        lone = time.perf_counter() - start
        # Two admitted, the second still "decoding": the batch waits for it and takes both.
        a, c = b.admit(1), b.admit(1)
        t1 = asyncio.create_task(a.run(_images(1)))
        await asyncio.sleep(0.05)
        t2 = asyncio.create_task(c.run(_images(1)))
        await asyncio.gather(t1, t2)
        a.release()
        c.release()
        await b.aclose()
        return lone

    lone = asyncio.run(main())
    assert lone < 0.25
    assert engine.batches[-2:] == [1, 2]


def test_an_engine_failure_fails_that_batch_only(engine):
    async def main():
        b = MicroBatcher(engine, name="toy", max_batch_size=4, max_wait_ms=0, max_queue=8)
        b.start()
        engine.error = RuntimeError("CUDA error: device lost")
        with b.admit(2) as adm, pytest.raises(InferenceError, match="inference failed on model toy: RuntimeError: "
                                                                      "CUDA error: device lost"):  # fmt: skip
            await adm.run(_images(2))
        engine.error = None
        with b.admit(2) as adm:
            out = await adm.run(_images(2))
        await b.aclose()
        return out

    assert len(asyncio.run(main())) == 2


def test_closing_answers_everything_already_queued(engine):
    async def main():
        engine.gate = threading.Event()
        b = MicroBatcher(engine, name="toy", max_batch_size=2, max_wait_ms=0, max_queue=8)
        b.start()
        adm = b.admit(5)
        task = asyncio.create_task(adm.run(_images(5)))
        await _wait_until(lambda: b.queued == 3)
        closing = asyncio.create_task(b.aclose())
        engine.gate.set()
        out = await task
        await closing
        adm.release()
        return b, out

    b, out = asyncio.run(main())
    assert len(out) == 5 and b.stopped


def test_a_full_queue_answers_503_with_retry_after_and_the_loop_stays_free(make_client, fake_engines, images):
    gate = threading.Event()
    fakes = fake_engines()
    client = make_client(engine_factory=fakes, max_queue=2, max_files=1, max_batch_size=1)
    fakes.last.gate = gate  # warm-up is done; from now on inference waits for the gate
    batcher = client.app.state.registry.get("toy").batcher
    png = images.make()

    def post():
        return client.post("/v1/predict", content=png, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post) for _ in range(2)]
        deadline = time.time() + 10
        while batcher.in_flight < 2 and time.time() < deadline:
            time.sleep(0.005)
        assert batcher.in_flight == 2

        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200  # inference is stuck; the event loop is not
        assert client.get("/v1/models").status_code == 200
        assert time.perf_counter() - start < 2.0

        r = post()
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json() == {
            "type": "urn:anoscope:problem:overloaded",
            "title": "Service overloaded",
            "status": 503,
            "detail": "model toy has 2 images in flight and 1 more would pass its queue limit of 2; retry after "
            "the Retry-After delay",
            "instance": "/v1/predict",
        }
        gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
    assert post().status_code == 200
    metrics = client.get("/metrics").text
    assert 'anoscope_overload_rejections_total{model="toy"} 1.0' in metrics
    assert 'anoscope_http_requests_total{method="POST",route="/v1/predict",status="503"} 1.0' in metrics


def test_requests_from_many_clients_are_batched_over_http(make_client, fake_engines, images):
    gate = threading.Event()
    fakes = fake_engines()
    client = make_client(engine_factory=fakes, max_batch_size=8, max_batch_wait_ms=50)
    fakes.last.gate = gate
    batcher = client.app.state.registry.get("toy").batcher
    png = images.make()
    with ThreadPoolExecutor(7) as pool:
        futures = [
            pool.submit(client.post, "/v1/predict", content=png, headers={"Content-Type": "image/png"})
            for _ in range(7)
        ]
        deadline = time.time() + 10
        engine = fakes.last
        # Wait until every image is either in the (gated) running batch or queued behind it.
        while not (engine.running.is_set() and batcher.queued + engine.batches[-1] == 7) and time.time() < deadline:
            time.sleep(0.005)
        gate.set()
        assert [f.result().status_code for f in futures] == [200] * 7
    served = engine.batches[2:]  # after the two warm-up batches
    # Seven single-image requests took at most two batches: whatever did not make the first (gated) batch
    # queued behind it and went as one.
    assert sum(served) == 7 and len(served) <= 2


def test_the_collector_survives_a_batch_it_cannot_even_assemble(engine):
    async def main():
        b = MicroBatcher(engine, name="toy", max_batch_size=4, max_wait_ms=200, max_queue=8)
        b.start()
        a, c = b.admit(1), b.admit(1)
        odd = asyncio.gather(a.run(_images(1)), c.run(_images(1, size=16)), return_exceptions=True)
        results = await odd  # different shapes in one batch: np.stack fails inside the collector
        a.release()
        c.release()
        with b.admit(1) as adm:
            out = await adm.run(_images(1))
        await b.aclose()
        return results, out

    results, out = asyncio.run(main())
    assert all(isinstance(r, InferenceError) for r in results)
    assert "ValueError" in str(results[0])
    assert len(out) == 1


def test_a_one_image_batch_is_a_view_and_a_larger_one_a_stack() -> None:
    one = np.ones((3, 4, 4), dtype=np.float32)
    batch = stack_batch([one])
    assert batch.shape == (1, 3, 4, 4) and np.shares_memory(batch, one)  # no copy for a lone camera
    two = stack_batch([one, 2 * one])
    assert two.shape == (2, 3, 4, 4) and np.array_equal(two[1], 2 * one)
