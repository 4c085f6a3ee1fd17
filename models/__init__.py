"""PyTorch networks and scoring heads of anoscope's GAN anomaly detectors. No file, network or console I/O.

cfg = ModelConfig(family="skipganomaly", image_size=128, channels=3)
model = build_model(cfg)
model.eval()
residual_score, discrimination_score, anomaly_map = model.scoring_head()(images)  # SCORE_OUTPUTS
"""

from __future__ import annotations

from .anogan import AnoGAN
from .base import Detector, ScoringHead
from .config import ModelConfig
from .scoring import SCORE_OUTPUTS
from .skipganomaly import SkipGANomaly

__all__ = ["SCORE_OUTPUTS", "AnoGAN", "Detector", "ModelConfig", "ScoringHead", "SkipGANomaly", "build_model"]


def build_model(config: ModelConfig) -> AnoGAN | SkipGANomaly:
    """A freshly initialised detector of `config.family`."""
    if not isinstance(config, ModelConfig):
        msg = f"build_model needs a ModelConfig (got {type(config).__name__}); use ModelConfig.from_dict(d)"
        raise TypeError(msg)
    if config.family == "anogan":
        return AnoGAN(config)
    return SkipGANomaly(config)
