"""Seconds one end of epoch costs a training run, with and without the label-free selection set.

Rebuilds each run's selection set from its exported checkpoint and times `fit_scores` as the training
engine calls it at the end of an epoch: once scoring the validation normals only (an epoch the
selection skips, `--select-from`), once with the synthetic set (an epoch it scores). One PyTorch
thread, the model in channels-last as training runs it; the median of `--repeats`.

    python scripts/selection_cost.py reports/acc8-late-skipganomaly/runs/magnetic_tile-skipganomaly-default-128
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from service.bundle import ScoreWeights
from training.checkpoint import load_trained
from training.config import TrainConfig
from training.loops.engine import fit_scores
from training.train import selection_set, validation_normals


def seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    print("| run | images scored with the set | normals only, s | with the selection set, s |")
    print("|---|---|---|---|")
    for run in args.runs:
        trained = load_trained(run)
        train_config = TrainConfig.from_dict(trained.train_config)
        normals = validation_normals(trained, run)
        synthetic = selection_set(normals, train_config)
        model = trained.model.to(memory_format=torch.channels_last)
        weights, batch = ScoreWeights(), train_config.batch_size
        epoch_end = partial(fit_scores, model, normals, weights, batch, cpu, "timing")
        plain = seconds(epoch_end, args.repeats)
        scored = seconds(partial(epoch_end, synthetic, True, True), args.repeats)
        relit = 0 if synthetic.relit is None else len(synthetic.relit)
        total = len(normals) + relit + len(synthetic.images)
        print(f"| {run.name} | {total} | {plain:.2f} | {scored:.2f} |")


if __name__ == "__main__":
    main()
