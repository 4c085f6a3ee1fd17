"""The interface the training engine drives: one `Loop` per family, one optimisation step at a time."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from models import Detector
from training.config import TrainConfig
from training.runtime import Precision


class Loop:
    """A family's optimisation: its phases, optimisers and one training step per batch.

    `step` returns detached loss tensors (no `.item()`: the engine syncs with the device only when it
    logs), named as in `columns[phase]`.
    """

    phases: ClassVar[tuple[str, ...]] = ("gan",)
    columns: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, model: Detector, config: TrainConfig, precision: Precision) -> None:
        self.model, self.config, self.precision = model, config, precision
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def adam(self, params: Any, lr: float | None) -> torch.optim.Adam:
        assert lr is not None, "TrainConfig.resolved() fills the learning rates"
        return torch.optim.Adam(params, lr=lr, betas=self.config.betas)

    def train_mode(self, phase: str) -> None:
        """Put every module in the mode this phase trains it in."""
        self.model.train()

    def step(self, phase: str, x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def sample_rows(self, x: Tensor, generator: torch.Generator) -> list[tuple[str, np.ndarray]]:
        """Extra rows for the per-epoch PNG grid (the model is in eval mode, gradients off)."""
        return []

    def all_columns(self) -> tuple[str, ...]:
        return tuple(c for phase in self.phases for c in self.columns[phase])

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            if name in state:
                opt.load_state_dict(state[name])
