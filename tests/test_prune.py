"""Pruning (training/prune.py): the pruned detector is the narrower architecture, exact when only dead
channels go, and a pruned run exports, scores and fine-tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models import ModelConfig, build_model  # noqa: E402
from training.prune import (  # noqa: E402
    PruneError,
    channel_groups,
    conv_weight,
    count_parameters,
    exact_spectral_vectors,
    index_plan,
    keep_indices,
    prune_model,
)
from training.speed import count_flops  # noqa: E402

SIZE = 64


def _cfg(width: float, **kw: Any) -> ModelConfig:
    kw.setdefault("image_size", SIZE)
    return ModelConfig(base_width=32, width_mult=width, **kw)


OPTIONS = [
    {"discriminator_map": True},
    {"discriminator_map": False},
    {"discriminator_map": True, "spectral_norm": False},
    {"skip_levels": 1},
    {"skip_levels": 0, "discriminator_map": True},
    {"image_size": 128, "discriminator_map": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_pruned_model_is_the_target_width(options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    source = build_model(_cfg(0.5, **options)).eval()
    target = _cfg(0.25, **options)
    pruned = prune_model(source, target)
    reference = build_model(target)
    assert pruned.config == target
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert count_parameters(pruned) == count_parameters(reference) < count_parameters(source)
    assert count_parameters(pruned.generator) < count_parameters(source.generator) / 3  # half the width: ~1/4
    size, channels = target.image_size, target.channels
    assert count_flops(pruned, channels, size) == count_flops(reference, channels, size)
    assert count_flops(pruned, channels, size) < count_flops(source, channels, size) / 2
    # the first encoder conv keeps whole filters of the source (input channels untouched)
    kept = keep_indices(source, pruned, channel_groups(source.config))[f"generator encoder {size // 2}px"]
    src_w, dst_w = conv_weight(source.generator.downs[0][0]), conv_weight(pruned.generator.downs[0][0])
    torch.testing.assert_close(dst_w, src_w[kept])
    assert not source.training and not pruned.training


def _kill_channels(model: Any, keep: dict[str, Any]) -> None:
    """Zero everything that reads or writes the channels outside `keep`: producing filters and biases,
    BatchNorm gamma and beta, and the consumers' input slices (so spectral norms are unchanged too)."""
    groups = channel_groups(model.config)
    outputs, inputs = index_plan(model, groups, keep)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in outputs:
                dead = torch.ones(
                    module.weight.shape[1 if isinstance(module, torch.nn.ConvTranspose2d) else 0], dtype=torch.bool
                )
                dead[outputs[name]] = False
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight[dead] = 0
                    module.bias[dead] = 0
                    module.running_mean.normal_(0, 0.3)  # non-trivial statistics for the live channels
                    module.running_var.uniform_(0.5, 2.0)
                else:
                    w = conv_weight(module)
                    if isinstance(module, torch.nn.ConvTranspose2d):
                        w[:, dead] = 0
                    else:
                        w[dead] = 0
                    if module.bias is not None:
                        module.bias[dead] = 0
            if name in inputs:
                w = conv_weight(module)
                dead = torch.ones(w.shape[0 if isinstance(module, torch.nn.ConvTranspose2d) else 1], dtype=torch.bool)
                dead[inputs[name]] = False
                if isinstance(module, torch.nn.ConvTranspose2d):
                    w[dead] = 0
                else:
                    w[:, dead] = 0


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_removing_only_dead_channels_is_exact(spectral_norm: bool) -> None:
    torch.manual_seed(0)
    source = build_model(_cfg(0.5, discriminator_map=True, spectral_norm=spectral_norm))
    target = _cfg(0.25, discriminator_map=True, spectral_norm=spectral_norm)
    reference = build_model(target)
    gen = torch.Generator().manual_seed(1)
    keep = {}
    for g in channel_groups(source.config):
        have = source.get_submodule(g.producers[0])
        n = have.num_features if isinstance(have, torch.nn.BatchNorm2d) else have.out_channels
        want = reference.get_submodule(g.producers[0])
        k = want.num_features if isinstance(want, torch.nn.BatchNorm2d) else want.out_channels
        keep[g.name] = torch.randperm(n, generator=gen)[:k].sort().values
    _kill_channels(source, keep)
    exact_spectral_vectors(source)
    source.eval()

    pruned = prune_model(source, target)
    chosen = keep_indices(source, pruned, channel_groups(source.config))
    assert all(torch.equal(chosen[name], keep[name]) for name in keep), "the criterion must find the dead channels"

    x = torch.rand(3, 3, SIZE, SIZE, generator=gen) * 2 - 1  # (B, C, S, S)
    with torch.no_grad():
        x_hat = source.reconstruct(x)
        torch.testing.assert_close(pruned.reconstruct(x), x_hat, rtol=1e-5, atol=1e-6)
        (logits, features), (src_logits, src_features) = pruned.discriminator(x), source.discriminator(x)
        torch.testing.assert_close(logits, src_logits, rtol=1e-4, atol=1e-5)
        live = keep[f"discriminator stage {source.config.num_stages - 1}"]  # D's features are pruned too
        torch.testing.assert_close(features, src_features[:, live], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pruned.map_discriminator(x, x_hat), source.map_discriminator(x, x_hat))
        for a, b in zip(pruned.scoring_head()(x), source.scoring_head()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_refuses_what_it_cannot_prune() -> None:
    source = build_model(_cfg(0.25))
    with pytest.raises(PruneError, match="cannot widen"):
        prune_model(source, _cfg(0.5))
    with pytest.raises(PruneError, match="changes only width_mult"):
        prune_model(source, _cfg(0.25, discriminator_map=True))
    with pytest.raises(PruneError, match="skipganomaly family only"):
        prune_model(build_model(_cfg(0.5, family="anogan")), _cfg(0.25, family="anogan"))
    with pytest.raises(PruneError, match="self-attention"):
        prune_model(build_model(_cfg(0.5, self_attention=True)), _cfg(0.25, self_attention=True))
    attended = {"discriminator_map": True, "map_attention": True}
    with pytest.raises(PruneError, match="map-attention"):
        prune_model(build_model(_cfg(0.5, **attended)), _cfg(0.25, **attended))


@pytest.mark.slow
def test_pruned_run_exports_scores_and_fine_tunes(tmp_path: Path) -> None:
    """train (width 0.5) -> prune to 0.25 -> export and score the pruned checkpoint -> fine-tune with --resume."""
    from anoscope import cli
    from service.engine import OnnxEngine
    from training.checkpoint import load_checkpoint, load_trained
    from training.export import export_bundle, load_images
    from training.prune import prune_run
    from training.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", n_train=12, n_test_good=2, n_test_defect=2, image_size=SIZE)
    wide, pruned = tmp_path / "wide", tmp_path / "pruned"
    common = ["--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--no-progress", "--threads", "1"]
    argv = ["train", "--data", str(data), "--out", str(wide), "--image-size", str(SIZE), "--base-width", "32"]
    assert cli.main([*argv, "--width-mult", "0.5", "--position-statistics", *common]) == 0

    prune_run(wide, pruned, 0.25, log=lambda _: None)
    trained = load_trained(pruned)
    # per-pixel statistics are refitted for the pruned network's maps the source run standardised
    standardised = load_trained(wide).provenance["position_statistics"]["standardised"]
    fitted = [bool(trained.model.position_mean[i].abs().max() > 0) for i in range(2)]
    assert fitted == [name in standardised for name in ("residual", "discrimination")]
    assert trained.model_config.width_mult == 0.25
    wide_config = ModelConfig.from_dict(load_checkpoint(wide)["model_config"])
    assert trained.model_config == ModelConfig.from_dict({**wide_config.to_dict(), "width_mult": 0.25})
    assert trained.provenance["pruned_from"]["width_mult"] == 0.5
    assert count_parameters(trained.model) == count_parameters(build_model(trained.model_config))

    meta = export_bundle(trained, tmp_path / "bundle")
    assert meta.provenance["parity"]["passed"]
    images = load_images(trained.val_paths, image_size=SIZE, channels=3, mean=trained.mean, std=trained.std, limit=4)
    out = OnnxEngine(tmp_path / "bundle", providers=("cpu",)).run(images)
    assert out.anomaly_map.shape == (len(images), SIZE, SIZE)
    assert np.isfinite(out.residual_score).all() and np.isfinite(out.discrimination_score).all()

    assert cli.main(["train", "--out", str(pruned), "--resume", "--epochs", "1", "--no-progress"]) == 0
    state = load_checkpoint(pruned)
    assert state["progress"]["epoch"] == 1 and state["model_config"]["width_mult"] == 0.25
