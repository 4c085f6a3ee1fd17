"""An exponential moving average of a model's weights (`--weight-average EPOCHS`).

GAN weights wander from step to step around where the losses balance; their running average holds
still (Yazıcı et al. 2019, "The unusual effectiveness of averaging in GAN training"; StyleGAN's and
BigGAN's EMA generator). For a detector the wandering is noise in every reconstruction and map: the
average gives the smoother, steadier model, at the cost of one `lerp` over the weights per step.

The average is what each epoch validates, selects, saves as the exported weights and samples; the
optimisers go on training the live weights, which the checkpoint keeps beside it for `--resume`.
Buffers (BatchNorm's running statistics) are averaged like the parameters; integer ones are copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: Early on the average follows the live weights closely (TensorFlow's `num_updates` rule): the
#: decay used after t earlier updates is min(decay, (1 + t) / (WARMUP + t)): the initial weights fade fast.
WARMUP = 10


def decay_for(epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose time constant is `epochs` epochs of `steps_per_epoch` steps."""
    if epochs <= 0:
        msg = f"the weight average's time constant must be > 0 epochs, got {epochs}"
        raise ValueError(msg)
    return 1.0 - 1.0 / max(1.0, epochs * max(steps_per_epoch, 1))


class WeightAverage:
    """An exponential moving average of `model`'s state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            msg = f"decay must be in [0, 1), got {decay}"
            raise ValueError(msg)
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.live: dict[str, Tensor] | None = None  # the live weights while the average is applied

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (WARMUP + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights (call after each optimisation step)."""
        if self.live is not None:
            msg = "the weight average is applied to the model: restore the live weights before updating"
            raise RuntimeError(msg)
        weight = 1.0 - self.current_decay()
        self.updates += 1
        state = model.state_dict()
        averaged, current = [], []
        for name, value in state.items():
            if value.is_floating_point():
                averaged.append(self.shadow[name])
                current.append(value)
            else:
                self.shadow[name].copy_(value)
        torch._foreach_lerp_(averaged, current, weight)

    @torch.no_grad()
    def copy(self, model: nn.Module, names: tuple[str, ...]) -> None:
        """Give the average `model`'s current values of the entries `names` (those it has)."""
        state = model.state_dict()
        for name in names:
            if name in state:
                self.shadow[name].copy_(state[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside, `model` holds the averaged weights; on leaving, its live weights are back (in place, so
        the optimisers keep their parameters)."""
        self.live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(self.live)
            self.live = None

    def adopt(self, model: nn.Module) -> None:
        """Make the average the live weights, and restart averaging from there: a later phase then
        builds on the weights that will be exported (AnoGAN's encoder learns to invert the averaged G)."""
        model.load_state_dict(self.shadow)
        self.updates = 0  # the warm-up restarts

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], shadow: dict[str, Tensor]) -> None:
        """Restore from a checkpoint: `shadow` is its exported (averaged) weights."""
        self.updates = int(state["updates"])
        with torch.no_grad():
            for name, value in shadow.items():
                if name in self.shadow:
                    self.shadow[name].copy_(value)
