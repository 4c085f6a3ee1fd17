"""Every fast path gives the right answer: INT8 and FP16 bundles close to FP32, batched equals unbatched,
the service serves reduced-precision bundles, the GPU provider options, IO binding, the faster heatmap
colouring, and the speed bench's own machinery. No timings are asserted here (they are noisy)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402

from models import ModelConfig, build_model  # noqa: E402
from service.bundle import read_metadata  # noqa: E402
from service.engine import OnnxEngine, provider_chain, tensorrt_options  # noqa: E402
from service.postprocess import _LUT, colorize  # noqa: E402
from training import speed  # noqa: E402
from training.export import TOLERANCES, compare_outputs, export_bundle, torch_outputs  # noqa: E402
from training.quantize import INT8_FP32_SCOPES, drop_duplicate_nodes, nodes_in_scopes  # noqa: E402

SIZE = 64
PRECISIONS = ("fp32", "int8", "fp16")


def _config(family: str, **options: Any) -> ModelConfig:
    return ModelConfig(family=family, image_size=SIZE, channels=3, base_width=8, latent_dim=16, **options)


#: anogan's bundle carries a map discriminator (what `anoscope train` recommends), so its INT8 path is
#: checked with that network kept in FP32 too; skipganomaly's scores the msgms residual, whose
#: gradient convolutions are score maths that must stay in FP32.
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "skipganomaly": {"residual": "msgms"},
    "anogan": {"discriminator_map": True},
}


#: Exports dominate this file's run time: every precision for one family, INT8 (the riskiest) for the other.
FAMILY_PRECISIONS = {"skipganomaly": PRECISIONS, "anogan": ("fp32", "int8")}


@pytest.fixture(scope="module", params=list(FAMILY_PRECISIONS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random-init model of each family, exported with export's default tolerances."""
    trained, images = speed.random_init(_config(request.param, **FAMILY_OPTIONS[request.param]), n_images=12)
    root = tmp_path_factory.mktemp(f"bundles-{request.param}")
    bundles = {}
    for precision in FAMILY_PRECISIONS[request.param]:
        bundles[precision] = root / f"{request.param}-{precision}"
        export_bundle(trained, bundles[precision], parity_images=images, precision=precision)
    # Unseen normals (another seed) for the checks below: calibration and parity used `images`.
    fresh = speed.preprocess_all(speed.generated_normals(SIZE, 3, 6, seed=99), SIZE, 3, trained.mean, trained.std)
    head = trained.model.scoring_head().eval()
    return {"family": request.param, "bundles": bundles, "head": head, "images": fresh, "mean": trained.mean}


def _need(exported: dict[str, Any], precision: str) -> Path:
    if precision not in exported["bundles"]:
        pytest.skip(f"no {precision} bundle exported for {exported['family']} (export time)")
    return exported["bundles"][precision]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_reduced_precision_is_close_to_pytorch_on_unseen_normals(exported: dict[str, Any], precision: str) -> None:
    engine = OnnxEngine(_need(exported, precision), providers=("cpu",))
    out = engine.run(exported["images"])
    reference = torch_outputs(exported["head"], exported["images"])
    report = compare_outputs(
        reference, (out.residual_score, out.discrimination_score, out.anomaly_map), TOLERANCES[precision]
    )
    assert report.passed, report.failures
    # Maps are what heatmaps and regions are drawn from: every pixel within 5% of the map's own range.
    span = float(np.ptp(reference[2]))
    assert np.abs(out.anomaly_map - reference[2]).max() <= 0.05 * span


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batched_equals_unbatched(exported: dict[str, Any], precision: str) -> None:
    engine = OnnxEngine(_need(exported, precision), providers=("cpu",))
    images = exported["images"]
    together = engine.run(images)
    for i in range(len(images)):
        alone = engine.run(images[i : i + 1])
        np.testing.assert_allclose(alone.residual_score, together.residual_score[i : i + 1], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            alone.discrimination_score, together.discrimination_score[i : i + 1], rtol=1e-4, atol=1e-7
        )
        np.testing.assert_allclose(alone.anomaly_map, together.anomaly_map[i : i + 1], rtol=1e-4, atol=1e-6)


def test_bundles_say_their_precision_and_how_they_were_made(exported: dict[str, Any]) -> None:
    for precision, path in exported["bundles"].items():
        meta = read_metadata(path)
        assert meta.precision == precision
        assert meta.provenance["parity"]["passed"]
        if precision != "fp32":
            assert meta.provenance["parity_fp32"]["passed"]  # the FP32 graph was checked before converting
            assert meta.provenance["precision_conversion"]["method"]
    versions = {read_metadata(p).version.rsplit("-", 1)[1] for p in exported["bundles"].values()}
    assert len(versions) == len(exported["bundles"])  # the version hash is of the graph each bundle ships


def test_int8_graph_quantises_convolutions_but_not_the_discriminator(exported: dict[str, Any]) -> None:
    model = onnx.load(str(exported["bundles"]["int8"] / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    fp32 = exported["bundles"]["fp32"] / "model.onnx"
    # The discriminators' nodes are found by their module (with a map discriminator, it alone scores).
    scope = (
        "model.map_discriminator"
        if "discriminator_map" in FAMILY_OPTIONS[exported["family"]]
        else "model.discriminator"
    )
    assert nodes_in_scopes(fp32, [scope])
    conv_inputs = {n.name: list(n.input) for n in model.graph.node if n.op_type == "Conv"}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    excluded = set(read_metadata(exported["bundles"]["int8"]).provenance["precision_conversion"]["fp32_scopes"])
    assert excluded == set(INT8_FP32_SCOPES)
    dequantized = [name for name, ins in conv_inputs.items() if producers.get(ins[0]) == "DequantizeLinear"]
    assert dequantized and len(dequantized) < len(conv_inputs)  # some convs quantised, D's left in FP32


def _prewitt_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The msgms residual's gradient convolutions: x and y kernels for the image and its reconstruction,
    grouped (four 3x3 outputs of one input channel each; no network has such)."""
    shapes = {t.name: (list(t.dims), t.data_type) for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and shapes.get(n.input[1], ([],))[0] == [4, 1, 3, 3]]


def test_int8_keeps_the_msgms_score_maths_in_float32(exported: dict[str, Any]) -> None:
    if FAMILY_OPTIONS[exported["family"]].get("residual") != "msgms":
        pytest.skip("this family's bundle scores the l1 residual")
    model = onnx.load(str(exported["bundles"]["int8"] / "model.onnx"))
    convs = _prewitt_convs(model)
    assert len(convs) == 4  # one per scale
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    weights = {t.name: t.data_type for t in model.graph.initializer}
    for conv in convs:
        assert producers.get(conv.input[0]) != "DequantizeLinear", conv.name  # activations not int8
        assert weights[conv.input[1]] == onnx.TensorProto.FLOAT, conv.name  # nor weights


def test_duplicate_casts_from_the_fp16_converter_are_dropped_and_distinct_nodes_kept() -> None:
    from onnx import helper

    cast = helper.make_node("Cast", ["x"], ["x32"], name="x_cast", to=onnx.TensorProto.FLOAT)
    other = helper.make_node("Cast", ["x"], ["x32b"], name="x_cast_b", to=onnx.TensorProto.FLOAT)
    graph = helper.make_graph([cast, helper.make_node("Cast", ["x"], ["x32"], name="x_cast", to=1), other], "g", [], [])
    assert drop_duplicate_nodes(graph) == 1
    assert [n.name for n in graph.node] == ["x_cast", "x_cast_b"]


def test_fp16_graph_keeps_float32_inputs_and_outputs(exported: dict[str, Any]) -> None:
    model = onnx.load(str(_need(exported, "fp16") / "model.onnx"))
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_the_service_serves_an_int8_bundle(exported: dict[str, Any], make_client: Any, images: Any) -> None:
    root = exported["bundles"]["int8"].parent
    # A normal image of the kind the bundle was calibrated on: INT8 ranges are calibrated on normals, so
    # an out-of-distribution image saturates activations and is scored differently (docs/performance.md).
    png = images.encode(speed.generated_normals(SIZE, 3, 1, seed=5)[0])
    scores = {}
    for precision in ("fp32", "int8"):
        name = exported["bundles"][precision].name
        client = make_client(model_dir=root, default_model=name, intra_op_threads=None)
        r = client.post("/v1/predict?heatmap=png&regions=true", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["model"]["name"] == name and result["heatmap"]
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert name in models
        scores[precision] = result["residual_score"]
    tol = TOLERANCES["int8"]
    assert abs(scores["int8"] - scores["fp32"]) <= tol.rtol * abs(scores["fp32"]) + 1e-3


# -- GPU paths, checked on the CPU ------------------------------------------------------------------


def test_tensorrt_gets_a_batch_profile_precision_and_cache(exported: dict[str, Any], tmp_path: Path) -> None:
    for precision in exported["bundles"]:
        meta = read_metadata(exported["bundles"][precision])
        opts = tensorrt_options(meta, cache_dir=tmp_path)
        assert opts["trt_profile_min_shapes"] == f"image:1x3x{SIZE}x{SIZE}"
        assert opts["trt_profile_max_shapes"].startswith("image:64x3x")
        assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_engine_cache_enable"] == "True"
        assert ("trt_fp16_enable" in opts) == (precision == "fp16")
        assert ("trt_int8_enable" in opts) == (precision == "int8")
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = provider_chain(["tensorrt", "cuda", "cpu"], available, tensorrt={"trt_fp16_enable": "True"})
    assert [c if isinstance(c, str) else c[0] for c in chain] == available
    assert chain[0] == ("TensorrtExecutionProvider", {"trt_fp16_enable": "True"})
    assert chain[1][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert provider_chain(["tensorrt"], ["CPUExecutionProvider"], tensorrt={"x": "1"}) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_io_binding_gives_the_same_outputs(exported: dict[str, Any], precision: str) -> None:
    bundle = _need(exported, precision)
    plain = OnnxEngine(bundle, providers=("cpu",)).run(exported["images"])
    bound = OnnxEngine(bundle, providers=("cpu",), io_binding=True).run(exported["images"])
    for a, b in zip(
        (plain.residual_score, plain.discrimination_score, plain.anomaly_map),
        (bound.residual_score, bound.discrimination_score, bound.anomaly_map),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_gpu_preference_falls_back_to_the_cpu_for_every_precision(exported: dict[str, Any]) -> None:
    import onnxruntime as ort

    for precision in sorted(set(exported["bundles"]) - {"fp32"}):
        engine = OnnxEngine(exported["bundles"][precision], providers=("tensorrt", "cuda", "cpu"))
        if engine.provider != "CPUExecutionProvider":
            pytest.skip(f"a working GPU provider is present ({engine.provider})")
        assert engine.providers_requested[-1] == "CPUExecutionProvider"
        assert len(engine.run(exported["images"][:2])) == 2
    assert "CPUExecutionProvider" in ort.get_available_providers()


def test_the_bench_session_takes_the_service_provider_chain(exported: dict[str, Any]) -> None:
    session = speed._ort_session(exported["bundles"]["fp32"], ("tensorrt", "cuda", "cpu"))
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    if speed.torch_device(("cuda",)) == "cpu":
        assert session.get_providers() == ["CPUExecutionProvider"]


# -- post-processing fast path ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (4, 16, 16), (5,), (), (0, 3), (1024, 768)])
def test_colorize_gives_exactly_the_lookup_table_colours(shape: tuple[int, ...]) -> None:
    values = np.random.default_rng(0).random(shape) * 1.4 - 0.2  # outside [0, 1] too: clipped
    expected = _LUT[np.clip(values * 255.0, 0, 255).astype(np.uint8)]
    np.testing.assert_array_equal(colorize(values), expected)


# -- the bench's machinery --------------------------------------------------------------------------


def test_flops_scale_with_pixels_and_width() -> None:
    small = speed.count_flops(build_model(_config("skipganomaly")), 3, SIZE)
    assert small > 0
    wide = ModelConfig(family="skipganomaly", image_size=SIZE, channels=3, base_width=16, latent_dim=16)
    assert 3.0 < speed.count_flops(build_model(wide), 3, SIZE) / small < 4.5  # convs: ~width²


def test_spread_and_table(tmp_path: Path) -> None:
    s = speed.Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.n == 5 and s.p5 < 2.0 < 4.0 < s.p95
    assert speed.Spread.of([]).n == 0
    row = speed.Row(
        "m",
        "fp32",
        "ONNX Runtime",
        batch=1,
        images_per_s=speed.Spread.of([10.0]),
        latency_ms={"median": 100.0},
        fraction_of_bound=0.5,
        load=[1.0],
        cpu_ms=180.0,
    )
    service = speed.Row(
        "m",
        "fp32",
        "service",
        clients=1,
        heatmap="none",
        images_per_s=speed.Spread.of([9.5]),
        latency_ms={"p50": 105.0, "p95": 120.0, "p99": 130.0},
        fraction_of_bound=0.47,
        load=[1.2],
        cpu_ms=200.0,
        client_cpu_ms=3.0,
    )
    eager = speed.Row(
        "m",
        "fp32",
        "eager PyTorch",
        batch=1,
        images_per_s=speed.Spread.of([2.0]),
        latency_ms={"median": 500.0},
        fraction_of_bound=0.1,
        load=[1.1],
    )
    model = speed.ModelSpeed("m", "skipganomaly", SIZE, 1.0, 0.1, 1.0, {}, rows=[eager, row, service])
    model.notes.append("bare session fp32: CPUExecutionProvider")
    report = {
        "date": "today",
        "command": "anoscope bench speed",
        "load_start": "1 / 1 / 1",
        "load_end": "1 / 1 / 1",
        "weights": "random",
        "request": "64 px PNG",
        "machine": {"hardware": "cpu", "matmul": {"n": 2048, "torch": 100.0, "numpy": 90.0}, "bound_gflops": 100.0},
        "models": [json.loads(json.dumps(speed.asdict(model)))],
    }
    table = speed.speed_table(report)
    assert (
        "| m | 0.10 | fp32 | service | 1 clients | none | 9.5 (9.5–9.5) | 105 / 120 / 130 | 200 + 3 | 47% | 4.8x "
        "| 95%; CPU 90% (b1) |" in table
    )
    assert "`anoscope bench speed`" in table
    assert "* m: bare session fp32: CPUExecutionProvider" in table  # which model's session, not a bare list
    assert table.startswith("## Speed on CPU\n")
    report["settings"] = {"config": "plain", "width_mult": [1.0, 0.25]}
    assert speed.speed_table(report).startswith("## Speed on CPU: the plain networks, width 1 and 0.25\n")


def test_the_load_generator_drives_a_real_service(toy_models: Path, tmp_path: Path, images: Any) -> None:
    body = images.make(48, 48)
    with speed.running_service(toy_models / "toy", log=tmp_path / "serve.log") as srv:
        result = speed.load_test(
            f"{srv.url}/v1/predict?heatmap=png",
            body,
            "image/png",
            clients=3,
            max_requests=7,
            max_seconds=60,
            server_pid=srv.pid,
        )
    assert result.errors == 0
    assert result.completed == 7  # bounded by the request count, warm-up excluded
    assert len(result.server_ms["inference"]) == 7 and result.throughput > 0
    assert result.server_cpu_s > 0 and result.client_cpu_s > 0


def test_bench_speed_parser_defaults_match_the_issue() -> None:
    from training.bench import build_parser, recommended_image_size

    parser = argparse.ArgumentParser()
    build_parser(parser)
    args = parser.parse_args(["speed"])
    assert args.family == ["skipganomaly", "anogan"] and {128, 256} <= set(args.image_size)
    # the table a user reads first must hold the size `anoscope train` builds by default
    assert {recommended_image_size(f) for f in args.family} <= set(args.image_size)
    assert {1, 8, 32} <= set(args.batches) and args.clients == [1, 4, 16]
    assert args.heatmaps == ["none", "png"] and args.section == "speed-cpu"


def test_export_cli_maps_quantize_and_precision() -> None:
    from training.export import build_parser

    parser = argparse.ArgumentParser()
    build_parser(parser)
    args = parser.parse_args(["--checkpoint", "run", "--out", "b", "--quantize", "int8"])
    assert args.quantize == "int8" and args.rtol is None and args.spread is None
    assert parser.parse_args(["--checkpoint", "run", "--out", "b", "--precision", "fp16"]).precision == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "run", "--out", "b", "--quantize", "int8", "--precision", "fp16"])


@pytest.mark.parametrize("family", ["skipganomaly", "anogan"])
def test_the_speed_bench_times_the_recommended_network_and_it_exports(family: str, tmp_path) -> None:
    """`anoscope bench speed` times what `anoscope train` builds by default; the settings training
    decides from data (`auto`) have no data here, so they resolve to none and export accepts them."""
    cfg = speed.model_config(family, 64, 0.125)
    assert (cfg.align, cfg.roi, cfg.crop, cfg.exposure) == ("none",) * 4
    assert cfg.discriminator_map  # otherwise the recommended network
    trained, images = speed.random_init(cfg, n_images=2)
    meta = export_bundle(trained, tmp_path / family, parity_images=images)
    assert meta.family == family and meta.image_size == 64
