"""Train a GAN anomaly detector on a folder of normal images (`anoscope train`).

Programmatic use (tests, benchmarks): `train(TrainConfig(...))` returns a `TrainResult`; the CLI maps
one flag onto each field of `TrainConfig` (training/config.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from anoscope import __version__
from models import build_model
from models.config import ModelConfig
from service.align import FULL_BOX, MAX_BOX_AREA, Survey, crop_box, survey
from service.bundle import atomic_write_bytes, utc_now
from service.datasets import normal_folder
from service.errors import AnoscopeError
from service.exposure import ExposureSurvey
from service.exposure import survey as survey_exposure
from service.images import load_image_file
from training.averaging import WeightAverage, decay_for
from training.checkpoint import CHECKPOINT_DIR, LAST, CheckpointError, TrainedModel, load_checkpoint, load_trained
from training.config import (
    FLAG_NAMES,
    RESUMABLE_OVERRIDES,
    TrainConfig,
    add_config_arguments,
    config_from_given,
    given_fields,
)
from training.data import ImageDataset, find_normal_images, load_split, normalisation, split_paths
from training.loops import make_loop
from training.loops.engine import Engine, Progress, Scores
from training.runtime import Precision, describe_device, git_revision, resolve_device, seed_everything, set_rng_state
from training.selection import SyntheticDefects, selection_copies, synthetic_defects

CONFIG_FILE = "config.json"
#: Training normals `--align auto` looks at (spread over the split; the survey costs ~10 ms an image).
ALIGN_SURVEY_IMAGES = 48


def selection_set(normals: Tensor, cfg: TrainConfig) -> SyntheticDefects:
    """The label-free selection set a run with `cfg` scores every epoch, from its validation normals
    (`anoscope train`, `training.prune` and `anoscope bench selection` rebuild the same one)."""
    copies = selection_copies(len(normals), cfg.select_defects)
    return synthetic_defects(normals, cfg.corruption, cfg.seed, cfg.lighting_drift, copies)


def validation_normals(trained: TrainedModel, run: object) -> Tensor:
    """A finished run's validation normals at its image size: what its selection set is built from
    (`anoscope bench selection` and `bench reduction`, and the studies under scripts/, rebuild it)."""
    if not trained.val_paths:
        msg = f"{run} kept no validation normals (--val-fraction 0); the selection set is built from them"
        raise ValueError(msg)
    return ImageDataset.for_model(trained.val_paths, trained.model_config).images


@dataclass(frozen=True)
class FinishedRun:
    """What every study of a finished run starts from (`anoscope bench selection` / `reduction`, the
    scripts under scripts/): its exported checkpoint, its training config and its validation normals."""

    trained: TrainedModel
    config: TrainConfig
    normals: Tensor


def finished_run(run_dir: str | os.PathLike[str]) -> FinishedRun:
    trained = load_trained(run_dir)
    return FinishedRun(trained, TrainConfig.from_dict(trained.train_config), validation_normals(trained, run_dir))


DESCRIPTION = """\
Train a GAN anomaly detector on photos of good parts only.

--data is a folder of normal images (PNG, JPEG, BMP, TIFF; any size, resized to --image-size), or an
MVTec AD category root, whose train/good folder is used. A share of the images (--val-fraction,
split deterministically from --seed) is held out: the trained model scores them at the end of every
epoch to fit the score statistics and the provisional normalisation that `anoscope export` writes
into the bundle.

Training stops after --epochs or --time-budget seconds, whichever comes first (mid-epoch if need be),
and always leaves a usable checkpoint. With the recommended settings a --time-budget given without
--epochs is used to its end. The run directory (--out) receives:
  config.json           the resolved configuration (every flag below)
  losses.csv            per-epoch mean losses and validation scores
  samples/epoch_NNN.png input / reconstruction / residual grid of validation images
  checkpoints/last.pt   weights, optimiser and RNG state, score statistics (written every epoch)
  normalization.json    score statistics and provisional thresholds from the validation normals

Families: skipganomaly (U-Net generator; default recipe 'corruption': restore images with pasted
rectangles) and anogan (DCGAN, then an f-AnoGAN encoder; --encoder-share of the epochs/budget).
"""

EPILOG = """\
examples:
  # 10 minutes of Skip-GANomaly on an MVTec category at 128 px
  anoscope train --data datasets/bottle --model skipganomaly --image-size 128 --time-budget 600 --out runs/bottle

  # AnoGAN with hinge loss on a plain folder of grayscale images, 30 epochs
  anoscope train --data photos/good --model anogan --channels 1 --gan-loss hinge --epochs 30 --out runs/tiles

  # a light model, the paper's plain reconstruction recipe (the ablation)
  anoscope train --data data/fabric --width-mult 0.25 --recipe paper --out runs/paper

  # continue a run: 10 more epochs (optimiser, epoch, phase and RNG state are restored)
  anoscope train --out runs/bottle --resume --epochs 25

  # check the data and the resolved configuration without training
  anoscope train --data datasets/bottle --out runs/bottle --dry-run

Then: anoscope export --checkpoint runs/bottle --out bundles/bottle
"""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    progress: Progress
    scores: Scores | None  # validation scores of the last epoch (None if this session trained nothing)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuse a resume that would change what is learnt (anything outside RESUMABLE_OVERRIDES)."""
    now = cfg.to_dict()
    ignored = RESUMABLE_OVERRIDES | {"out", "data"}
    changed = [k for k in now if k not in ignored and now[k] != saved.get(k)]
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        msg = (
            f"--resume cannot change {', '.join(changed)} ({details}); only "
            f"{', '.join(sorted(RESUMABLE_OVERRIDES))} may change. Start a new run with another --out instead."
        )
        raise ValueError(msg)


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or with `resume`, continue) training as `config` says; see the module and CLI help."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, resume=resume, log=log)
    finally:
        torch.set_num_threads(threads)


def survey_images(data: str | os.PathLike[str], *, val_fraction: float, seed: int) -> list[Image.Image]:
    """What the `auto` choices look at: up to `ALIGN_SURVEY_IMAGES` of the run's training normals, spread
    over the split (never a validation or test image)."""
    train_paths, _ = split_paths(find_normal_images(data), val_fraction, seed)
    picked = train_paths[:: max(1, len(train_paths) // ALIGN_SURVEY_IMAGES)][:ALIGN_SURVEY_IMAGES]
    images = []
    for path in picked:
        try:
            images.append(load_image_file(path))
        except AnoscopeError:
            continue  # unreadable files are reported (or refused) when the data is loaded
    return images


def resolve_preprocessing(
    m: ModelConfig, images: Sequence[Image.Image]
) -> tuple[ModelConfig, tuple[Survey, ExposureSurvey]]:
    """`m` with `align`, `roi`, `crop` and `exposure` decided from the training normals `images` where
    they are `auto` (`crop` "part" measures its box, `exposure` "standardise" its level), and the
    surveys behind the choice.

    `crop` needs alignment: "auto" crops an aligned part whose box keeps at most `MAX_BOX_AREA` of the
    frame; "part" on a run that is not aligned is refused. `crop` "none" keeps a box given by hand.
    """
    found, lit = survey(images), survey_exposure(images, m.channels)
    exposure, target = (lit.choice if m.exposure == "auto" else m.exposure), m.exposure_target
    if exposure == "standardise":
        target = lit.target
    align = found.choice if m.align == "auto" else m.align
    roi = found.roi_choice if m.roi == "auto" else m.roi
    crop, box = "none", m.crop_box
    if m.crop == "part" and align != "principal-axis":
        msg = f"--crop part crops the aligned frame, and this run's align is {align!r}: use --crop auto"
        raise ValueError(msg)
    if m.crop != "none" and align == "principal-axis":
        box = crop_box(images)
        if m.crop == "auto" and box[0] * box[1] > MAX_BOX_AREA:
            box = FULL_BOX  # the part fills most of the frame already: a crop would only distort it
        crop = "part" if box != FULL_BOX else "none"
    chosen = replace(m, align=align, roi=roi, crop=crop, crop_box=box, exposure=exposure, exposure_target=target)
    return chosen, (found, lit)


def describe_choices(asked: ModelConfig, chosen: ModelConfig) -> str:
    """The log's account of the `auto` (and measured) choices, e.g. "align: auto -> principal-axis, ..."."""
    parts = [f"{name}: auto -> {getattr(chosen, name)}" for name in ("align", "roi") if getattr(asked, name) == "auto"]
    if asked.crop != "none":
        box = chosen.crop_box
        shown = f" {box[0]:g} x {box[1]:g}" if chosen.crop == "part" else ""
        parts.append(f"crop: {asked.crop} -> {chosen.crop}{shown}")
    if asked.exposure != "none":
        level = chosen.exposure_standard
        shown = f" to mean {level[0]:g}, std {level[1]:g}" if level else ""
        parts.append(f"exposure: {asked.exposure} -> {chosen.exposure}{shown}")
    return ", ".join(parts)


#: The ModelConfig fields `resolve_preprocessing` decides: what a resumed run takes from its checkpoint.
RESOLVED_FIELDS = ("align", "roi", "crop", "crop_box", "exposure", "exposure_target")


def _resolve_auto(cfg: TrainConfig, checkpoint: dict[str, Any] | None, log: Callable[[str], None]) -> TrainConfig:
    """`--align`, `--roi`, `--crop` and `--exposure` where training decides them -> what this run uses,
    chosen once from the training normals (`resolve_preprocessing`) and recorded, so a resumed run, the
    checkpoint and the bundle all pose and score images the same way."""
    m = cfg.model
    if "auto" not in (m.align, m.roi, m.crop, m.exposure) and m.crop != "part" and m.exposure != "standardise":
        return cfg
    if checkpoint is not None:
        r = ModelConfig.from_dict(checkpoint["model_config"])
        chosen = replace(m, **{name: getattr(r, name) for name in RESOLVED_FIELDS})
        why = " (as the run was started)"
    else:
        images = survey_images(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        chosen, (found, lit) = resolve_preprocessing(m, images)
        why = f" ({found.describe()}; {lit.describe()})"
    log(describe_choices(m, chosen) + why)
    return replace(cfg, model=chosen)


def _train(config: TrainConfig, *, resume: bool, log: Callable[[str], None]) -> TrainResult:
    cfg = config.resolved()
    if not cfg.out:
        msg = "no run directory: pass --out RUN_DIR"
        raise ValueError(msg)
    run_dir = Path(cfg.out)
    last = run_dir / CHECKPOINT_DIR / LAST
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint = load_checkpoint(run_dir)
        cfg = _resolve_auto(cfg, checkpoint, log)
        # through from_dict, so fields added since the run started compare as their defaults
        _check_resume_config(cfg, TrainConfig.from_dict(checkpoint["train_config"]).to_dict())
    elif last.exists():
        msg = f"{run_dir} already holds a run ({last}); pass --resume to continue it, or choose another --out"
        raise CheckpointError(msg)
    elif not cfg.data:
        msg = "no data: pass --data with a folder of normal images or an MVTec category root"
        raise ValueError(msg)
    else:
        cfg = _resolve_auto(cfg, None, log)

    device = resolve_device(cfg.device)
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    precision = Precision(device, amp)
    # Channels-last pays on CPU too (oneDNN's transposed convolutions, the generators' upsampling, are
    # the gain): epochs 7-16% shorter on a 2-core CPU (docs/performance.md, "Training speed").
    channels_last = True if cfg.channels_last is None else cfg.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)

    m = cfg.model
    train_ds, val_ds = load_split(
        cfg.data,
        image_size=m.image_size,
        channels=m.channels,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        skip_bad=cfg.skip_bad_images,
        workers=cfg.num_workers,
        resize=m.resize,
        align=m.align,
        crop_box=m.crop_box,
        exposure=m.exposure_standard,
        train_paths=checkpoint["train_paths"] if checkpoint else None,
        val_paths=checkpoint["val_paths"] if checkpoint else None,
    )
    source = checkpoint["provenance"]["data"] if checkpoint else str(normal_folder(cfg.data).resolve())
    tiles = f" ({len(train_ds)} and {len(val_ds)} tiles)" if m.resize == "tiles" else ""
    log(f"data: {len(train_ds.paths)} training and {len(val_ds.paths)} validation images{tiles} from {source}")
    for path, why in train_ds.skipped + val_ds.skipped:
        log(f"skipped {path}: {why}")
    if len(val_ds.paths) < 8:
        log(
            f"warning: only {len(val_ds.paths)} validation images: score statistics will be rough "
            "(add normal images or raise --val-fraction)"
        )

    model = build_model(m).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loop = make_loop(model, cfg, precision)
    progress = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        loop.load_state_dict(checkpoint["optimizers"])
        precision.load_state_dict(checkpoint.get("precision") or {})
        progress = Progress.from_dict(checkpoint["progress"])
        set_rng_state(checkpoint["rng"])
    average = None
    if cfg.weight_average > 0:
        steps_per_epoch = len(train_ds) // min(cfg.batch_size, len(train_ds))  # the ragged tail is dropped
        average = WeightAverage(model, decay_for(cfg.weight_average, steps_per_epoch))
        # "model" is the average and the optimisers go on with the live weights; a pruned checkpoint has
        # only its weights, and the average starts from them
        if checkpoint is not None and "live_model" in checkpoint:
            average.load_state_dict(checkpoint["weight_average"], checkpoint["model"])
            model.load_state_dict(checkpoint["live_model"])
        log(f"weight average: {cfg.weight_average:g} epochs ({steps_per_epoch} steps each, decay {average.decay:.4f})")
    extras = " + channels-last" if channels_last else ""
    log(f"device: {describe_device(device)}, {precision.description}{extras}; model {m.family} {m.image_size} px")

    mean, std = normalisation(m.channels)
    provenance = dict(checkpoint["provenance"]) if checkpoint else {"data": source, "started": utc_now()}
    provenance.update(
        git_revision=git_revision(),
        anoscope_version=__version__,
        torch_version=str(torch.__version__),  # TorchVersion is not weights_only-safe
        device=describe_device(device),
        precision=precision.description,
        n_train=len(train_ds),
        n_val=len(val_ds),
        skipped=[str(p) for p, _ in train_ds.skipped + val_ds.skipped],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    engine = Engine(
        config=cfg,
        run_dir=run_dir,
        model=model,
        loop=loop,
        train_images=train_ds.images.to(device),
        val_images=val_ds.images,
        device=device,
        precision=precision,
        checkpoint_extra={
            "model_config": m.to_dict(),
            "train_config": cfg.to_dict(),
            "mean": mean,
            "std": std,
            "train_paths": [str(p.resolve()) for p in train_ds.paths],
            "val_paths": [str(p.resolve()) for p in val_ds.paths],
            "provenance": provenance,
        },
        progress=progress,
        channels_last=channels_last,
        log=log,
        average=average,
    )
    selecting = cfg.select_weights or cfg.select_map or cfg.select_checkpoint
    if selecting and len(val_ds):
        # Label-free selection sees the validation normals (training split) and nothing else.
        engine.synthetic = selection_set(val_ds.images, cfg)
        n_defects = engine.synthetic.images.shape[0]
        copies = n_defects // len(val_ds)
        when = (
            f", scored from {cfg.select_from:.0%} of the {loop.phases[-1]} phase on"
            if cfg.select_from > 0
            else ", scored every epoch"
        )
        per = "tile" if tiles else "normal"
        log(f"label-free selection: {n_defects} synthetic defective images ({copies} per validation {per}){when}")
    elif selecting:
        log("warning: no validation normals (--val-fraction 0): label-free selection is off")
    progress = engine.fit()
    if engine.scores is None:
        log(
            f"nothing to train: {progress.epoch} epochs and {progress.train_seconds:.0f} s already done; "
            "raise --epochs or --time-budget to continue"
        )
    else:
        log(
            f"done: {progress.epoch} epochs in {progress.train_seconds:.0f} s (stopped by {progress.stop_reason}); "
            f"checkpoint {last}"
        )
    return TrainResult(run_dir, last, progress, engine.scores)


# ====================================================================== command line
def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' layout
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from checkpoints/last.pt with its recorded config; only "
        + ", ".join("--" + FLAG_NAMES.get(k, k.replace("_", "-")) for k in sorted(RESUMABLE_OVERRIDES))
        + " may be given to change it",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the data, print the resolved config, write nothing"
    )
    parser.add_argument(
        "--defaults",
        choices=("recommended", "plain"),
        default="recommended",
        help="what the flags apply over: the family's recommended settings (training.config.FAMILY_DEFAULTS, "
        "docs/quality.md) or the plain dataclass defaults (the configuration before issue 6: no map "
        "discriminator, full width, rectangles only, no selection) (default: recommended)",
    )
    add_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the flags over the defaults, or over the recorded config with --resume."""
    given = given_fields(args)
    if not getattr(args, "resume", False):
        plain = getattr(args, "defaults", "recommended") == "plain"
        return config_from_given(given, base=TrainConfig() if plain else None)
    if "out" not in given:
        msg = "--resume needs --out RUN_DIR (the run to continue)"
        raise ValueError(msg)
    saved = TrainConfig.from_dict(load_checkpoint(given["out"])["train_config"])
    fixed = {k: v for k, v in given.items() if k not in RESUMABLE_OVERRIDES | {"out", "data"}}
    candidate = config_from_given(fixed, base=saved)
    _check_resume_config(candidate, saved.to_dict())
    overrides = {k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES}
    return replace(config_from_given(overrides, base=saved), out=given["out"])


def _dry_run(cfg: TrainConfig) -> int:
    cfg = cfg.resolved()
    folder = normal_folder(cfg.data)
    paths = find_normal_images(cfg.data)
    train_paths, val_paths = split_paths(paths, cfg.val_fraction, cfg.seed)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(
        f"would train {cfg.model.family} at {cfg.model.image_size} px on {len(train_paths)} images of {folder} "
        f"(validation: {len(val_paths)}), {cfg.phase_epochs()} epochs per phase"
        + (f", at most {cfg.time_budget_s:g} s" if cfg.time_budget_s else "")
        + f", writing to {cfg.out or '(no --out given)'}"
    )
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            return _dry_run(cfg)
        train(cfg, resume=args.resume)
    except (AnoscopeError, ValueError) as exc:
        text = textwrap.fill(str(exc), width=120, subsequent_indent="  ")
        print(f"anoscope train: error: {text}", file=sys.stderr)
        return 2
    return 0
