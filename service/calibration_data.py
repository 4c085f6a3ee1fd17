"""Which images `anoscope calibrate` uses and how it scores them: normals, defects, masks, through the
service's own engine path. Torch-free, like the rest of the calibration side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import calibration as cal
from service.bundle import BundleMetadata
from service.datasets import GOOD, IMAGE_EXTENSIONS, DatasetError, Sample, is_mvtec_root, list_images, load_mask
from service.datasets import normal_folder as training_folder_of
from service.errors import InvalidImageError

# ------------------------------------------------------------------------------------------------- data


@dataclass
class DataPlan:
    normals_dir: Path
    normals: list[Path]
    defects_dir: Path | None = None
    defects: list[Sample] = field(default_factory=list)
    masks_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def masked(self) -> int:
        return sum(s.mask_path is not None for s in self.defects)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _defect_samples(root: Path) -> list[Sample]:
    """Defective images from an MVTec root (test/<defect>), a folder of type folders, or a flat folder."""
    if not root.is_dir():
        msg = f"defect folder {root} is not a directory; point at a folder of defective images"
        raise DatasetError(msg)
    base = root / "test" if is_mvtec_root(root) else root
    groups = sorted(d for d in base.iterdir() if d.is_dir() and d.name != GOOD)
    samples = [Sample(f, 1, g.name) for g in groups for f in _image_files(g)]
    samples += [Sample(f, 1, "defect") for f in _image_files(base)]
    if not samples:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        msg = f"{root} holds no defective images ({exts}), neither directly nor in defect-type sub-folders"
        raise DatasetError(msg)
    return samples


def _find_mask(masks: Path, sample: Sample) -> Path | None:
    stem, kind = sample.path.stem, sample.defect_type
    for candidate in (
        masks / kind / f"{stem}_mask.png",
        masks / f"{stem}_mask.png",
        masks / kind / f"{stem}.png",
        masks / f"{stem}.png",
    ):
        if candidate.is_file():
            return candidate
    return None


def resolve_data(normals: Path, defects: Path | None, masks: Path | None) -> DataPlan:
    """Which images play which part; an MVTec root given as --normals supplies all three."""
    notes: list[str] = []
    normals_dir = normals
    if normals.is_dir() and is_mvtec_root(normals):
        normals_dir = normals / "test" / GOOD
        if not normals_dir.is_dir():
            msg = f"{normals} looks like an MVTec root (it has test/) but no test/{GOOD}; pass a folder of good images"
            raise DatasetError(msg)
        notes.append(f"MVTec root: normals from test/{GOOD} (train/{GOOD} is what the model trained on)")
        if defects is None:
            defects = normals  # its test/<defect> folders, and ground_truth/ below
    plan = DataPlan(normals_dir=normals_dir, normals=list_images(normals_dir), notes=notes)
    if defects is not None:
        plan.defects_dir = defects
        plan.defects = _defect_samples(defects)
        if masks is None and is_mvtec_root(defects) and (defects / "ground_truth").is_dir():
            masks = defects / "ground_truth"
    if masks is not None:
        if not masks.is_dir():
            msg = f"mask folder {masks} is not a directory"
            raise DatasetError(msg)
        if not plan.defects:
            msg = "--masks needs defective images to go with them: pass --defects DIR"
            raise DatasetError(msg)
        plan.masks_dir = masks
        plan.defects = [Sample(s.path, 1, s.defect_type, _find_mask(masks, s)) for s in plan.defects]
        if plan.masked == 0:
            msg = (
                f"no mask in {masks} matches a defective image; masks are looked up as "
                "<masks>/<type>/<stem>_mask.png, <masks>/<stem>_mask.png or the same names without _mask"
            )
            raise DatasetError(msg)
        missing = len(plan.defects) - plan.masked
        if missing:
            notes.append(f"{missing} defective images have no mask; their pixels are left out of the pixel F1")
    overlap = {p.resolve() for p in plan.normals} & {s.path.resolve() for s in plan.defects}
    if overlap:
        msg = f"{len(overlap)} images are both normal and defective (e.g. {sorted(overlap)[0]}); separate the folders"
        raise DatasetError(msg)
    return plan


def _provenance_folders(obj: Any, key: str = "") -> list[tuple[str, Path]]:
    """(key, training image folder) for provenance entries that name an existing data or training folder."""
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in _provenance_folders(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, str) and any(word in key.lower() for word in ("train", "data")):
        path = Path(obj)
        if path.is_dir():
            return [(key, training_folder_of(path).resolve())]
    return []


def check_not_training_data(meta: BundleMetadata, normals_dir: Path) -> None:
    """Refuse normals the bundle's provenance says it trained on: their scores are optimistically low."""
    normals = normals_dir.resolve()
    for key, folder in _provenance_folders(meta.provenance):
        if normals == folder or folder in normals.parents:
            msg = (
                f"{normals_dir} holds the images model {meta.name} was trained on (provenance {key!r} = {folder}); "
                "the model scores its training images lower than new parts, so a threshold set on them "
                "would raise more false alarms than promised. Use good images it has not seen."
            )
            raise cal.CalibrationError(msg)


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    combined: np.ndarray  # (N,) combined image scores, float64
    map_max: np.ndarray  # (N,) highest anomaly-map value per image
    pixels: np.ndarray  # sampled map values, float32
    pixel_labels: np.ndarray | None  # mask value of each sampled pixel (None: no masks)


def score_images(
    engine: Any,
    paths: Sequence[Path],
    mask_paths: Sequence[Path | None] | None,
    *,
    batch_size: int,
    pixel_cap: int,
    rng: np.random.Generator,
    failures: list[str],
) -> Scores:
    """Score images through the service's path; unreadable files are appended to `failures` by name."""
    from service.engine import score_files
    from service.postprocess import combine_scores

    residual: list[float] = []
    discrimination: list[float] = []
    aspect: list[float] = []
    map_max: list[float] = []
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i, img, out in score_files(
        engine, paths, batch_size=batch_size, on_error=lambda _i, e: failures.append(str(e))
    ):
        mask = None
        if mask_paths is not None and mask_paths[i] is not None:
            try:
                mask = _load_mask(mask_paths[i], img.size)
            except InvalidImageError as exc:
                failures.append(str(exc))
                continue
        residual.append(out.residual_score)
        discrimination.append(out.discrimination_score)
        aspect.append(img.size[0] / img.size[1])
        map_max.append(float(out.anomaly_map.max()))
        if mask_paths is not None and mask is None:
            continue  # a defective image without a mask says nothing about which pixels are defective
        values, lab = cal.sample_pixels(out.anomaly_map, mask, pixel_cap, rng)
        pixels.append(values)
        if lab is not None:
            labels.append(lab)
    meta = engine.metadata
    combined = combine_scores(
        np.asarray(residual), np.asarray(discrimination), meta.score_stats, meta.score_weights, np.asarray(aspect)
    )
    return Scores(
        combined=np.asarray(combined, dtype=np.float64),
        map_max=np.asarray(map_max, dtype=np.float64),
        pixels=np.concatenate(pixels) if pixels else np.zeros(0, np.float32),
        pixel_labels=np.concatenate(labels) if labels else None,
    )


def _load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        return load_mask(path, size)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        msg = f"mask {path} could not be read ({type(exc).__name__}: {exc})"
        raise InvalidImageError(msg) from exc
