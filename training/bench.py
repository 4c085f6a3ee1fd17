"""Benchmarks anyone can rerun: `anoscope bench accuracy` (train/export/evaluate on real categories),
`anoscope bench speed` (eager PyTorch vs ONNX Runtime vs the service vs the FLOP bound),
`anoscope bench latent-search` (AnoGAN's encoder against its iterative latent search) and
`anoscope bench selection` (leave-one-kind-out check of the label-free weighting rule).

The accuracy bench runs the real `anoscope` commands in subprocesses, so its figures are what a user
gets; every bench writes its exact command next to its numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from training.speed import DEFAULT_BATCHES, DEFAULT_CLIENTS

# Published image AUROC of anomalib's GANomaly (seed 42), from anomalib's model README.
ANOMALIB_GANOMALY_IMAGE_AUROC = {"bottle": 0.251, "screw": 0.231}

# Named training presets: the defaults (the family's recommended settings, docs/quality.md), "plain"
# (the dataclass defaults: the configuration before issue 6), and the paper-faithful ablation of each
# family (over the plain defaults, so none of the later options leaks into it).
PRESETS: dict[str, dict[str, list[str]]] = {
    "skipganomaly": {
        "default": [],
        "plain": ["--defaults", "plain"],
        "paper": ["--defaults", "plain", "--recipe", "paper", "--score-reduction", "mean", "--map-smoothing", "1"],
    },
    "anogan": {
        "default": [],
        "plain": ["--defaults", "plain"],
        "paper": ["--defaults", "plain", "--score-reduction", "mean", "--map-smoothing", "1", "--no-spectral-norm"],
    },
}


@dataclass
class AccuracyRow:
    category: str
    family: str
    preset: str
    image_size: int
    budget_s: float
    train_s: float = 0.0
    image_auroc: float | None = None
    image_auroc_residual: float | None = None
    image_auroc_discrimination: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None  # area under the per-region-overlap curve up to FPR 0.3 (MVTec AD's metric)
    best_f1: float | None = None
    brightness_auroc: float | None = None  # the test images' mean brightness alone (a shortcut check)
    matched_auroc: float | None = None  # image AUROC with every test image relit to one mean grey (on a shortcut)
    epochs: int | None = None  # epochs trained within the budget
    best_epoch: int | None = None  # the exported epoch (label-free selection's best, else the last)
    best_s: float | None = None  # training seconds when that epoch ended: time to the final validation score
    device: str | None = None  # what trained it, as the run recorded it: "cpu (threads: 1)", "cuda (NAME)"
    commands: list[str] = field(default_factory=list)
    error: str | None = None


def training_progress(run_dir: Path, bundle: Path) -> tuple[int, int, float] | None:
    """(epochs trained, exported epoch, seconds when it ended) from a run's losses.csv and its bundle.

    None when either is missing (a failed or foreign run).
    """
    import csv

    losses, meta = run_dir / "losses.csv", bundle / "model.json"
    if not losses.is_file() or not meta.is_file():
        return None
    with losses.open(newline="") as fh:
        seconds = {int(r["epoch"]): float(r["seconds"]) for r in csv.DictReader(fh) if r.get("epoch")}
    if not seconds:
        return None
    provenance = json.loads(meta.read_text()).get("provenance") or {}
    best = int((provenance.get("selection") or {}).get("epoch") or provenance.get("epochs_done") or max(seconds))
    return max(seconds), best, seconds.get(best, seconds[max(seconds)])


def training_device(bundle: Path) -> str | None:
    """The device that trained a bundle's checkpoint, as `anoscope train` recorded it; None if unknown."""
    meta = bundle / "model.json"
    if not meta.is_file():
        return None
    return (json.loads(meta.read_text()).get("provenance") or {}).get("device")


def recommended_image_size(family: str) -> int:
    """The input side `anoscope train` uses for `family` when --image-size is not given."""
    from training.config import recommended

    return recommended(family).model.image_size


def _anoscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "anoscope", *args]


def _run(cmd: list[str], log: Path) -> float:
    """Run a command with its output appended to `log`; return wall seconds; raise on failure."""
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        msg = f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}; see {log}"
        raise RuntimeError(msg)
    return time.perf_counter() - start


def bench_command(verb: str) -> str:
    """The `anoscope bench ...` command line this process runs, to print next to its figures."""
    return "anoscope bench " + (shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else verb)


def _display(cmd: list[str]) -> str:
    return "anoscope " + shlex.join(cmd[3:])


def _read_report(row: AccuracyRow, report: Path) -> None:
    """Fill the row's metrics from an `anoscope evaluate` report folder."""
    rep = json.loads((report / "report.json").read_text())
    row.image_auroc = rep["image"]["auroc"]
    row.image_auroc_residual = rep["image"]["auroc_residual"]
    row.image_auroc_discrimination = rep["image"]["auroc_discrimination"]
    row.brightness_auroc = rep["image"].get("auroc_brightness_only")
    row.matched_auroc = (rep["image"].get("brightness_matched") or {}).get("auroc")
    row.pixel_auroc = rep["pixel"]["auroc"] if rep.get("pixel") else None
    row.aupro = rep["pixel"].get("aupro") if rep.get("pixel") else None
    row.best_f1 = (rep["image"]["best_f1"] or {}).get("f1")


def run_accuracy(args: argparse.Namespace) -> list[AccuracyRow]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = {}
    if results_path.exists() and not args.fresh:
        for row in json.loads(results_path.read_text()):
            # keyed by size too: a 128-px row must not stand in for a 64-px run sharing the folder
            done[(row["category"], row["family"], row["preset"], row["image_size"])] = AccuracyRow(**row)
    from training.evaluate import brightness_shortcut

    rows: list[AccuracyRow] = []
    datasets = Path(args.datasets)
    for category in args.categories:
        for family in args.families:
            size = args.image_size or recommended_image_size(family)
            for preset in args.presets:
                key = (category, family, preset, size)
                tag = f"{category}-{family}-{preset}-{size}"
                run_dir, bundle, report = out / "runs" / tag, out / "bundles" / tag, out / "reports" / tag
                evaluate = _anoscope(
                    "evaluate", "--bundle", str(bundle), "--data", str(datasets / category), "--out", str(report)
                )
                log = out / f"{tag}.log"
                if key in done and done[key].error is None:
                    row = done[key]
                    # results.json from before a column existed: fill it from the run, re-evaluating if needed
                    if row.best_s is None and (progress := training_progress(run_dir, bundle)):
                        row.epochs, row.best_epoch, row.best_s = progress
                    row.device = row.device or training_device(bundle)
                    stale = (
                        row.brightness_auroc is None
                        or (brightness_shortcut(row.brightness_auroc) and row.matched_auroc is None)
                        or (row.pixel_auroc is not None and row.aupro is None)
                    )
                    if stale and (bundle / "model.json").is_file():
                        try:
                            _run(evaluate, log)
                            _read_report(row, report)
                        except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                            print(f"[bench] {tag}: re-evaluation failed: {exc}", flush=True)
                    rows.append(row)
                    continue
                row = AccuracyRow(category, family, preset, size, args.budget)
                train = _anoscope(
                    "train",
                    "--data",
                    str(datasets / category),
                    "--model",
                    family,
                    "--image-size",
                    str(size),
                    "--time-budget",
                    str(args.budget),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                    "--no-progress",
                    "--out",
                    str(run_dir),
                    *PRESETS[family][preset],
                    *args.train_args,
                )
                export = _anoscope("export", "--checkpoint", str(run_dir), "--out", str(bundle), "--name", tag)
                row.commands = [_display(c) for c in (train, export, evaluate)]
                print(f"[bench] {tag}: training for up to {args.budget:.0f} s", flush=True)
                try:
                    row.train_s = round(_run(train, log), 1)
                    _run(export, log)
                    _run(evaluate, log)
                    _read_report(row, report)
                    if progress := training_progress(run_dir, bundle):
                        row.epochs, row.best_epoch, row.best_s = progress
                    row.device = training_device(bundle)
                except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                    row.error = str(exc)
                print(f"[bench] {tag}: {asdict(row)}", flush=True)
                rows.append(row)
                results_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    results_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))  # reused rows may have been filled in
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _epochs(r: AccuracyRow) -> str:
    if r.epochs is None or r.best_epoch is None or r.best_s is None:
        return "n/a"
    return f"{r.epochs} ({r.best_epoch} at {r.best_s:.0f})"


def accuracy_table(rows: list[AccuracyRow], command: str) -> str:
    from training.speed import hardware as speed_hardware  # one description of the machine for every table

    # the device each run recorded: a table trained on a GPU box must not say CPU
    devices = ", ".join(sorted({r.device for r in rows if r.device})) or "not recorded"
    lines = [
        f"Hardware: {speed_hardware()}; trained on: {devices}. Command: `{command}`",
        "",
        "| category | family | preset | size | train s | epochs (exported: epoch at s) | image AUROC "
        "| (residual / discr.) | pixel AUROC | AUPRO ⁴ | best F1 | brightness alone ¹ "
        "| image AUROC, brightness-matched ² | anomalib GANomaly image AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = ANOMALIB_GANOMALY_IMAGE_AUROC.get(r.category)
        status = f" (failed: {r.error.splitlines()[0][:80]})" if r.error else ""
        lines.append(
            f"| {r.category} | {r.family} | {r.preset}{status} | {r.image_size} | {r.train_s:.0f} | {_epochs(r)} | "
            f"{_fmt(r.image_auroc)} | {_fmt(r.image_auroc_residual)} / {_fmt(r.image_auroc_discrimination)} | "
            f"{_fmt(r.pixel_auroc)} | {_fmt(r.aupro)} | {_fmt(r.best_f1)} | {_fmt(r.brightness_auroc)} | "
            f"{'–' if r.matched_auroc is None else _fmt(r.matched_auroc)} | {_fmt(ref)} |"
        )
    for family in sorted({r.family for r in rows}):
        for preset in sorted({r.preset for r in rows}):
            sel = [r for r in rows if r.family == family and r.preset == preset and r.image_auroc is not None]
            if len(sel) > 1:
                img = sum(r.image_auroc or 0 for r in sel) / len(sel)
                pix = [r.pixel_auroc for r in sel if r.pixel_auroc is not None]
                pix_s = _fmt(sum(pix) / len(pix)) if pix else "n/a"
                pro = [r.aupro for r in sel if r.aupro is not None]
                pro_s = _fmt(sum(pro) / len(pro)) if pro else "n/a"
                honest = "–"
                if any(r.matched_auroc is not None for r in sel):
                    matched = [r.image_auroc if r.matched_auroc is None else r.matched_auroc for r in sel]
                    honest = f"{sum(matched) / len(sel):.3f} ³"
                lines.append(
                    f"| **mean** | {family} | {preset} | | | | {img:.3f} | | {pix_s} | {pro_s} | | | {honest} | |"
                )
    lines += [
        "",
        "¹ Not a detector: the image AUROC of the test images' mean grey level alone (brighter = defective).",
        "Near 0 or 1 the lighting differs between good and defective test images, and a score that reacts",
        "to lighting looks good there without finding defects (`anoscope evaluate` warns).",
        "",
        "² Only where ¹ warns (>= 0.9 or <= 0.1): the image AUROC with every test image relit to the set's median",
        "mean grey level (a global gain) and scored again, so the lighting cannot separate the classes",
        "(`anoscope evaluate --brightness-matched`, docs/evaluation.md).",
        "³ The mean image AUROC with ² in place of the image AUROC where it was measured.",
        "",
        "⁴ Area under the per-region-overlap curve up to a pixel false-positive rate of 0.3, divided by 0.3",
        "(MVTec AD's segmentation metric): every defect counts once however large, where pixel AUROC is",
        "mostly the large defects' pixels (docs/evaluation.md).",
    ]
    return "\n".join(lines) + "\n"


def add_study_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """The arguments every bench verb that studies finished training runs takes (see `study_runs`)."""
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (their exported checkpoint)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = PyTorch's default)")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    parser.add_argument("--write-docs", metavar="MD", help="write the table into this markdown file")
    parser.add_argument("--section", default=section, help="marker name of the section in --write-docs")


def study_runs(
    args: argparse.Namespace,
    verb: str,
    study: Callable[[Path], list[Any]],
    table: Callable[[list[Any], str], str],
    problems: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> int:
    """The body of the bench verbs that study finished training runs (`selection`, `reduction`): check
    `args.runs` (plus the verb's own `problems`), run `study` on each, print `table`, and write the rows
    (`--out`, JSON) and the table (`--write-docs`). A run that cannot be studied is an error naming it."""
    found = [f"{r} is not a training run folder" for r in args.runs if not (r / "checkpoints").is_dir()]
    if found or problems:
        print("error: " + "; ".join([*found, *problems]), file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from service.errors import AnoscopeError

    rows: list[Any] = []
    for run in args.runs:
        log(f"[{verb}] {run}")
        try:
            rows += study(run)
        except (AnoscopeError, ValueError) as exc:
            print(f"error: {run}: {exc}", file=sys.stderr)
            return 2
    text = table(rows, bench_command(verb))
    log(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    if args.write_docs:
        write_section(Path(args.write_docs), args.section, text)
    return 0


def write_section(doc: Path, section: str, body: str) -> None:
    """Replace the text between `<!-- bench:SECTION -->` markers in `doc` (append the section if absent)."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)


#: `anoscope train` flags every bench run sets itself (dest: flag, what to do instead). Given again in
#: --train-args they would silently win over the bench's (argparse keeps the last) or, like --resume, fail
#: after the first run's training.
_BENCH_OWNED = {
    "data": ("--data", "use bench's --datasets and --categories"),
    "out": ("--out", "use bench's --out"),
    "family": ("--model", "use bench's --families"),
    "image_size": ("--image-size", "use bench's --image-size"),
    "time_budget_s": ("--time-budget", "use bench's --budget"),
    "seed": ("--seed", "use bench's --seed"),
    "threads": ("--threads", "use bench's --threads"),
    "resume": ("--resume", "use bench's --out: finished rows are reused"),
    "dry_run": ("--dry-run", "a dry run trains nothing to evaluate"),
}


def train_flags(text: str) -> list[str]:
    """`--train-args`: shell-style words that must be `anoscope train` flags (checked before any training)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        msg = f"cannot split {text!r} into flags: {exc}"
        raise argparse.ArgumentTypeError(msg) from None
    from training.train import build_parser as add_train_arguments
    from training.train import config_from_args

    class Checking(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            msg = f"{text!r} is not a valid set of `anoscope train` flags: {message}"
            raise argparse.ArgumentTypeError(msg)

    train = Checking(prog="anoscope train")
    add_train_arguments(train)
    flags = train.parse_args(["--data", "d", *words])
    # `is`, not `in (None, False)`: `--seed 0` equals False and must count as given
    given = {k for k, v in vars(flags).items() if v is not None and v is not False and (k != "data" or v != "d")}
    if owned := [f"{flag} ({instead})" for dest, (flag, instead) in _BENCH_OWNED.items() if dest in given]:
        msg = f"{text!r}: the bench sets these itself: {', '.join(owned)}"
        raise argparse.ArgumentTypeError(msg)
    try:  # values too (a negative weight), so a bad one fails here and not after the first run's training
        config_from_args(flags)
    except ValueError as exc:
        msg = f"{text!r} is not a valid set of `anoscope train` flags: {exc}"
        raise argparse.ArgumentTypeError(msg) from None
    return words


def build_parser(parser: argparse.ArgumentParser) -> None:
    from models.config import IMAGE_SIZES  # here, like the module's other model imports: torch comes with it

    sub = parser.add_subparsers(dest="bench", required=True)
    acc = sub.add_parser("accuracy", help="train, export and evaluate each family on each real category")
    acc.add_argument("--datasets", default="../shared/datasets", help="folder of MVTec-layout categories")
    acc.add_argument("--categories", nargs="+", default=["bottle", "screw", "magnetic_tile"])
    acc.add_argument("--families", nargs="+", default=["skipganomaly", "anogan"], choices=sorted(PRESETS))
    acc.add_argument("--presets", nargs="+", default=["default"], choices=["default", "plain", "paper"])
    acc.add_argument(
        "--image-size",
        type=int,
        choices=IMAGE_SIZES,  # refused here, not after the bench has started training other rows
        help="model input side for every run; default: each family's recommended size (`anoscope train --help`), "
        "for its ablation presets too, so a preset row differs from the default row in method only",
    )
    acc.add_argument("--budget", type=float, default=600, help="training seconds per category and model")
    acc.add_argument("--seed", type=int, default=0)
    acc.add_argument("--threads", type=int, default=0, help="PyTorch threads per training run (0 = default)")
    acc.add_argument(
        "--train-args",
        type=train_flags,
        default=[],
        metavar="FLAGS",
        help="extra `anoscope train` flags for every run, after the preset's (an ablation, e.g. '--w-struct 40'); "
        "give it its own --out: finished rows are reused by category, family and preset. Flags the bench sets "
        "itself (--data, --out, --model, --image-size, --time-budget, --seed, --threads, --resume) are refused",
    )
    acc.add_argument("--out", default="reports/bench-accuracy", help="runs, bundles, reports and results.json")
    acc.add_argument("--fresh", action="store_true", help="ignore results.json from an earlier run")
    acc.add_argument("--write-docs", metavar="MD", help="write the table into this markdown file")
    acc.add_argument("--section", default="accuracy-cpu", help="marker name of the section in --write-docs")

    spd = sub.add_parser(
        "speed",
        help="eager PyTorch vs bare ONNX Runtime vs the service over HTTP, against the FLOP bound",
        description=(
            "Time one model on this machine along every scoring path, side by side: eager PyTorch one image at a "
            "time, a bare ONNX Runtime session at several batch sizes, and `anoscope serve` over HTTP on 127.0.0.1 "
            "under 1-16 concurrent clients with and without heatmaps; with FLOPs per image and the measured "
            "matmul rate. Without --bundle, freshly initialised models of the default configuration are exported "
            "(speed does not depend on the weights). Writes speed.json under --out and, with --write-docs, a "
            "markdown table."
        ),
    )
    spd.add_argument("--family", nargs="+", default=["skipganomaly", "anogan"], choices=sorted(PRESETS))
    # the families' recommended size (64) first, then the larger inputs a GPU box or finer defects call for
    spd.add_argument("--image-size", nargs="+", type=int, default=[64, 128, 256])
    spd.add_argument(
        "--config",
        choices=["recommended", "plain"],
        default="recommended",
        help="recommended: the network `anoscope train` builds by default (training.config); plain: the ModelConfig "
        "defaults (paper-like: width 1, no map discriminator)",
    )
    spd.add_argument(
        "--width-mult", nargs="+", type=float, help="override the configuration's width, e.g. 1 0.25 (default: its own)"
    )
    spd.add_argument("--bundle", type=Path, help="measure this bundle instead (--family/--image-size are ignored)")
    spd.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "int8"],
        choices=["fp32", "int8", "fp16"],
        help="bundles to export and time in the bare session (fp16 on a CPU checks nothing about speed)",
    )
    spd.add_argument("--service-precisions", nargs="+", default=["fp32"], choices=["fp32", "int8", "fp16"])
    spd.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES), help="bare-session batch sizes")
    spd.add_argument("--clients", nargs="+", type=int, default=list(DEFAULT_CLIENTS), help="concurrent HTTP clients")
    spd.add_argument("--heatmaps", nargs="+", default=["none", "png"], choices=["none", "png", "overlay"])
    spd.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every path")
    spd.add_argument("--repeats", type=int, default=5, help="timed calls per path and batch size in each round")
    spd.add_argument("--requests", type=int, default=200, help="most requests per service window")
    spd.add_argument("--seconds", type=float, default=12.0, help="most seconds per service window")
    spd.add_argument("--request-size", type=int, default=0, help="side of the request image in px (0 = model size)")
    spd.add_argument("--request-format", choices=["png", "jpeg"], default="png")
    spd.add_argument("--stage-repeats", type=int, default=20, help="in-process per-stage timings (0 = skip)")
    spd.add_argument("--matmul-repeats", type=int, default=7)
    spd.add_argument("--no-service", action="store_true", help="skip the HTTP measurements")
    spd.add_argument(
        "--providers",
        default="cpu",
        help="execution providers of the bare session and the service, e.g. cuda,cpu or tensorrt,cuda,cpu "
        "(eager PyTorch and the matmul bound then run on the GPU too)",
    )
    spd.add_argument("--fresh", action="store_true", help="re-export bundles even when --out already holds them")
    spd.add_argument("--out", default="reports/bench-speed", help="bundles, server logs and speed.json")
    spd.add_argument("--write-docs", metavar="MD", help="write the table into this markdown file")
    spd.add_argument("--section", default="speed-cpu", help="marker name of the section in --write-docs")

    from training import latent_bench

    lat = sub.add_parser(
        "latent-search",
        help="AnoGAN: the encoder's one pass against the 500-step latent search (accuracy and time)",
        description=(latent_bench.__doc__ or "").split("\n\n")[0],
    )
    latent_bench.build_parser(lat)

    from training import selection_bench

    sel = sub.add_parser(
        "selection",
        help="label-free: does the weighting rule generalise to a synthetic defect kind it did not see?",
        description=(selection_bench.__doc__ or "").split("\n\n")[0],
    )
    selection_bench.build_parser(sel)

    from training import reduction_bench

    red = sub.add_parser(
        "reduction",
        help="max, top-k or mean of the maps as the image score: label-free and test AUROC side by side",
        description=(reduction_bench.__doc__ or "").split("\n\n")[0],
    )
    reduction_bench.build_parser(red)


def main(args: argparse.Namespace) -> int:
    if args.bench == "accuracy":
        datasets = Path(args.datasets)
        missing = [c for c in args.categories if not (datasets / c / "train").is_dir()]
        if missing:
            print(f"error: no MVTec-layout category {', '.join(missing)} under {datasets}", file=sys.stderr)
            return 2
        rows = run_accuracy(args)
        table = accuracy_table(rows, bench_command("accuracy"))
        print(table)
        if args.write_docs:
            write_section(Path(args.write_docs), args.section, table)
        return 1 if any(r.error for r in rows) else 0
    if args.bench == "speed":
        return _speed(args)
    if args.bench == "latent-search":
        from training import latent_bench

        return latent_bench.main(args)
    if args.bench == "selection":
        from training import selection_bench

        return selection_bench.main(args)
    if args.bench == "reduction":
        from training import reduction_bench

        return reduction_bench.main(args)
    return 2


def _speed(args: argparse.Namespace) -> int:
    from training.speed import run_speed, speed_table  # torch-heavy: imported when the sub-command runs

    if args.bundle is not None and not (args.bundle / "model.json").is_file():
        print(f"error: {args.bundle} is not a bundle (no model.json)", file=sys.stderr)
        return 2
    report = run_speed(args, bench_command("speed"), log=lambda line: print(f"[speed] {line}", flush=True))
    table = speed_table(report)
    print(table)
    if args.write_docs:
        write_section(Path(args.write_docs), args.section, table)
    errors = sum(r["errors"] for m in report["models"] for r in m["rows"])
    return 1 if errors else 0
