"""Structured channel pruning of a trained Skip-GANomaly detector to a smaller `width_mult`.

The pruned model is exactly the network `build_model(replace(config, width_mult=w))` builds, so its
checkpoint, export, evaluation and `anoscope train --resume` work unchanged. Every network of the detector
is pruned: the U-Net generator, the DCGAN discriminator and, when there is one, the map discriminator.

Method (network slimming, Liu et al. 2017, with L1 filter norms where there is no BatchNorm, Li et al.
2017): channels are pruned in *groups*, the channels that must go together. A group is one layer's output
channels and every tensor that indexes them: the producing conv (its output filters and bias), its
BatchNorm, the next conv's input channels and, for a U-Net level with a skip connection, the slice of the
decoder conv that reads the concatenation `[decoder, encoder]`. Each group keeps the channels with the
largest |BatchNorm gamma| (or, without BatchNorm, the largest L1 norm of the producing filter and bias), as
many as the target width has, in their original order. Spectral-norm vectors are recomputed exactly (SVD)
for the smaller weights.

A channel whose BatchNorm gamma and beta (or filter and bias) are all zero outputs 0 after the activation,
so removing only such channels leaves the outputs unchanged (tests/test_prune.py checks this).

`prune_run` writes a run directory holding the pruned checkpoint (score statistics refitted on the
validation normals, fresh optimiser state, progress at zero), to fine-tune with
`anoscope train --out DIR --resume --time-budget SECONDS`. docs/pruning.md has the measurements; pruning
did not beat training the narrow model from scratch, so it is not an `anoscope` verb.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models import Detector, ModelConfig, build_model
from models.segmentation import DEPTH as MAP_DEPTH

#: What ranks the channels of a group (recorded in the checkpoint's provenance).
CRITERION = "|BatchNorm gamma|, else L1 norm of the producing filter and bias"


class PruneError(ValueError):
    """The model cannot be pruned to the requested width."""


@dataclass(frozen=True)
class Group:
    """Channels that are pruned together.

    `producers`: module names whose output channels are the group (a conv or transposed conv, then its
    BatchNorm). `consumers`: (module name, position) of the layers reading them; position orders the
    pieces of a concatenated input (0 = the decoder's own map, 1 = the skip concatenated after it).
    """

    name: str
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]


# ------------------------------------------------------------------------------------ coupling tables
def _down(prefix: str, i: int, norm: bool) -> tuple[str, ...]:
    return (f"{prefix}.{i}.0", f"{prefix}.{i}.1") if norm else (f"{prefix}.{i}.0",)


def generator_groups(config: ModelConfig, prefix: str = "generator") -> list[Group]:
    """Groups of `models.skipganomaly.UNetGenerator`: encoder levels, bottleneck, decoder levels."""
    n = config.num_stages
    ups = [f"{prefix}.ups.{j}.0" for j in range(n)]  # ups[j] (j < n-1) outputs resolution 8 * 2**j
    groups = []
    for i in range(n):  # downs[i] outputs resolution S / 2**(i+1)
        resolution = config.image_size // 2 ** (i + 1)
        consumers: list[tuple[str, int]] = []
        if i < n - 1:
            consumers.append((f"{prefix}.downs.{i + 1}.0", 0))
            if resolution in config.skip_resolutions:
                j = (resolution // 8).bit_length() - 1  # the decoder block that outputs this resolution
                consumers.append((ups[j + 1], 1))
        else:
            consumers.append((ups[0], 0))  # the bottleneck feeds the decoder
        groups.append(Group(f"{prefix} encoder {resolution}px", _down(f"{prefix}.downs", i, i > 0), tuple(consumers)))
    for j in range(n - 1):
        producers = (f"{prefix}.ups.{j}.0", f"{prefix}.ups.{j}.1")
        groups.append(Group(f"{prefix} decoder {8 * 2**j}px", producers, ((ups[j + 1], 0),)))
    return groups


def map_discriminator_groups(prefix: str = "map_discriminator") -> list[Group]:
    """Groups of `models.segmentation.MapDiscriminator` (a full U-Net of depth `DEPTH`)."""
    readers = [f"{prefix}.ups.{k}.0" for k in range(1, MAP_DEPTH - 1)] + [f"{prefix}.out"]  # after ups[k]
    groups = []
    for i in range(MAP_DEPTH):
        if i < MAP_DEPTH - 1:
            k = MAP_DEPTH - 2 - i  # ups[k] outputs this level's resolution; the next layer reads the concat
            consumers = ((f"{prefix}.downs.{i + 1}.0", 0), (readers[k], 1))
        else:
            consumers = ((f"{prefix}.ups.0.0", 0),)
        groups.append(Group(f"{prefix} encoder level {i}", _down(f"{prefix}.downs", i, i > 0), consumers))
    for k in range(MAP_DEPTH - 1):
        producers = (f"{prefix}.ups.{k}.0", f"{prefix}.ups.{k}.1")
        groups.append(Group(f"{prefix} decoder block {k}", producers, ((readers[k], 0),)))
    return groups


def discriminator_groups(config: ModelConfig, prefix: str = "discriminator") -> list[Group]:
    """Groups of `models.discriminator.Discriminator`: one per trunk stage (BatchNorm only without spectral norm)."""
    n = config.num_stages
    norm = not config.spectral_norm
    groups = []
    for i in range(n):
        consumer = f"{prefix}.trunk.stages.{i + 1}.0" if i < n - 1 else f"{prefix}.classifier"
        groups.append(
            Group(f"{prefix} stage {i}", _down(f"{prefix}.trunk.stages", i, norm and i > 0), ((consumer, 0),))
        )
    return groups


def channel_groups(config: ModelConfig) -> list[Group]:
    """Every prunable group of a Skip-GANomaly detector with `config`."""
    if config.family != "skipganomaly":
        msg = (
            f"pruning supports the skipganomaly family only (got {config.family!r}); train the narrower "
            "AnoGAN from scratch with --width-mult instead"
        )
        raise PruneError(msg)
    if config.self_attention:
        msg = "pruning does not support --self-attention (its block couples channels not mapped here)"
        raise PruneError(msg)
    if config.map_attention:
        msg = "pruning does not support --map-attention (its block couples channels not mapped here)"
        raise PruneError(msg)
    groups = generator_groups(config) + discriminator_groups(config)
    if config.discriminator_map:
        groups += map_discriminator_groups()
    return groups


# ------------------------------------------------------------------------------------ tensors
def _is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.ConvTranspose2d)


def conv_weight(module: nn.Module) -> Tensor:
    """The trainable weight of a conv, under spectral normalisation its un-normalised `original`."""
    if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
        return module.parametrizations.weight.original
    return module.weight


def importance(model: nn.Module, group: Group) -> Tensor:
    """One score per channel of `group` (larger = more important): |gamma| of its BatchNorm, else L1 of
    the producing filter plus |bias|."""
    for name in group.producers:
        module = model.get_submodule(name)
        if isinstance(module, nn.BatchNorm2d):
            return module.weight.detach().abs()
    conv = model.get_submodule(group.producers[0])
    w = conv_weight(conv).detach()
    w = w.transpose(0, 1) if _is_transposed(conv) else w  # (out, in, k, k)
    score = w.abs().flatten(1).sum(dim=1)  # (out,)
    if conv.bias is not None:
        score = score + conv.bias.detach().abs()
    return score


def _out_channels(module: nn.Module) -> int:
    return module.num_features if isinstance(module, nn.BatchNorm2d) else module.out_channels


def keep_indices(source: nn.Module, target: nn.Module, groups: list[Group]) -> dict[str, Tensor]:
    """Group name -> the sorted indices of the source channels kept (as many as the target has)."""
    kept = {}
    for g in groups:
        have = _out_channels(source.get_submodule(g.producers[0]))
        want = _out_channels(target.get_submodule(g.producers[0]))
        if want > have:
            msg = f"{g.name}: the target has {want} channels, the source only {have}; pruning cannot widen"
            raise PruneError(msg)
        order = torch.argsort(importance(source, g), descending=True, stable=True)
        kept[g.name] = order[:want].sort().values
    return kept


def index_plan(
    source: nn.Module, groups: list[Group], kept: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(module -> kept output channels, module -> kept input channels) over the source's channel indices."""
    outputs: dict[str, Tensor] = {}
    pieces: dict[str, list[tuple[int, int, Tensor]]] = {}  # consumer -> (position, source size, kept)
    for g in groups:
        size = _out_channels(source.get_submodule(g.producers[0]))
        for name in g.producers:
            outputs[name] = kept[g.name]
        for name, position in g.consumers:
            pieces.setdefault(name, []).append((position, size, kept[g.name]))
    inputs = {}
    for name, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        offset, index = 0, []
        for _, size, idx in parts:
            index.append(idx + offset)
            offset += size
        channels = source.get_submodule(name).in_channels
        if offset != channels:
            msg = f"internal: the groups read by {name} cover {offset} of its {channels} input channels"
            raise PruneError(msg)
        inputs[name] = torch.cat(index)
    return outputs, inputs


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)):
            yield name, module


def _slice(tensor: Tensor, dim: int, index: Tensor | None) -> Tensor:
    return tensor if index is None else tensor.index_select(dim, index)


def exact_spectral_vectors(model: nn.Module) -> None:
    """Set every spectral-norm power-iteration vector (u, v) to the weight's top singular vectors, so the
    normalising sigma is exact in eval mode (where no iteration runs)."""
    for module in model.modules():
        if not (hasattr(module, "parametrizations") and "weight" in module.parametrizations):
            continue
        for p in module.parametrizations.weight:
            if hasattr(p, "_u") and hasattr(p, "_v"):
                with torch.no_grad():
                    matrix = p._reshape_weight_to_matrix(module.parametrizations.weight.original)  # (out, in*k*k)
                    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
                    p._u.copy_(u[:, 0])
                    p._v.copy_(vh[0])


def prune_model(model: Detector, target: ModelConfig) -> Detector:
    """A new detector built from `target` (same config but a smaller width) with `model`'s most important
    channels; `model` is not modified. The result is in `model`'s train/eval mode."""
    source_cfg = model.config
    if replace(target, width_mult=source_cfg.width_mult) != source_cfg:
        changed = [k for k, v in target.to_dict().items() if k != "width_mult" and source_cfg.to_dict()[k] != v]
        msg = f"pruning changes only width_mult; the target config also changes {', '.join(changed)}"
        raise PruneError(msg)
    groups = channel_groups(source_cfg)
    pruned = build_model(target)
    kept = keep_indices(model, pruned, groups)
    outputs, inputs = index_plan(model, groups, kept)
    source_layers = dict(_layers(model))
    with torch.no_grad():
        for name, dst in _layers(pruned):
            src = source_layers[name]
            out_idx, in_idx = outputs.get(name), inputs.get(name)
            if isinstance(dst, nn.BatchNorm2d):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst, attr).copy_(_slice(getattr(src, attr), 0, out_idx))
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
                continue
            out_dim, in_dim = (1, 0) if _is_transposed(dst) else (0, 1)
            weight = _slice(_slice(conv_weight(src), out_dim, out_idx), in_dim, in_idx)
            conv_weight(dst).copy_(weight)
            if dst.bias is not None:
                dst.bias.copy_(_slice(src.bias, 0, out_idx))
        if pruned.roi is not None and model.roi is not None:  # where the part lies does not depend on width
            pruned.roi_mask.copy_(model.roi_mask)
    exact_spectral_vectors(pruned)
    pruned.train(model.training)
    return pruned


# ------------------------------------------------------------------------------------ measurements
def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: Detector) -> dict[str, Any]:
    """Parameters per network and scoring-head FLOPs per image (what is exported: G, and M when present)."""
    from training.speed import count_flops

    cfg = model.config
    out: dict[str, Any] = {
        "width_mult": cfg.width_mult,
        "params_generator": count_parameters(model.generator),
        "params_discriminator": count_parameters(model.discriminator),
        "params_map_discriminator": count_parameters(model.map_discriminator) if model.map_discriminator else 0,
    }
    was_training = model.training
    out["flops_per_image"] = count_flops(model, cfg.channels, cfg.image_size)
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------ run directories
def prune_run(
    source: str | Path,
    out: str | Path,
    width_mult: float,
    *,
    log: Callable[[str], None] = print,
) -> Path:
    """Prune the checkpoint of `source` (a run directory: its best.pt if selection kept one, else last.pt;
    or a .pt file) to `width_mult` and write a run directory at `out` to fine-tune with `--resume`.

    The new checkpoint is complete (per-pixel statistics refitted on the run's training normals for the
    maps the source standardised; score statistics, weights and normalisation on its validation normals;
    so it exports as it is), with fresh optimiser state and progress at zero: the fine-tune's
    `--time-budget` counts from the pruning. Returns the checkpoint path.
    """
    from service.bundle import ScoreWeights, utc_now
    from training.checkpoint import (
        CHECKPOINT_DIR,
        LAST,
        CheckpointError,
        load_checkpoint,
        rebuild_model,
        save_checkpoint,
        trained_path,
    )
    from training.config import TrainConfig
    from training.data import ImageDataset
    from training.loops import make_loop
    from training.loops.engine import Engine, Progress, fit_scores
    from training.position_stats import fit_position_statistics, training_normals, use_statistics
    from training.runtime import Precision
    from training.train import selection_set

    out = Path(out)
    if (out / CHECKPOINT_DIR / LAST).exists():
        msg = f"{out} already holds a run; choose another --out"
        raise CheckpointError(msg)
    path = trained_path(source)
    state = load_checkpoint(path)
    source_cfg, model = rebuild_model(state)
    target = replace(source_cfg, width_mult=float(width_mult))
    pruned = prune_model(model, target).eval()
    before, after = describe(model), describe(pruned)
    log(
        f"pruned {path}: width {source_cfg.width_mult:g} -> {width_mult:g}, generator parameters "
        f"{before['params_generator']:,} -> {after['params_generator']:,}, scoring FLOPs/image "
        f"{before['flops_per_image'] / 1e6:.1f} M -> {after['flops_per_image'] / 1e6:.1f} M"
    )

    cfg = replace(TrainConfig.from_dict(state["train_config"]), model=target, out=str(out))
    device = torch.device("cpu")
    precision = Precision(device, False)
    m = target
    val = ImageDataset.for_model([Path(p) for p in state["val_paths"]], m)
    provenance = dict(state["provenance"])
    provenance["pruned_from"] = {
        "checkpoint": str(Path(path).resolve()),
        "width_mult": source_cfg.width_mult,
        "epochs": int(state["progress"]["epoch"]),
        "train_seconds": float(state["progress"]["train_seconds"]),
        "steps": int(state["progress"]["steps"]),
        "criterion": CRITERION,
        "date": utc_now(),
        "before": before,
        "after": after,
    }
    engine = Engine(
        config=cfg,
        run_dir=out,
        model=pruned,
        loop=make_loop(pruned, cfg, precision),
        train_images=torch.empty(0, m.channels, m.image_size, m.image_size),
        val_images=val.images,
        device=device,
        precision=precision,
        checkpoint_extra={
            **{k: state[k] for k in ("mean", "std", "train_paths", "val_paths")},
            "model_config": target.to_dict(),
            "train_config": cfg.to_dict(),
            "provenance": provenance,
        },
        progress=Progress(stop_reason="pruned"),
        log=log,
    )
    standardised = tuple((state["provenance"].get("position_statistics") or {}).get("standardised") or ())
    if pruned.position is not None and standardised:
        # The maps the source run standardised (its label-free choice) are standardised again, with
        # statistics fitted on the pruned network's own maps.
        fit_position_statistics(pruned, training_normals(state["train_paths"], m), cfg.batch_size, device)
        use_statistics(pruned, (pruned.position_mean.clone(), pruned.position_scale.clone()), standardised)
    selecting = cfg.select_weights or cfg.select_map or cfg.select_checkpoint
    synthetic = selection_set(val.images, cfg) if selecting and len(val) else None  # the set `anoscope train` builds
    weights = ScoreWeights(residual=cfg.score_weight_residual, discrimination=cfg.score_weight_discrimination)
    engine.scores = fit_scores(
        pruned,
        val.images,
        weights,
        cfg.batch_size,
        device,
        "training-validation",
        synthetic,
        cfg.select_weights,
        cfg.select_map,
        cfg.select_margin,
    )
    if engine.scores.selection is not None:
        sel = engine.scores.selection
        pixel = "n/a" if sel.pixel_auroc is None else f"{sel.pixel_auroc:.3f}"
        log(f"pruned model before fine-tuning: synthetic AUROC image {sel.image_auroc:.3f} pixel {pixel}")
    last = out / CHECKPOINT_DIR / LAST
    save_checkpoint(last, engine.state())
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    log(f"wrote {last}; fine-tune with: anoscope train --out {out} --resume --time-budget SECONDS")
    return last


# ------------------------------------------------------------------------------------ command line
def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory (its best.pt, else last.pt) or a .pt file")
    parser.add_argument("--width-mult", type=float, required=True, help="the smaller width to prune to, e.g. 0.25")
    parser.add_argument("--out", required=True, help="new run directory for the pruned checkpoint")


def main(args: argparse.Namespace) -> int:
    from service.errors import AnoscopeError

    try:
        prune_run(args.checkpoint, args.out, args.width_mult)
    except (AnoscopeError, ValueError) as exc:
        print(f"prune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m training.prune", description=__doc__.splitlines()[0])
    build_parser(_parser)
    raise SystemExit(main(_parser.parse_args()))
