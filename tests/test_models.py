"""Tests of models/: configs, every network and option, the score maths, the heads, ONNX export.

Networks are built with base_width=8 so the whole file runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import models
from models import SCORE_OUTPUTS, AnoGAN, ModelConfig, SkipGANomaly, build_model
from models.anogan import latent_search
from models.layers import SelfAttention
from models.scoring import (
    feature_distance,
    gradient_magnitudes,
    msgms_map,
    msgms_map_reference,
    msgms_mean,
    reduce_map,
    residual_map,
    smooth,
    topk_count,
)

FAMILIES = ("anogan", "skipganomaly")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These networks are tiny: a second thread costs more CPU than it saves on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- factories
def tiny_config(family: str = "skipganomaly", image_size: int = 64, channels: int = 3, **options: Any) -> ModelConfig:
    """A config with the narrowest layers, so tests stay fast."""
    return ModelConfig(family=family, image_size=image_size, channels=channels, base_width=8, **options)


def tiny_model(family: str = "skipganomaly", seed: int = 0, **kw: Any) -> AnoGAN | SkipGANomaly:
    torch.manual_seed(seed)
    return build_model(tiny_config(family, **kw))


def random_images(n: int, channels: int, size: int, seed: int = 0) -> Tensor:
    """Normalised images in [-1, 1]: (n, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def smooth_image(channels: int, size: int) -> Tensor:
    """A defect-free, slowly varying 'part' in [-1, 0.5]: (1, C, S, S)."""
    ramp = torch.linspace(-1.0, 0.5, size)
    img = (ramp[None, :] + ramp[:, None]) / 2  # (S, S)
    return img.expand(1, channels, size, size).clone()


def paste_defect(img: Tensor, top: int, left: int, side: int, value: float = 1.0) -> Tensor:
    """A copy of img with a bright square pasted at (top, left)."""
    out = img.clone()
    out[..., top : top + side, left : left + side] = value
    return out


def set_attention_gamma(module: nn.Module, value: float) -> None:
    """Self-attention starts as the identity (gamma = 0); open it so its weights matter."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SelfAttention):
                m.gamma.fill_(value)


# ----------------------------------------------------------------------------- option grid
OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"spectral_norm": False}, id="no_sn"),
    pytest.param({"self_attention": True}, id="attn"),
    pytest.param({"self_attention": True, "spectral_norm": False}, id="attn_no_sn"),
    pytest.param({"score_reduction": "topk", "residual": "l2"}, id="topk_l2"),
    pytest.param({"score_reduction": "mean", "map_smoothing": 1}, id="mean_unsmoothed"),
    pytest.param({"residual": "msgms"}, id="msgms"),
    pytest.param({"width_mult": 0.5, "latent_dim": 16}, id="light"),
    pytest.param({"discriminator_map": True}, id="dmap"),
    pytest.param({"discriminator_map": True, "map_source": "mean", "score_reduction": "topk"}, id="dmap_mean"),
]
SKIP_OPTIONS = [
    pytest.param({"skip_levels": 2, "skip_dropout": 0.3}, id="skip2_dropout"),
    pytest.param({"skip_levels": 0}, id="skip0"),
]


def grid() -> list[Any]:
    cases = []
    for family in FAMILIES:
        options = OPTIONS + (SKIP_OPTIONS if family == "skipganomaly" else [])
        for channels in (1, 3):
            for size in (64, 128):
                for opt in options:
                    (values,) = opt.values
                    case_id = f"{family}-c{channels}-{size}-{opt.id}"
                    cases.append(pytest.param(family, channels, size, values, id=case_id))
    return cases


def generate(model: AnoGAN | SkipGANomaly, x: Tensor) -> Tensor:
    """The generator's output for input images x (through the encoder for AnoGAN)."""
    if isinstance(model, AnoGAN):
        return model.generator(model.encoder(x))
    return model.generator(x)


# ----------------------------------------------------------------------------- shapes, dtypes, no NaN
@pytest.mark.parametrize(("family", "channels", "size", "options"), grid())
def test_forward_shapes_dtypes_and_finite(family: str, channels: int, size: int, options: dict[str, Any]) -> None:
    model = tiny_model(family, image_size=size, channels=channels, **options).eval()
    cfg = model.config
    x = random_images(2, channels, size)

    with torch.no_grad():
        logits, features = model.discriminator(x)
        assert logits.shape == (2,)
        assert features.shape == (2, cfg.width_at(4), 4, 4)
        if isinstance(model, AnoGAN):
            z = model.encoder(x)
            assert z.shape == (2, cfg.latent_dim)
            assert model.sample_latent(5, "cpu").shape == (5, cfg.latent_dim)
            assert model.generator(model.sample_latent(2)).shape == x.shape
        x_hat = generate(model, x)
        assert torch.equal(model.reconstruct(x), x_hat)
        residual_score, discrimination_score, anomaly_map = model.scoring_head()(x)

    assert x_hat.shape == x.shape
    assert x_hat.abs().max() <= 1.0  # tanh output
    assert residual_score.shape == (2,)
    assert discrimination_score.shape == (2,)
    assert anomaly_map.shape == (2, 1, size, size)
    for t in (logits, features, x_hat, residual_score, discrimination_score, anomaly_map):
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
    assert (anomaly_map >= 0).all() and (residual_score >= 0).all() and (discrimination_score >= 0).all()
    if cfg.discriminator_map:
        assert model.map_discriminator is not None
        assert model.map_discriminator(x, x_hat).shape == (2, 1, size, size)
        assert (discrimination_score <= 1).all(), "a reduction of a probability map"
    else:
        assert model.map_discriminator is None


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_at_256_px(family: str) -> None:
    model = tiny_model(family, image_size=256, channels=3, self_attention=True).eval()
    x = random_images(1, 3, 256)
    with torch.no_grad():
        assert generate(model, x).shape == (1, 3, 256, 256)
        residual_score, discrimination_score, anomaly_map = model.scoring_head()(x)
    assert residual_score.shape == discrimination_score.shape == (1,)
    assert anomaly_map.shape == (1, 1, 256, 256)
    assert model.config.smoothing_kernel == 17


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(("family", "channels", "size", "options"), grid())
def test_every_parameter_gets_a_gradient(family: str, channels: int, size: int, options: dict[str, Any]) -> None:
    model = tiny_model(family, image_size=size, channels=channels, **options).train()
    set_attention_gamma(model, 0.5)
    x = random_images(2, channels, size)
    target = random_images(2, channels, size, seed=1)

    if isinstance(model, AnoGAN):
        fake = model.generator(model.sample_latent(2))
        z = model.encoder(x)
        loss = (fake - target).square().mean() + (z - 1).square().mean()
    else:
        loss = (model.generator(x) - target).square().mean()
    logits, features = model.discriminator(x)
    loss = loss + (logits - 1).square().mean() + (features - 1).square().mean()
    if model.map_discriminator is not None:
        loss = loss + (model.map_discriminator(x, target) - 1).square().mean()
    loss.backward()

    networks = {"generator": model.generator, "discriminator": model.discriminator}
    if isinstance(model, AnoGAN):
        networks["encoder"] = model.encoder
    if model.map_discriminator is not None:
        networks["map_discriminator"] = model.map_discriminator
    for net_name, net in networks.items():
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{net_name}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{net_name}.{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{net_name}.{name} got an all-zero gradient"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spectral_norm", [True, False])
def test_no_bias_right_before_batchnorm(family: str, spectral_norm: bool) -> None:
    # BatchNorm subtracts the per-channel mean, so such a bias would never learn (its gradient is ~1e-11).
    model = tiny_model(family, spectral_norm=spectral_norm)
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        for layer, following in itertools.pairwise(seq):
            if isinstance(following, nn.BatchNorm2d):
                assert isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.bias is None


# ----------------------------------------------------------------------------- the scoring head
@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_deterministic_in_eval_and_leaves_state_alone(family: str) -> None:
    model = tiny_model(family, self_attention=True, skip_dropout=0.5).eval()
    set_attention_gamma(model, 0.5)
    head = model.scoring_head()
    x = random_images(3, 3, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        first, second = head(x), head(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():  # no running stats or spectral-norm vectors updated
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_head_refuses_training_mode_and_does_not_change_the_mode(family: str) -> None:
    model = tiny_model(family).train()
    head = model.scoring_head()
    assert model.training, "creating the head must not switch the model's mode"
    with pytest.raises(RuntimeError, match="eval mode"):
        head(random_images(2, 3, 64))
    head.eval()  # shares modules, so this puts the model in eval too
    assert not model.training
    model.train()  # a later model.train() must re-arm the guard
    with pytest.raises(RuntimeError, match="eval mode"):
        head(random_images(2, 3, 64))


def test_head_shares_the_models_weights() -> None:
    model = tiny_model("skipganomaly").eval()
    head = model.scoring_head()
    x = random_images(2, 3, 64)
    with torch.no_grad():
        before = head(x)[0]
        for p in model.generator.parameters():
            p.add_(0.05)
        after = head(x)[0]
    assert not torch.equal(before, after)


class Restorer(nn.Module):
    """A generator that always outputs the clean part, i.e. one that repairs every defect perfectly."""

    def __init__(self, clean: Tensor) -> None:
        super().__init__()
        self.register_buffer("clean", clean)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.clean.expand(inputs.shape[0], -1, -1, -1)  # (B, C, S, S)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_defect_lights_up_the_map_when_the_generator_restores_the_part(family: str, channels: int) -> None:
    model = tiny_model(family, channels=channels, image_size=64)
    clean = smooth_image(channels, 64)
    model.generator = Restorer(clean)
    model.eval()
    head = model.scoring_head()
    defect = paste_defect(clean, top=10, left=30, side=8)
    with torch.no_grad():
        r_clean, d_clean, map_clean = head(clean)
        r_defect, d_defect, map_defect = head(defect)

    assert r_clean.item() == 0 and d_clean.item() == 0 and map_clean.abs().max() == 0
    assert r_defect.item() > 0.5
    assert d_defect.item() > 0
    peak = divmod(int(map_defect.flatten().argmax()), 64)
    assert 10 <= peak[0] < 18 and 30 <= peak[1] < 38, f"map peaks at {peak}, away from the defect"


class FixedLogits(nn.Module):
    """A map discriminator that flags a fixed square of every image with probability ~1."""

    def __init__(self, top: int, left: int, side: int) -> None:
        super().__init__()
        self.box = (top, left, side)

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        top, left, side = self.box
        logits = torch.full_like(x[:, :1], -20.0)  # (B, 1, S, S): probability ~0
        logits[..., top : top + side, left : left + side] = 20.0
        return logits


class Exploding(nn.Module):
    """A discriminator that must not be called (the map discriminator replaces its feature score)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise AssertionError("the D-feature score was computed although a map discriminator is present")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("source", ["auto", "discrimination", "residual", "mean"])
def test_map_discriminator_gives_the_discrimination_score_and_the_chosen_map(family: str, source: str) -> None:
    model = tiny_model(family, discriminator_map=True, map_source=source, map_smoothing=1)
    clean = smooth_image(3, 64)
    model.generator = Restorer(clean)
    model.map_discriminator = FixedLogits(top=40, left=8, side=6)
    model.discriminator = Exploding()
    model.eval()
    defect = paste_defect(clean, top=10, left=30, side=8)  # the residual sees this square, M the other one
    with torch.no_grad():
        residual_score, discrimination_score, anomaly_map = model.scoring_head()(defect)
    residual = residual_map(defect, clean)  # (1, 1, 64, 64), unsmoothed (map_smoothing=1)
    flagged = torch.sigmoid(model.map_discriminator(defect, clean))  # (1, 1, 64, 64)
    torch.testing.assert_close(residual_score, reduce_map(residual, "max"))
    torch.testing.assert_close(discrimination_score, torch.tensor([1.0]))  # the max of M's probability map
    expected = {"auto": flagged, "discrimination": flagged, "residual": residual, "mean": (residual + flagged) / 2}
    torch.testing.assert_close(anomaly_map, expected[source])
    assert model.config.anomaly_map_source == ("discrimination" if source == "auto" else source)


def test_map_discriminator_localises_and_starts_at_a_low_prior() -> None:
    model = tiny_model("skipganomaly", discriminator_map=True).eval()
    m = model.map_discriminator
    assert m is not None
    x = random_images(2, 3, 64)
    with torch.no_grad():
        p = torch.sigmoid(m(x, x))
    assert p.mean().item() == pytest.approx(0.05, abs=0.02), "starts near the defect prior, not at 0.5"
    with torch.no_grad():  # a change in one corner moves the logits near it more than far away
        moved = x.clone()
        moved[..., :4, :4] += 1.0
        delta = (m(moved, x) - m(x, x)).abs()[0, 0]
    assert delta[:8, :8].mean() > 10 * delta[48:, 48:].mean()


def test_map_base_width_sets_the_map_discriminators_width() -> None:
    assert tiny_config(discriminator_map=True).map_width == 8  # auto: half of 8, at least MIN_WIDTH
    assert ModelConfig(width_mult=0.5).map_width == 16
    model = tiny_model("skipganomaly", discriminator_map=True, map_base_width=24)
    assert model.map_discriminator is not None
    assert model.map_discriminator.downs[0][0].out_channels == 24


def test_map_attention_lets_the_map_discriminator_compare_far_places_and_starts_without_it() -> None:
    plain = tiny_model("skipganomaly", image_size=128, discriminator_map=True).eval()
    model = tiny_model("skipganomaly", image_size=128, discriminator_map=True, map_attention=True).eval()
    assert plain.map_discriminator is not None and model.map_discriminator is not None
    blocks = [m for m in model.map_discriminator.modules() if isinstance(m, SelfAttention)]
    assert len(blocks) == 1 and not any(isinstance(m, SelfAttention) for m in plain.map_discriminator.modules())
    model.map_discriminator.load_state_dict(plain.map_discriminator.state_dict(), strict=False)
    x = random_images(1, 3, 128)
    moved = x.clone()
    moved[..., :4, :4] += 1.0  # a change in one corner ...

    def far_corner_change(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(moved, x) - m(x, x))[0, 0, -8:, -8:].abs().max().item()

    with torch.no_grad():  # gamma starts at 0: exactly the map discriminator without the block
        torch.testing.assert_close(model.map_discriminator(x, x), plain.map_discriminator(x, x))
    assert far_corner_change(plain.map_discriminator) == 0, "convolutions alone do not reach across the image"
    blocks[0].gamma.data.fill_(1e3)  # at random init the mixed-in features are tiny; a large gain shows the path
    assert far_corner_change(model.map_discriminator) > 0, "... reaches the far corner through the attention"


def test_map_attention_needs_a_map_discriminator() -> None:
    with pytest.raises(ValueError, match="map_attention needs discriminator_map"):
        ModelConfig(map_attention=True)


def test_older_configs_build_without_a_map_discriminator() -> None:
    old = ModelConfig(family="skipganomaly", image_size=64).to_dict()
    del old["discriminator_map"], old["map_source"]  # a config written before these options existed
    cfg = ModelConfig.from_dict(old)
    model = build_model(cfg)
    assert model.map_discriminator is None and cfg.anomaly_map_source == "residual"
    assert not any(k.startswith("map_discriminator") for k in model.state_dict())


# ----------------------------------------------------------------------------- score maths
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("how", ["max", "mean", "topk"])
def test_score_maths_locate_a_pasted_defect(kind: str, how: str) -> None:
    clean = smooth_image(3, 128)
    defect = paste_defect(clean, top=40, left=70, side=16)
    k = 9
    amap = smooth(residual_map(defect, clean, kind), k)  # (1, 1, 128, 128)
    inside = amap[..., 40 + k // 2 : 56 - k // 2, 70 + k // 2 : 86 - k // 2]  # windows inside the square
    far = amap.clone()
    far[..., 40 - k // 2 : 56 + k // 2, 70 - k // 2 : 86 + k // 2] = 0
    assert inside.min() > 0.5
    assert far.abs().max() == 0  # smoothing spreads the defect by k // 2 pixels only
    clean_map = smooth(residual_map(clean, clean, kind), k)
    assert reduce_map(amap, how, 0.01).item() > reduce_map(clean_map, how, 0.01).item() == 0


def test_residual_map_averages_channels() -> None:
    x = torch.zeros(1, 3, 4, 4)
    x_hat = torch.tensor([1.0, 2.0, -3.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(residual_map(x, x_hat, "l1"), torch.full((1, 1, 4, 4), 2.0))
    torch.testing.assert_close(residual_map(x, x_hat, "l2"), torch.full((1, 1, 4, 4), 14.0 / 3))
    with pytest.raises(ValueError, match="l1, l2, msgms, l1\\+msgms"):
        residual_map(x, x_hat, "ssim")


@pytest.mark.parametrize("kind", ["msgms", "l1+msgms"])
def test_structural_residuals_are_zero_on_a_perfect_copy_and_bounded(kind: str) -> None:
    x = random_images(2, 3, 64)
    torch.testing.assert_close(residual_map(x, x.clone(), kind), torch.zeros(2, 1, 64, 64))
    noisy = residual_map(x, random_images(2, 3, 64, seed=9), kind)
    assert noisy.shape == (2, 1, 64, 64)
    assert noisy.min() > 0 and noisy.max() <= 1  # both images are textured everywhere: every pixel differs


def test_msgms_weighs_a_lost_edge_by_structure_not_by_contrast() -> None:
    """A step edge blurred away: l1 grows with the edge's contrast; msgms, a similarity ratio, far less,
    so a faint crack lost in the reconstruction counts nearly as much as a strong one. It stays local."""

    def lost_edge(contrast: float, kind: str) -> Tensor:
        step = torch.full((1, 1, 64, 64), -contrast / 2)
        step[..., :, 32:] = contrast / 2
        blurred = F.avg_pool2d(F.pad(step, (4, 4, 4, 4), mode="replicate"), 9, stride=1)
        return residual_map(step, blurred, kind)

    faint, strong = 0.4, 1.6
    assert lost_edge(strong, "l1").max() / lost_edge(faint, "l1").max() == pytest.approx(4, rel=1e-4)
    assert lost_edge(strong, "msgms").max() / lost_edge(faint, "msgms").max() < 2
    assert lost_edge(faint, "msgms").max() > 1.5 * lost_edge(faint, "l1").max()
    assert lost_edge(faint, "msgms")[..., :, :4].max().item() < 1e-6  # nothing far from the edge


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 1, 37, 50)], ids=["rgb", "odd-sizes"])
def test_msgms_is_riads_definition_image_by_image(shape: tuple[int, int, int, int]) -> None:
    """The shipped map batches both images through one grouped convolution and pools level by level;
    it must equal the textbook form: each image's channel mean, pooled by 2**level from full size,
    Prewitt magnitudes, the similarity ratio, upsampled and averaged over the four scales."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_hat = x + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    reference = msgms_map_reference(x, x_hat)
    torch.testing.assert_close(residual_map(x, x_hat, "msgms"), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (60, 60)])  # 60: levels do not divide, the map is taken
def test_the_structure_loss_is_the_mean_of_the_shipped_map_and_has_its_gradient(size: tuple[int, int]) -> None:
    """`msgms_mean` skips the upsampling and uses separable gradients; loss and gradient must be the
    map's, or training would optimise something other than what the head scores."""
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    x_hat = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for loss in (msgms_mean, lambda a, b: msgms_map(a, b).mean()):
        leaf = x_hat.clone().requires_grad_(True)
        value = loss(leaf, x)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    # float64 throughout, except the convolution's 1/3, which is stored in float32 (rel. error 3e-8)
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=1e-7)
    scale = grads[1][1].abs().max().item()  # per-pixel gradients of a mean are tiny: compare to the largest
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6 * scale, rtol=1e-6)
    grey = torch.cat((x, x_hat), dim=1)[:, 2:4]  # any two channels stand for (image, reconstruction)
    torch.testing.assert_close(gradient_magnitudes(grey, separable=True), gradient_magnitudes(grey))


def test_gms_ignores_a_uniform_brightness_shift() -> None:
    """A global offset changes no gradient: msgms stays zero where l1 fires everywhere (lighting drift)."""
    x = smooth_image(1, 64)
    brighter = x + 0.3
    assert residual_map(x, brighter, "l1").min().item() == pytest.approx(0.3, abs=1e-5)
    assert residual_map(x, brighter, "msgms").max().item() < 1e-5


def test_smoothing_does_not_darken_borders() -> None:
    ones = torch.ones(2, 1, 32, 32)
    torch.testing.assert_close(smooth(ones, 9), ones)
    corner = torch.zeros(1, 1, 32, 32)
    corner[..., :3, :3] = 1.0  # a defect in the corner: 9 of the 25 valid pixels of a 5x5 window
    assert smooth(corner, 5)[0, 0, 0, 0].item() == pytest.approx(1.0)  # window holds 3x3 valid pixels
    assert smooth(corner, 1) is corner
    with pytest.raises(ValueError, match="odd"):
        smooth(ones, 4)


def test_reduce_map_values() -> None:
    amap = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    amap = torch.cat([amap, -amap])  # (2, 1, 10, 10)
    torch.testing.assert_close(reduce_map(amap, "max"), torch.tensor([99.0, 0.0]))
    torch.testing.assert_close(reduce_map(amap, "mean"), torch.tensor([49.5, -49.5]))
    torch.testing.assert_close(reduce_map(amap, "topk", 0.05), torch.tensor([97.0, -2.0]))  # top 5 pixels
    assert topk_count(100, 0.05) == 5 and topk_count(100, 0.0001) == 1 and topk_count(100, 1.0) == 100
    with pytest.raises(ValueError, match="'max', 'mean' or 'topk'"):
        reduce_map(amap, "median")


def test_feature_distance_is_mean_squared_difference() -> None:
    fx = torch.zeros(2, 4, 2, 2)
    fx_hat = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)])
    torch.testing.assert_close(feature_distance(fx, fx_hat), torch.tensor([0.0, 9.0]))


# ----------------------------------------------------------------------------- options really act
@pytest.mark.parametrize("family", FAMILIES)
def test_spectral_norm_really_present_when_on(family: str) -> None:
    model = tiny_model(family, spectral_norm=True, self_attention=True).train()
    convs = [m for m in model.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.discriminator.modules())
    for net in [model.generator] + ([model.encoder] if isinstance(model, AnoGAN) else []):
        assert not any(parametrize.is_parametrized(m) for m in net.modules()), "spectral norm is for D only"

    with torch.no_grad():  # power iteration converges while training: the largest singular value -> 1
        for seed in range(30):
            model.discriminator(random_images(2, 3, 64, seed))
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_spectral_norm_off_gives_a_batchnorm_dcgan_discriminator(family: str) -> None:
    model = tiny_model(family, spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in model.discriminator.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.discriminator.modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("on", [True, False])
def test_self_attention_block_placement(family: str, on: bool) -> None:
    model = tiny_model(family, image_size=128, self_attention=on)
    networks = [model.generator, model.discriminator] + ([model.encoder] if isinstance(model, AnoGAN) else [])
    for net in networks:
        blocks = [m for m in net.modules() if isinstance(m, SelfAttention)]
        assert len(blocks) == (1 if on else 0), type(net).__name__
    assert model.config.attention_resolution == 32


def test_self_attention_starts_as_identity_and_is_non_local() -> None:
    torch.manual_seed(0)
    block = SelfAttention(16).eval()
    x = torch.randn(2, 16, 8, 8)
    assert block.gamma.item() == 0
    torch.testing.assert_close(block(x), x)
    block.gamma.data.fill_(1.0)
    moved = x.clone()
    moved[:, :, 0, 0] += 5.0  # change one corner pixel ...
    assert not torch.allclose(block(moved)[:, :, 7, 7], block(x)[:, :, 7, 7])  # ... the far corner sees it


def test_skip_levels_pick_the_coarsest_connections() -> None:
    assert tiny_config(image_size=128).skip_resolutions == (8, 16, 32, 64)
    assert tiny_config(image_size=128, skip_levels=2).skip_resolutions == (8, 16)
    assert tiny_config(image_size=128, skip_levels=0).skip_resolutions == ()
    assert tiny_config(image_size=64).skip_resolutions == (8, 16, 32)
    assert ModelConfig(image_size=512).max_skip_levels == 6


@pytest.mark.parametrize(("skip_levels", "copies_input"), [(0, False), (1, True), ("all", True)])
def test_skip_levels_cut_the_path_around_the_bottleneck(skip_levels: int | str, copies_input: bool) -> None:
    model = tiny_model("skipganomaly", skip_levels=skip_levels).eval()
    # Zero the bottleneck: whatever still reaches the output went through a skip connection.
    model.generator.downs[-1].register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    with torch.no_grad():
        a = model.generator(random_images(1, 3, 64, seed=1))
        b = model.generator(random_images(1, 3, 64, seed=2))
    assert (not torch.allclose(a, b)) == copies_input


def test_skip_dropout_acts_in_training_only() -> None:
    model = tiny_model("skipganomaly", skip_dropout=0.5)
    x = random_images(2, 3, 64)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.generator(x), model.generator(x))
        model.eval()
        assert torch.equal(model.generator(x), model.generator(x))


def test_width_mult_makes_lighter_models() -> None:
    def n_params(**kw: Any) -> int:
        return sum(p.numel() for p in build_model(ModelConfig(image_size=64, **kw)).parameters())

    assert n_params(width_mult=0.25) < n_params(width_mult=0.5) < n_params()
    assert ModelConfig(base_width=64, width_mult=0.25).effective_width == 16
    assert ModelConfig(base_width=64, width_mult=0.01).effective_width == 8  # never below 8 channels
    assert ModelConfig(base_width=64, image_size=512).width_at(4) == 512  # capped at 8x


# ----------------------------------------------------------------------------- AnoGAN latent search
def settle_batchnorm(model: AnoGAN) -> None:
    """Give BatchNorm realistic running statistics, so that in eval mode G(z) really depends on z."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average of the batches below
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model.generator(model.sample_latent(16))
            model.encoder(random_images(16, model.config.channels, model.config.image_size, seed))


def test_latent_search_lowers_the_reconstruction_loss() -> None:
    # mean of the unsmoothed L1 map = exactly the residual term the search minimises
    model = tiny_model("anogan", score_reduction="mean", map_smoothing=1, latent_dim=16)
    settle_batchnorm(model)  # leaves the model in training mode
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()
        x = model.generator(model.sample_latent(3))  # images G can reach, so the search has somewhere to go
        start = model.scoring_head()(x)[0]
        model.train()

    residual_score, discrimination_score, anomaly_map = latent_search(model, x, steps=5, lr=0.05, feature_weight=0.0)

    assert residual_score.shape == discrimination_score.shape == (3,)
    assert anomaly_map.shape == (3, 1, 64, 64)
    assert (residual_score < 0.98 * start).all(), f"{residual_score} not clearly below {start}"
    assert model.training, "latent_search must restore the model's mode"
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"latent_search changed {k}"


def test_latent_search_zero_steps_from_encoder_is_the_head_and_random_init_is_seeded() -> None:
    model = tiny_model("anogan", self_attention=True).eval()
    x = random_images(2, 3, 64)
    with torch.no_grad():
        head = model.scoring_head()(x)
    for a, b in zip(latent_search(model, x, steps=0), head, strict=True):
        torch.testing.assert_close(a, b)

    def run(seed: int) -> Tensor:
        return latent_search(model, x, steps=2, init="random", generator=torch.Generator().manual_seed(seed))[0]

    torch.testing.assert_close(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_latent_search_rejects_bad_arguments() -> None:
    x = random_images(1, 3, 64)
    with pytest.raises(TypeError, match="AnoGAN"):
        latent_search(tiny_model("skipganomaly"), x, steps=1)  # type: ignore[arg-type]
    anogan = tiny_model("anogan")
    with pytest.raises(ValueError, match="init"):
        latent_search(anogan, x, steps=1, init="zeros")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        latent_search(anogan, x, steps=-1)


# ----------------------------------------------------------------------------- config
def test_config_defaults() -> None:
    cfg = ModelConfig()
    assert (cfg.family, cfg.image_size, cfg.channels) == ("skipganomaly", 128, 3)
    assert (cfg.latent_dim, cfg.base_width, cfg.width_mult) == (100, 64, 1.0)
    assert cfg.spectral_norm and not cfg.self_attention
    assert (cfg.skip_levels, cfg.skip_dropout, cfg.score_reduction, cfg.residual) == ("all", 0.0, "max", "l1")
    assert cfg.map_smoothing is None and cfg.smoothing_kernel == 9  # FINDINGS: 9x9 box at 128 px
    # the dataclass defaults rebuild older checkpoints; anoscope train's recommended settings live in training/
    assert not cfg.discriminator_map and cfg.map_source == "auto" and cfg.anomaly_map_source == "residual"


@pytest.mark.parametrize(("size", "kernel"), [(64, 5), (128, 9), (256, 17), (512, 33)])
def test_auto_smoothing_kernel_scales_with_image_size(size: int, kernel: int) -> None:
    assert ModelConfig(image_size=size).smoothing_kernel == kernel
    assert ModelConfig(image_size=size, map_smoothing=3).smoothing_kernel == 3
    resized = dataclasses.replace(ModelConfig(image_size=128), image_size=size)
    assert resized.smoothing_kernel == kernel  # auto follows the size, also through replace()


@pytest.mark.parametrize(("size", "kernel"), [(64, 3), (128, 5), (256, 9), (512, 17)])
def test_a_finer_auto_smoothing_keeps_the_filter_a_fixed_share_of_the_image(size: int, kernel: int) -> None:
    assert ModelConfig(image_size=size, map_smoothing_divisor=32).smoothing_kernel == kernel
    assert ModelConfig(image_size=size, map_smoothing_divisor=32, map_smoothing=7).smoothing_kernel == 7


@pytest.mark.parametrize(("divisor", "kernel"), [(24, 5), (10, 13), (200, 1)])
def test_auto_smoothing_is_always_odd(divisor: int, kernel: int) -> None:
    # 128 // 24 = 5, 128 // 10 = 12 -> 13, 128 // 200 = 0 -> 1 (no smoothing): a centred filter always
    assert ModelConfig(image_size=128, map_smoothing_divisor=divisor).smoothing_kernel == kernel


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"family": "ganomaly"}, "family must be one of anogan, skipganomaly"),
        ({"image_size": 100}, "image_size must be one of 64, 128, 256, 512"),
        ({"image_size": True}, "image_size must be one of"),
        ({"channels": 2}, "channels must be 1"),
        ({"latent_dim": 0}, "latent_dim must be a positive int"),
        ({"base_width": 2.5}, "base_width must be a positive int"),
        ({"width_mult": 0}, "width_mult must be a number in"),
        ({"spectral_norm": "yes"}, "spectral_norm must be true or false"),
        ({"self_attention": 1}, "self_attention must be true or false"),
        ({"image_size": 64, "skip_levels": 4}, "skip_levels must be 'all' or an int from 0 to 3"),
        ({"skip_levels": -1}, "skip_levels must be"),
        ({"skip_levels": "some"}, "skip_levels must be"),
        ({"skip_dropout": 1.0}, "skip_dropout must be a probability"),
        ({"map_smoothing": 4}, "map_smoothing must be an odd positive int"),
        ({"map_smoothing": 0}, "map_smoothing must be an odd positive int"),
        ({"map_smoothing_divisor": 0}, "map_smoothing_divisor must be a positive int"),
        ({"map_smoothing_divisor": 2.5}, "map_smoothing_divisor must be a positive int"),
        ({"image_size": 64, "map_smoothing": 65}, "must not exceed image_size"),
        ({"score_reduction": "median"}, "score_reduction must be one of max, mean, topk"),
        ({"topk_fraction": 0.0}, "topk_fraction must be in"),
        ({"residual": "ssim"}, "residual must be one of l1, l2"),
        ({"discriminator_map": 1}, "discriminator_map must be true or false"),
        ({"map_source": "seg"}, "map_source must be one of auto, residual, discrimination, mean"),
        ({"map_source": "mean"}, "map_source 'mean' needs discriminator_map=true"),
        ({"map_base_width": 0}, "map_base_width must be a positive int"),
    ],
)
def test_config_validation_says_what_to_fix(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**options)


def test_config_reports_every_problem_at_once_and_is_frozen() -> None:
    with pytest.raises(ValueError, match="image_size.*channels"):
        ModelConfig(image_size=100, channels=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().image_size = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        ModelConfig(family="anogan", image_size=64, channels=1, latent_dim=32, spectral_norm=False),
        ModelConfig(skip_levels=2, skip_dropout=0.25, map_smoothing=5, score_reduction="topk", topk_fraction=0.02),
        ModelConfig(width_mult=0.5, self_attention=True, residual="l2", image_size=512),
        ModelConfig(family="anogan", discriminator_map=True, map_source="mean"),
        ModelConfig(discriminator_map=True, map_attention=True),
    ],
)
def test_config_json_round_trip(cfg: ModelConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg


def test_from_dict_names_unknown_keys_and_fills_missing_ones() -> None:
    with pytest.raises(ValueError, match="unknown ModelConfig keys: depth, nz"):
        ModelConfig.from_dict({"family": "anogan", "nz": 100, "depth": 4})
    assert ModelConfig.from_dict({"family": "anogan"}) == ModelConfig(family="anogan")
    # a checkpoint written before map_smoothing_divisor existed keeps the filter it was trained with
    assert ModelConfig.from_dict({"image_size": 256, "map_smoothing": None}).smoothing_kernel == 17
    assert ModelConfig.from_dict({"width_mult": 1}).width_mult == 1.0  # JSON ints for floats are fine
    assert isinstance(ModelConfig.from_dict({"width_mult": 1}).to_dict()["width_mult"], float)
    with pytest.raises(TypeError, match="mapping"):
        ModelConfig.from_dict([("family", "anogan")])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- public API
def test_public_api() -> None:
    assert SCORE_OUTPUTS == ("residual_score", "discrimination_score", "anomaly_map")
    assert {"ModelConfig", "build_model", "SCORE_OUTPUTS", "AnoGAN", "SkipGANomaly"} <= set(models.__all__)
    cfg = tiny_config("anogan")
    model = build_model(cfg)
    assert isinstance(model, AnoGAN) and model.config is cfg
    assert isinstance(build_model(tiny_config("skipganomaly")), SkipGANomaly)
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model(cfg.to_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="family='anogan'"):
        AnoGAN(tiny_config("skipganomaly"))


# ----------------------------------------------------------------------------- ONNX export
@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("anogan", {"self_attention": True, "score_reduction": "topk", "channels": 1}),
        ("skipganomaly", {"self_attention": True, "skip_levels": 2, "skip_dropout": 0.2, "spectral_norm": False}),
        ("skipganomaly", {"discriminator_map": True, "skip_levels": 2}),
        ("anogan", {"discriminator_map": True, "map_source": "mean", "channels": 1}),
        ("skipganomaly", {"residual": "msgms", "score_reduction": "topk"}),
        ("anogan", {"residual": "l1+msgms", "discriminator_map": True, "map_source": "mean"}),
    ],
)
def test_head_exports_to_onnx_and_matches_pytorch(family: str, options: dict[str, Any], tmp_path: Any) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_model(family, **options)
    set_attention_gamma(model, 0.5)
    channels = model.config.channels
    with torch.no_grad():  # move BatchNorm running statistics away from their initial values
        for seed in range(3):
            x = random_images(4, channels, 64, seed) * 0.5 + 0.2
            x_hat = generate(model.train(), x)
            if model.map_discriminator is not None:
                model.map_discriminator(x, x_hat)
    head = model.eval().scoring_head()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        head,
        (random_images(2, channels, 64),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        output_names=list(SCORE_OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(SCORE_OUTPUTS)
    x = random_images(3, channels, 64, seed=7)  # another batch size than at export
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = head(x)
    for name, g, e in zip(SCORE_OUTPUTS, got, expected, strict=True):
        assert g.shape == tuple(e.shape), name
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-5, msg=name)
