"""A tiny hand-built ONNX bundle with the real bundle's interface, for fast torch-free tests.

Its "model" flags pixels brighter than mid-grey: anomaly_map = relu(mean over channels of the input),
residual_score = max of the map, discrimination_score = mean of the map. Images of a darker texture
with a bright defect therefore score high exactly where the defect is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.bundle import (
    BundleMetadata,
    Normalization,
    NormalizationPair,
    ScoreStats,
    utc_now,
    write_metadata,
)


def make_toy_bundle(
    directory: Path,
    *,
    name: str = "toy",
    image_size: int = 32,
    channels: int = 3,
    resize: str = "squash",
    align: str = "none",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, image_size, image_size])
    outs = [
        helper.make_tensor_value_info("residual_score", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("discrimination_score", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, image_size, image_size]),
    ]
    axes_c = helper.make_tensor("axes_c", TensorProto.INT64, [1], [1])
    axes_all = helper.make_tensor("axes_all", TensorProto.INT64, [3], [1, 2, 3])
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes_c"], ["m"], keepdims=1),
        helper.make_node("Relu", ["m"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map", "axes_all"], ["residual_score"], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map", "axes_all"], ["discrimination_score"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "toy", [x], outs, initializer=[axes_c, axes_all])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    meta = BundleMetadata(
        name=name,
        version=f"{utc_now()}-toy",
        family="skipganomaly",
        image_size=image_size,
        channels=channels,
        mean=[0.5] * channels,
        std=[0.5] * channels,
        resize=resize,
        align=align,
        score_stats={"residual": ScoreStats(mean=0.1, std=0.1), "discrimination": ScoreStats(mean=0.01, std=0.01)},
        normalization=NormalizationPair(
            image=Normalization(threshold=2.0, min=-1.0, max=9.0, source="toy"),
            pixel=Normalization(threshold=0.3, min=0.0, max=1.0, source="toy"),
        ),
        provenance={"made_by": "tests/toy_bundle.py"},
    )
    write_metadata(directory, meta)
    return directory


def toy_image(size: int = 64, defect: bool = True, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 dark noisy texture, with a bright square defect when asked."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 90, (size, size, 3), dtype=np.uint8)
    if defect:
        img[size // 4 : size // 4 + size // 8, size // 2 : size // 2 + size // 8] = 250
    return img
