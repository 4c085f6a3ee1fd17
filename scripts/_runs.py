"""What the studies of finished runs under scripts/ share: their command line and their table header.

Each script takes training run folders (`anoscope train --out`), scores their exported checkpoints on
one CPU thread (the studies run beside training jobs on a 2-core machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch


def parse_runs(doc: str, add: Callable[[argparse.ArgumentParser], object] | None = None) -> argparse.Namespace:
    """`runs...` and `--batch-size`, plus what `add` adds; sets PyTorch to one thread."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--batch-size", type=int, default=32)
    if add is not None:
        add(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def run_name(path: Path) -> str:
    """`bench-out/run` for a run under a bench's runs/ folder, else the folder's name."""
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "runs" else path.name


def print_header(*columns: str) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def fmt(value: float | None) -> str:
    """A table cell: three decimals, or a dash where the figure could not be computed."""
    return "–" if value is None else f"{value:.3f}"
