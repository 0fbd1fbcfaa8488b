"""MatNet: the reference Matryoshka Network (plain PyTorch ops), paper section 2."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import ARDecoder
from .config import MatNetConfig, conditional_fields_set
from .distributions import make_output_distribution
from .modules import (
    BUModule,
    FCTop,
    GRUMergeModule,
    GRUTDModule,
    MergeModule,
    MixturePrior,
    TDModule,
    UsesOps,
    downsample,
    make_out_up,
    make_stem,
    orthogonal_init_,
    scale_latent,
    upsample,
)
from .ops import reference

# images per TD pass of iwae_nll by default: on a CPU larger passes fall out of cache (128-200 measured
# fastest for "mnist" and "cifar10", 2048 was 1.2-2x slower); a GPU wants large ones
IWAE_IMAGES_PER_PASS = {"cpu": 128, "cuda": 2048}


@dataclass
class MatNetOutput:
    """What a forward pass returns (all in nats)."""

    loss: torch.Tensor  # scalar: mean of recon_nll + kl_weight * kl.sum(1) (+ the mixture prior's entropy penalty)
    nll_bound: torch.Tensor  # [B] negative ELBO
    recon_nll: torch.Tensor  # [B] -log p(x | z)
    kl: torch.Tensor  # [B, n_stochastic] KL(q(z_i | .) || p(z_i | .)), z0 first, then TD modules top-down
    log_weight: torch.Tensor | None = None  # [B] log p(x, z) - log q(z | x) at the sampled z


class GenerationOverflow(ValueError):
    """A generation pass gave non-finite features (a high temperature scales every latent draw, and the
    features can overflow to inf and NaN): raised before any draw from them."""


def check_count(name: str, v: object, low: int = 1) -> None:
    """An integer argument (a count) of the public API: >= low, and an int (not a bool, float or string)."""
    try:
        if isinstance(v, bool):
            raise TypeError
        v = operator.index(v)  # ints of numpy and torch too
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})") from None
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")


def check_iwae_counts(k: object, chunk: object) -> None:
    """`iwae_nll`'s k samples, and its chunk unless None (the per-device default)."""
    check_count("k", k)
    if chunk is not None:
        check_count("chunk", chunk)


def check_batch(x: torch.Tensor) -> None:
    """The loss to train on is a mean over the batch: an empty one would be NaN. Without gradients an empty batch
    is fine (empty bounds: a rank's empty share of a sharded evaluation)."""
    if x.shape[0] == 0 and torch.is_grad_enabled():
        raise ValueError("x has batch size 0: the loss is a mean over the batch (under torch.no_grad an empty batch "
                         "gives empty bounds)")


def check_config(cfg: object) -> None:
    if not isinstance(cfg, MatNetConfig):
        raise TypeError(f"cfg must be a MatNetConfig (e.g. MatNetConfig.preset(\"tiny\")), got {type(cfg).__name__}")
    cfg.validate()


def check_generated(h: torch.Tensor, temperature: float) -> None:
    """Raise GenerationOverflow unless h, the generation pass's last TD features, is finite."""
    if not torch.isfinite(h).all():
        raise GenerationOverflow(f"generation overflowed at temperature {temperature:g}: the top-down features "
                                 "are not finite; use a lower temperature")


def clip_logits(cfg: MatNetConfig, params: torch.Tensor) -> torch.Tensor:
    """The original's output clip: Bernoulli logits clamped to +-cfg.logit_clip (0: unchanged)."""
    return params.clamp(-cfg.logit_clip, cfg.logit_clip) if cfg.logit_clip else params


class _Trace:
    """Collects per-module KL and, for importance sampling, log q(z) - log p(z)."""

    def __init__(self, track_log_ratio: bool):
        self.kl: list[torch.Tensor] = []
        self.log_ratio: torch.Tensor | float | None = 0.0 if track_log_ratio else None
        self.log_resp: torch.Tensor | None = None  # [B, K] q's posterior over z0's mixture components (Eq. 12)


class MatNet(UsesOps, nn.Module):
    """A Matryoshka Network: BU network, TD network and merge modules (Fig. 1).

    `forward(x)` runs inference + generation and returns a `MatNetOutput`;
    `iwae_nll` gives the importance-sampled bound; `sample` generates images.
    """

    default_ops: str = "reference"

    def __init__(self, cfg: MatNetConfig):
        super().__init__()
        check_config(cfg)
        if conditional := conditional_fields_set(cfg):
            raise ValueError(f"{conditional} are conditional-MatNet settings (ConditionalMatNet; "
                             "matnet train --task inpaint), not a density model's")
        self.cfg = cfg
        s, k = cfg.slope, cfg.kernel_size
        if cfg.fully_connected:
            k = 1
            W: tuple[int, ...] = (cfg.fc_width,)  # channels of each meta module, top-down
            self.scale_sizes: tuple[int, ...] = (1,)
            counts: tuple[int, ...] = (cfg.fc_modules,)
            self.stem = nn.Linear(cfg.data_dims, W[0])
        else:
            W, self.scale_sizes, counts = cfg.scale_widths, cfg.scale_sizes, cfg.modules_per_scale
            self.stem = make_stem(cfg.image_channels, cfg.stem_width, W[-1], cfg.stem_downsample, k, s)
        self.counts = counts
        n = len(counts)
        gru = cfg.fully_connected and cfg.fc_update == "gru"
        # BU meta modules, listed top-down like everything else; bu_down[j] joins scale j+1 to scale j
        self.bu = nn.ModuleList(nn.ModuleList(BUModule(W[j], k, s) for _ in range(m)) for j, m in enumerate(counts))
        self.bu_down = nn.ModuleList(downsample(W[j + 1], s, W[j]) for j in range(n - 1))
        self.top = FCTop(W[0], self.scale_sizes[0], cfg.nz0, cfg.fc_width, s)
        self.z0_prior = MixturePrior(cfg.prior_components, cfg.nz0) if cfg.prior == "gmm" else None
        if gru:
            self.td = nn.ModuleList(
                nn.ModuleList(GRUTDModule(W[j], cfg.z_channels, s) for _ in range(m)) for j, m in enumerate(counts))
            self.merge = nn.ModuleList(
                nn.ModuleList(GRUMergeModule(W[j], cfg.z_channels) for _ in range(m)) for j, m in enumerate(counts))
        else:
            self.td = nn.ModuleList(nn.ModuleList(TDModule(W[j], cfg.z_channels, k, s) for _ in range(m))
                                    for j, m in enumerate(counts))
            self.merge = nn.ModuleList(nn.ModuleList(MergeModule(W[j], cfg.z_channels, k, s) for _ in range(m))
                                       for j, m in enumerate(counts))
        self.td_up = nn.ModuleList(upsample(W[j], s, W[j + 1]) for j in range(n - 1))
        self.merge_up = nn.ModuleList(upsample(W[j], s, W[j + 1]) for j in range(n - 1))
        self.dist = make_output_distribution(cfg)
        n_params = self.dist.n_params()
        if cfg.fully_connected:
            self.out_up = nn.Identity()
            self.out = nn.Linear(W[0], n_params * cfg.image_size**2)
            out_w = W[0]
        else:
            out_w = cfg.stem_width if cfg.stem_downsample else W[-1]
            self.out_up = make_out_up(W[-1], out_w, cfg.stem_downsample, s)
            self.out = nn.Conv2d(out_w, n_params, k, padding=k // 2)
        self.ar = ARDecoder(cfg.image_channels, out_w, n_params, cfg.ar_layers, cfg.ar_channels, s) \
            if cfg.ar_layers else None
        if cfg.ortho_init_gain:
            orthogonal_init_(self, cfg.ortho_init_gain)
        # the original's latent scaling (a generator parameter there, as here: see matnet.regularizers)
        self.latent_scale = nn.Parameter(torch.tensor(float(cfg.latent_scale))) if cfg.latent_scale else None
        self.set_ops(self.default_ops)

    def set_ops(self, name: str) -> None:
        """Route every module's numeric kernels through the 'reference' or the 'fast' ops."""
        for m in [*self.modules(), self.dist]:
            if isinstance(m, UsesOps):
                m.ops_name = name

    # ---- input checks -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        p = next(self.parameters())
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the model is on {p.device}")
        if x.dtype != p.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {p.dtype}")
        if x.device.type == "cpu" and x.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(x)
            rng = (0.0, 1.0) if self.dist.binary else (-1.0, 1.0)
            if lo < rng[0] or hi > rng[1] or not torch.isfinite(lo + hi):
                raise ValueError(
                    f"x must lie in [{rng[0]}, {rng[1]}] for the {cfg.likelihood} likelihood, "
                    f"got values in [{lo.item():.4g}, {hi.item():.4g}]")

    # ---- the three networks ---------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Eq. 9: the BU states, grouped by meta module top-down; within a group, the state aligned
        with TD module j (top-down) is group[j] (BU modules are numbered in reverse order)."""
        h = self.stem(x.flatten(1))[:, :, None, None] if self.cfg.fully_connected else self.stem(x)
        h = F.leaky_relu(h, self.cfg.slope) if self.cfg.fully_connected else h
        groups: list[list[torch.Tensor]] = [[] for _ in self.counts]
        for j in reversed(range(len(self.counts))):
            if j < len(self.counts) - 1:
                h = self.bu_down[j](h)
            for mod in self.bu[j]:
                h = mod(h)
                groups[j].append(h)
            groups[j].reverse()
        return groups

    def feature_layout(self) -> torch.memory_format:
        """channels_last when the model's conv weights are (`model.to(memory_format=torch.channels_last)`):
        the feature maps then stay channels_last end to end, converted once where the FC top meets them."""
        w = self.out.weight
        cl = w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl else torch.contiguous_format

    def noise(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """N(0, I) noise in the parameters' dtype, drawn in fp32 whatever that dtype: an fp64 copy of the
        model then sees the very same draws (the accuracy tests judge fp32 against such a copy)."""
        dtype = next(self.parameters()).dtype
        return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)

    def _stochastic(self, mu_q, logvar_q, mu_p, logvar_p, trace: _Trace) -> torch.Tensor:
        eps = self.noise(mu_q.shape, mu_q.device)
        z, kl = self.ops.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, eps)
        trace.kl.append(kl.flatten(1).sum(1))
        if trace.log_ratio is not None:
            # summed over every latent dimension: in fp32 at least, also under autocast and for half models
            # (upcast copies under new names: the z returned below stays in the model's dtype)
            lv_q, e, z32, m_p, lv_p = reference._fp32_at_least(logvar_q, eps, z, mu_p, logvar_p)
            log_q = -0.5 * (reference.LOG_2PI + lv_q + e**2)
            log_p = reference.gaussian_log_prob(z32, m_p, lv_p)
            trace.log_ratio = trace.log_ratio + (log_q - log_p).flatten(1).sum(1)
        return z

    def _stochastic_z0(self, mu0: torch.Tensor, logvar0: torch.Tensor, trace: _Trace) -> torch.Tensor:
        """z0 ~ q(z0 | x) with its KL: closed form against N(0, I), Eq. 12 against the mixture prior."""
        if self.z0_prior is None:
            zeros = torch.zeros_like(mu0)
            return self._stochastic(mu0, logvar0, zeros, zeros, trace)
        eps = self.noise(mu0.shape, mu0.device)
        z0 = mu0 + torch.exp(0.5 * logvar0) * eps
        kl, trace.log_resp = self.z0_prior.kl(mu0, logvar0)  # Eq. 12
        trace.kl.append(kl)
        if trace.log_ratio is not None:  # importance weights need the exact mixture density, not Eq. 12
            logvar0, eps = reference._fp32_at_least(logvar0, eps)
            log_q = (-0.5 * (reference.LOG_2PI + logvar0 + eps**2)).sum(1)
            trace.log_ratio = trace.log_ratio + log_q - self.z0_prior.log_prob(z0).float()
        return z0

    def top_down(self, bu: list[list[torch.Tensor]], trace: _Trace) -> torch.Tensor:
        """Inference pass (Eq. 2, 7, 8, 10, 11): returns the last TD output at image resolution."""
        mu0, logvar0 = scale_latent(self.latent_scale, *self.top.encode(bu[0][0]))  # f_0^b reads the final BU state
        z0 = self._stochastic_z0(mu0, logvar0, trace)
        h_t = self.top.decode(z0).contiguous(memory_format=self.feature_layout())
        h_m = torch.zeros_like(h_t)
        for j, (tds, merges) in enumerate(zip(self.td, self.merge)):
            if j > 0:
                h_t, h_m = self.td_up[j - 1](h_t), self.merge_up[j - 1](h_m)
            for td, merge, h_b in zip(tds, merges, bu[j]):
                mu_p, logvar_p = scale_latent(self.latent_scale, *td.prior(h_t))
                h_m, mu_q, logvar_q = merge(h_m, h_b, h_t)
                mu_q, logvar_q = scale_latent(self.latent_scale, mu_q, logvar_q)
                z = self._stochastic(mu_q, logvar_q, mu_p, logvar_p, trace)
                h_t = td(h_t, z)
        return self.out_up(h_t)

    def generate_features(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Generation pass (Eq. 1, 7, 8): z0 ~ p(z0) (N(0, I) or the mixture), z_i ~ p(z_i | h_t(i))."""
        p = next(self.parameters())
        z0 = self.noise((n, self.cfg.nz0), p.device)
        z0 = temperature * z0 if self.z0_prior is None else self.z0_prior.sample(z0, temperature)
        h_t = self.top.decode(z0).contiguous(memory_format=self.feature_layout())
        for j, tds in enumerate(self.td):
            if j > 0:
                h_t = self.td_up[j - 1](h_t)
            for td in tds:
                mu_p, logvar_p = scale_latent(self.latent_scale, *td.prior(h_t))
                eps = self.noise(mu_p.shape, mu_p.device)
                h_t = td(h_t, mu_p + temperature * torch.exp(0.5 * logvar_p) * eps)
        return self.out_up(h_t)

    def output_params(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """Parameters of p(x | z) from the last TD output (and, with AR reconstruction, from x)."""
        if self.cfg.fully_connected:
            s = self.cfg.image_size
            return clip_logits(self.cfg, self.out(h.flatten(1)).view(h.shape[0], -1, s, s))
        params = self.out(h)
        if self.ar is not None:
            params = params + self.ar(x, h)
        return clip_logits(self.cfg, params)

    # ---- public API -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, kl_weight: float | torch.Tensor = 1.0,
                return_log_weight: bool = False) -> MatNetOutput:
        self.check_input(x)
        check_batch(x)
        trace = _Trace(return_log_weight)
        h = self.top_down(self.bottom_up(x), trace)
        recon = self.dist.nll(x, self.output_params(h, x))
        kl = torch.stack(trace.kl, dim=1)
        kl_sum = kl.sum(1)
        nll_bound = recon + kl_sum
        loss = (recon + kl_weight * kl_sum).mean()  # no branch on the weight: compiled graphs keep one shape
        if self.cfg.prior_entropy_weight and trace.log_resp is not None:  # sec. 3: sharpen q's component posteriors
            lr = trace.log_resp  # a component with infinite KL has log_resp -inf: 0 * -inf would be NaN
            entropy = -(lr.exp() * lr.clamp(min=torch.finfo(lr.dtype).min)).sum(1)
            loss = loss + self.cfg.prior_entropy_weight * entropy.mean()
        log_w = -(recon + trace.log_ratio) if return_log_weight else None
        return MatNetOutput(loss, nll_bound, recon, kl, log_w)

    @staticmethod
    def iwae_chunk(batch: int, device: torch.device) -> int:
        """Default samples per TD pass of `iwae_nll` for a batch of `batch` images on `device`."""
        return max(1, IWAE_IMAGES_PER_PASS.get(device.type, IWAE_IMAGES_PER_PASS["cuda"]) // max(batch, 1))

    @torch.inference_mode()
    def iwae_nll(self, x: torch.Tensor, k: int = 2500, chunk: int | None = None) -> torch.Tensor:
        """Importance-sampled bound -log (1/k) sum_s p(x, z_s) / q(z_s | x), z_s ~ q(z | x); [B] nats
        (fp32, or fp64 for an fp64 model).

        The BU pass runs once; the k samples go through the TD network `chunk` at a time, with a
        running logsumexp, so memory is set by B * chunk and not by k. The default chunk gives about
        IWAE_IMAGES_PER_PASS[device] images per pass (CPU: what stays in cache; GPU: enough to fill it).
        Under bf16 autocast the networks run in bf16 while every log-density and the log-weights are
        summed in fp32 (fp64 across samples).
        """
        self.check_input(x)
        check_iwae_counts(k, chunk)
        B = x.shape[0]
        chunk = max(1, min(k, chunk or self.iwae_chunk(B, x.device)))
        bu = self.bottom_up(x)
        total = torch.full((B,), -math.inf, device=x.device, dtype=torch.float64)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            bu_c = [[s.repeat(c, 1, 1, 1) for s in g] for g in bu]
            x_c = x.repeat(c, 1, 1, 1)
            trace = _Trace(True)
            h = self.top_down(bu_c, trace)
            log_w = -(self.dist.nll(x_c, self.output_params(h, x_c)).float() + trace.log_ratio)
            lse = torch.logsumexp(log_w.double().view(c, B), dim=0)
            total = torch.logaddexp(total, lse)
            done += c
        return (math.log(k) - total).to(torch.promote_types(x.dtype, torch.float32))  # no bf16 rounding

    @torch.no_grad()
    def z0_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z0 | x)'s mean and log-variance, [B, nz0] each."""
        self.check_input(x)
        return scale_latent(self.latent_scale, *self.top.encode(self.bottom_up(x)[0][0]))

    @torch.no_grad()
    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        """[B] int64: the mixture component of z0 for each image (Fig. 3), the argmax of the components'
        responsibilities p(k | z0) at the posterior mean z0 = E_q[z0 | x]. Needs cfg.prior == "gmm"."""
        if self.z0_prior is None:
            raise ValueError("cluster needs a mixture prior on z0 (cfg.prior='gmm')")
        return self.z0_prior.component_log_prob(self.z0_posterior(x)[0]).argmax(1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, mean: bool = False) -> torch.Tensor:
        """n images [n, C, H, W] in data space. mean=True returns E[x | z] (the mode for the logistic
        likelihoods) instead of a draw, as is customary for displaying binary data; with the AR decoder,
        8-bit images are then decoded greedily and binary ones show each pixel's mean given drawn pixels."""
        check_count("n", n)
        h = self.generate_features(n, temperature)
        check_generated(h, temperature)
        pick = self.dist.mean if mean else self.dist.sample
        dtype = next(self.parameters()).dtype  # the data's dtype, also under autocast (h is bf16 there)
        if self.ar is None:
            return pick(self.output_params(h, None)).to(dtype)
        cfg = self.cfg
        x = torch.zeros(n, cfg.image_channels, cfg.image_size, cfg.image_size, device=h.device, dtype=dtype)
        # binary means are probabilities, not data: the loop then conditions on draws and only shows means
        shown = torch.zeros_like(x) if mean and self.dist.binary else x
        base = self.out(h)
        reach = max(c.weight.shape[-1] for c in self.ar.convs) // 2  # rows of `h` that row i reads below it
        for i in range(cfg.image_size):  # raster order: pixel (i, j) sees only pixels before it
            r = min(cfg.image_size, i + 1 + reach)  # rows past r cannot reach row i: crop for speed
            for j in range(cfg.image_size):
                params = clip_logits(cfg, base[:, :, :r] + self.ar(x[:, :, :r], h[:, :, :r]))
                shown[:, :, i, j] = pick(params)[:, :, i, j]
                if shown is not x:
                    x[:, :, i, j] = self.dist.sample(params)[:, :, i, j]
        return shown

    def kl_groups(self) -> list[tuple[str, int]]:
        """(name, number of stochastic modules) per meta module, top-down, z0 first (for Fig. 4)."""
        names = ["fc"] if self.cfg.fully_connected else [f"{r}x{r}" for r in self.scale_sizes]
        return [("z0", 1)] + list(zip(names, self.counts))
