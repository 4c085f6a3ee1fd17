"""Seconds one end of epoch costs a training run, with and without the label-free selection set.

Rebuilds each run's selection set from its exported checkpoint and times `fit_scores` as the training
engine calls it at the end of an epoch: once scoring the validation normals only (an epoch the
selection skips, `--select-from`), once with the synthetic set (an epoch it scores). One PyTorch
thread, the model in channels-last as training runs it; the median of `--repeats`.

    python scripts/selection_cost.py reports/acc8-late-skipganomaly/runs/magnetic_tile-skipganomaly-default-128
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch
from _runs import parse_runs, print_header

from service.bundle import ScoreWeights
from training.loops.engine import fit_scores
from training.train import finished_run, selection_set


def seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_runs(__doc__, lambda parser: parser.add_argument("--repeats", type=int, default=3))
    cpu = torch.device("cpu")
    print_header("run", "images scored with the set", "normals only, s", "with the selection set, s")
    for run in args.runs:
        finished = finished_run(run)
        trained, train_config, normals = finished.trained, finished.config, finished.normals
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
