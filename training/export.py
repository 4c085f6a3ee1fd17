"""Export a trained checkpoint to an ONNX bundle (model.onnx + model.json), checking parity with PyTorch.

The scoring head is exported in eval mode with the dynamo exporter (opset >= 18, dynamic batch axis),
then run by ONNX Runtime through `service.engine.OnnxEngine` — the engine the service uses — on the
run's validation normals, pre-processed by `service.images.preprocess`. Every output must match
PyTorch within `|onnx - torch| <= atol + rtol * |torch|`; otherwise the export fails and leaves
nothing behind: the bundle is built in a temporary folder beside `--out` and moved into place only
when every check has passed.

Why the dynamo exporter: the legacy TorchScript exporter produced outputs up to 96% off for a briefly
trained model with BatchNorm, while the dynamo exporter matched to ~1e-7 (docs/FINDINGS).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.align import FULL_BOX, Align
from service.bundle import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAMES,
    BundleMetadata,
    Normalization,
    NormalizationPair,
    Resize,
    ScoreStats,
    ScoreWeights,
    utc_now,
    write_metadata,
)
from service.datasets import list_images, normal_folder
from service.errors import AnoscopeError
from service.images import load_image_file
from service.postprocess import (
    ASPECT_MIN_IMAGES,
    combine_scores,
    fit_aspect_baseline,
    fit_image_normalization,
    fit_normalization,
)
from service.tiles import preprocess_tiles

MIN_OPSET = 18
DEFAULT_OPSET = 18
#: Validation normals compared between PyTorch and ONNX Runtime (in one batch, and the first ones alone).
MAX_PARITY_IMAGES = 32
#: Validation normals scored to fit the provisional normalisation when the checkpoint carries none.
MAX_NORMALIZATION_IMAGES = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REPO = Path(__file__).resolve().parents[1]


class ExportError(AnoscopeError):
    """The checkpoint could not be exported into a valid bundle."""

    title = "Export failed"


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""

    title = "Export parity check failed"

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Tolerance:
    """Elementwise `|candidate - reference| <= atol + rtol * |reference| + spread * std(reference)`.

    With `spread` = 0 this is numpy's allclose. `spread` measures error in standard deviations of each
    output over the parity images (normal images): the unit that matters once scores are z-scored and
    ranked, and one that does not depend on the arbitrary scale of an untrained or a trained network.
    """

    rtol: float = 1e-3
    atol: float = 1e-5
    spread: float = 0.0


#: Default tolerance per bundle precision (docs/performance.md says how the reduced-precision ones were set).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(),
    # Float16 keeps ~3 significant digits per op; errors compound over the generator's ~10 layers.
    "fp16": Tolerance(rtol=1e-2, atol=1e-4, spread=0.05),
    # INT8 rounds every Conv input and weight to 256 levels. A sanity check, not the acceptance test (compare
    # AUROC with `anoscope evaluate`): on the six final bottle/screw/magnetic_tile models the worst map pixel
    # moved 1-31% (the map discriminator sees the INT8 reconstruction) while image AUROC moved <= 0.011.
    "int8": Tolerance(rtol=0.35, atol=1e-5, spread=0.2),
}
PRECISIONS = tuple(TOLERANCES)


@dataclass(frozen=True)
class ParityReport:
    """How far ONNX Runtime's outputs are from PyTorch's, per output."""

    tolerance: Tolerance
    n_images: int
    batch_sizes: list[int]
    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]  # |d| / max(|reference|, 1e-12): large where the reference is ~0
    #: max over elements of |d| / (atol + rtol * |reference| + spread * std(reference)); > 1 is out of tolerance.
    worst_ratio: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        parts = [f"{k}={self.max_abs_diff[k]:.3g}" for k in OUTPUT_NAMES if k in self.max_abs_diff]
        return (
            f"max |onnx - torch| on {self.n_images} image(s), batch sizes {self.batch_sizes}: {', '.join(parts)} "
            f"(tolerance {fmt_tolerance(self.tolerance)})"
        )


def fmt_tolerance(t: Tolerance) -> str:
    spread = f", spread={t.spread:g} std" if t.spread else ""
    return f"rtol={t.rtol:g}, atol={t.atol:g}{spread}"


class TrainedLike(Protocol):
    """What export needs from `training.checkpoint.TrainedModel`."""

    model_config: Any  # models.ModelConfig
    model: Any  # torch.nn.Module with .scoring_head()
    train_config: dict[str, Any]
    score_stats: dict[str, ScoreStats]
    score_weights: ScoreWeights
    normalization: NormalizationPair | None
    mean: list[float]
    std: list[float]
    provenance: dict[str, Any]
    val_paths: list[str]
    train_paths: list[str]


# ---------------------------------------------------------------------------------------- parity
def compare_outputs(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    tolerance: Tolerance,
    *,
    n_images: int = 0,
    batch_sizes: Sequence[int] = (),
) -> ParityReport:
    """Compare (residual_score, discrimination_score, anomaly_map) tuples output by output."""
    max_abs, max_rel, worst, failures = {}, {}, {}, []
    for name, ref, cand in zip(OUTPUT_NAMES, reference, candidate, strict=True):
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64).reshape(r.shape)
        if not (np.isfinite(r).all() and np.isfinite(c).all()):
            failures.append(
                f"{name} has NaN or infinite values (torch: {not np.isfinite(r).all()}, onnx: "
                f"{not np.isfinite(c).all()})"
            )
            max_abs[name] = max_rel[name] = worst[name] = float("inf")
            continue
        d = np.abs(c - r)
        allowed = tolerance.atol + tolerance.rtol * np.abs(r) + tolerance.spread * float(r.std())
        max_abs[name] = float(d.max(initial=0.0))
        max_rel[name] = float((d / np.maximum(np.abs(r), 1e-12)).max(initial=0.0))
        worst[name] = float((d / allowed).max(initial=0.0))
        if worst[name] > 1.0:
            failures.append(f"{name} differs by up to {max_abs[name]:.3g} (relative {max_rel[name]:.3g})")
    return ParityReport(tolerance, n_images, list(batch_sizes), max_abs, max_rel, worst, failures)


def torch_outputs(head: Any, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PyTorch scoring head's outputs for a pre-processed batch, as numpy (anomaly_map (B, S, S))."""
    import torch

    with torch.inference_mode():
        r, d, m = head(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return r.numpy().reshape(-1), d.numpy().reshape(-1), m.numpy()[:, 0]


def check_parity(head: Any, engine: Any, images: np.ndarray, tolerance: Tolerance) -> ParityReport:
    """Run the PyTorch head and the engine on `images` as one batch, and the first two alone at batch 1."""
    n = len(images)
    ref = torch_outputs(head, images)
    out = engine.run(images)
    reference = [ref]
    candidate = [(out.residual_score, out.discrimination_score, out.anomaly_map)]
    for i in range(min(n, 2) if n > 1 else 0):
        one = engine.run(images[i : i + 1])
        reference.append(tuple(r[i : i + 1] for r in ref))
        candidate.append((one.residual_score, one.discrimination_score, one.anomaly_map))
    stacked_ref = [np.concatenate([np.ravel(r[k]) for r in reference]) for k in range(3)]
    stacked_cand = [np.concatenate([np.ravel(c[k]) for c in candidate]) for k in range(3)]
    sizes = [n] + [1] * (len(reference) - 1)
    return compare_outputs(stacked_ref, stacked_cand, tolerance, n_images=n, batch_sizes=sizes)


# ---------------------------------------------------------------------------------------- inputs
def load_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    limit: int,
    resize: Resize = "squash",
    align: Align = "none",
    crop_box: tuple[float, float] = FULL_BOX,
    exposure: tuple[float, float] | None = None,
) -> np.ndarray:
    """Pre-process up to `limit` images exactly as training and the service do: (N, C, S, S) float32,
    one row per image or, with `resize="tiles"`, per tile."""
    chosen = list(paths)[:limit]
    kw = {"image_size": image_size, "channels": channels, "mean": mean, "std": std, "resize": resize, "align": align}
    kw.update(crop_box=crop_box, exposure=exposure)
    arrays = [preprocess_tiles(load_image_file(p), **kw)[0] for p in chosen]
    if not arrays:
        return np.zeros((0, channels, image_size, image_size), dtype=np.float32)
    return np.concatenate(arrays)


def validation_paths(trained: TrainedLike, parity_data: str | os.PathLike[str] | None) -> list[Path]:
    """The normals to check parity on: `parity_data` when given, else the run's validation split."""
    if parity_data is not None:
        return list_images(normal_folder(parity_data))
    paths = [Path(p) for p in (getattr(trained, "val_paths", None) or [])]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        why = "lists no validation images" if not paths else f"lists validation images that are gone ({missing[0]})"
        msg = (
            f"the checkpoint {why}; parity must be checked on real normal images: "
            "pass --parity-data DIR (a folder of normal images of this part)"
        )
        raise ExportError(msg)
    return paths


# ---------------------------------------------------------------------------------------- export
def export_onnx(head: Any, example: np.ndarray, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write the scoring head to `path` with the dynamo exporter: input `image`, dynamic batch axis."""
    import torch

    if opset < MIN_OPSET:
        msg = f"opset {opset} is too old; bundles need opset >= {MIN_OPSET}"
        raise ExportError(msg)
    if len(example) < 2:  # an example batch of 1 would let the exporter specialise the batch axis to 1
        example = np.concatenate([example, example])
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            head,
            (torch.from_numpy(np.ascontiguousarray(example[:2], dtype=np.float32)),),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        if program is None:
            msg = "torch.onnx.export returned no program"
            raise ExportError(msg)
        program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many internal types
        msg = f"the ONNX exporter failed on this model ({type(exc).__name__}: {exc})"
        raise ExportError(msg) from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_revision(repo: Path = _REPO) -> str | None:
    """`git rev-parse HEAD` of the source tree (with '-dirty' when it has changes), or None outside git."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _placeholder_normalization() -> NormalizationPair:
    n = Normalization(threshold=0.0, min=-1.0, max=1.0, source="placeholder during export (never shipped)")
    return NormalizationPair(image=n, pixel=n)


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` (same filesystem, so the final move is a rename); removed on exit."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(staged: Path, out: Path) -> None:
    """Replace `out` by `staged`; an existing bundle is swapped out first and deleted last."""
    # mkdtemp/mkstemp make 0700/0600; the service may run as another user, so open the bundle for reading.
    os.chmod(staged, 0o755)
    for f in staged.iterdir():
        os.chmod(f, 0o644)
    if not out.exists():
        os.replace(staged, out)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, backup / "bundle")
    try:
        os.replace(staged, out)
    except OSError:
        os.replace(backup / "bundle", out)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace anything but an existing bundle or an empty folder, unless `overwrite`."""
    if out.exists() and not out.is_dir():
        msg = f"{out} exists and is not a directory; choose another --out"
        raise ExportError(msg)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        msg = f"{out} is not empty; choose another --out, or pass --overwrite to replace the bundle in it"
        raise ExportError(msg)


def export_bundle(
    trained: TrainedLike,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    parity_images: np.ndarray | None = None,
    parity_data: str | os.PathLike[str] | None = None,
    tolerance: Tolerance | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    checkpoint: str | None = None,
    precision: str = "fp32",
    calibration_images: np.ndarray | None = None,
    calibration_data: str | os.PathLike[str] | None = None,
    aspect_baseline: bool = True,
) -> BundleMetadata:
    """Export `trained` to a bundle at `out_dir` and return its metadata.

    Parity is checked on `parity_images` ((N, C, S, S) float32, already pre-processed) when given, else
    on the normals in `parity_data`, else on the run's validation normals (`trained.val_paths`).
    Raises `ParityError` (nothing written) when ONNX Runtime and PyTorch disagree beyond `tolerance`
    (default: `TOLERANCES[precision]`), `ExportError` for everything else that stops an export. With
    `dry_run` every check runs but nothing is written.

    `precision` "fp16" or "int8" (`training.quantize`) first checks the FP32 graph with the FP32
    tolerance, then converts it and checks the converted graph against PyTorch with `tolerance`. INT8
    calibrates on `calibration_images` (pre-processed) when given, else on the normals in
    `calibration_data`, else on the run's validation normals (else the parity images).

    `aspect_baseline`: fit each score's baseline on the normals' aspect ratios (`_aspect_baseline`),
    kept only where it is significant; False leaves the scores as the head gives them.
    """
    from service.engine import OnnxEngine

    out = Path(out_dir)
    name = name or out.name
    if not _NAME_RE.match(name):
        msg = f"bundle name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise ExportError(msg)
    if precision not in TOLERANCES:
        msg = f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
        raise ExportError(msg)
    if not dry_run:
        check_out_dir(out, overwrite=overwrite)
    tolerance = tolerance or TOLERANCES[precision]
    cfg = trained.model_config
    size, channels = int(cfg.image_size), int(cfg.channels)
    mean, std = [float(v) for v in trained.mean], [float(v) for v in trained.std]
    if len(mean) != channels or len(std) != channels:
        msg = f"the checkpoint has mean {mean} and std {std}, but the model has {channels} channel(s)"
        raise ExportError(msg)
    for option in ("align", "roi", "crop", "exposure"):
        if getattr(cfg, option) == "auto":
            msg = f"the checkpoint's {option} is 'auto', which training resolves; was it written by `anoscope train`?"
            raise ExportError(msg)

    # How an image becomes the model's input: the parity check loads images so, and the bundle says so.
    inputs: dict[str, Any] = {
        "image_size": size,
        "channels": channels,
        "mean": mean,
        "std": std,
        "resize": cfg.resize,
        "align": cfg.align,
    }
    # the box and the exposure reach the bundle in `network`
    load = partial(load_images, **inputs, crop_box=cfg.crop_box, exposure=cfg.exposure_standard)
    val_paths: list[Path] = []
    if parity_images is None:
        val_paths = validation_paths(trained, parity_data)
        parity_images = load(val_paths, limit=MAX_PARITY_IMAGES)
    parity_images = np.asarray(parity_images, dtype=np.float32)
    if parity_images.ndim != 4 or parity_images.shape[1:] != (channels, size, size) or len(parity_images) == 0:
        msg = f"parity images have shape {parity_images.shape}; the model needs (N>=1, {channels}, {size}, {size})"
        raise ExportError(msg)

    # A private CPU copy in eval mode: the caller's model keeps its device and train/eval mode.
    model = copy.deepcopy(trained.model).cpu().eval()
    head = model.scoring_head().eval()

    with _staging_dir(out) as staged:
        model_path = staged / MODEL_FILE
        export_onnx(head, parity_images, model_path, opset=opset)
        graph_hash = _sha256(model_path)[:12]  # of the graph as exported, before metadata is mirrored into it
        provenance: dict[str, Any] = {
            **_json_safe(dict(trained.provenance or {})),
            "train_config": _json_safe(dict(trained.train_config or {})),
            "exported": utc_now(),
            "export_git_revision": git_revision(),
            "checkpoint": checkpoint,
            "opset": opset,
            **_versions(),
        }
        provenance.setdefault("data", provenance["train_config"].get("data"))
        meta = BundleMetadata(
            name=name,
            version=f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{graph_hash}",
            family=cfg.family,
            **inputs,
            score_weights=trained.score_weights,
            score_stats=dict(trained.score_stats),
            normalization=trained.normalization or _placeholder_normalization(),
            network=_json_safe(cfg.to_dict()),
            provenance=provenance,
        )
        write_metadata(staged, meta, mirror=False)  # the engine reads model.json; the final write mirrors it
        try:
            engine = OnnxEngine(staged, providers=("cpu",))
        except AnoscopeError as exc:
            msg = f"ONNX Runtime cannot load the exported graph: {exc}"
            raise ExportError(msg) from exc

        report = check_parity(head, engine, parity_images, tolerance if precision == "fp32" else TOLERANCES["fp32"])
        _raise_unless_passed(report, "")
        if precision != "fp32":
            calibration = None
            if precision == "int8":
                calibration = _calibration_images(calibration_images, calibration_data, val_paths, parity_images, load)
            conversion = _reduce_precision(model_path, precision, calibration)
            graph_hash = _sha256(model_path)[:12]
            provenance = {**provenance, "parity_fp32": report.to_dict(), "precision_conversion": conversion}
            meta = meta.model_copy(
                update={"precision": precision, "version": f"{meta.version.rsplit('-', 1)[0]}-{graph_hash}"}
            )
            write_metadata(staged, meta, mirror=False)
            try:
                engine = OnnxEngine(staged, providers=("cpu",))
            except AnoscopeError as exc:
                msg = f"ONNX Runtime cannot load the {precision} graph: {exc}"
                raise ExportError(msg) from exc
            report = check_parity(head, engine, parity_images, tolerance)
            _raise_unless_passed(report, f" of the {precision} graph")

        normalization = trained.normalization
        if normalization is None:
            normalization = _fit_normalization(engine, trained, val_paths, parity_images, load)
        stats = dict(trained.score_stats)
        if aspect_baseline:
            stats, normalization, provenance["aspect_baseline"] = _aspect_baseline(engine, trained, normalization)
        meta = meta.model_copy(
            update={
                "score_stats": stats,
                "normalization": normalization,
                "provenance": {**provenance, "parity": report.to_dict()},
            }
        )
        meta = BundleMetadata.model_validate(meta.model_dump())  # re-validate the updated fields
        write_metadata(staged, meta)
        if not dry_run:
            _move_into_place(staged, out)
    return meta


def _raise_unless_passed(report: ParityReport, what: str) -> None:
    if not report.passed:
        msg = (
            f"ONNX Runtime's outputs{what} differ from PyTorch's; no bundle was written. "
            + "; ".join(report.failures)
            + f". {report.summary()}"
        )
        raise ParityError(msg, report)


def _calibration_images(
    given: np.ndarray | None,
    folder: str | os.PathLike[str] | None,
    val_paths: Sequence[Path],
    parity_images: np.ndarray,
    load: Callable[..., np.ndarray],
) -> np.ndarray:
    """Normal images for INT8 calibration: given, else a folder's, else the validation normals, else parity's."""
    from training.quantize import DEFAULT_CALIBRATION_IMAGES

    if given is not None:
        return np.asarray(given, dtype=np.float32)
    paths = list_images(normal_folder(folder)) if folder is not None else list(val_paths)
    if not paths:
        return parity_images
    return load(paths, limit=DEFAULT_CALIBRATION_IMAGES)


def _reduce_precision(model_path: Path, precision: str, calibration: np.ndarray | None) -> dict[str, Any]:
    """Rewrite the FP32 graph at `model_path` in `precision`; return what was done, for the provenance."""
    from training.quantize import QuantizeError, convert_fp16, quantize_int8

    converted = model_path.with_name(f"{precision}.onnx")
    try:
        if precision == "int8":
            if calibration is None or len(calibration) == 0:
                msg = "INT8 needs normal images to calibrate on: pass --calibration-data DIR"
                raise ExportError(msg)
            done = quantize_int8(model_path, converted, calibration)
        else:
            done = convert_fp16(model_path, converted)
    except QuantizeError as exc:
        msg = f"could not convert the graph to {precision}: {exc}"
        raise ExportError(msg) from exc
    os.replace(converted, model_path)
    return done


def _fit_normalization(
    engine: Any,
    trained: TrainedLike,
    val_paths: Sequence[Path],
    parity_images: np.ndarray,
    load: Callable[..., np.ndarray],
) -> NormalizationPair:
    """Provisional normalisation from the validation normals, through the exported graph (per tile for a
    bundle that cuts tiles, as training measures it)."""
    more = len(val_paths) > len(parity_images)
    images = load(val_paths, limit=MAX_NORMALIZATION_IMAGES) if more else parity_images
    scores, pixels = [], []
    for start in range(0, len(images), 16):
        out = engine.run(images[start : start + 16])
        scores.append(
            combine_scores(out.residual_score, out.discrimination_score, trained.score_stats, trained.score_weights)
        )
        pixels.append(out.anomaly_map.ravel())
    return fit_normalization(
        np.concatenate(scores),
        np.concatenate(pixels),
        source=f"validation normals at export ({len(images)} images)",
    )


def _score_files(engine: Any, paths: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual, discrimination, width / height) of the readable `paths`, scored as the service scores them."""
    from service.engine import score_files

    rows = [
        (out.residual_score, out.discrimination_score, img.size[0] / img.size[1])
        for _, img, out in score_files(engine, paths, on_error=lambda _i, _e: None)
    ]
    r, d, a = (np.asarray(v, dtype=np.float64) for v in zip(*rows, strict=True)) if rows else (np.zeros(0),) * 3
    return r, d, a


def _aspect_baseline(
    engine: Any, trained: TrainedLike, normalization: NormalizationPair
) -> tuple[dict[str, ScoreStats], NormalizationPair, dict[str, Any]]:
    """Each score's baseline against the image's aspect ratio (`service.postprocess.fit_aspect_baseline`),
    fitted on up to STATS_IMAGES of the run's training normals (as the per-pixel statistics are), through
    the exported graph from the image files, as the service will score them. Where a slope is kept, the
    provisional image threshold is refitted on the validation normals' baselined scores. Returns the
    score statistics, the normalisation and a note for the provenance.
    """
    from training.position_stats import spaced_indices

    stats = dict(trained.score_stats)
    paths = list(trained.train_paths)
    picked = [paths[i] for i in spaced_indices(len(paths))]
    r, d, aspect = _score_files(engine, picked)
    fitted = {}
    for name, values in (("residual", r), ("discrimination", d)):
        slope, centre = fit_aspect_baseline(values, aspect)
        fitted[name] = stats[name].model_copy(update={"aspect_slope": slope, "aspect_centre": centre})
    note: dict[str, Any] = {
        "images": int(aspect.size),
        "unreadable": len(picked) - int(aspect.size),
        "log_aspect_std": round(float(np.log(aspect).std()), 4) if aspect.size else None,
        "slopes": {name: s.aspect_slope for name, s in fitted.items()},
    }
    if all(s.aspect_slope == 0.0 for s in fitted.values()):
        return stats, normalization, note
    r, d, aspect = _score_files(engine, list(trained.val_paths)[:MAX_NORMALIZATION_IMAGES])
    if aspect.size:
        combined = combine_scores(r, d, fitted, trained.score_weights, aspect)
        image = fit_image_normalization(combined, source=f"validation normals at export ({aspect.size} images)")
        normalization = normalization.model_copy(update={"image": image})
    return fitted, normalization, note


def _unread_warning(note: dict[str, Any] | None) -> str | None:
    """What export says when the aspect baseline could not be fitted because training images it read
    before are gone (None when they were all read, or enough of them: a run with few images is no news)."""
    if not note or not note.get("unreadable") or note["images"] >= ASPECT_MIN_IMAGES:
        return None
    tried = note["images"] + note["unreadable"]
    return (
        f"aspect baseline: none fitted, only {note['images']} of {tried} of the run's training images could be "
        "read (moved?); scores are taken as the head gives them"
    )


# ---------------------------------------------------------------------------------------- command
def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a trained checkpoint to a bundle folder (model.onnx + model.json). The scoring head is exported "
        "with the dynamo ONNX exporter and run by ONNX Runtime on the run's validation normals; if any output "
        "differs from PyTorch beyond the tolerance, the export fails and writes nothing."
    )
    parser.epilog = "example: anoscope export --checkpoint runs/fabric --out bundles/fabric"
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a training run directory, or a checkpoint .pt file in one"
    )
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    parser.add_argument("--name", help="model name the service will use (default: the --out folder's name)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, at least {MIN_OPSET}")
    tolerances = "; ".join(f"{k}: {fmt_tolerance(t)}" for k, t in TOLERANCES.items())
    parser.add_argument("--rtol", type=float, help=f"parity: relative tolerance (default per precision: {tolerances})")
    parser.add_argument("--atol", type=float, help="parity: absolute tolerance (default per precision)")
    parser.add_argument(
        "--spread",
        type=float,
        help="parity: tolerance in standard deviations of each output over the parity images (default per precision)",
    )
    reduced = parser.add_mutually_exclusive_group()
    reduced.add_argument(
        "--quantize",
        choices=["int8"],
        help="INT8 static quantisation (ONNX Runtime, QDQ, per-channel weights) calibrated on normal images; "
        "for CPUs (see docs/performance.md)",
    )
    reduced.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="graph precision; fp16 (float32 inputs/outputs) is meant for GPUs",
    )
    parser.add_argument(
        "--calibration-data",
        type=Path,
        help="with --quantize int8: folder of normal images to calibrate on (default: the run's validation images)",
    )
    parser.add_argument(
        "--parity-data",
        type=Path,
        help="folder of normal images to check parity on, when the run's validation images have moved",
    )
    parser.add_argument(
        "--aspect-baseline",
        choices=["auto", "none"],
        default="auto",
        help="auto: where the normals' scores follow their aspect ratio (images of varying shape squashed to the "
        "model's square), fit that baseline and take it off every image's score; kept only when significant "
        "(docs/quality.md). none: scores as the head gives them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    parser.add_argument("--dry-run", action="store_true", help="export and check parity, but write nothing")


def _fmt_parity(meta: BundleMetadata) -> str:
    parity = meta.provenance.get("parity", {})
    diffs = parity.get("max_abs_diff", {})
    return ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())


def main(args: argparse.Namespace) -> int:
    from training.checkpoint import load_trained  # torch-heavy: imported only when the command runs

    if not args.checkpoint.exists():
        print(
            f"anoscope export: error: {args.checkpoint} does not exist; point --checkpoint at a run directory",
            file=sys.stderr,
        )
        return 2
    try:
        trained = load_trained(args.checkpoint)
    except (AnoscopeError, ValueError, KeyError) as exc:
        print(f"anoscope export: error: cannot load {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    precision = args.quantize or args.precision
    if args.calibration_data is not None and precision != "int8":
        print("anoscope export: error: --calibration-data only applies with --quantize int8", file=sys.stderr)
        return 2
    default = TOLERANCES[precision]
    tolerance = Tolerance(
        rtol=default.rtol if args.rtol is None else args.rtol,
        atol=default.atol if args.atol is None else args.atol,
        spread=default.spread if args.spread is None else args.spread,
    )
    try:
        meta = export_bundle(
            trained,
            args.out,
            name=args.name,
            opset=args.opset,
            parity_data=args.parity_data,
            tolerance=tolerance,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            checkpoint=str(getattr(trained, "path", None) or args.checkpoint),
            precision=precision,
            calibration_data=args.calibration_data,
            aspect_baseline=args.aspect_baseline == "auto",
        )
    except AnoscopeError as exc:
        print(f"anoscope export: error: {exc}", file=sys.stderr)
        return 1
    what = "would write" if args.dry_run else "wrote"
    print(
        f"{what} bundle {meta.name} ({meta.family}, {meta.image_size} px, {meta.channels} channel(s), "
        f"{meta.precision}) "
        f"version {meta.version} to {args.out}"
    )
    print(f"parity with PyTorch: max |diff| {_fmt_parity(meta)} (within {fmt_tolerance(tolerance)})")
    slopes = {k: s.aspect_slope for k, s in meta.score_stats.items() if s.aspect_slope}
    unread = _unread_warning(meta.provenance.get("aspect_baseline"))
    if unread:
        print(unread)
    if slopes:
        fitted = ", ".join(f"{k} {v:+.3g}" for k, v in slopes.items())
        print(f"aspect baseline: scores of the normals follow their shape (per unit of log(width/height): {fitted})")
    print("thresholds: not calibrated yet (scores and heatmaps work; run `anoscope calibrate` for verdicts)")
    return 0
