"""Label-free check of a corruption kind: how well finished runs find synthetic defects of each kind.

Each run's exported checkpoint scores its validation normals (and, with lighting drift, their relit
copies) against copies of them carrying shapes of one kind only, for every kind of the selection set
plus `--kinds`, through `anoscope bench selection`'s own code. Printed: the image AUROC of the
residual and of the discrimination score alone on each kind. A run trained on a kind (e.g. `warp`)
that finds it no better than a run that was not has learnt nothing it could use. No test image is read.

    python scripts/kind_crosscheck.py reports/acc11-base-skipganomaly/runs/screw-skipganomaly-default-128 ...
"""

from __future__ import annotations

import argparse

from _runs import parse_runs, print_header, run_name

from training.selection import SELECTION_KINDS
from training.selection_bench import kind_auroc, per_kind_scores, run_scorer


def main() -> None:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kinds", nargs="+", default=["warp"], help="kinds to add to the selection set's")
        parser.add_argument("--copies", type=int, default=2, help="corrupted copies of each normal, per kind")

    args = parse_runs(__doc__, more)
    kinds = tuple(sorted(set(SELECTION_KINDS) | set(args.kinds)))
    print_header("run", "trained on", *kinds)
    for path in args.runs:
        run = run_scorer(path, args.batch_size)
        per_kind = per_kind_scores(run.scores, run.normals, run.config, kinds, args.copies)
        cells = [
            f"{kind_auroc(run.negatives, per_kind[k], run.stats, (1, 0)):.3f} / "
            f"{kind_auroc(run.negatives, per_kind[k], run.stats, (0, 1)):.3f}"
            for k in kinds
        ]
        name = run_name(path)
        print(f"| {name} | {', '.join(run.config.corruption.kinds)} | " + " | ".join(cells) + " |")
    print("\nCells: image AUROC of the residual / the discrimination score alone on that kind.")


if __name__ == "__main__":
    main()
