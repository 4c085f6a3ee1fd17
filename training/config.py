"""`TrainConfig`: every choice of one training run, in one frozen dataclass, and its command line.

The CLI flags are generated from the dataclass fields (one flag per field, `--image-size` for
`image_size`), so a new field is a new flag with no second place to edit. The nested `ModelConfig`
(owned by `models/`) and `CorruptionConfig` contribute their fields the same way; `family` is spelt
`--model` and corruption fields carry a `corruption-` prefix. `resolved()` fills the family-dependent
defaults (learning rates), and the resolved config is what `config.json` and checkpoints hold.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Literal

from models import ModelConfig
from training.corruption import CORRUPTIONS, CorruptionConfig

RECIPES = ("corruption", "paper")
GAN_LOSSES = ("bce", "hinge")
DEVICES = ("auto", "cpu", "cuda")

#: Family defaults for the two-time-scale update rule (TTUR, Heusel et al. 2017): AnoGAN's DCGAN is
#: trained with a faster discriminator; Skip-GANomaly's paper uses 2e-4 for both.
DEFAULT_LRS = {"anogan": (1e-4, 4e-4), "skipganomaly": (2e-4, 2e-4)}

#: Fields a resumed run may change: they decide how long and where it runs, not what it learns.
RESUMABLE_OVERRIDES = frozenset(
    {"epochs", "time_budget_s", "device", "amp", "channels_last", "num_workers", "threads", "progress"}
)


def _f(default: Any, help: str, *, metavar: str | None = None, shown: str | None = None) -> Any:
    """A field with its CLI help; `shown` replaces the displayed default (e.g. "required")."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "shown": shown})


@dataclass(frozen=True)
class TrainConfig:
    """One training run; validated on construction. `None` means "choose for me" (see `resolved`)."""

    data: str = _f(
        "",
        "folder of normal images, or an MVTec category root (its train/good is used)",
        metavar="DIR",
        shown="required unless --resume",
    )
    out: str = _f(
        "",
        "run directory: config.json, losses.csv, samples/, checkpoints/, normalization.json",
        metavar="RUN_DIR",
        shown="required",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: Literal["corruption", "paper"] = _f(
        "corruption",
        "Skip-GANomaly recipe: 'corruption' restores inputs with pasted rectangles (clean image as target), "
        "'paper' is plain reconstruction (the paper's recipe; the generator learns to copy defects)",
    )
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    epochs: int = _f(
        15,
        "stop after this many epochs in total (all phases, across resumes); with --time-budget and the "
        "recommended settings, the budget alone decides unless --epochs is given",
    )
    time_budget_s: float | None = _f(
        None,
        "stop after this many seconds of training in total (across resumes), even mid-epoch",
        metavar="SECONDS",
        shown="no limit",
    )
    batch_size: int = _f(16, "images per optimisation step")
    lr_g: float | None = _f(None, "generator learning rate (default: 1e-4 AnoGAN, 2e-4 Skip-GANomaly)")
    lr_d: float | None = _f(None, "discriminator learning rate (default: 4e-4 AnoGAN (TTUR), 2e-4 Skip-GANomaly)")
    lr_e: float = _f(1e-4, "AnoGAN encoder learning rate (phase 2)")
    lr_m: float = _f(2e-4, "map discriminator learning rate (with --discriminator-map)")
    lr_decay: float = _f(
        0.0,
        "share of each phase, at its end, over which every learning rate falls linearly to zero (pix2pix and "
        "CycleGAN's schedule; 0 = constant); the phase's length is its epochs or its time budget, whichever "
        "ends first",
    )
    weight_average: float = _f(
        0.0,
        "validate, select and export an exponential moving average of the weights, with this time constant in "
        "epochs (0 = the live weights); training goes on with the live ones (docs/training.md)",
        metavar="EPOCHS",
    )
    betas: tuple[float, float] = _f((0.5, 0.999), "Adam betas for every optimiser (SAGAN uses 0.0 0.9)")
    w_adv: float = _f(1.0, "weight of the generator's adversarial loss")
    w_con: float = _f(40.0, "Skip-GANomaly: weight of the contextual L1 loss |G(x) - target|")
    w_lat: float = _f(1.0, "Skip-GANomaly: weight of the latent L2 loss between D features of target and G(x)")
    w_struct: float = _f(
        0.0,
        "weight of the structure loss, the mean MSGMS between reconstruction and target (edges and texture, "
        "RIAD), next to Skip-GANomaly's contextual loss and AnoGAN's encoder loss; 0 = off",
    )
    kappa: float = _f(1.0, "AnoGAN encoder: weight of the discriminator-feature residual (f-AnoGAN izi_f)")
    feature_matching: bool = _f(
        False, "generator's adversarial term matches mean D features of real and fake instead of fooling D"
    )
    gan_loss: Literal["bce", "hinge"] = _f("bce", "adversarial loss: non-saturating BCE or hinge")
    encoder_share: float = _f(
        0.3, "AnoGAN: share of the epochs and of the time budget given to encoder training (phase 2)"
    )
    val_fraction: float = _f(0.1, "share of the normal images held out for score statistics (split from --seed)")
    augment: bool = _f(False, "random horizontal flips of training images")
    rotate: bool = _f(
        False,
        "random quarter turns of training images, for parts fed at any angle (with --augment: all eight "
        "views); it hurt where every image is taken one way up (docs/quality.md)",
    )
    lighting_drift: float = _f(
        0.0,
        "global illumination change of training images as normal variation: gain 1 +- s and offset +- s/2 of "
        "the range per image (0 = off); the label-free selection also scores the validation normals relit so",
    )
    seed: int = _f(0, "seeds the split, initialisation, batch order, corruption and sampling")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = CUDA when present, else CPU")
    amp: bool | None = _f(None, "mixed precision (default: on with CUDA, off on CPU)")
    channels_last: bool | None = _f(None, "channels-last memory format (default: on; faster on CPU and GPU)")
    num_workers: int = _f(0, "threads decoding images into the in-memory cache (0 = up to 4)")
    threads: int = _f(0, "CPU threads for PyTorch (0 = PyTorch's default; 1 is often faster on a busy, shared machine)")
    skip_bad_images: bool = _f(False, "warn about and skip unreadable image files instead of stopping")
    score_weight_residual: float = _f(1.0, "weight of the z-scored residual score in the combined score")
    score_weight_discrimination: float = _f(0.0, "weight of the z-scored discrimination score in the combined score")
    select_weights: bool = _f(
        False,
        "choose the score weights each epoch on synthetic defects pasted on the validation normals "
        "(label-free; replaces --score-weight-*; see docs/quality.md)",
    )
    select_map: bool = _f(
        False,
        "with --discriminator-map: choose the exported anomaly map (discrimination, mean or residual) each epoch "
        "by its pixel AUROC on the same synthetic defects (replaces --map-source)",
    )
    select_checkpoint: bool = _f(
        False,
        "keep the epoch with the best label-free selection score as checkpoints/best.pt, which export uses",
    )
    select_defects: int = _f(
        0,
        "with label-free selection: at least this many synthetic defective images, made as several copies of "
        "each validation normal, each with its own defects (0 = one copy per normal)",
    )
    select_margin: float = _f(
        0.0,
        "with --select-weights: keep both scores (1/1) unless another weighting's synthetic AUROC is higher by "
        "more than this many standard errors of the difference (DeLong; 1.645 = one-sided 95%%; 0 = the plain "
        "maximum)",
    )
    select_from: float = _f(
        0.0,
        "with label-free selection: score only the exported phase's epochs (AnoGAN: the encoder phase) from "
        "this share of that phase on, measured like --lr-decay (0 = every epoch of every phase); the "
        "selection saves its time on epochs it would not choose",
    )
    progress: bool = _f(True, "show a progress bar with live losses")

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        if isinstance(self.corruption, Mapping):
            object.__setattr__(self, "corruption", CorruptionConfig.from_dict(self.corruption))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = self._problems()
        if problems:
            msg = "invalid training config: " + "; ".join(problems)
            raise ValueError(msg)

    def _problems(self) -> list[str]:
        p: list[str] = []
        if self.recipe not in RECIPES:
            p.append(f"recipe must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        if self.gan_loss not in GAN_LOSSES:
            p.append(f"gan_loss must be one of {', '.join(GAN_LOSSES)} (got {self.gan_loss!r})")
        if self.device not in DEVICES:
            p.append(f"device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.epochs < 1:
            p.append(f"epochs must be at least 1 (got {self.epochs}); use --time-budget to stop on time")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            p.append(f"time_budget_s must be positive (got {self.time_budget_s})")
        if self.batch_size < 1:
            p.append(f"batch_size must be at least 1 (got {self.batch_size})")
        for name in ("lr_g", "lr_d", "lr_e", "lr_m"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                p.append(f"{name} must be positive (got {value})")
        if self.weight_average < 0:
            p.append(f"weight_average must be >= 0 epochs (got {self.weight_average}); 0 turns the average off")
        if not 0 <= self.lr_decay <= 1:
            p.append(f"lr_decay must be in [0, 1] (got {self.lr_decay}); 0.5 decays over the second half")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(f"betas must be two numbers in [0, 1) (got {self.betas})")
        for name in ("w_adv", "w_con", "w_lat", "w_struct", "kappa"):
            if getattr(self, name) < 0:
                p.append(f"{name} must not be negative (got {getattr(self, name)})")
        if not 0 < self.encoder_share < 1:
            p.append(f"encoder_share must be in (0, 1) (got {self.encoder_share}); 0.3 gives the encoder 30%")
        if not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if not 0 <= self.lighting_drift < 1:
            p.append(f"lighting_drift must be in [0, 1) (got {self.lighting_drift}); 0.15 = gain 0.85-1.15")
        if not 0 <= self.select_from < 1:
            p.append(f"select_from must be in [0, 1) (got {self.select_from}); 0.5 scores the second half")
        if self.select_margin < 0:
            p.append(f"select_margin must not be negative (got {self.select_margin}); 1.645 = one-sided 95%")
        if self.select_defects < 0:
            p.append(f"select_defects must not be negative (got {self.select_defects})")
        if self.threads < 0:
            p.append(f"threads must not be negative (got {self.threads})")
        if self.num_workers < 0:
            p.append(f"num_workers must not be negative (got {self.num_workers})")
        if self.score_weight_residual == 0 and self.score_weight_discrimination == 0:
            p.append("score weights must not both be 0")
        return p

    # ----------------------------------------------------------------- derived values
    def resolved(self) -> TrainConfig:
        """A copy with the family-dependent defaults filled in (the config a run records)."""
        lr_g, lr_d = DEFAULT_LRS[self.model.family]
        return replace(
            self,
            lr_g=self.lr_g if self.lr_g is not None else lr_g,
            lr_d=self.lr_d if self.lr_d is not None else lr_d,
        )

    def phase_epochs(self) -> dict[str, int]:
        """Epochs per phase: Skip-GANomaly has one phase; AnoGAN splits `epochs` by `encoder_share`."""
        if self.model.family != "anogan":
            return {"gan": self.epochs}
        if self.epochs < 2:
            return {"gan": 1, "encoder": 1}
        encoder = min(self.epochs - 1, max(1, int(self.epochs * self.encoder_share + 0.5)))  # half up
        return {"gan": self.epochs - encoder, "encoder": encoder}

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (nested model and corruption dicts); `from_dict` rebuilds an equal config."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            msg = f"unknown TrainConfig keys: {', '.join(unknown)}; was this run written by a newer anoscope?"
            raise ValueError(msg)
        return cls(**dict(data))


#: Recommended settings per family: what `anoscope train` (and so `anoscope bench`) uses where no flag
#: says otherwise, chosen from the measurements in docs/quality.md. Same layout as `given_fields`. They
#: are applied over the dataclass defaults rather than being those defaults, because ModelConfig's
#: defaults must keep rebuilding checkpoints written before these options existed, and `TrainConfig()`
#: stays the plain baseline for programmatic use (tests, the paper ablation).
_QUALITY: dict[str, Any] = {
    # align "auto": a part at any angle on a plain background is turned to one pose, anything else left as
    # it is; roi "auto": such a part (at any angle or not) is scored only where it lies, plus a margin;
    # crop "auto": an aligned long thin part is cropped to its box, so it fills the input; exposure
    # "auto": images are brought to one brightness and contrast where the normals' own exposure varies
    # beyond what the lighting drift covers. All four are decided from the training normals
    # (docs/training.md, "Parts at any angle", "A long part fills the input", "Where a defect counts",
    # "Good images at different exposures").
    "model": {
        "width_mult": 0.25,
        "discriminator_map": True,
        "position_statistics": True,
        "align": "auto",
        "roi": "auto",
        "crop": "auto",
        "exposure": "auto",
        # 64 px: a CPU budget fits three to four times the epochs of 128 px, which found defects as well
        # or better on every category in both families and mapped large regions better (docs/quality.md,
        # "A smaller input in the same budget"); defects under 1/64 of the side need a larger input.
        "image_size": 64,
    },
    "corruption": {
        "kinds": ["patch", "colour", "perlin", "line", "spot", "stain"],
        "clean_fraction": 0.2,
        "cross_border": True,
    },
    "select_weights": True,
    "select_map": True,
    "select_checkpoint": True,
    "epochs": 100,
    "lighting_drift": 0.15,
    "lr_decay": 0.5,
    "select_from": 0.5,
    "select_defects": 100,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # The U-Net reconstructs sharply enough for a structural residual and loss to pay (docs/quality.md,
    # "Structure-aware residuals"); AnoGAN's DCGAN reconstruction is too coarse for either. Without its
    # skip connections the generator cannot pass a defect straight to its output, and at equal epochs it
    # found defects better on every real-data run measured ("Limiting what the skips copy").
    "skipganomaly": {
        **_QUALITY,
        "model": {**_QUALITY["model"], "residual": "l1+msgms", "skip_levels": 0},
        "w_struct": 40.0,
    },
    "anogan": {**_QUALITY, "encoder_share": 0.5},
}


def _recommended_text(name: str, section: str | None = None) -> str | None:
    """'skipganomaly X, anogan Y' for a field some family overrides, else None. Every family is named,
    also one that keeps the plain default, so `--help` never leaves a family's value to be guessed."""
    if not any(name in (over.get(section, {}) if section else over) for over in FAMILY_DEFAULTS.values()):
        return None
    parts = []
    for family in FAMILY_DEFAULTS:
        config = recommended(family)
        value = getattr(getattr(config, section) if section else config, name)
        parts.append(f"{family} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return ", ".join(parts)


# ====================================================================== command line
#: Field name -> flag name where the generated one would read badly.
FLAG_NAMES = {"family": "model", "time_budget_s": "time-budget"}
#: Help for ModelConfig's fields (models/ documents them in comments, which are not visible at runtime).
MODEL_HELP = {
    "family": "detector family",
    "image_size": "side of the square model input; images are resized to it",
    "channels": "1 = grayscale, 3 = RGB (images are converted)",
    "latent_dim": "AnoGAN: size of the latent code z",
    "base_width": "channels of the finest layers before --width-mult",
    "width_mult": "multiplies --base-width; e.g. 0.25 for a light model",
    "spectral_norm": "spectral normalisation in the discriminator",
    "self_attention": "a SAGAN self-attention block at a middle resolution",
    "skip_levels": "Skip-GANomaly: 'all' or how many of the coarsest U-Net skips to keep",
    "skip_dropout": "Skip-GANomaly: dropout probability on skip connections while training",
    "map_smoothing": "odd box-filter size for the anomaly maps; 1 = none; 'auto' = image_size // "
    "--map-smoothing-divisor, made odd",
    "map_smoothing_divisor": "the auto --map-smoothing as a share of the image: image_size // this (made odd)",
    "score_reduction": "how the anomaly map becomes residual_score: max, mean or topk",
    "topk_fraction": "share of pixels the 'topk' reduction averages",
    "residual": "per-pixel residual: l1, l2, msgms (multi-scale gradient-magnitude similarity: structure, "
    "not intensity) or l1+msgms (their mean)",
    "discriminator_map": "a map discriminator that sees the image and its reconstruction and is trained to flag "
    "synthetic defects per pixel; its map gives the discrimination score",
    "map_source": "the exported anomaly map: residual, discrimination (map), their mean, or auto "
    "(the discrimination map when there is one)",
    "map_base_width": "channels of the map discriminator's finest layer; 'auto' = half the effective width",
    "map_attention": "a self-attention block at the map discriminator's bottleneck, so each place is compared "
    "with the rest of the image (cheap: S/16 positions a side)",
    "resize": "how images become square inputs: squash (resize) or tiles (an image 1.5:1 or longer is cut into "
    "square tiles along its long side, scored one by one; docs/training.md)",
    "align": "how each image is posed first: none; principal-axis (the part on a plain background is turned "
    "and centred to one pose, for parts fed at any angle; maps are turned back); or auto (chosen once from the "
    "training normals: principal-axis for an elongated part at varying angles clear of the frame, else none; "
    "docs/training.md)",
    "position_statistics": "score each map against per-pixel statistics of the training normals' maps (fitted "
    "after training): residual that good parts leave at the same place every time stops deciding the score",
    "roi": "where defects count: none (everywhere); part (only where the part lies in the training normals, "
    "plus a margin; fitted after training, maps are zero elsewhere); or auto (chosen once from the training "
    "normals: part for a part on a plain background clear of the frame, else none; docs/training.md)",
    "crop": "with alignment, crop the aligned frame to the part before resizing it to the square input: none; "
    "part (the box about the centre that holds every training normal's part, plus a margin); or auto (part "
    "where that box keeps at most 80%% of the frame, e.g. a long thin part; chosen once from the training "
    "normals; docs/training.md)",
    "crop_box": "the share of the aligned frame's width and height the model sees; set by training from --crop "
    "(give it with --crop none to crop by hand)",
    "exposure": "bring every image to one brightness and contrast before the model sees it: none; standardise "
    "(shift and scale each image's pixels to the training normals' median mean and std); or auto (standardise "
    "where the normals' own brightness or contrast varies by more than 15%%; chosen once from the training "
    "normals; docs/training.md)",
    "exposure_target": "the mean and std of 0-1 pixels 'standardise' brings images to; measured by training "
    "on the normals (their medians) whenever it standardises, so a value given here is replaced",
}
_NONE_WORDS = ("none", "auto", "null")


def _converter(tp: Any, name: str) -> tuple[Any, list[str] | None, str]:
    """(type function, choices, metavar) for one annotated field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = list(typing.get_args(tp))
        return type(values[0]), [str(v) for v in values], ""
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(members) < len(typing.get_args(tp))
        convs = [_converter(m, name) for m in members]

        def convert(text: str) -> Any:
            if allows_none and text.lower() in _NONE_WORDS:
                return None
            for fn, choices, _ in convs:
                try:
                    value = fn(text)
                except (TypeError, ValueError):
                    continue
                if choices is None or str(value) in choices:
                    return value
            msg = f"invalid value {text!r} for --{name}"
            raise argparse.ArgumentTypeError(msg)

        words = [c for _, choices, _ in convs for c in (choices or [])]
        kinds = [fn.__name__.upper() for fn, choices, _ in convs if choices is None]
        return convert, None, "|".join(kinds + words + (["auto"] if allows_none else []))
    if tp in (int, float, str):
        return tp, None, tp.__name__.upper()
    msg = f"no command-line converter for field {name!r} of type {tp!r}"
    raise TypeError(msg)


def _add_field(
    group: argparse._ArgumentGroup,
    f: Any,
    tp: Any,
    default: Any,
    help_text: str,
    prefix: str = "",
    recommended_text: str | None = None,
) -> None:
    flag = "--" + prefix + FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
    dest = (prefix.replace("-", "_") + f.name) if prefix else f.name
    shown = f.metadata.get("shown")
    if shown is None:
        shown = "auto" if default is None else (" ".join(map(str, default)) if isinstance(default, tuple) else default)
    if recommended_text:
        shown = f"{recommended_text}; plain config: {shown}"
    if "default:" not in help_text:  # some help texts say the default themselves
        help_text = f"{help_text} (default: {shown})"
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp)):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        return
    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)
        group.add_argument(flag, type=elem[0], nargs=len(elem), metavar=elem[0].__name__.upper(), **kw)
        return
    convert, choices, metavar = _converter(tp, f.name)
    if choices is not None:
        group.add_argument(flag, type=convert, choices=typing.get_args(tp), **kw)
    else:
        group.add_argument(flag, type=convert, metavar=f.metadata.get("metavar") or metavar or None, **kw)


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _sequence_type(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of TrainConfig, ModelConfig and CorruptionConfig (defaults shown, not set)."""
    hints = typing.get_type_hints(TrainConfig)
    run = parser.add_argument_group("run")
    model = parser.add_argument_group("model (see models/config.py)")
    train = parser.add_argument_group("training")
    corruption = parser.add_argument_group("corruption recipe (Skip-GANomaly --recipe corruption)")
    run_fields = {"data", "out", "epochs", "time_budget_s", "device", "amp", "channels_last", "num_workers", "threads"}
    run_fields |= {"seed", "skip_bad_images", "progress"}
    for f in fields(TrainConfig):
        if f.name == "model":
            model_hints = typing.get_type_hints(ModelConfig)
            for mf in fields(ModelConfig):
                help_text = MODEL_HELP.get(mf.name, "model option (see models/config.py)")
                rec = _recommended_text(mf.name, "model")
                _add_field(model, mf, model_hints[mf.name], _default(mf), help_text, recommended_text=rec)
        elif f.name == "corruption":
            c_hints = typing.get_type_hints(CorruptionConfig)
            for cf in fields(CorruptionConfig):
                tp = c_hints[cf.name]
                rec = _recommended_text(cf.name, "corruption")
                if _sequence_type(tp):  # tuple[str, ...]: a list of words
                    shown = f"{rec}; plain config: {' '.join(_default(cf))}" if rec else " ".join(_default(cf))
                    corruption.add_argument(
                        "--corruption-" + cf.name.replace("_", "-"),
                        dest="corruption_" + cf.name,
                        nargs="+",
                        metavar="KIND",
                        default=argparse.SUPPRESS,
                        help=f"{cf.metadata.get('help', '')}, from: {', '.join(sorted(CORRUPTIONS))} "
                        f"(default: {shown})",
                    )
                else:
                    _add_field(corruption, cf, tp, _default(cf), cf.metadata.get("help", ""), "corruption-", rec)
        else:
            group = run if f.name in run_fields else train
            rec = _recommended_text(f.name)
            _add_field(group, f, hints[f.name], _default(f), f.metadata.get("help", ""), recommended_text=rec)


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave, grouped like `TrainConfig.to_dict()` (nested model/corruption)."""
    given = vars(args)
    model_names = {f.name for f in fields(ModelConfig)}
    out: dict[str, Any] = {}
    model: dict[str, Any] = {}
    corruption: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name in given and f.name not in ("model", "corruption"):
            out[f.name] = given[f.name]
    for name in model_names:
        if name in given:
            model[name] = given[name]
    for f in fields(CorruptionConfig):
        if "corruption_" + f.name in given:
            corruption[f.name] = given["corruption_" + f.name]
    if model:
        out["model"] = model
    if corruption:
        out["corruption"] = corruption
    return out


def _apply(base: TrainConfig, given: Mapping[str, Any]) -> TrainConfig:
    d = base.to_dict()
    for key, value in given.items():
        if key in ("model", "corruption"):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return TrainConfig.from_dict(d)


def recommended(family: str = "skipganomaly") -> TrainConfig:
    """The dataclass defaults with `FAMILY_DEFAULTS[family]` applied: what `anoscope train` starts from."""
    if family not in FAMILY_DEFAULTS:
        msg = f"no recommended settings for family {family!r}; use one of {', '.join(FAMILY_DEFAULTS)}"
        raise ValueError(msg)
    return _apply(TrainConfig(model=ModelConfig(family=family)), FAMILY_DEFAULTS[family])  # type: ignore[arg-type]


#: The recommended settings' epoch cap when a time budget is given without --epochs: high enough that
#: the budget decides. The fixed cap of 100 stopped AnoGAN on bottle after 272 s of a 600-s budget on
#: a fast host, and letting it train the whole budget raised its image AUROC there (docs/quality.md,
#: "Let the time budget decide").
BUDGET_EPOCHS = 10_000


def config_from_given(given: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply `given` (as from `given_fields`) over `base` (default: the recommended settings of the given
    family, `recommended(family)`, whose epoch cap becomes `BUDGET_EPOCHS` when `given` has a time
    budget and no epochs: who gives a budget expects it to be used)."""
    if base is None:
        family = given.get("model", {}).get("family", ModelConfig().family)
        base = recommended(family) if family in FAMILY_DEFAULTS else TrainConfig()  # a bad family fails below
        if given.get("time_budget_s") is not None and "epochs" not in given:
            base = replace(base, epochs=BUDGET_EPOCHS)
    return _apply(base, given)
