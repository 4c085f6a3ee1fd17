"""Where and how a run executes: device choice, mixed precision, seeding, RNG state, git revision."""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda was asked for but PyTorch sees no CUDA device; use --device auto or cpu"
        raise ValueError(msg)
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu (threads: {torch.get_num_threads()})"


@dataclass
class Precision:
    """Mixed precision on CUDA: bfloat16 autocast where supported, else float16 with loss scaling.

    `step(name, loss, optimizer)` does zero_grad/backward/step with the scaler of that optimizer, so
    the loops are written once for fp32 and AMP. On CPU (or with amp off) it is plain fp32.
    """

    device: torch.device
    enabled: bool

    def __post_init__(self) -> None:
        self.enabled = self.enabled and self.device.type == "cuda"
        self.dtype = torch.bfloat16
        if self.enabled and not torch.cuda.is_bf16_supported():
            self.dtype = torch.float16
        self._scalers: dict[str, torch.amp.GradScaler] = {}

    @property
    def description(self) -> str:
        return f"mixed precision ({str(self.dtype).removeprefix('torch.')})" if self.enabled else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _scaler(self, name: str) -> torch.amp.GradScaler | None:
        if not (self.enabled and self.dtype == torch.float16):
            return None
        if name not in self._scalers:
            self._scalers[name] = torch.amp.GradScaler(self.device.type)
        return self._scalers[name]

    def step(self, name: str, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler = self._scaler(name)
        if scaler is None:
            loss.backward()
            optimizer.step()
            return
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self._scalers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, s in state.items():
            scaler = self._scaler(name)
            if scaler is not None:
                scaler.load_state_dict(s)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's batch order, corruption and augmentation.

    Derived from (seed, epoch) only, so a resumed run draws exactly what an uninterrupted one would.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and primitive containers (loadable with weights_only=True)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_primitives(np.random.get_state()),
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_primitives(state: tuple[Any, ...]) -> list[Any]:
    kind, keys, pos, has_gauss, cached = state
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Turn off gradients of `modules` inside the block (their outputs still pass gradients upstream)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def git_revision(path: str | Path | None = None) -> str | None:
    """`git describe`-like revision of the code (commit hash, '-dirty' if modified), or None outside git."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")
