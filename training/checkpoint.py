"""Checkpoints: what a run saves every epoch, and `load_trained`, the API export and evaluate use.

A checkpoint is a dict of tensors and primitive containers only (configs as dicts), so it loads with
`torch.load(..., weights_only=True)` and the model is rebuilt from the stored `model_config` without
knowing the flags it was trained with (nanoGPT's habit). Layout (format version 1):

    format, format_version
    model_config, train_config            dicts (ModelConfig.to_dict(), TrainConfig.to_dict())
    model                                 the Detector's state_dict
    optimizers, precision                 optimiser / grad-scaler state dicts, for --resume
    progress                              epoch, phase, per-phase epochs and seconds, stop reason
    rng                                   global RNG states, for --resume
    score_stats, score_weights            dicts matching service.bundle.ScoreStats / ScoreWeights
    normalization                         dict matching service.bundle.NormalizationPair, or None
    mean, std                             per-channel normalisation of the input
    provenance                            data path, date, git revision, epochs, seconds, device, torch
    train_paths, val_paths                the split of the normal images

`checkpoints/last.pt` is the run as it stands (what --resume continues). With label-free checkpoint
selection (`--select-checkpoint`, training/selection.py) the epoch with the best selection score is
also kept as `checkpoints/best.pt`; `load_trained` on a run directory prefers it, so export and
evaluate use the selected epoch.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import Detector, ModelConfig, build_model
from service.bundle import NormalizationPair, ScoreStats, ScoreWeights
from service.errors import AnoscopeError

FORMAT = "anoscope-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(AnoscopeError):
    title = "Checkpoint error"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file in the same folder, then `os.replace`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, tmp_name)
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def checkpoint_path(path_or_run_dir: str | os.PathLike[str]) -> Path:
    """A .pt file as given, or `RUN_DIR/checkpoints/last.pt` for a run directory."""
    p = Path(path_or_run_dir)
    return p / CHECKPOINT_DIR / LAST if p.is_dir() else p


def load_checkpoint(path_or_run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict (tensors on the CPU), validated for format; errors say what to do."""
    path = checkpoint_path(path_or_run_dir)
    if not path.is_file():
        msg = f"no checkpoint at {path}; point at a run directory written by `anoscope train` or a .pt file in it"
        raise CheckpointError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, foreign objects refused by weights_only
        msg = f"{path} is not a readable anoscope checkpoint ({type(exc).__name__}: {exc})"
        raise CheckpointError(msg) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        msg = f"{path} is not an anoscope checkpoint (no '{FORMAT}' marker)"
        raise CheckpointError(msg)
    if state.get("format_version") != FORMAT_VERSION:
        msg = (
            f"{path} has checkpoint format {state.get('format_version')!r}; this anoscope reads {FORMAT_VERSION}. "
            "Use the anoscope version that wrote it."
        )
        raise CheckpointError(msg)
    return state


@dataclass
class TrainedModel:
    """A trained detector and everything export and evaluate need to describe it."""

    model_config: ModelConfig
    model: nn.Module  # models' Detector, in eval mode, on the CPU
    train_config: dict[str, Any]
    score_stats: dict[str, ScoreStats]
    score_weights: ScoreWeights
    normalization: NormalizationPair | None
    mean: list[float]
    std: list[float]
    provenance: dict[str, Any]
    val_paths: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)
    path: Path | None = None  # the checkpoint file it was loaded from


def trained_path(path_or_run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint a run directory is used through: checkpoints/best.pt when selection kept one, else
    checkpoints/last.pt; a .pt file as given."""
    p = Path(path_or_run_dir)
    if p.is_dir() and (p / CHECKPOINT_DIR / BEST).is_file():
        return p / CHECKPOINT_DIR / BEST
    return checkpoint_path(p)


def rebuild_model(state: dict[str, Any]) -> tuple[ModelConfig, Detector]:
    """The network a loaded checkpoint holds, with its weights, in eval mode."""
    model_config = ModelConfig.from_dict(state["model_config"])
    model = build_model(model_config)
    model.load_state_dict(state["model"])
    return model_config, model.eval()


def load_trained(path_or_run_dir: str | os.PathLike[str]) -> TrainedModel:
    """Rebuild the detector of a run directory (its best.pt if selection kept one, else last.pt) or of a
    checkpoint file."""
    path = trained_path(path_or_run_dir)
    state = load_checkpoint(path)
    model_config, model = rebuild_model(state)
    stats = {name: ScoreStats.model_validate(s) for name, s in (state.get("score_stats") or {}).items()}
    if set(stats) != {"residual", "discrimination"}:
        msg = f"{path} holds no score statistics; it was saved before its first epoch ended. Train longer."
        raise CheckpointError(msg)
    norm = state.get("normalization")
    return TrainedModel(
        model_config=model_config,
        model=model,
        train_config=state["train_config"],
        score_stats=stats,
        score_weights=ScoreWeights.model_validate(state["score_weights"]),
        normalization=NormalizationPair.model_validate(norm) if norm is not None else None,
        mean=[float(m) for m in state["mean"]],
        std=[float(s) for s in state["std"]],
        provenance=dict(state.get("provenance") or {}),
        val_paths=[str(p) for p in state.get("val_paths") or []],
        train_paths=[str(p) for p in state.get("train_paths") or []],
        path=path,
    )
