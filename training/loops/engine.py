"""The training engine: phases and epochs, the time budget, per-epoch validation, samples and checkpoints.

It knows nothing of a family's losses (that is the `Loop`) nor of the command line (that is
`training/train.py`). Every epoch ends with the validation normals scored by the model's scoring head
in eval mode, `service.postprocess` fitting score statistics and the provisional normalisation on
them, a PNG grid, a row of `losses.csv` and an atomic `checkpoints/last.pt`; so the last checkpoint is
always a complete, exportable model, including after a time-budget stop or Ctrl-C.

With label-free selection (`training/selection.py`), the engine also scores copies of the validation
normals with synthetic defects: `select_weights` takes the best score weighting of that epoch,
`select_map` the best anomaly map (it sets the model's `map_source`, which the checkpoint records), and
`select_checkpoint` keeps the epoch with the best selection score as `checkpoints/best.pt`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models import Detector
from models.config import ModelConfig
from models.scoring import combine_maps, map_pair, map_scores, within
from service.bundle import ScoreWeights, atomic_write_bytes, utc_now
from service.postprocess import combine_scores, fit_normalization, fit_score_stats
from training.augment import lighting_drift, random_flip, random_rot90
from training.averaging import WeightAverage
from training.checkpoint import BEST, CHECKPOINT_DIR, LAST, load_checkpoint, save_checkpoint, trained_path
from training.config import BUDGET_EPOCHS, TrainConfig
from training.position_stats import (
    MAPS,
    evenly_spaced,
    fit_position_statistics,
    reset_position_statistics,
    use_statistics,
)
from training.roi import fit_roi, reset_roi
from training.runtime import Precision, epoch_generator, rng_state
from training.selection import MAP_CANDIDATES, Selection, SyntheticDefects, assess, within_region

from .artifacts import LossLog, sample_grid, write_png
from .base import Loop

NORMALIZATION_FILE = "normalization.json"
LOSSES_FILE = "losses.csv"
SAMPLES_DIR = "samples"
#: Images in the per-epoch sample grid.
SAMPLE_COUNT = 8
#: Fewer validation images than this gives rough score statistics; the run says so.
FEW_VALIDATION_IMAGES = 8


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint and restored by --resume."""

    epoch: int = 0  # epochs done in total (a budget-stopped partial epoch counts)
    phase: str = "gan"  # the phase being trained; earlier phases are finished
    phase_epochs: dict[str, int] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0  # wall-clock seconds inside the training loop, over all sessions
    steps: int = 0
    stop_reason: str = ""  # "epochs", "time budget", "interrupted"
    finished: bool = False
    best_epoch: int = 0  # the epoch saved as best.pt (select_checkpoint), 0 = none yet
    best_score: float = -1.0  # its selection score

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(**d)


@dataclass
class Scores:
    """The scoring head's outputs on the validation normals, and what service.postprocess fits on them."""

    residual: np.ndarray  # (N,)
    discrimination: np.ndarray  # (N,)
    maps: np.ndarray  # (N, 1, S, S)
    stats: dict[str, Any]  # name -> ScoreStats
    combined: np.ndarray  # (N,)
    normalization: Any  # NormalizationPair
    selection: Selection | None = None  # on the synthetic defects, when the run selects


def score_images(model: Detector, images: Tensor, batch_size: int, device: torch.device) -> tuple[np.ndarray, ...]:
    """(residual (N,), discrimination (N,), maps (N, 1, S, S)) of the scoring head in eval mode, fp32."""
    model.eval()
    head = model.scoring_head()
    out: list[tuple[np.ndarray, ...]] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            r, d, m = head(images[start : start + batch_size].to(device))
            out.append((r.float().cpu().numpy(), d.float().cpu().numpy(), m.float().cpu().numpy()))
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def score_variants(
    model: Detector, images: Tensor, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """For a model with a map discriminator, from one pass: the head's residual and discrimination
    scores (N,) and every candidate anomaly map, source -> (N, 1, S, S); eval mode, fp32.

    The scores and `maps[model.config.anomaly_map_source]` are what `score_images` returns.
    """
    assert model.map_discriminator is not None
    model.eval()
    config = model.config
    residual_scores: list[np.ndarray] = []
    discrimination_scores: list[np.ndarray] = []
    maps: dict[str, list[np.ndarray]] = {name: [] for name in MAP_CANDIDATES}
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)  # (B, C, S, S)
            residual, dmap = map_pair(config, x, model.reconstruct(x), model.map_discriminator)  # (B, 1, S, S) x2
            r, d = map_scores(config, residual, dmap, model.position, model.roi)  # (B,) x2
            residual_scores.append(r.float().cpu().numpy())
            discrimination_scores.append(d.float().cpu().numpy())
            for name in MAP_CANDIDATES:
                maps[name].append(within(combine_maps(residual, dmap, name), model.roi).float().cpu().numpy())
    variants = {name: np.concatenate(parts) for name, parts in maps.items()}
    return np.concatenate(residual_scores), np.concatenate(discrimination_scores), variants


def fit_scores(
    model: Detector,
    images: Tensor,
    weights: ScoreWeights,
    batch_size: int,
    device: torch.device,
    source: str,
    synthetic: SyntheticDefects | None = None,
    select_weights: bool = False,
    select_map: bool = False,
    margin_z: float = 0.0,
) -> Scores:
    """Score the validation normals and fit statistics and normalisation on them.

    With `synthetic` (copies of the same normals with synthetic defects) the selection is measured too;
    with `select_weights` its chosen weights (`margin_z`: see `choose_weights`) replace `weights`, and
    with `select_map` (and a map discriminator) its chosen map becomes the model's `map_source`
    (`model.config` is replaced).
    """
    # Comparing maps needs every candidate map; one pass gives them and the scores together.
    variants = synthetic is not None and select_map and model.map_discriminator is not None

    def score(x: Tensor) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        if variants:
            return score_variants(model, x, batch_size, device)
        r, d, m = score_images(model, x, batch_size, device)
        return r, d, {model.config.anomaly_map_source: m}

    residual, discrimination, normal_maps = score(images)
    maps = normal_maps[model.config.anomaly_map_source]
    stats = fit_score_stats(residual, discrimination)
    selection = None
    if synthetic is not None:
        d_residual, d_discrimination, defect_maps = score(synthetic.images)
        # The normals under other lighting count as normals for the selection (a score that fires on a
        # global brightness change loses), but the statistics stay those of the normals as they are.
        normal_scores = (residual, discrimination)
        if synthetic.relit is not None:
            l_residual, l_discrimination, relit_maps = score(synthetic.relit)
            normal_scores = (np.concatenate([residual, l_residual]), np.concatenate([discrimination, l_discrimination]))
            normal_maps = {name: np.concatenate([m, relit_maps[name]]) for name, m in normal_maps.items()}
        shown = model.config.anomaly_map_source
        normal = (*normal_scores, normal_maps[shown])
        defective = (d_residual, d_discrimination, defect_maps[shown])
        candidates = {name: (normal_maps[name], defect_maps[name]) for name in MAP_CANDIDATES} if variants else None
        selection = assess(normal, defective, synthetic.masks.numpy(), stats, candidates, margin_z)
        if select_weights:
            weights = selection.weights
        if candidates is not None and selection.map_source is not None:
            model.config = replace(model.config, map_source=selection.map_source)  # type: ignore[arg-type]
            maps = candidates[selection.map_source][0][: images.shape[0]]  # without the relit normals
    combined = combine_scores(residual, discrimination, stats, weights)
    normalization = fit_normalization(combined, maps, source=source)
    return Scores(residual, discrimination, maps, stats, combined, normalization, selection)


def decay_scale(progress: float, decay: float) -> float:
    """The learning-rate multiplier at `progress` (0 = a phase's start, 1 = its end) when the rate falls
    linearly to zero over the last `decay` share of the phase (0: constant, 1: from the start)."""
    if decay <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / decay))


class Clock:
    """Seconds of training: what earlier sessions recorded plus this session's wall clock."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._start = time.monotonic()
        self._base_total = progress.train_seconds
        self._base_phase = dict(progress.phase_seconds)

    def session(self) -> float:
        return time.monotonic() - self._start

    def total(self) -> float:
        return self._base_total + self.session()

    def sync(self, phase: str, phase_start: float) -> None:
        """Write elapsed times into `progress` (call before saving)."""
        self.progress.train_seconds = self.total()
        self.progress.phase_seconds[phase] = self._base_phase.get(phase, 0.0) + time.monotonic() - phase_start

    def phase(self, phase: str, phase_start: float) -> float:
        return self._base_phase.get(phase, 0.0) + time.monotonic() - phase_start


@dataclass
class Engine:
    """Runs a `Loop` over the training images until the epochs or the time budget are spent."""

    config: TrainConfig  # resolved
    run_dir: Path
    model: Detector
    loop: Loop
    train_images: Tensor  # (N, C, S, S) on the device
    val_images: Tensor  # (M, C, S, S) on the CPU; M may be 0 (then training images are used for stats)
    device: torch.device
    precision: Precision
    checkpoint_extra: dict[str, Any]  # model_config, train_config, mean, std, paths, provenance base
    progress: Progress = field(default_factory=Progress)
    channels_last: bool = False  # resolved: inputs are converted like the model
    log: Callable[[str], None] = print
    scores: Scores | None = None
    #: Synthetic defects on copies of `val_images`, for label-free selection (None: no selection).
    synthetic: SyntheticDefects | None = None
    #: The learning-rate multiplier of the last step (`TrainConfig.lr_decay`).
    lr_scale: float = 1.0
    #: The average of the weights (`TrainConfig.weight_average`) that is validated and saved; None: off.
    average: WeightAverage | None = None

    # ----------------------------------------------------------------- budget
    def _phase_budget(self, phase: str) -> float | None:
        """Seconds this phase may run in total; AnoGAN's GAN phase gets (1 - encoder_share) of the budget."""
        budget = self.config.time_budget_s
        if budget is None:
            return None
        if self.config.model.family == "anogan" and phase == "gan":
            return budget * (1.0 - self.config.encoder_share)
        return budget

    def _over_budget(self, clock: Clock, phase: str, phase_start: float) -> str:
        budget = self.config.time_budget_s
        if budget is not None and clock.total() >= budget:
            return "time budget"
        phase_budget = self._phase_budget(phase)
        if phase_budget is not None and clock.phase(phase, phase_start) >= phase_budget:
            return "phase budget"
        return ""

    # ----------------------------------------------------------------- main loop
    def fit(self) -> Progress:
        """Train until done; returns the final progress (also in the last checkpoint)."""
        cfg, p = self.config, self.progress
        targets = cfg.phase_epochs()
        losses = LossLog(
            self.run_dir / LOSSES_FILE,
            [
                "epoch",
                "phase",
                "seconds",
                "steps",
                "complete",
                *self.loop.all_columns(),
                "val_residual",
                "val_discrimination",
                "sel_image_auroc",
                "sel_pixel_auroc",
                "sel_weights",
                "sel_map",
            ],
            resume_epoch=p.epoch if p.epoch > 0 else None,
        )
        clock = Clock(p)
        total_epochs = sum(targets.values())
        p.finished = False
        # Training and the per-epoch selection score the raw maps everywhere; the statistics and the
        # region of interest are fitted at the end.
        reset_position_statistics(self.model)
        reset_roi(self.model)
        if self.average is not None:  # a resumed average holds the exported checkpoint's fitted ones
            self.average.copy(self.model, ("position_mean", "position_scale", "roi_mask"))
        phases = list(self.loop.phases)
        for phase in phases[phases.index(p.phase) :]:
            p.phase = phase
            if self.average is not None and phase != phases[0] and not p.phase_epochs.get(phase):
                self.average.adopt(self.model)  # a later phase builds on the weights that are exported
            if phase == phases[-1] and len(phases) > 1:
                # The last phase gets the epochs the earlier ones left (they may have stopped early on their
                # share of the budget, and a resume may have raised --epochs).
                earlier = sum(p.phase_epochs.get(ph, 0) for ph in phases[:-1])
                targets[phase] = max(1, cfg.epochs - earlier)
                total_epochs = earlier + targets[phase]
            self.loop.train_mode(phase)
            phase_start = time.monotonic()
            stop = ""
            while p.phase_epochs.get(phase, 0) < targets[phase]:
                stop = self._over_budget(clock, phase, phase_start)
                if stop:
                    break
                epoch_losses, complete, stop = self._run_epoch(phase, clock, phase_start, total_epochs, targets[phase])
                p.epoch += 1
                p.phase_epochs[phase] = p.phase_epochs.get(phase, 0) + 1
                clock.sync(phase, phase_start)
                selecting = self._selecting(phase, clock, phase_start, targets[phase])
                self._end_epoch(phase, epoch_losses, complete, losses, clock, phase_start, selecting)
                if stop:
                    break
            if stop in ("time budget", "interrupted"):
                p.stop_reason = stop
                break
            next_index = phases.index(phase) + 1
            if next_index < len(phases):  # the next phase starts from a checkpoint that says so
                p.phase = phases[next_index]
        else:  # the last phase reached its epochs (an earlier one may have stopped on its budget share)
            p.finished = True
            p.stop_reason = "epochs"
        if self.scores is not None:
            self._save()  # records the final stop reason
            if self.model.position is not None or self.model.roi is not None:
                self.fit_position_statistics()
        return p

    def fit_position_statistics(self) -> None:
        """Fit the exported checkpoint's region of interest (`training.roi`) and per-pixel statistics on the
        training normals, refit its score statistics, weights and map choice on the scores the head now
        gives (the selection set is scored again) and rewrite that checkpoint; `last.pt` stays the one to
        resume.

        With a selection set, which maps are standardised is chosen label-free like the weights: the
        residual map, the discrimination map, both, or neither (the scores as trained), whichever gives
        the exported epoch's best selection score, the fewer maps on ties. A part that turns from image
        to image has no fixed places to learn, and a map that already ignores them gains nothing; the
        checkpoint records every candidate's score. Without a selection set every map is standardised.
        A fitted region changes every score, so the scores as trained are then scored again as the
        "none" candidate rather than taken from training.
        """
        cfg = self.config
        path = trained_path(self.run_dir)
        state = load_checkpoint(path)
        model = self.model
        exported_config = ModelConfig.from_dict(state["model_config"])  # the exported epoch's map choice
        model.config = exported_config
        model.load_state_dict(state["model"])
        normals = evenly_spaced(self.train_images)
        roi = fit_roi(model, normals)
        summary = fit_position_statistics(model, normals, cfg.batch_size, self.device)
        fitted = None if model.position is None else (model.position_mean.clone(), model.position_scale.clone())
        maps = tuple(name for name in MAPS if name in summary)
        have_val = self.val_images.shape[0] > 0
        synthetic = self.synthetic if have_val else None
        if synthetic is not None and model.roi is not None:  # the head now finds defects only in the region
            inside = within_region(synthetic, model.roi.cpu())
            synthetic = inside if len(inside.images) else synthetic
        # nothing to choose on without a selection set: every map is standardised
        candidates = [(name,) for name in maps] + [maps] * (len(maps) > 1) if synthetic is not None else [maps]
        raw = state["provenance"].get("selection")
        if roi["fitted"]:  # every score changed within the region: the raw maps are scored again too
            raw = None
            if synthetic is not None and maps:
                candidates = [(), *candidates]
        # select_map may set model.config's map source for each candidate: the chosen one's is restored
        best: tuple[tuple[str, ...], Scores | None, ModelConfig] = ((), None, exported_config)
        best_score = raw["score"] if raw is not None else -1.0
        tried: dict[str, float] = {} if raw is None else {"none": raw["score"]}
        for names in candidates:
            if fitted is not None:
                use_statistics(model, fitted, names)
            model.config = exported_config
            scores = fit_scores(
                model,
                self.val_images if have_val else self.train_images.cpu(),
                ScoreWeights.model_validate(state["score_weights"]),
                cfg.batch_size,
                self.device,
                "training-validation" if have_val else "training-images",
                synthetic,
                cfg.select_weights,
                cfg.select_map,
                cfg.select_margin,
            )
            if scores.selection is None:
                best = (names, scores, model.config)
                continue
            tried["+".join(names) or "none"] = scores.selection.score
            if scores.selection.score > best_score:
                best, best_score = (names, scores, model.config), scores.selection.score
        names, scores, model.config = best
        if fitted is not None:
            use_statistics(model, fitted, names)
        summary.update(standardised=list(names), kept=bool(names))
        if tried:
            summary["selection_score"] = tried
        provenance = dict(state["provenance"], position_statistics=summary, roi=roi)
        if scores is not None:
            self.scores = scores
            state.update(
                model=model.state_dict(),
                model_config=model.config.to_dict(),
                score_stats={k: v.model_dump() for k, v in scores.stats.items()},
                normalization=scores.normalization.model_dump(),
            )
            sel = scores.selection
            if sel is not None:
                provenance["selection"] = {"epoch": state["progress"]["epoch"], **sel.to_dict()}
                if cfg.select_weights:
                    state["score_weights"] = sel.weights.model_dump()
        state["provenance"] = provenance
        save_checkpoint(path, state)
        self._write_summary(state)
        which = " and ".join(names) + " map" + ("s" if len(names) > 1 else "") if names else "no map"
        shown = f"per-pixel statistics of {summary['images']} training normals: {which} standardised in {path.name}"
        if tried:
            shown += " (label-free selection score " + ", ".join(f"{k} {v:.4f}" for k, v in tried.items()) + ")"
        self.log(shown)

    def _phase_progress(self, phase: str, clock: Clock, phase_start: float, target: int, epoch_done: float) -> float:
        """How far the phase is, 0..1: by its epochs or its time, whichever is further (`epoch_done`:
        the share of the current epoch's steps done)."""
        p = self.progress
        by_epochs = (p.phase_epochs.get(phase, 0) + epoch_done) / max(target, 1)
        budget = self.config.time_budget_s
        if budget is None:
            return min(1.0, by_epochs)
        elapsed = clock.phase(phase, phase_start)
        # The phase ends on its own share of the budget or on the run's, whichever comes first.
        phase_budget = self._phase_budget(phase)
        length = elapsed + budget - clock.total()
        if phase_budget is not None:
            length = min(length, phase_budget)
        by_time = elapsed / length if length > 0 else 1.0
        return min(1.0, max(by_epochs, by_time))

    def _selecting(self, phase: str, clock: Clock, phase_start: float, target: int) -> bool:
        """Whether the epoch just done is scored on the synthetic set (`TrainConfig.select_from`)."""
        start = self.config.select_from
        if self.synthetic is None:
            return False
        if start <= 0:
            return True
        # Only the last phase trains the whole scoring head (AnoGAN's E and M learn in the encoder phase).
        return phase == self.loop.phases[-1] and self._phase_progress(phase, clock, phase_start, target, 0.0) >= start

    def _schedule(self, phase: str, clock: Clock, phase_start: float, target: int, epoch_done: float) -> float:
        """Set every optimiser's learning rate for the next step; returns the multiplier."""
        decay = self.config.lr_decay
        if decay <= 0:  # no change to the optimisers at all: runs from before the option replay exactly
            return 1.0
        scale = decay_scale(self._phase_progress(phase, clock, phase_start, target, epoch_done), decay)
        for optimizer in self.loop.optimizers.values():
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # saved with the optimiser: a resume keeps it
                group["lr"] = group["initial_lr"] * scale
        return scale

    def _run_epoch(
        self, phase: str, clock: Clock, phase_start: float, total_epochs: int, target: int
    ) -> tuple[dict[str, float], bool, str]:
        cfg, p = self.config, self.progress
        gen = epoch_generator(cfg.seed, p.epoch)
        n = self.train_images.shape[0]
        batch = min(cfg.batch_size, n)
        order = torch.randperm(n, generator=gen)
        batches = [order[i : i + batch] for i in range(0, n - batch + 1, batch)]  # drop the ragged tail
        sums: dict[str, Tensor] = {}
        done, stop = 0, ""
        bar = tqdm(
            total=len(batches),
            desc=f"epoch {p.epoch + 1}{'' if total_epochs >= BUDGET_EPOCHS else f'/{total_epochs}'} [{phase}]",
            disable=not cfg.progress,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            for idx in batches:
                x = self.train_images[idx.to(self.train_images.device)]  # (B, C, S, S)
                if cfg.augment:
                    x = random_flip(x, gen)
                if cfg.rotate:  # a draw only when on: runs configured without it replay exactly
                    x = random_rot90(x, gen)
                x = lighting_drift(x, cfg.lighting_drift, gen)  # no random draw at 0: old runs replay exactly
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.lr_scale = self._schedule(phase, clock, phase_start, target, done / len(batches))
                step_losses = self.loop.step(phase, x, gen)
                if self.average is not None:
                    self.average.update(self.model)
                for k, v in step_losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                done += 1
                p.steps += 1
                bar.update(1)
                if cfg.progress and (done % 5 == 0 or done == len(batches)):
                    bar.set_postfix({k: f"{float(v) / done:.3f}" for k, v in sums.items()}, refresh=False)
                stop = self._over_budget(clock, phase, phase_start)
                if stop:
                    break
        except KeyboardInterrupt:
            stop = "interrupted"
            self.log("interrupted: saving a checkpoint of the model as it is (Ctrl-C again to abort)")
        finally:
            bar.close()
        means = {k: float(v) / max(done, 1) for k, v in sums.items()}
        return means, done == len(batches), stop

    # ----------------------------------------------------------------- end of epoch
    def _end_epoch(
        self,
        phase: str,
        epoch_losses: dict[str, float],
        complete: bool,
        losses: LossLog,
        clock: Clock,
        phase_start: float,
        selecting: bool,
    ) -> None:
        cfg, p = self.config, self.progress
        have_val = self.val_images.shape[0] > 0
        images = self.val_images if have_val else self.train_images.cpu()
        weights = ScoreWeights(residual=cfg.score_weight_residual, discrimination=cfg.score_weight_discrimination)
        source = "training-validation" if have_val else "training-images"
        synthetic = self.synthetic if have_val and selecting else None
        with self.averaged():
            self.scores = fit_scores(
                self.model,
                images,
                weights,
                cfg.batch_size,
                self.device,
                source,
                synthetic,
                cfg.select_weights,
                cfg.select_map,
                cfg.select_margin,
            )
            self._write_samples(images[:SAMPLE_COUNT])
        self.loop.train_mode(phase)
        clock.sync(phase, phase_start)
        row = {"epoch": p.epoch, "phase": phase, "seconds": round(p.train_seconds, 2), "steps": p.steps}
        row.update(epoch_losses, complete=int(complete))
        row["val_residual"] = float(self.scores.residual.mean())
        row["val_discrimination"] = float(self.scores.discrimination.mean())
        sel = self.scores.selection
        best = False
        if sel is not None:
            row["sel_image_auroc"] = sel.image_auroc
            row["sel_pixel_auroc"] = sel.pixel_auroc if sel.pixel_auroc is not None else ""
            row["sel_weights"] = f"{sel.weights.residual:g}/{sel.weights.discrimination:g}"
            if sel.map_source is not None:
                row["sel_map"] = sel.map_source
            if cfg.select_checkpoint and sel.score > p.best_score:
                p.best_epoch, p.best_score, best = p.epoch, sel.score, True
        losses.append(row)
        self._save(best=best)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in epoch_losses.items())
        partial = "" if complete else " (partial)"
        if cfg.lr_decay > 0:
            shown += f"  lr x{self.lr_scale:.2f}"
        selected = ""
        if sel is not None:
            pixel = "n/a" if sel.pixel_auroc is None else f"{sel.pixel_auroc:.3f}"
            chosen = f"w {row['sel_weights']}" + (f", map {sel.map_source}" if sel.map_source else "")
            selected = f"  synthetic AUROC image {sel.image_auroc:.3f} pixel {pixel} ({chosen})"
            selected += " best" if best else ""
        self.log(
            f"epoch {p.epoch} [{phase}]{partial} {p.train_seconds:.0f}s  {shown}  "
            f"val residual {row['val_residual']:.4f}{selected}"
        )

    def _write_samples(self, x: Tensor) -> None:
        model = self.model
        model.eval()
        with torch.no_grad():
            xd = x.to(self.device)
            x_hat = model.reconstruct(xd).float().cpu().numpy()
            _, _, maps = model.scoring_head()(xd)
            extra = self.loop.sample_rows(xd, torch.Generator().manual_seed(self.config.seed))
        assert self.scores is not None
        rows = [("input", x.numpy()), ("reconstruction", x_hat), ("residual", maps.float().cpu().numpy())]
        grid = sample_grid(
            rows + extra,
            mean=self.checkpoint_extra["mean"],
            std=self.checkpoint_extra["std"],
            residual_max=float(self.scores.maps.max()) or None,
        )
        write_png(self.run_dir / SAMPLES_DIR / f"epoch_{self.progress.epoch:03d}.png", grid)

    # ----------------------------------------------------------------- checkpoint
    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside, the model holds the weights that are validated and exported: the average when there is
        one (re-entrant), else the live weights."""
        if self.average is None or self.average.live is not None:
            yield
            return
        with self.average.applied(self.model):
            yield

    def state(self) -> dict[str, Any]:
        """The checkpoint; call inside `averaged()`, so "model" holds the exported weights."""
        assert self.scores is not None
        p, s = self.progress, self.scores
        extra = dict(self.checkpoint_extra)
        provenance = dict(extra.pop("provenance"))
        provenance.update(
            date=utc_now(),
            epochs_done=p.epoch,
            train_seconds=round(p.train_seconds, 3),
            stop_reason=p.stop_reason or "running",
        )
        weights = ScoreWeights(
            residual=self.config.score_weight_residual, discrimination=self.config.score_weight_discrimination
        )
        if s.selection is not None:
            provenance["selection"] = {"epoch": p.epoch, **s.selection.to_dict()}
            if self.config.select_weights:
                weights = s.selection.weights
        averaging = {}
        if self.average is not None and self.average.live is not None:
            averaging = {"live_model": self.average.live, "weight_average": self.average.state_dict()}
        return {
            **extra,
            **averaging,
            "model_config": self.model.config.to_dict(),  # select_map may have changed map_source
            "model": self.model.state_dict(),
            "optimizers": self.loop.state_dict(),
            "precision": self.precision.state_dict(),
            "progress": asdict(p),
            "rng": rng_state(),
            "score_stats": {k: v.model_dump() for k, v in s.stats.items()},
            "score_weights": weights.model_dump(),
            "normalization": s.normalization.model_dump(),
            "provenance": provenance,
        }

    def _save(self, best: bool = False) -> None:
        with self.averaged():  # the state's tensors are the model's own: saved before the live ones return
            state = self.state()
            save_checkpoint(self.run_dir / CHECKPOINT_DIR / LAST, state)
            if best:
                save_checkpoint(self.run_dir / CHECKPOINT_DIR / BEST, state)
        self._write_summary(state)

    def _write_summary(self, state: dict[str, Any]) -> None:
        """normalization.json: what a checkpoint's scores were fitted to, for people reading the run."""
        summary = {
            "score_stats": state["score_stats"],
            "score_weights": state["score_weights"],
            "normalization": state["normalization"],
            "validation_images": int(self.scores.residual.shape[0]) if self.scores is not None else 0,
            "epoch": state["progress"]["epoch"],
            "selection": state["provenance"].get("selection"),
            "best_epoch": self.progress.best_epoch,
        }
        if "position_statistics" in state["provenance"]:
            summary["position_statistics"] = state["provenance"]["position_statistics"]
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(self.run_dir / NORMALIZATION_FILE, text.encode("utf-8"))
