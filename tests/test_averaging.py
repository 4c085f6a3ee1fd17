"""The weight average (`--weight-average EPOCHS`): what is validated, saved and exported, and how it resumes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from models.config import ModelConfig
from service.postprocess import fit_score_stats
from training.averaging import WARMUP, WeightAverage, decay_for
from training.checkpoint import load_checkpoint, load_trained
from training.config import TrainConfig
from training.loops.artifacts import read_losses
from training.synthetic import generate_dataset
from training.train import train, validation_normals

SIZE = 64


def test_the_decay_gives_the_time_constant_in_epochs() -> None:
    assert decay_for(2, 50) == pytest.approx(1 - 1 / 100)
    assert decay_for(0.01, 10) == 0.0, "a constant under one step averages nothing"
    with pytest.raises(ValueError, match="> 0 epochs"):
        decay_for(0, 10)
    with pytest.raises(ValueError, match=r"weight_average must be >= 0 epochs \(got -1"):
        TrainConfig(weight_average=-1)


def test_the_average_follows_the_weights_by_its_decay_and_copies_integer_buffers() -> None:
    net = nn.BatchNorm1d(3)  # a parameter, float running statistics and an integer counter
    average = WeightAverage(net, decay=0.9)
    start = net.weight.detach().clone()
    expected = start.clone()
    for step in range(1, 100):
        with torch.no_grad():
            net.weight.add_(1.0)
            net.num_batches_tracked += 1
        average.update(net)
        decay = min(0.9, step / (WARMUP + step - 1))  # the warm-up rule, at update `step`
        expected = decay * expected + (1 - decay) * net.weight.detach()
    assert torch.allclose(average.shadow["weight"], expected, atol=1e-5)
    assert average.current_decay() == 0.9, "the warm-up ends"
    assert (net.weight - average.shadow["weight"] > 5).all(), "the average lags the moving weights"
    assert average.shadow["num_batches_tracked"] == 99


def test_applying_the_average_swaps_the_weights_in_place_and_gives_the_live_ones_back() -> None:
    net = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    average = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    live = net.weight.detach().clone()
    parameter = net.weight
    with average.applied(net):
        assert net.weight is parameter, "in place: the optimiser still holds the model's parameters"
        assert torch.equal(net.weight, average.shadow["weight"]) and not torch.equal(net.weight, live)
        with pytest.raises(RuntimeError, match="restore the live weights"):
            average.update(net)
    assert torch.equal(net.weight, live)
    net(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(net.weight, live), "training goes on with the live weights"


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("averaging") / "fabric"
    return generate_dataset(root, texture="fabric", n_train=24, n_test_good=1, n_test_defect=1, image_size=SIZE)


def _config(data: Path, out: Path, epochs: int, **kw: object) -> TrainConfig:
    model = ModelConfig(image_size=SIZE, width_mult=0.25, **kw.pop("model", {}))  # type: ignore[arg-type]
    base = {"epochs": epochs, "batch_size": 6, "val_fraction": 0.25, "progress": False, "threads": 1}
    return TrainConfig(data=str(data), out=str(out), model=model, weight_average=1.0, **{**base, **kw})  # type: ignore[arg-type]


def _losses(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_losses(run / "losses.csv")]


@pytest.mark.parametrize("family", ["skipganomaly", "anogan"])
def test_the_checkpoint_exports_the_average_that_was_validated(fabric: Path, tmp_path: Path, family: str) -> None:
    lines: list[str] = []
    extra = {"model": {"family": family, "latent_dim": 16}} if family == "anogan" else {}
    train(_config(fabric, tmp_path, epochs=3, **extra), log=lines.append)
    assert any(line.startswith("weight average: 1 epochs (3 steps each, decay 0.6667)") for line in lines)

    state = load_checkpoint(tmp_path)
    model, live = state["model"], state["live_model"]
    assert set(model) == set(live)
    assert any(not torch.equal(model[k], live[k]) for k in model if model[k].is_floating_point()), "not the live"
    # the score statistics were fitted on what the exported weights give
    trained = load_trained(tmp_path)
    with torch.no_grad():
        r, d, _ = trained.model.scoring_head().eval()(validation_normals(trained, tmp_path))
    stats = fit_score_stats(r.numpy(), d.numpy())
    assert stats["residual"].mean == pytest.approx(trained.score_stats["residual"].mean, rel=1e-4)
    assert stats["discrimination"].mean == pytest.approx(trained.score_stats["discrimination"].mean, rel=1e-4)
    if family == "anogan":  # the encoder phase learnt to invert the averaged G, which it froze
        generator = [k for k in model if k.startswith("generator.")]
        assert generator and all(torch.equal(model[k], live[k]) for k in generator)


def test_a_resumed_run_continues_both_the_live_weights_and_their_average(fabric: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(_config(fabric, straight, epochs=3), log=lambda _: None)
    resumed = tmp_path / "resumed"
    cfg = _config(fabric, resumed, epochs=2)
    train(cfg, log=lambda _: None)
    train(replace(cfg, epochs=3), resume=True, log=lambda _: None)
    assert _losses(resumed) == _losses(straight)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for key in ("model", "live_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["weight_average"] == b["weight_average"] == {"decay": pytest.approx(2 / 3), "updates": 9}


def test_a_resume_cannot_switch_the_average_on(fabric: Path, tmp_path: Path) -> None:
    cfg = replace(_config(fabric, tmp_path / "run", epochs=1), weight_average=0.0)
    train(cfg, log=lambda _: None)
    assert "live_model" not in load_checkpoint(tmp_path / "run")
    with pytest.raises(Exception, match="weight_average"):
        train(replace(cfg, epochs=2, weight_average=1.0), resume=True, log=lambda _: None)
