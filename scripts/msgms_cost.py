"""Time of the `msgms` residual map alone in ONNX Runtime: the shipped `models.scoring.msgms_map`
against RIAD's image-by-image form (`msgms_map_reference`: each image pooled from full size, two
convolutions per image and scale), which computes the same map. Then the training side: the
structure loss's forward and backward in PyTorch, as `msgms_map(...).mean()` and as the shipped
`models.scoring.msgms_mean` (no upsampling, separable gradients; the same value and gradient).

    python scripts/msgms_cost.py [--size 128] [--batch 8] [--threads 1] [--repeats 50] [--loss-batch 16]

Prints the median milliseconds per batch of each and the largest difference between their maps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from models.scoring import msgms_map, msgms_map_reference, msgms_mean


class _Map(torch.nn.Module):
    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        return self.fn(x, x_hat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--loss-batch", type=int, default=16, help="batch of the training-loss timing (training's)")
    args = parser.parse_args()
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_hat = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    feed = {"x": x.numpy(), "x_hat": x_hat.numpy()}
    maps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("shipped (batched)", msgms_map), ("image by image", msgms_map_reference)):
            path = Path(tmp) / "map.onnx"
            torch.onnx.export(_Map(fn).eval(), (x, x_hat), str(path), input_names=["x", "x_hat"], dynamo=True)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            maps[name] = session.run(None, feed)[0]
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            print(f"{name}: {1e3 * float(np.median(times)):.2f} ms per batch of {args.batch} ({args.size} px)")
    diff = np.abs(maps["shipped (batched)"] - maps["image by image"]).max()
    print(f"largest difference between the maps: {diff:.1e}")
    loss_cost(args.size, args.loss_batch, args.threads, args.repeats)


def loss_cost(size: int, batch: int, threads: int, repeats: int) -> None:
    """The structure loss as a training step meets it: on a channels-last tanh output, forward and backward."""
    torch.set_num_threads(threads)
    target = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    losses = {"msgms_map(...).mean()": lambda a, b: msgms_map(a, b).mean(), "msgms_mean (shipped)": msgms_mean}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(repeats // 2):  # interleaved, so load on a shared machine hits both alike
        for name, loss in losses.items():
            logits = torch.randn(target.shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
            start = time.perf_counter()
            loss(torch.tanh(logits), target).backward()
            times[name].append(time.perf_counter() - start)
    for name, spent in times.items():
        ms = 1e3 * float(np.median(spent))
        print(f"structure loss, {name}: {ms:.1f} ms forward + backward per batch of {batch} ({size} px, PyTorch)")


if __name__ == "__main__":
    main()
