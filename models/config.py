"""`ModelConfig`: every architectural and scoring choice of a detector, in one frozen dataclass.

The config travels with the weights (checkpoints and bundles store `to_dict()`), so a model can be
rebuilt with `build_model(ModelConfig.from_dict(d))` without knowing the flags it was trained with.
New options must get a default that reproduces the old behaviour, so older dicts keep loading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

FAMILIES = ("anogan", "skipganomaly")
IMAGE_SIZES = (64, 128, 256, 512)
CHANNELS = (1, 3)
SCORE_REDUCTIONS = ("max", "mean", "topk")
RESIDUALS = ("l1", "l2", "msgms", "l1+msgms")
MAP_SOURCES = ("auto", "residual", "discrimination", "mean")
RESIZE_MODES = ("squash", "tiles")
ALIGN_MODES = ("none", "principal-axis", "auto")
ROI_MODES = ("none", "part", "auto")
CROP_MODES = ("none", "part", "auto")
EXPOSURE_MODES = ("none", "standardise", "auto")

#: Widths stop doubling at this multiple of the base width (DCGAN's 8 * ngf), which bounds the size of
#: the deep layers at 256 and 512 px.
MAX_WIDTH_FACTOR = 8
#: Smallest number of channels any layer gets, however small `width_mult` is.
MIN_WIDTH = 8
#: Self-attention sits at this resolution or at image_size // 4 if smaller: attention over N pixels
#: costs N² memory, and 32x32 is where SAGAN placed it at 128 px.
MAX_ATTENTION_RESOLUTION = 32


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and scoring options of one detector; validated on construction."""

    family: Literal["anogan", "skipganomaly"] = "skipganomaly"
    image_size: int = 128
    channels: int = 3
    #: AnoGAN only: dimension of the latent code z ~ N(0, 1).
    latent_dim: int = 100
    base_width: int = 64
    #: Multiplies `base_width` for light models; the result is rounded and at least `MIN_WIDTH`.
    width_mult: float = 1.0
    #: Spectral normalisation on every conv of the discriminator (which then has no BatchNorm).
    spectral_norm: bool = True
    #: One SAGAN self-attention block at `attention_resolution` in the generator and discriminator.
    self_attention: bool = False
    #: Skip-GANomaly only: "all" (the paper) or how many of the coarsest U-Net levels keep their skip
    #: connection (0 = none, a plain encoder-decoder); fewer skips copy less of the input.
    skip_levels: int | Literal["all"] = "all"
    #: Skip-GANomaly only: dropout probability on the skip connections while training.
    skip_dropout: float = 0.0
    #: Odd box-filter size for smoothing the anomaly maps; 1 = no smoothing; None = auto, a size that
    #: scales with the image (`map_smoothing_divisor`). See `smoothing_kernel` for the value in use.
    map_smoothing: int | None = None
    #: Auto `map_smoothing` = image_size // this, made odd (16: 9 at 128 px, 17 at 256). 16 was the
    #: fixed rule before this option existed; it stays the dataclass default so that older checkpoints
    #: rebuild with the filter they were trained with, and measured as the better default (32 halves the
    #: filter, for defects a few pixels across: docs/quality.md, "Map smoothing").
    map_smoothing_divisor: int = 16
    #: How the anomaly map becomes `residual_score`: its max, its mean, or the mean of its top
    #: `topk_fraction` of pixels.
    score_reduction: Literal["max", "mean", "topk"] = "max"
    topk_fraction: float = 0.01
    #: Per-pixel residual: mean over channels of |x - x_hat| ("l1") or (x - x_hat)² ("l2"), one minus the
    #: multi-scale gradient-magnitude similarity ("msgms", structure rather than intensity), or the mean
    #: of l1 and msgms ("l1+msgms"). See `models.scoring.residual_map`.
    residual: Literal["l1", "l2", "msgms", "l1+msgms"] = "l1"
    #: A segmentation discriminator (`models/segmentation.py`) that sees the input and its reconstruction
    #: and outputs a per-pixel defect logit map, trained to flag synthetic defects (DRAEM's discriminative
    #: network inside the GAN). Its smoothed probability map is the "discrimination map";
    #: `discrimination_score` becomes that map's reduction instead of the D-feature distance.
    discriminator_map: bool = False
    #: What the exported `anomaly_map` is: the smoothed residual, the discrimination map, or their mean
    #: (the last two need `discriminator_map`); "auto" = the discrimination map when there is one, else the
    #: residual. See `anomaly_map_source` for the value in use.
    map_source: Literal["auto", "residual", "discrimination", "mean"] = "auto"
    #: Channels of the map discriminator's finest layer; None = half the effective width (at least
    #: `MIN_WIDTH`). See `map_width` for the value in use.
    map_base_width: int | None = None
    #: One SAGAN self-attention block at the map discriminator's bottleneck (S/16: 64 positions at 128 px,
    #: so it costs little): every place can be compared with the rest of the same image, which a
    #: region that is wrong only against its surroundings (a band of another finish) needs; the
    #: network's convolutions alone see about a third of the image.
    map_attention: bool = False
    #: How an image becomes model inputs (pre-processing, not the network; it travels with the weights so
    #: training, export and the service cut images alike): "squash" resizes it to the square, "tiles" cuts
    #: an elongated image into a row or column of square tiles (`service.tiles`).
    resize: Literal["squash", "tiles"] = "squash"
    #: How an image is posed before that (pre-processing too): as it comes, or turned and shifted so the
    #: part on a plain background always lies along the same axis at the centre (`service.align`), for
    #: parts fed at any angle. "auto" is decided once by training from its normal images
    #: (`service.align.survey`) and recorded as one of the other two.
    align: Literal["none", "principal-axis", "auto"] = "none"
    #: Score each map against the model's own normal images, pixel by pixel: the image scores become
    #: reductions of (map - mean) / scale, where mean and scale (the per-pixel std, at least its median)
    #: are buffers fitted after training on reconstructions of training normals
    #: (`training.position_stats`). Residual that good parts always leave at the same place (edges,
    #: the part's outline, the frame) then stops deciding the max. The exported `anomaly_map` is not
    #: standardised.
    position_statistics: bool = False
    #: Where on the image a defect can count: everywhere, or only where the part lies in the training
    #: normals (after alignment), widened by a margin (`training.roi`). A mask buffer fitted after
    #: training zeroes both maps outside it before they are reduced, and the exported `anomaly_map` too,
    #: so specks on the table beside a part neither raise the score nor draw regions. "auto" is decided
    #: once by training (`service.align.Survey.roi_choice`) and recorded as one of the other two.
    roi: Literal["none", "part", "auto"] = "none"
    #: With alignment, whether the aligned frame is cropped to the part before it is resized to the
    #: square input (pre-processing): "part" keeps `crop_box`, the box about the centre that holds every
    #: training normal's part with a margin (`service.align.crop_box`), so a long thin part fills the
    #: input instead of a third of it. "auto" crops where that box keeps at most `MAX_BOX_AREA` of the
    #: frame; both are decided once by training and recorded.
    crop: Literal["none", "part", "auto"] = "none"
    #: The share of the aligned frame's width and height kept (across and along the part's axis); set by
    #: training from `crop`. (1, 1) = no crop.
    crop_box: tuple[float, float] = (1.0, 1.0)
    #: Whether each image's brightness and contrast are set to one level before the model sees it
    #: (pre-processing, `service.images.standardise_exposure`): "standardise" shifts and scales every
    #: image's pixels to the mean and standard deviation `exposure_target`, for products whose good
    #: images come at very different exposures; "auto" standardises where the training normals' own
    #: brightness or contrast varies by more than `service.exposure.MAX_SPREAD`; decided once by
    #: training and recorded.
    exposure: Literal["none", "standardise", "auto"] = "none"
    #: The (mean, std) of the pixels, on a 0-1 scale, that "standardise" brings every image to; set by
    #: training from the normals (their medians).
    exposure_target: tuple[float, float] = (0.5, 0.2)

    def __post_init__(self) -> None:
        for name in ("crop_box", "exposure_target"):  # a list from JSON
            if isinstance(getattr(self, name), list | tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = self._problems()
        if problems:
            msg = "invalid ModelConfig: " + "; ".join(problems)
            raise ValueError(msg)
        for name in ("width_mult", "skip_dropout", "topk_fraction"):  # ints from JSON become floats
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("crop_box", "exposure_target"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def _problems(self) -> list[str]:
        p: list[str] = []
        if self.family not in FAMILIES:
            p.append(f"family must be one of {', '.join(FAMILIES)} (got {self.family!r})")
        if not _is_int(self.image_size) or self.image_size not in IMAGE_SIZES:
            sizes = ", ".join(map(str, IMAGE_SIZES))
            p.append(f"image_size must be one of {sizes} (got {self.image_size!r}); pick the nearest one")
        if not _is_int(self.channels) or self.channels not in CHANNELS:
            p.append(f"channels must be 1 (grayscale) or 3 (RGB) (got {self.channels!r})")
        if not _is_int(self.latent_dim) or self.latent_dim < 1:
            p.append(f"latent_dim must be a positive int (got {self.latent_dim!r})")
        if not _is_int(self.base_width) or self.base_width < 1:
            p.append(f"base_width must be a positive int (got {self.base_width!r})")
        if not _is_number(self.width_mult) or not (0 < self.width_mult <= 16):
            p.append(f"width_mult must be a number in (0, 16] (got {self.width_mult!r}); e.g. 0.25 for a light model")
        if not isinstance(self.spectral_norm, bool):
            p.append(f"spectral_norm must be true or false (got {self.spectral_norm!r})")
        if not isinstance(self.self_attention, bool):
            p.append(f"self_attention must be true or false (got {self.self_attention!r})")
        if self.image_size in IMAGE_SIZES:  # the number of skips depends on a valid size
            n = self.max_skip_levels
            if self.skip_levels != "all" and (not _is_int(self.skip_levels) or not 0 <= self.skip_levels <= n):
                p.append(
                    f"skip_levels must be 'all' or an int from 0 to {n} (the U-Net at {self.image_size} px has"
                    f" {n} skip connections; the int counts the coarsest ones kept) (got {self.skip_levels!r})"
                )
        if not _is_number(self.skip_dropout) or not 0 <= self.skip_dropout < 1:
            p.append(f"skip_dropout must be a probability in [0, 1) (got {self.skip_dropout!r})")
        k = self.map_smoothing
        if k is not None and (not _is_int(k) or k < 1 or k % 2 == 0):
            p.append(f"map_smoothing must be an odd positive int (1 = no smoothing) or null for auto (got {k!r})")
        elif k is not None and _is_int(self.image_size) and k > self.image_size:
            p.append(f"map_smoothing ({k}) must not exceed image_size ({self.image_size})")
        d = self.map_smoothing_divisor
        if not _is_int(d) or d < 1:
            p.append(f"map_smoothing_divisor must be a positive int (auto filter = image_size // it) (got {d!r})")
        if self.score_reduction not in SCORE_REDUCTIONS:
            options = ", ".join(SCORE_REDUCTIONS)
            p.append(f"score_reduction must be one of {options} (got {self.score_reduction!r})")
        if not _is_number(self.topk_fraction) or not 0 < self.topk_fraction <= 1:
            p.append(f"topk_fraction must be in (0, 1] (got {self.topk_fraction!r}); 0.01 = the top 1% of pixels")
        if self.residual not in RESIDUALS:
            p.append(f"residual must be one of {', '.join(RESIDUALS)} (got {self.residual!r})")
        if not isinstance(self.discriminator_map, bool):
            p.append(f"discriminator_map must be true or false (got {self.discriminator_map!r})")
        mw = self.map_base_width
        if mw is not None and (not _is_int(mw) or mw < 1):
            p.append(f"map_base_width must be a positive int or null for auto (got {mw!r})")
        if not isinstance(self.map_attention, bool):
            p.append(f"map_attention must be true or false (got {self.map_attention!r})")
        elif self.map_attention and self.discriminator_map is not True:
            p.append("map_attention needs discriminator_map=true (it is a block of the map discriminator)")
        if self.map_source not in MAP_SOURCES:
            p.append(f"map_source must be one of {', '.join(MAP_SOURCES)} (got {self.map_source!r})")
        elif self.map_source not in ("auto", "residual") and self.discriminator_map is not True:
            p.append(f"map_source {self.map_source!r} needs discriminator_map=true (or use map_source 'residual')")
        if self.resize not in RESIZE_MODES:
            p.append(f"resize must be one of {', '.join(RESIZE_MODES)} (got {self.resize!r})")
        if self.align not in ALIGN_MODES:
            p.append(f"align must be one of {', '.join(ALIGN_MODES)} (got {self.align!r})")
        if not isinstance(self.position_statistics, bool):
            p.append(f"position_statistics must be true or false (got {self.position_statistics!r})")
        if self.roi not in ROI_MODES:
            p.append(f"roi must be one of {', '.join(ROI_MODES)} (got {self.roi!r})")
        if self.crop not in CROP_MODES:
            p.append(f"crop must be one of {', '.join(CROP_MODES)} (got {self.crop!r})")
        box = self.crop_box
        if not (isinstance(box, tuple) and len(box) == 2 and all(_is_number(v) and 0 < v <= 1 for v in box)):
            p.append(f"crop_box must be two shares of the aligned frame in (0, 1], width and height (got {box!r})")
        elif box != (1.0, 1.0) and self.align == "none":
            p.append(f"crop_box {box} crops the aligned frame: it needs align 'principal-axis'")
        if self.exposure not in EXPOSURE_MODES:
            p.append(f"exposure must be one of {', '.join(EXPOSURE_MODES)} (got {self.exposure!r})")
        t = self.exposure_target
        pair = isinstance(t, tuple) and len(t) == 2 and all(_is_number(v) for v in t)
        if not (pair and 0 < t[0] < 1 and 0 < t[1] <= 0.5):
            p.append(f"exposure_target must be a mean in (0, 1) and a std in (0, 0.5] of 0-1 pixels (got {t!r})")
        return p

    # ----------------------------------------------------------------- derived values
    @property
    def effective_width(self) -> int:
        """Channels of the finest layers: round(base_width * width_mult), at least `MIN_WIDTH`."""
        return max(MIN_WIDTH, round(self.base_width * self.width_mult))

    def width_at(self, resolution: int) -> int:
        """Channels of a feature map at `resolution`: doubles per halving, up to 8x the effective width."""
        factor = min(MAX_WIDTH_FACTOR, self.image_size // (2 * resolution))
        return self.effective_width * max(1, factor)

    @property
    def num_stages(self) -> int:
        """Stride-2 stages between the image and the 4x4 bottleneck (4 at 64 px, 5 at 128 px)."""
        return int(math.log2(self.image_size)) - 2

    @property
    def max_skip_levels(self) -> int:
        """Skip connections of the full U-Net: one per resolution from image_size // 2 down to 8."""
        return self.num_stages - 1

    @property
    def skip_resolutions(self) -> tuple[int, ...]:
        """Resolutions whose U-Net skip connection is kept, coarsest first."""
        n = self.max_skip_levels if self.skip_levels == "all" else int(self.skip_levels)
        return tuple(8 * 2**i for i in range(n))

    @property
    def attention_resolution(self) -> int:
        """Resolution of the self-attention block (when `self_attention` is on)."""
        return min(MAX_ATTENTION_RESOLUTION, self.image_size // 4)

    @property
    def smoothing_kernel(self) -> int:
        """The box-filter size actually used on the maps (resolves `map_smoothing=None`)."""
        if self.map_smoothing is not None:
            return self.map_smoothing
        return (self.image_size // self.map_smoothing_divisor) | 1  # odd, so the filter is centred

    @property
    def map_width(self) -> int:
        """Channels of the map discriminator's finest layer (resolves `map_base_width=None`)."""
        if self.map_base_width is not None:
            return max(MIN_WIDTH, self.map_base_width)
        return max(MIN_WIDTH, self.effective_width // 2)

    @property
    def exposure_standard(self) -> tuple[float, float] | None:
        """The (mean, std) every image is brought to before the model sees it, or None (as it comes)."""
        return self.exposure_target if self.exposure == "standardise" else None

    @property
    def anomaly_map_source(self) -> str:
        """What the exported anomaly map is (resolves `map_source="auto"`)."""
        if self.map_source == "auto":
            return "discrimination" if self.discriminator_map else "residual"
        return self.map_source

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (the box as a list, as JSON reads it); `from_dict` rebuilds an
        equal config."""
        return {**asdict(self), "crop_box": list(self.crop_box), "exposure_target": list(self.exposure_target)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict()` output; missing keys take defaults, unknown keys are an error."""
        if not isinstance(data, Mapping):
            msg = f"ModelConfig.from_dict needs a mapping, got {type(data).__name__}"
            raise TypeError(msg)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            msg = (
                f"unknown ModelConfig keys: {', '.join(map(str, unknown))} (known keys: {', '.join(known)});"
                " was this config written by a newer anoscope, or misspelt?"
            )
            raise ValueError(msg)
        return cls(**data)
