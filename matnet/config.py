"""MatNetConfig: architecture, likelihood and training hyper-parameters, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "logistic_mixture")


def _type_ok(v: Any, tp: Any) -> bool:
    """Whether `v` fits the annotation `tp` (ints pass as floats, bools never pass as numbers)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, a) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(x, args[0]) for x in v)
        return len(v) == len(args) and all(_type_ok(x, a) for x, a in zip(v, args))
    if origin in (list, dict):
        return isinstance(v, origin)
    return not isinstance(tp, type) or isinstance(v, tp)  # other annotation forms are not checked


def check_field_types(obj: Any) -> None:
    """Raise ValueError naming the first dataclass field of `obj` whose value has the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not _type_ok(v, hints[f.name]):
            hint = hints[f.name]  # "tuple[float, float]", not "tuple", where the length or items are wrong
            want = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ValueError(f"{f.name} must be {want}, got {v!r} ({type(v).__name__})")


@dataclass
class MatNetConfig:
    # data
    dataset: str = "mnist"
    image_channels: int = 1
    image_size: int = 28
    likelihood: str = "bernoulli"
    # architecture (section 2.2). Meta modules are listed top-down: the first is the coarsest.
    modules_per_scale: tuple[int, ...] = (5, 5)
    stem_downsample: int = 1  # stride-2 stages between the image and the finest meta module
    channels: int = 32
    scale_channels: tuple[int, ...] = ()  # channels of each meta module, top-down; () = `channels` at every scale
    stem_channels: int = 0  # channels of the stem and output stages finer than the finest meta module (needs
    #   stem_downsample > 0: the original's 28x28 stage); 0 = the finest meta module's channels
    z_channels: int = 4  # latent channels per stochastic module
    nz0: int = 32  # size of the top latent z0
    fc_width: int = 128
    kernel_size: int = 3
    slope: float = 0.1
    # fully-connected MatNet: every module works on vectors (1x1 maps, 1x1 kernels)
    fully_connected: bool = False
    fc_modules: int = 4  # stochastic modules after z0 in a fully-connected MatNet
    fc_update: str = "gru"  # "gru" (stochastic GRU-style updates) or "residual"
    # output distribution and the autoregressive reconstruction of section 2.3
    n_mixtures: int = 10
    ar_layers: int = 0  # 0 disables; the paper uses about five masked convs
    ar_channels: int = 32
    min_log_scale: float = -7.0
    # initialisation and output scaling of the original Theano code (0 = off: this library's defaults)
    ortho_init_gain: float = 0.0  # > 0: orthogonal weights with this gain and zero biases (original: 1.1)
    latent_scale: float = 0.0  # > 0: a trainable scalar, initialised to this, multiplies every latent mean and
    #   log-variance (priors and posteriors, z0 included), one per model (per stage of a conditional one)
    logit_clip: float = 0.0  # > 0: Bernoulli logits clamped to [-logit_clip, logit_clip] (original: 15)
    binarize: str = "auto"  # binary datasets: "dynamic" (fresh draws), "fixed" (one seeded draw per image,
    #   matnet.data.FIXED_BINARIZE_SEED) or "auto" (the dataset's default: dynamic)
    # training (this library's paper-spec defaults; the *_orig presets carry the original Theano code's, see README)
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay_start: float = 0.5  # fraction of steps at constant lr before linear decay
    lr_final: float = 0.0  # fraction of lr reached at the last step
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 200.0  # max grad norm; with separate_adams, of each parameter group
    separate_adams: bool = False  # generator and inference parameters in two Adam groups, clipped separately
    l2_penalty: float = 0.0  # loss += l2_penalty * sum of squares of every parameter (biases included)
    lr_schedule: str = "linear"  # "linear": constant for lr_decay_start of the steps, then linear to lr_final;
    #   "epochs": the original's, halved after each epoch of lr_halve_epochs, linear to 0 from lr_linear_from_epoch
    steps_per_epoch: int = 0  # epoch length of the "epochs" schedule, in steps
    lr_halve_epochs: tuple[int, ...] = ()  # halve lr after these epochs (1-based: 5 = from the 6th epoch on)
    adam_beta1_target: float | None = None  # at each halving, beta1 moves halfway toward this (None: fixed)
    lr_linear_from_epoch: int = 0  # first epoch (1-based) of the linear decay to 0 at the run's end; 0: none
    skip_threshold: float = 0.0  # skip updates whose grad norm exceeds this (0 disables)
    kl_warmup_steps: int = 0
    ema_rate: float = 0.0  # 0 disables EMA weights
    steps: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)
    # conditional MatNets (Eq. 3, 4, 6) and the two-stage inpainting models of section 3 (matnet.conditional)
    stages: int = 1  # conditional MatNets in a chain; stage s > 1 reads stage s-1's guess at the missing pixels
    cond_fill: tuple[float, ...] = ()  # missing pixels' value before the networks see them: the training mean,
    #   one per channel or one for all; () = mid-range (0.5 binary, 0 for 8-bit) until `set_fill` sets it
    stage_recon_weight: float = 1.0  # loss weight of each earlier stage's own -log p(x^u | z, x^k); 0: the plain bound
    # the extensions of section 2.3: mixture prior on z0 (Eq. 12) and the inference regulariser (Eq. 13)
    prior: str = "normal"  # p(z0): "normal" (N(0, I)) or "gmm" (K learned Gaussians, uniform weights)
    prior_components: int = 50  # K of the "gmm" prior (the original used 50 on Omniglot)
    prior_entropy_weight: float = 0.0  # loss += this x mean entropy of q's component posteriors (original: 0.4)
    prior_refit_step: int = 0  # at this training step the components move to k-means clusters of q(z0 | x)'s
    #   means on training images (not in the paper; revives components Eq. 12 never reaches); 0: never
    infer_reg_weight: float = 0.0  # lambda of Eq. 13 on samples x ~ p(x), inference parameters only; 0 disables
    #   (each step then draws a batch from the model: with ar_layers > 0, one decoder pass per pixel)
    infer_reg_start: int = 0  # first training step at which Eq. 13 is applied

    def __post_init__(self) -> None:
        for name in ("modules_per_scale", "adam_betas", "scale_channels", "lr_halve_epochs"):  # JSON gives lists
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        check_field_types(self)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0, got {self.grad_clip}")
        if not self.skip_threshold >= 0:  # also rejects NaN; inf is fine (never skip on size)
            raise ValueError(f"skip_threshold must be >= 0 (0: off), got {self.skip_threshold}")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        for name in ("image_channels", "image_size", "channels", "z_channels", "nz0", "fc_width", "n_mixtures",
                     "batch_size", "fc_modules"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ar_layers and self.ar_channels < 1:  # unused without AR layers: older such configs still load
            raise ValueError(f"ar_channels must be >= 1, got {self.ar_channels}")
        for name in ("stem_downsample", "ar_layers", "steps", "kl_warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_decay_start", "lr_final"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"ema_rate must lie in [0, 1), got {self.ema_rate}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.likelihood == "bernoulli" and self.ar_layers and self.image_channels != 1:
            raise ValueError("the autoregressive decoder with a Bernoulli output needs 1 channel")
        if self.fc_update not in ("gru", "residual"):
            raise ValueError(f"fc_update must be 'gru' or 'residual', got {self.fc_update!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not (math.isfinite(self.slope) and self.slope >= 0):
            raise ValueError(f"slope must be a finite number >= 0 (leaky ReLU), got {self.slope}")
        if not math.isfinite(self.min_log_scale):
            raise ValueError(f"min_log_scale must be a finite number, got {self.min_log_scale}")
        if not self.fully_connected:
            if not self.modules_per_scale or min(self.modules_per_scale) < 1:
                raise ValueError(f"modules_per_scale needs positive counts, got {self.modules_per_scale}")
            div = 2 ** (self.stem_downsample + len(self.modules_per_scale) - 1)
            if self.image_size % div:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by {div} "
                    f"(stem_downsample={self.stem_downsample}, {len(self.modules_per_scale)} scales)"
                )
        if self.ar_layers and self.fully_connected:
            raise ValueError("the autoregressive decoder needs a convolutional MatNet (fully_connected=False)")
        if self.ar_layers and self.likelihood == "gaussian":
            raise ValueError("the autoregressive decoder needs a discrete likelihood")
        validate_conditional(self)
        validate_extensions(self)
        validate_original(self)

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        """Spatial size of each meta module, top-down (coarsest first)."""
        finest = self.image_size // 2**self.stem_downsample
        n = len(self.modules_per_scale)
        return tuple(finest // 2 ** (n - 1 - i) for i in range(n))

    @property
    def scale_widths(self) -> tuple[int, ...]:
        """Channels of each meta module, top-down (convolutional MatNets)."""
        return self.scale_channels or (self.channels,) * len(self.modules_per_scale)

    @property
    def stem_width(self) -> int:
        """Channels of the stem and output stages above the finest meta module's resolution."""
        return self.stem_channels or self.scale_widths[-1]

    @property
    def n_stochastic(self) -> int:
        """Number of stochastic modules, z0 included (columns of `out.kl`)."""
        return 1 + (self.fc_modules if self.fully_connected else sum(self.modules_per_scale))

    @property
    def data_dims(self) -> int:
        return self.image_channels * self.image_size**2

    def replace(self, **kw: Any) -> MatNetConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_per_scale"] = list(self.modules_per_scale)
        d["adam_betas"] = list(self.adam_betas)
        d["scale_channels"] = list(self.scale_channels)
        d["lr_halve_epochs"] = list(self.lr_halve_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MatNetConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MatNetConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def field_default(name: str, cls: type | None = None) -> Any:
    """A dataclass field's default value (of MatNetConfig unless `cls` is given)."""
    f = next(f for f in dataclasses.fields(cls or MatNetConfig) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def conditional_fields_set(cfg: MatNetConfig) -> list[str]:
    """The conditional-MatNet fields that differ from their defaults (they mean nothing to a density model)."""
    return [n for n in ("stages", "cond_fill", "stage_recon_weight") if getattr(cfg, n) != field_default(n)]


def validate_conditional(cfg: MatNetConfig) -> None:
    """Checks of the conditional-MatNet block (normalises cond_fill to a tuple of floats)."""
    if cfg.stages < 1:
        raise ValueError(f"stages must be >= 1, got {cfg.stages}")
    cfg.cond_fill = tuple(float(v) for v in cfg.cond_fill)
    if len(cfg.cond_fill) not in (0, 1, cfg.image_channels):
        raise ValueError(f"cond_fill needs 0, 1 or image_channels={cfg.image_channels} values, got {cfg.cond_fill}")
    lo, hi = (0.0, 1.0) if cfg.likelihood == "bernoulli" else (-1.0, 1.0)
    if not all(lo <= v <= hi for v in cfg.cond_fill):
        raise ValueError(f"cond_fill must lie in the data range [{lo}, {hi}], got {cfg.cond_fill}")
    if not (math.isfinite(cfg.stage_recon_weight) and cfg.stage_recon_weight >= 0):
        raise ValueError(f"stage_recon_weight must be a finite number >= 0, got {cfg.stage_recon_weight}")


def validate_extensions(cfg: MatNetConfig) -> None:
    """Checks of the section 2.3 block: mixture prior (Eq. 12) and inference regulariser (Eq. 13)."""
    if cfg.prior not in ("normal", "gmm"):
        raise ValueError(f"prior must be 'normal' or 'gmm', got {cfg.prior!r}")
    if cfg.prior_components < 1:
        raise ValueError(f"prior_components must be >= 1, got {cfg.prior_components}")
    for name in ("prior_entropy_weight", "infer_reg_weight"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    for name in ("prior_entropy_weight", "prior_refit_step", "prior_components"):
        if getattr(cfg, name) != field_default(name) and cfg.prior != "gmm":
            raise ValueError(f"{name} needs the mixture prior (prior='gmm')")
    if cfg.prior_refit_step < 0:
        raise ValueError(f"prior_refit_step must be >= 0, got {cfg.prior_refit_step}")
    if cfg.infer_reg_start < 0:
        raise ValueError(f"infer_reg_start must be >= 0, got {cfg.infer_reg_start}")


def validate_original(cfg: MatNetConfig) -> None:
    """Checks of the original code's options: per-scale widths, init, latent scale, logit clip, binarization,
    optimizer and epoch schedule."""
    if cfg.scale_channels:
        if cfg.fully_connected or len(cfg.scale_channels) != len(cfg.modules_per_scale):
            raise ValueError(f"scale_channels needs one width per meta module of a convolutional MatNet "
                             f"({len(cfg.modules_per_scale)}), got {cfg.scale_channels}")
        if min(cfg.scale_channels) < 1:
            raise ValueError(f"scale_channels must be >= 1, got {cfg.scale_channels}")
    if cfg.stem_channels < 0 or (cfg.stem_channels and (cfg.fully_connected or not cfg.stem_downsample)):
        raise ValueError(f"stem_channels must be 0, or >= 1 with stem_downsample > 0, got {cfg.stem_channels}")
    for name in ("ortho_init_gain", "latent_scale", "logit_clip", "l2_penalty"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {v}")
    if cfg.logit_clip and cfg.likelihood != "bernoulli":
        raise ValueError("logit_clip needs the bernoulli likelihood")
    if cfg.binarize not in ("auto", "dynamic", "fixed"):
        raise ValueError(f"binarize must be 'auto', 'dynamic' or 'fixed', got {cfg.binarize!r}")
    if cfg.binarize != "auto" and cfg.likelihood != "bernoulli":
        raise ValueError(f"binarize={cfg.binarize!r} needs the bernoulli likelihood")
    if not (math.isfinite(cfg.adam_eps) and cfg.adam_eps > 0):
        raise ValueError(f"adam_eps must be a finite number > 0, got {cfg.adam_eps}")
    if cfg.lr_schedule not in ("linear", "epochs"):
        raise ValueError(f"lr_schedule must be 'linear' or 'epochs', got {cfg.lr_schedule!r}")
    epochal = cfg.lr_halve_epochs or cfg.lr_linear_from_epoch or cfg.adam_beta1_target is not None
    if cfg.lr_schedule == "linear" and epochal:
        raise ValueError("lr_halve_epochs, lr_linear_from_epoch and adam_beta1_target need lr_schedule='epochs'")
    if cfg.lr_schedule == "epochs" and cfg.steps_per_epoch < 1:
        raise ValueError(f"lr_schedule='epochs' needs steps_per_epoch >= 1, got {cfg.steps_per_epoch}")
    if cfg.steps_per_epoch < 0 or cfg.lr_linear_from_epoch < 0 or any(e < 1 for e in cfg.lr_halve_epochs):
        raise ValueError("steps_per_epoch and lr_linear_from_epoch must be >= 0, lr_halve_epochs >= 1")
    if cfg.adam_beta1_target is not None and not 0.0 <= cfg.adam_beta1_target < 1.0:
        raise ValueError(f"adam_beta1_target must lie in [0, 1), got {cfg.adam_beta1_target}")


PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU; for tests and smoke runs
    "tiny": dict(
        modules_per_scale=(1, 2), channels=8, z_channels=2, nz0=4, fc_width=16, batch_size=16, steps=200
    ),
    # paper-spec: the paper's MNIST / Omniglot layout (Fig. 4 caption), FC top + 5 modules at 7x7 + 5 at 14x14,
    # with this library's widths (32 channels everywhere), default init and single Adam; not the original code's
    # settings, which are the *_orig presets below
    "mnist": dict(),
    "omniglot": dict(dataset="omniglot"),
    # the original Theano code (ModelBuilders.build_mnist_conv_res, TestMNIST_conv.py): 64 channels at 7x7 and
    # 14x14, 32 at 28x28, FC width 128; two Adams (b1 0.8 raised halfway to 0.95 at each halving, b2 0.98,
    # eps 1e-4), each clipped at 1000; L2 1e-5; lr 1e-3 halved after epochs 5, 15, 30, 60, 100, then linear to 0
    # over epochs 151-300 of 600 steps (60,000 fixed-binarized images / batch 100: train with --val-size 0);
    # orthogonal init (gain 1.1), latent means / log-variances x a trainable 0.2, logits clipped to +-15
    "mnist_orig": dict(
        channels=64, scale_channels=(64, 64), stem_channels=32, fc_width=128, binarize="fixed",
        batch_size=100, lr=1e-3, adam_betas=(0.8, 0.98), adam_eps=1e-4, separate_adams=True, grad_clip=1000.0,
        l2_penalty=1e-5, lr_schedule="epochs", steps_per_epoch=600, lr_halve_epochs=(5, 15, 30, 60, 100),
        adam_beta1_target=0.95, lr_linear_from_epoch=151, steps=300 * 600, ortho_init_gain=1.1,
        latent_scale=0.2, logit_clip=15.0,
    ),
    # Omniglot in the original: 128 / 64 / 32 channels, FC width 256, dynamic binarization, halvings after
    # epochs 10, 25, 50, 150 and 500 epochs, linear decay over the last half (251-500) as for MNIST; an epoch
    # is 243 steps (the 24,345 training images of chardata.mat / batch 100: train with --val-size 0)
    "omniglot_orig": dict(
        dataset="omniglot", channels=64, scale_channels=(128, 64), stem_channels=32, fc_width=256,
        binarize="dynamic", batch_size=100, lr=1e-3, adam_betas=(0.8, 0.98), adam_eps=1e-4, separate_adams=True,
        grad_clip=1000.0, l2_penalty=1e-5, lr_schedule="epochs", steps_per_epoch=243,
        lr_halve_epochs=(10, 25, 50, 150), adam_beta1_target=0.95, lr_linear_from_epoch=251, steps=500 * 243,
        ortho_init_gain=1.1, latent_scale=0.2, logit_clip=15.0,
    ),
    # FC top + meta modules at 8x8, 16x16, 32x32 with 2, 4, 4 modules; 8-bit RGB
    "cifar10": dict(
        dataset="cifar10",
        image_channels=3,
        image_size=32,
        likelihood="logistic_mixture",
        modules_per_scale=(2, 4, 4),
        stem_downsample=0,
        channels=64,
        z_channels=4,
        nz0=64,
        fc_width=256,
        batch_size=64,
        lr=1e-3,
        grad_clip=400.0,
    ),
    # a fully-connected MatNet with GRU-style stochastic updates
    "mnist_fc": dict(fully_connected=True, fc_modules=4, fc_width=256, nz0=32, z_channels=32),
}
