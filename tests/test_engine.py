"""The ONNX engine on the CPU fallback path: provider choice, batching, maps at input size."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.engine import Engine, OnnxEngine, predict_images, provider_chain
from service.errors import BundleError, InferenceError
from tests.toy_bundle import make_toy_bundle, toy_image


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> OnnxEngine:
    return OnnxEngine(make_toy_bundle(tmp_path_factory.mktemp("b") / "toy"))


def test_engine_implements_the_protocol(engine: OnnxEngine) -> None:
    assert isinstance(engine, Engine)


def test_cuda_preference_falls_back_to_cpu_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    caplog.set_level(logging.WARNING)
    e = OnnxEngine(make_toy_bundle(tmp_path / "t"), providers=("cuda", "cpu"))
    if "CUDAExecutionProvider" in ort.get_available_providers() and e.provider == "CUDAExecutionProvider":
        pytest.skip("a working CUDA device is present")
    assert e.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider was asked for but is unavailable" in caplog.text


def test_provider_chain_keeps_order_and_always_ends_on_cpu() -> None:
    chain = provider_chain(["cuda", "cpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert chain[0][0] == "CUDAExecutionProvider" and chain[-1] == "CPUExecutionProvider"
    assert provider_chain(["cuda"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        provider_chain(["tpu"], [])


def test_batched_equals_unbatched_and_maps_come_back_at_input_size(engine: OnnxEngine) -> None:
    imgs = [Image.fromarray(toy_image(48, defect=i % 2 == 0, seed=i)) for i in range(5)]
    imgs.append(Image.fromarray(toy_image(48)).resize((70, 30)))
    together = predict_images(engine, imgs, batch_size=4)
    alone = [predict_images(engine, [im], batch_size=1)[0] for im in imgs]
    for a, b, im in zip(together, alone, imgs, strict=True):
        assert a.residual_score == pytest.approx(b.residual_score, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert a.anomaly_map.shape == (im.height, im.width)
    assert together[0].residual_score > together[1].residual_score  # defect vs clean


def test_wrong_batch_shape_is_an_inference_error(engine: OnnxEngine) -> None:
    with pytest.raises(InferenceError, match="expects"):
        engine.run(np.zeros((1, 1, 5, 5), np.float32))


def test_corrupt_model_file_is_a_bundle_error(tmp_path: Path) -> None:
    b = make_toy_bundle(tmp_path / "t")
    (b / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(BundleError, match="could not be loaded by ONNX Runtime"):
        OnnxEngine(b)


def test_score_files_yields_in_order_and_reports_unreadable_files(engine: OnnxEngine, tmp_path: Path) -> None:
    from service.engine import score_files
    from service.errors import InvalidImageError

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        if i == 2:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(toy_image(32, defect=i % 2 == 0, seed=i)).save(p)
        paths.append(p)
    with pytest.raises(InvalidImageError, match="2.png"):
        list(score_files(engine, paths, batch_size=2))
    bad: list[int] = []
    got = list(score_files(engine, paths, batch_size=2, on_error=lambda i, _e: bad.append(i)))
    assert [i for i, _img, _out in got] == [0, 1, 3, 4] and bad == [2]
    assert all(out.anomaly_map.shape == (32, 32) for _i, _img, out in got)


def test_the_session_does_not_spin_between_requests(engine: OnnxEngine) -> None:
    # spinning pool threads burnt about half the service's CPU per request on a 2-core box (docs/performance.md)
    options = engine._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
