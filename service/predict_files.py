"""Score image files with a bundle offline, exactly as the service would answer for them.

`anoscope predict --bundle B IMAGES_OR_FOLDERS...` runs each image through the service's own request
path (`service.app.pipeline`: decode, pre-processing, the ONNX engine, post-processing), without an
HTTP server: a quality engineer can check a folder of parts, or a line PC can score a batch written to
disk, and get the answer the camera would get. Every record is the API's per-image JSON
(`ImageResult`, docs/api.md); a heatmap is written as a PNG file and the record names that file
instead of carrying base64. Torch-free: it runs on the factory box beside the service.

Output: JSON lines on stdout, or with `--out DIR` the files `DIR/predictions.jsonl`,
`DIR/predictions.csv`, a histogram of the scores per folder given (`DIR/predictions.png`) and, with
`--heatmap png|overlay`, `DIR/heatmaps/...png`. Files that cannot be
read are reported (a record with an `error`) and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.datasets import IMAGE_EXTENSIONS, DatasetError
from service.engine import Engine
from service.errors import AnoscopeError, ImageTooLargeError, InputError
from service.images import DEFAULT_MAX_PIXELS

JSONL_FILE = "predictions.jsonl"
CSV_FILE = "predictions.csv"
PLOT_FILE = "predictions.png"
HEATMAP_DIR = "heatmaps"
CSV_COLUMNS = (
    "file",
    "anomaly_score",
    "is_anomalous",
    "residual_score",
    "discrimination_score",
    "threshold",
    "calibrated",
    "regions",
    "largest_region",
    "heatmap",
    "error",
)
MAX_NAMED_FAILURES = 10


# ------------------------------------------------------------------------------------------------ inputs


#: The group of the image files given one by one (a folder's images are grouped under its name).
FILES_GROUP = "files"


@dataclass(frozen=True)
class Item:
    path: Path  # the file to read
    name: Path  # where its outputs go under --out: the path below the folder given, under that folder's name
    group: str = FILES_GROUP  # the folder given that held it, for the score plot


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def collect(inputs: Sequence[Path], *, recursive: bool = False) -> list[Item]:
    """The image files named or held by `inputs`, in order, each once; a clear error for a path that
    does not exist or a folder without images."""
    items: list[Item] = []
    seen: set[Path] = set()
    for given in inputs:
        if given.is_dir():
            files = _images_in(given, recursive)
            if not files:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                hint = "" if recursive else "; add --recursive to look in its sub-folders"
                msg = f"{given} holds no image files ({exts}){hint}"
                raise DatasetError(msg)
            folder = given.resolve().name
            found = [Item(f, Path(folder) / f.relative_to(given), folder) for f in files]
        elif given.is_file():
            found = [Item(given, Path(given.name))]
        else:
            msg = f"{given} does not exist; pass image files or folders of images"
            raise DatasetError(msg)
        for item in found:
            if (key := item.path.resolve()) not in seen:
                seen.add(key)
                items.append(item)
    return items


def heatmap_names(items: Sequence[Item]) -> list[Path]:
    """One PNG path per item under `HEATMAP_DIR`, unique even where two inputs share a name."""
    taken: set[Path] = set()
    out = []
    for item in items:
        base = Path(HEATMAP_DIR) / item.name.with_suffix(".png")
        name, n = base, 1
        while name in taken:
            n += 1
            name = base.with_name(f"{base.stem}-{n}.png")
        taken.add(name)
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------ scoring


@dataclass
class Outcome:
    """One input's result: the API record, or why it could not be scored."""

    item: Item
    record: dict[str, Any] | None = None
    heatmap_png: bytes | None = None
    error: str | None = None


def predict_items(
    engine: Engine,
    items: Sequence[Item],
    *,
    heatmap: str = "none",
    regions: bool = True,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model_name: str | None = None,
) -> Iterator[Outcome]:
    """Score `items` through the service's request path, `batch_size` images per engine call, in order."""
    from service.app.pipeline import HeatmapMode, PredictOptions, decode, postprocess
    from service.app.schemas import ModelRef
    from service.app.uploads import Upload
    from service.engine import run_rows

    meta = engine.metadata
    options = PredictOptions(heatmap=HeatmapMode(heatmap), regions=regions)
    keep = options.heatmap is HeatmapMode.overlay
    model = ModelRef(name=model_name or meta.name, version=meta.version)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        outcomes: list[Outcome] = []
        decoded = []
        for item in chunk:
            outcomes.append(Outcome(item))
            try:
                data = item.path.read_bytes()
                decoded.append(
                    decode(Upload(str(item.path), data), meta, max_pixels=max_pixels, keep=keep, what=str(item.path))
                )
            except OSError as exc:
                outcomes[-1].error = f"cannot read {item.path}: {exc.strerror or exc}"
            except ImageTooLargeError as exc:
                outcomes[-1].error = f"{exc}; here, pass --max-pixels"
            except InputError as exc:  # not an image, truncated, an unsupported mode: the message names the file
                outcomes[-1].error = str(exc)
        if decoded:
            t0 = time.perf_counter()
            rows = np.concatenate([d.tiles for d in decoded])
            raw = run_rows(engine, rows, batch_size=batch_size)
            inference_ms = (time.perf_counter() - t0) * 1000
            results = iter(postprocess(meta, model, decoded, raw, inference_ms, options))
            for outcome in outcomes:
                if outcome.error is None:
                    result, _ = next(results)
                    outcome.record = result.model_dump(mode="json")
                    if result.heatmap is not None:
                        outcome.heatmap_png = base64.b64decode(result.heatmap)
        yield from outcomes


# ------------------------------------------------------------------------------------------------ output


def csv_row(path: Path, rec: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    """The CSV row of one file: its record's scores, verdict and largest region, or its error."""
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
    row["file"] = str(path)
    if rec is None:
        row["error"] = error
        return row
    for key in ("anomaly_score", "residual_score", "discrimination_score", "threshold"):
        row[key] = f"{rec[key]:.6g}"
    row["is_anomalous"] = "" if rec["is_anomalous"] is None else str(rec["is_anomalous"]).lower()
    row["calibrated"] = str(rec["calibrated"]).lower()
    boxes = rec.get("regions")
    if boxes is not None:
        row["regions"] = len(boxes)
        if boxes:
            b = boxes[0]
            row["largest_region"] = f"{b['x']} {b['y']} {b['width']} {b['height']}"
    row["heatmap"] = rec.get("heatmap") or ""
    return row


def plot_scores(path: Path, scores: dict[str, list[float]], *, calibrated: bool, title: str) -> list[str]:
    """A histogram of `anomaly_score` per input group, with the threshold at 0.5; returns the legend's labels.

    One folder per group is how a quality engineer checks a bundle by eye: `good/` should sit left of
    the line and each defect folder right of it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no pyplot, no global backend
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    labels = []
    for group, values in scores.items():
        flagged = sum(v >= 0.5 for v in values)
        labels.append(f"{group}: {len(values)} images, {flagged} at or above the threshold")
        ax.hist(values, bins=bins, alpha=0.55, label=labels[-1])
    line = "threshold" if calibrated else "provisional threshold (bundle not calibrated)"
    labels.append(line)
    ax.axvline(0.5, color="black", linestyle="--", label=line)
    ax.set_xlim(0, 1)
    ax.set_xlabel("anomaly_score (0.5 = the threshold)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return labels


class Writer:
    """Streams outcomes as they come: JSON lines (stdout or a file), a CSV and heatmap PNGs beside it;
    with an output folder, the score plot at the end."""

    def __init__(self, out: Path | None, stdout: IO[str]) -> None:
        self.out = out
        self.scores: dict[str, list[float]] = {}
        self._files: list[IO[str]] = []
        if out is None:
            self._jsonl, self._csv = stdout, None
            return
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = self._open(out / JSONL_FILE)
        self._csv = csv.DictWriter(self._open(out / CSV_FILE), fieldnames=CSV_COLUMNS)
        self._csv.writeheader()

    def _open(self, path: Path) -> IO[str]:
        f = path.open("w", encoding="utf-8", newline="")
        self._files.append(f)
        return f

    def write(self, outcome: Outcome, heatmap_name: Path) -> None:
        record = outcome.record
        if record is not None:
            if outcome.heatmap_png is not None and self.out is not None:
                target = self.out / heatmap_name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(outcome.heatmap_png)
                record = {**record, "heatmap": heatmap_name.as_posix()}  # the file, where the API sends base64
            self.scores.setdefault(outcome.item.group, []).append(record["anomaly_score"])
        line = record if record is not None else {"filename": str(outcome.item.path), "error": outcome.error}
        self._jsonl.write(json.dumps(line) + "\n")
        if self._csv is not None:
            self._csv.writerow(csv_row(outcome.item.path, record, outcome.error))

    @property
    def scored(self) -> int:
        return sum(len(v) for v in self.scores.values())

    def close(self) -> None:
        for f in self._files:
            f.close()

    def plot(self, *, calibrated: bool, title: str) -> Path | None:
        if self.out is None or not self.scores:
            return None
        plot_scores(self.out / PLOT_FILE, self.scores, calibrated=calibrated, title=title)
        return self.out / PLOT_FILE


# ------------------------------------------------------------------------------------------------ command


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Examples:\n"
        "  anoscope predict --bundle models/line3 part.png\n"
        "  anoscope predict --bundle models/line3 shift-2/ --out preds/ --heatmap overlay\n"
        "Records are the API's per-image JSON (docs/api.md); a heatmap is a PNG under --out, named in the record."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER", help="image files and folders")
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder (model.onnx + model.json)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"folder for {JSONL_FILE}, {CSV_FILE}, {PLOT_FILE} and {HEATMAP_DIR}/ (default: JSON lines on stdout)",
    )
    parser.add_argument("--recursive", action="store_true", help="also take images in sub-folders of a folder")
    parser.add_argument(
        "--heatmap",
        choices=("none", "png", "overlay"),
        default="none",
        help="write each heatmap as a PNG under --out: the colour map alone, or over the image (default: none)",
    )
    parser.add_argument("--no-regions", action="store_true", help="leave out the defect regions")
    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=16, help="images per inference batch (default: 16)")
    run.add_argument(
        "--providers", default="cuda,cpu", help="ONNX Runtime providers in order of preference (default: cuda,cpu)"
    )
    run.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    run.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images, as the service does (default: {DEFAULT_MAX_PIXELS}, the service's default)",
    )


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r[predict] {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, stdout: IO[str] | None = None) -> int:
    if args.heatmap != "none" and args.out is None:
        msg = "--heatmap writes PNG files, so it needs --out DIR"
        raise DatasetError(msg)
    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1, not {args.batch_size}"
        raise DatasetError(msg)
    items = collect(args.inputs, recursive=args.recursive)
    from service.engine import OnnxEngine

    providers = [p for p in args.providers.split(",") if p.strip()]
    engine = OnnxEngine(args.bundle, providers=providers, intra_op_threads=args.threads)
    meta = engine.metadata
    served_as = args.bundle.resolve().name  # the service names a model after its bundle folder
    print(
        f"[predict] {len(items)} images, model {served_as} (version {meta.version}) on {engine.provider}",
        file=sys.stderr,
    )
    if not meta.calibrated:
        print(
            "[predict] the bundle is not calibrated: is_anomalous is null; set a threshold with "
            f"`anoscope calibrate --bundle {args.bundle} --normals GOOD_IMAGES`",
            file=sys.stderr,
        )
    names = heatmap_names(items)
    writer = Writer(args.out, stdout or sys.stdout)
    failures: list[str] = []
    anomalous = 0
    start = time.perf_counter()
    try:
        outcomes = predict_items(
            engine,
            items,
            heatmap=args.heatmap,
            regions=not args.no_regions,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            model_name=served_as,
        )
        for i, outcome in enumerate(outcomes):
            writer.write(outcome, names[i])
            if outcome.record is None:
                failures.append(outcome.error or str(outcome.item.path))
            else:
                anomalous += bool(outcome.record["is_anomalous"])
            _progress(i + 1, len(items))
    finally:
        writer.close()
    plot = writer.plot(calibrated=meta.calibrated, title=f"model {served_as} (version {meta.version})")
    seconds = time.perf_counter() - start
    verdicts = f"{anomalous} anomalous" if meta.calibrated else "no verdicts (uncalibrated)"
    where = "" if args.out is None else f"; wrote {args.out / JSONL_FILE}, {args.out / CSV_FILE}"
    where += "" if plot is None else f" and {plot}"
    images = f"{writer.scored} image{'s' * (writer.scored != 1)}"
    print(f"[predict] scored {images} in {seconds:.1f} s: {verdicts}{where}", file=sys.stderr)
    if failures:
        named = "\n  ".join(failures[:MAX_NAMED_FAILURES])
        more = len(failures) - MAX_NAMED_FAILURES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        n = len(failures)
        print(f"[predict] {n} file{'s' * (n != 1)} could not be scored:\n  {named}{tail}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (AnoscopeError, OSError) as exc:
        print(f"anoscope predict: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C on a long folder: what was scored is already written, say so
        kept = "" if args.out is None else f"; the records scored so far are in {args.out / JSONL_FILE}"
        print(f"\nanoscope predict: interrupted{kept}", file=sys.stderr)
        return 130
