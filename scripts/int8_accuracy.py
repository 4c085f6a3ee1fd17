"""Image and pixel AUROC of INT8 bundles against FP32, on the checkpoints of an accuracy bench.

For each `anoscope bench accuracy` output folder, every run under `runs/` is exported again with
`--quantize int8` (calibrated on the run's validation normals; the parity check is widened, AUROC
on the test set being the acceptance test) and evaluated with `anoscope evaluate` on its category;
the FP32 figures are the bench's own `reports/`. Prints a markdown table.

    python scripts/int8_accuracy.py reports/acc11-base-skipganomaly reports/acc11-base-anogan --out reports/int8-acc11
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def anoscope(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "anoscope", *args], check=True, stdout=subprocess.DEVNULL)


def figures(report: Path) -> tuple[float, float | None]:
    data = json.loads((report / "report.json").read_text())
    return data["image"]["auroc"], (data["pixel"] or {}).get("auroc")  # no pixel figures without masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benches", nargs="+", type=Path, help="`anoscope bench accuracy --out` folders")
    parser.add_argument("--out", type=Path, required=True, help="where the INT8 bundles and reports go")
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    args = parser.parse_args()
    rows = []
    for bench in args.benches:
        for run in sorted((bench / "runs").iterdir()):
            category = Path(json.loads((run / "config.json").read_text())["data"]).name
            bundle, report = args.out / "bundles" / f"{run.name}-int8", args.out / "reports" / f"{run.name}-int8"
            if not (report / "report.json").exists():
                anoscope("export", "--checkpoint", str(run), "--quantize", "int8", "--rtol", "1", "--spread", "1e9",
                         "--out", str(bundle), "--name", f"{run.name}-int8", "--overwrite")  # fmt: skip
                anoscope("evaluate", "--bundle", str(bundle), "--data", str(args.datasets / category),
                         "--out", str(report))  # fmt: skip
            rows.append((run.name, figures(bench / "reports" / run.name), figures(report)))
    print("| run | image AUROC FP32 → INT8 | pixel AUROC FP32 → INT8 |")
    print("|---|---|---|")
    for name, (image32, pixel32), (image8, pixel8) in rows:
        pixel = "n/a" if pixel32 is None or pixel8 is None else f"{pixel32:.3f} → {pixel8:.3f}"
        print(f"| {name} | {image32:.3f} → {image8:.3f} ({image8 - image32:+.3f}) | {pixel} |")


if __name__ == "__main__":
    main()
