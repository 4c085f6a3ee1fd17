"""The bundle: `model.onnx` + `model.json`, a self-describing exported detector.

`model.json` is the source of truth; the same JSON is mirrored into the ONNX model's
`metadata_props` (key `anoscope`) so a lone `model.onnx` still says what it is. Every write goes to a
temporary file in the bundle directory and is moved into place with `os.replace`, so a crash at any
point leaves the previous file intact and loadable.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.align import Align
from service.errors import BundleError, BundleSchemaError

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"
ONNX_METADATA_KEY = "anoscope"
INPUT_NAME = "image"
OUTPUT_NAMES = ("residual_score", "discrimination_score", "anomaly_map")
#: How an image becomes model inputs: squashed to the square, or cut into square tiles (`service.tiles`).
Resize = Literal["squash", "tiles"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreStats(_Strict):
    """Mean and spread of a raw score on validation normals; used to z-score it before combining.

    `aspect_slope`: how a normal image's raw score moves per unit of log(width / height), where export
    found that it does (parts photographed at varying shapes, squashed to the model's square;
    `service.postprocess.fit_aspect_baseline`). The score less `aspect_slope * (log(aspect) -
    aspect_centre)` is what gets z-scored; 0 (the default, and every bundle written before it) changes nothing.
    """

    mean: float
    std: float = Field(gt=0)
    aspect_slope: float = 0.0
    aspect_centre: float = 0.0


class ScoreWeights(_Strict):
    residual: float = 1.0
    discrimination: float = 0.0


class Normalization(_Strict):
    """Maps a raw value to [0, 1] with 0.5 at `threshold` (anomalib's min-max normalisation)."""

    threshold: float
    min: float
    max: float
    source: str = Field(description="what data these numbers were measured on")


class Thresholds(_Strict):
    """Decision thresholds on the combined image score and on anomaly-map pixels; null until calibrated."""

    image: float | None = None
    pixel: float | None = None


class NormalizationPair(_Strict):
    image: Normalization
    pixel: Normalization


class Calibration(_Strict):
    """One calibration run: what it set and how it was chosen (kept in the history when replaced)."""

    date: str
    strategy: str
    thresholds: Thresholds
    normalization: NormalizationPair
    data: dict[str, Any] = Field(default_factory=dict, description="folders and image counts used")
    report: dict[str, Any] = Field(default_factory=dict, description="expected rates, AUROC, counts")


class BundleMetadata(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = Field(description="export identifier: UTC time of export plus a content hash")
    family: Literal["anogan", "skipganomaly"]
    image_size: int
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]
    resize: Resize = "squash"
    align: Align = "none"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    input_name: str = INPUT_NAME
    output_names: list[str] = Field(default_factory=lambda: list(OUTPUT_NAMES))
    score_weights: ScoreWeights = Field(default_factory=ScoreWeights)
    score_stats: dict[Literal["residual", "discrimination"], ScoreStats]
    # Active thresholds (null until `anoscope calibrate`) and the normalisation that maps them to 0.5.
    # Before calibration the normalisation is provisional, measured on the training validation normals.
    thresholds: Thresholds = Field(default_factory=Thresholds)
    normalization: NormalizationPair
    calibration: Calibration | None = None
    calibration_history: list[Calibration] = Field(default_factory=list)
    network: dict[str, Any] = Field(default_factory=dict, description="the architecture config it was built from")
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.thresholds.image is not None

    @property
    def roi(self) -> str:
        """ "part" when the graph scores only where the part lies in the training normals, else "none"
        (applied inside the graph: nothing for the service to do, only to report)."""
        return str(self.network.get("roi", "none"))

    @property
    def crop_box(self) -> tuple[float, float]:
        """The share of the aligned frame's width and height the model sees (`service.align.crop_box`);
        (1, 1) = the whole frame. Pre-processing: the service crops with it after posing the image."""
        box = self.network.get("crop_box") or (1.0, 1.0)
        return float(box[0]), float(box[1])

    @property
    def aspect_baseline(self) -> bool:
        """Whether either score loses a baseline fitted on the image's aspect ratio (`ScoreStats.aspect_slope`)."""
        return any(s.aspect_slope != 0.0 for s in self.score_stats.values())

    @property
    def exposure(self) -> tuple[float, float] | None:
        """The (mean, std) of 0-1 pixels every image is standardised to before the model, or None (as it
        comes; `service.images.standardise_exposure`). Pre-processing: the service applies it."""
        if self.network.get("exposure") != "standardise":
            return None
        target = self.network.get("exposure_target") or (0.5, 0.2)
        return float(target[0]), float(target[1])

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def with_calibration(self, calibration: Calibration) -> BundleMetadata:
        """A copy with `calibration` active and the previous one moved to the history."""
        history = list(self.calibration_history)
        if self.calibration is not None:
            history.append(self.calibration)
        return self.model_copy(
            update={
                "calibration": calibration,
                "calibration_history": history,
                "thresholds": calibration.thresholds,
                "normalization": calibration.normalization,
            }
        )


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse(text: str, where: str) -> BundleMetadata:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{where} is not valid JSON ({exc}); re-export the bundle with `anoscope export`"
        raise BundleError(msg) from exc
    if not isinstance(raw, dict):
        msg = f"{where} must hold a JSON object; re-export the bundle with `anoscope export`"
        raise BundleError(msg)
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        msg = (
            f"{where} has schema_version {version!r}; this anoscope reads version {SCHEMA_VERSION}. "
            "Re-export the bundle with this anoscope version, or run the anoscope version that wrote it."
        )
        raise BundleSchemaError(msg)
    try:
        return BundleMetadata.model_validate(raw)
    except ValidationError as exc:
        msg = f"{where} does not match the bundle schema: {exc}"
        raise BundleSchemaError(msg) from exc


def read_metadata(bundle_dir: str | os.PathLike[str]) -> BundleMetadata:
    """Read and validate `model.json`; raise BundleError saying what is wrong."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        msg = f"bundle directory {bundle} does not exist; point at a folder holding {MODEL_FILE} and {METADATA_FILE}"
        raise BundleError(msg)
    meta_path = bundle / METADATA_FILE
    if not meta_path.is_file():
        msg = f"{bundle} is not a bundle: {METADATA_FILE} is missing (create one with `anoscope export`)"
        raise BundleError(msg)
    if not (bundle / MODEL_FILE).is_file():
        msg = f"{bundle} is not a bundle: {MODEL_FILE} is missing (create one with `anoscope export`)"
        raise BundleError(msg)
    return _parse(meta_path.read_text(encoding="utf-8"), str(meta_path))


#: A temporary file of an atomic write older than this was left by a writer that was killed (a model
#: file is written in seconds); the next write of the same file removes it.
STALE_TMP_S = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except OSError:  # another writer finished or removed it meanwhile
            pass


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it over `path` only if the block succeeds."""
    _remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; keep the mode of the file being replaced (or a readable 0644) so a
    # service running as another user can still read a bundle written by export or calibrate.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    try:
        os.chmod(tmp, mode)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_target(path) as tmp:
        tmp.write_bytes(data)


def _mirror_into_onnx(bundle: Path, meta_json: str) -> None:
    """Rewrite model.onnx with the metadata under `metadata_props['anoscope']`, atomically."""
    import onnx  # only writers need the onnx package; readers use onnxruntime

    model_path = bundle / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props[ONNX_METADATA_KEY] = meta_json
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    atomic_write_bytes(model_path, model.SerializeToString())


def write_metadata(bundle_dir: str | os.PathLike[str], meta: BundleMetadata, *, mirror: bool = True) -> None:
    """Write `model.json` (and its mirror inside model.onnx) atomically.

    The ONNX mirror is written first: if the process dies between the two writes, model.json — the
    source of truth — still describes a consistent, loadable bundle.
    """
    bundle = Path(bundle_dir)
    text = meta.to_json()
    if mirror:
        _mirror_into_onnx(bundle, text)
    atomic_write_bytes(bundle / METADATA_FILE, (text + "\n").encode("utf-8"))


def read_onnx_metadata(model_path: str | os.PathLike[str]) -> BundleMetadata | None:
    """The metadata mirrored inside a model.onnx, or None when it carries none."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return _parse(prop.value, f"{model_path} metadata_props[{ONNX_METADATA_KEY!r}]")
    return None
