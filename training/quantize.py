"""Reduced-precision graphs for bundles: INT8 static quantisation (CPU) and FP16 conversion (GPU).

Both take the FP32 `model.onnx` that `training.export` wrote and rewrite it; `export_bundle` then checks
the new graph against the PyTorch head with the precision's own tolerance (`training.export.TOLERANCES`).

INT8 (`anoscope export --quantize int8`): ONNX Runtime static quantisation in the QDQ format, int8
symmetric weights, uint8 activations with ranges calibrated (min/max) on normal images. What is
quantised was chosen by measurement (docs/performance.md):
* only `Conv`: ONNX Runtime's CPU provider fuses QDQ `Conv` into `QLinearConv`, but has no fused int8
  `ConvTranspose`, so quantising the decoders would only add rounding and Quantize/Dequantize work;
  the score maths (residual, smoothing, reductions) stays in FP32 as well;
* not the score maths outside the networks (`score_math_nodes`): the Prewitt convolutions of the
  `msgms` residual compare gradients of the input and its reconstruction, and rounding both would
  add the noise the residual is meant to measure;
* not the discriminators: `discrimination_score` is the mean squared difference of D's features on x
  and on its reconstruction, two nearly equal feature maps, and int8 rounding noise in both was as
  large as the differences (errors of 0.6-9.5 standard deviations of the score over normals against
  0.1-1.0 with D in FP32); the map discriminator (per-pixel defect logits, the anomaly map of models
  trained with `discriminator_map`) moved maps by up to 0.047 (33%) when quantised;
* weights per tensor by default: on CPUs without VNNI (AVX2 only) the u8s8 kernels can saturate their
  16-bit intermediate sums, and per-channel weights, which use the full int8 range in every channel,
  saturate more (maps 4-8x further from FP32); `per_channel=True` is there for VNNI/GPU targets.

FP16 (`anoscope export --precision fp16`): every network op in float16 with float32 inputs and outputs
(`keep_io_types`), so the service feeds and reads the bundle exactly as an FP32 one. The score maths
(residual, squares of small feature differences, means over many pixels: the op types of
`FP16_KEEP_FP32_OPS`) stays in FP32, where float16 would underflow or lose the small differences scores
are made of. The `msgms` residual's gradient convolutions are `Conv`s like the networks' and run in
float16, since the converter keeps ops in FP32 by type and keeping `Conv` would keep the networks too;
its similarity ratio is a `Div`, in FP32, and the export's parity check holds the result to FP16's
tolerance. Meant for GPUs; on a CPU, ONNX Runtime computes float16 nodes through inserted casts, which
checks correctness but not speed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import INPUT_NAME

#: Ops quantised to INT8 (see the module docstring for why not ConvTranspose or MatMul).
INT8_OP_TYPES = ("Conv",)
#: Modules (PyTorch name scopes recorded by the exporter) whose ops stay in FP32.
INT8_FP32_SCOPES = ("model.discriminator", "model.map_discriminator")
#: Normal images used to calibrate activation ranges (min/max over all of them).
DEFAULT_CALIBRATION_IMAGES = 64
#: Ops kept in float32 in FP16 graphs: the score maths after the networks, plus onnxruntime's default list.
FP16_KEEP_FP32_OPS = ("Sub", "Abs", "Pow", "ReduceMean", "ReduceMax", "ReduceSum", "AveragePool", "TopK", "Div")


class QuantizeError(ValueError):
    """The graph could not be converted (bad calibration data, converter failure)."""


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over pre-processed images, one image per call."""

    def __init__(self, images: np.ndarray) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            {INPUT_NAME: np.ascontiguousarray(images[i : i + 1], dtype=np.float32)} for i in range(len(images))
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: np.ndarray,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    op_types: Sequence[str] = INT8_OP_TYPES,
    fp32_scopes: Sequence[str] = INT8_FP32_SCOPES,
) -> dict[str, Any]:
    """Statically quantise the FP32 graph `src` to QDQ INT8 at `dst`; return the settings used.

    `calibration` holds pre-processed normal images (N, C, S, S) float32; activation ranges are their
    min/max. The graph is first optimised (constant folding, e.g. the discriminator's spectral norm)
    and shape-inferred, as onnxruntime recommends before quantising.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    images = np.asarray(calibration, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0 or not np.isfinite(images).all():
        msg = f"calibration images have shape {images.shape} (or non-finite values); need (N>=1, C, S, S) float32"
        raise QuantizeError(msg)

    class Reader(_Batches, CalibrationDataReader):  # onnxruntime checks isinstance
        pass

    excluded = nodes_in_scopes(src, fp32_scopes) + score_math_nodes(src)

    with tempfile.TemporaryDirectory(prefix="anoscope-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            _prepare(src, prepared)
            quantize_static(
                str(prepared),
                str(dst),
                Reader(images),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                nodes_to_exclude=excluded,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime.quantization raises many internal types
            msg = f"ONNX Runtime static quantisation failed ({type(exc).__name__}: {exc})"
            raise QuantizeError(msg) from exc
    return {
        "method": "onnxruntime static quantisation, QDQ",
        "op_types": list(op_types),
        "fp32_scopes": list(fp32_scopes),
        "fp32_nodes": len(excluded),
        "weights": "int8 symmetric, "
        + ("per output channel" if per_channel else "per tensor")
        + (", 7-bit range" if reduce_range else ""),
        "activations": "uint8 asymmetric, min/max calibration",
        "calibration_images": len(images),
    }


def _prepare(src: str | os.PathLike[str], dst: Path) -> Path:
    """ONNX Runtime's basic graph optimisations (constant folding, Conv+BatchNorm fusion) and shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference is for transformer graphs; ONNX shape inference covers these CNNs.
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def nodes_in_scopes(path: str | os.PathLike[str], scopes: Sequence[str]) -> list[str]:
    """Names of the nodes the PyTorch exporter attributed to any module in `scopes` (or below it)."""
    import onnx

    if not scopes:
        return []
    model = onnx.load(str(path), load_external_data=False)
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        recorded = meta.get("pkg.torch.onnx.name_scopes", "")
        if any(f"'{s}'" in recorded or f"'{s}." in recorded for s in scopes):
            names.append(node.name)
    return names


def score_math_nodes(path: str | os.PathLike[str]) -> list[str]:
    """Names of the nodes the PyTorch exporter attributed to no module of the model: the scoring head's
    own maths (residual, smoothing, reductions) after the networks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "'model" not in meta.get("pkg.torch.onnx.name_scopes", ""):
            names.append(node.name)
    return names


def drop_duplicate_nodes(graph: Any) -> int:
    """Remove nodes identical to an earlier one (op, inputs, outputs, attributes); return how many.

    The FP16 converter inserts one float32 cast per kept-FP32 consumer of a float16 tensor, all with the
    same name and output: the `msgms` residual reads the reconstruction in several FP32 ops, and ONNX
    Runtime refuses a graph with two equally named nodes. The copies compute the same tensor, so the first
    stands for all.
    """
    seen: set[bytes] = set()
    duplicates = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key in seen:
            duplicates.append(node)
        seen.add(key)
    for node in duplicates:
        graph.node.remove(node)
    return len(duplicates)


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert the FP32 graph `src` to FP16 at `dst`, keeping float32 inputs/outputs and the score maths."""
    import onnx
    from onnxruntime.transformers import float16

    keep = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
    with tempfile.TemporaryDirectory(prefix="anoscope-fp16-") as tmp:
        try:
            # Fold constants first (the discriminator's spectral norm computes its weights from initialisers
            # at run time): the converter would otherwise add two equally named casts for a weight used twice.
            prepared = _prepare(src, Path(tmp) / "prepared.onnx")
            converted = float16.convert_float_to_float16(
                onnx.load(str(prepared)), keep_io_types=True, op_block_list=keep
            )
        except Exception as exc:
            msg = f"FP16 conversion failed ({type(exc).__name__}: {exc})"
            raise QuantizeError(msg) from exc
    drop_duplicate_nodes(converted.graph)
    onnx.save(converted, str(dst))
    return {
        "method": "onnxruntime.transformers.float16, float32 inputs and outputs",
        "float32_ops": list(FP16_KEEP_FP32_OPS),
    }
