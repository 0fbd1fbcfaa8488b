"""Conditional MatNets (paper Eq. 3, 4, 6) and the two-stage inpainting models of section 3.

Masks follow `matnet.masks`: [B, 1, H, W], 1 = missing pixel (x^u), 0 = known pixel (x^k). Before any
network sees an image, its missing pixels are replaced by a fill value (the `fill` buffer: the training
mean, from `cfg.cond_fill` or `set_fill`), so the generator never reads x^u.

Each stage has two encoders (BU network + z0 head + merge modules) around one shared TD network:
- the generator's encoder reads [x_fill, mask] and gives p(z0 | x^k) and p(z_i | h^{m:g}_{i+1}) (Eq. 3);
- the inference encoder reads [x, x_fill, mask] and gives q(z0 | x) and q(z_i | h^{m:i}_{i+1}) (Eq. 4).
The TD modules are Eq. 7 updates only: in a conditional MatNet the generator's merge modules, not the
Eq. 8 heads, give the priors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .autoregressive import ARDecoder
from .config import MatNetConfig
from .distributions import (
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    Gaussian,
    OutputDistribution,
    make_output_distribution,
)
from .model import (
    MatNet,
    MatNetOutput,
    _Trace,
    check_batch,
    check_config,
    check_count,
    check_generated,
    check_iwae_counts,
    clip_logits,
)
from .modules import (
    BUModule,
    GRUMergeModule,
    GRUUpdate,
    MergeModule,
    ResidualBlock,
    UsesOps,
    downsample,
    fc_decode,
    fc_encode,
    make_out_up,
    make_stem,
    orthogonal_init_,
    scale_latent,
    upsample,
)


def _widths(cfg: MatNetConfig) -> tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]:
    """(state channels of each meta module, kernel size, modules per meta module, spatial sizes), as in MatNet."""
    if cfg.fully_connected:
        return (cfg.fc_width,), 1, (cfg.fc_modules,), (1,)
    return cfg.scale_widths, cfg.kernel_size, cfg.modules_per_scale, cfg.scale_sizes


class _Encoder(nn.Module):
    """A BU network (Eq. 9), its z0 head f_0^b and its merge modules (Eq. 10-11): the generator's or the
    inference network's half of a conditional MatNet stage."""

    bottom_up = MatNet.bottom_up  # over this encoder's own stem, BU modules and joins

    def __init__(self, cfg: MatNetConfig, in_channels: int):
        super().__init__()
        s = cfg.slope
        W, k, counts, sizes = _widths(cfg)
        self.cfg, self.counts = cfg, counts
        if cfg.fully_connected:
            self.stem = nn.Linear(in_channels * cfg.image_size**2, W[0])
        else:
            self.stem = make_stem(in_channels, cfg.stem_width, W[-1], cfg.stem_downsample, k, s)
        self.bu = nn.ModuleList(nn.ModuleList(BUModule(W[j], k, s) for _ in range(m)) for j, m in enumerate(counts))
        self.bu_down = nn.ModuleList(downsample(W[j + 1], s, W[j]) for j in range(len(counts) - 1))
        # z0 head: last BU state -> FC -> residual FC module -> [mu0; logvar0] (FCTop.encode's form)
        self.z0_in = nn.Linear(W[0] * sizes[0] ** 2, cfg.fc_width)
        self.z0_module = BUModule(cfg.fc_width, 1, s)
        self.z0_out = nn.Linear(cfg.fc_width, 2 * cfg.nz0)
        gru = cfg.fully_connected and cfg.fc_update == "gru"
        self.merge = nn.ModuleList(nn.ModuleList(
            GRUMergeModule(W[j], cfg.z_channels) if gru else MergeModule(W[j], cfg.z_channels, k, s)
            for _ in range(m)) for j, m in enumerate(counts))
        self.merge_up = nn.ModuleList(upsample(W[j], s, W[j + 1]) for j in range(len(counts) - 1))

    def z0(self, h_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fc_encode(h_b, self.z0_in, self.z0_module, self.z0_out, self.cfg.slope)


class _Stage(nn.Module):
    """One conditional MatNet: generator and inference encoders around a TD network (Fig. 1, section 2.2)."""

    output_params = MatNet.output_params  # p(x | z) parameters from the last TD output (+ AR term)

    def __init__(self, cfg: MatNetConfig, final: bool):
        super().__init__()
        s, ci = cfg.slope, cfg.image_channels
        W, k, counts, sizes = _widths(cfg)
        self.cfg = cfg
        self.gen = _Encoder(cfg, ci + 1)  # [x_fill, mask]
        self.inf = _Encoder(cfg, 2 * ci + 1)  # [x, x_fill, mask]
        # TD top (FCTop.decode's form): z0 -> FC -> residual FC module -> FC -> the first TD state
        self.shape = (W[0], sizes[0], sizes[0])
        self.top_in = nn.Linear(cfg.nz0, cfg.fc_width)
        self.top_module = BUModule(cfg.fc_width, 1, s)
        self.top_out = nn.Linear(cfg.fc_width, W[0] * sizes[0] ** 2)
        gru = cfg.fully_connected and cfg.fc_update == "gru"
        self.td = nn.ModuleList(nn.ModuleList(
            GRUUpdate(cfg.z_channels, W[j]) if gru else ResidualBlock(W[j], cfg.z_channels, k, s)
            for _ in range(m)) for j, m in enumerate(counts))
        self.td_up = nn.ModuleList(upsample(W[j], s, W[j + 1]) for j in range(len(counts) - 1))
        self.dist = make_output_distribution(cfg)
        n_params = self.dist.n_params()
        if cfg.fully_connected:
            self.out_up: nn.Module = nn.Identity()
            self.out: nn.Module = nn.Linear(W[0], n_params * cfg.image_size**2)
            out_w = W[0]
        else:
            out_w = cfg.stem_width if cfg.stem_downsample else W[-1]
            self.out_up = make_out_up(W[-1], out_w, cfg.stem_downsample, s)
            self.out = nn.Conv2d(out_w, n_params, k, padding=k // 2)
        # only the last stage: an AR term reads x (teacher forcing), so an earlier stage's guess could not use it
        self.ar = ARDecoder(ci, out_w, n_params, cfg.ar_layers, cfg.ar_channels, s) \
            if cfg.ar_layers and final else None
        if cfg.ortho_init_gain:
            orthogonal_init_(self, cfg.ortho_init_gain)
        # the original's latent scaling, one scalar per stage (a conditional MatNet of the original code each)
        self.latent_scale = nn.Parameter(torch.tensor(float(cfg.latent_scale))) if cfg.latent_scale else None

    def top(self, z0: torch.Tensor) -> torch.Tensor:
        return fc_decode(z0, self.top_in, self.top_module, self.top_out, self.shape, self.cfg.slope)


def masked_nll(dist: OutputDistribution, x: torch.Tensor, params: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 6's -log p(x^u | z, x^k): the output distribution's NLL summed over the missing pixels only, [B] nats.

    Every pixel is scored as a 1x1 image through the distribution's own (reference or fast) op, which gives
    per-pixel values for every likelihood, the RGB mixture included; known pixels are then dropped by a select,
    so their values never reach the result."""
    B, _, H, W = x.shape

    def pixels(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(B * H * W, t.shape[1], 1, 1)

    nll = dist.nll(pixels(x), pixels(params)).view(B, H, W)
    return torch.where(m[:, 0], nll, torch.zeros_like(nll)).flatten(1).sum(1)


def stage_guess(dist: OutputDistribution, params: torch.Tensor) -> torch.Tensor:
    """A stage's guess for the next stage (section 3: "the first stage formed an initial guess for the missing
    image content, and the second stage then refined that guess"): E[x | z] under the stage's output
    distribution, kept differentiable so both stages train jointly. Bernoulli: the probabilities; Gaussian and
    logistic: the means; the RGB mixture: the component-weighted means (channel coefficients left out)."""
    if isinstance(dist, Bernoulli):
        return torch.sigmoid(params)
    if isinstance(dist, DiscretizedLogisticMixture):
        logits, means, _, _ = dist.split(params)
        return (torch.softmax(logits, dim=1).unsqueeze(2) * means).sum(1).clamp(-1, 1)
    if isinstance(dist, (Gaussian, DiscretizedLogistic)):
        return params.chunk(2, dim=1)[0].clamp(-1, 1)
    raise TypeError(f"no guess for {type(dist).__name__}")


class ConditionalMatNet(UsesOps, nn.Module):
    """A conditional MatNet for inpainting (Eq. 3, 4, 6), or a chain of `cfg.stages` of them (section 3).

    `forward(x, mask)` returns a `MatNetOutput` whose `nll_bound` is Eq. 6: -log p(x^u | z, x^k) over the
    missing pixels plus KL(q || p) per stochastic module (columns: stage by stage, z0 first, then top-down).

    Two-stage models (section 3): stage s > 1 is a conditional MatNet whose generator and inference encoders
    read `m * guess + (1 - m) * x` in place of the filled image, where `guess` is stage s-1's E[x | z]
    (`stage_guess`, from its output layer without AR term). Its latents join the chain's: the bound is the last
    stage's -log p(x^u | z, x^k) plus every stage's KL, a valid bound on -log p(x^u | x^k) because the guess is
    a function of x^k and of earlier latents only. Both stages train jointly through the guess; the loss also
    adds `cfg.stage_recon_weight` times each earlier stage's own -log p(x^u | z, x^k), which keeps its guess an
    image (0: the plain bound). With AR reconstruction (section 2.3) only the last stage has the AR term.
    """

    default_ops: str = "reference"
    check_input = MatNet.check_input
    noise = MatNet.noise
    _stochastic = MatNet._stochastic  # z ~ q through self.ops' sample + KL op; KL and log q - log p into the trace

    def __init__(self, cfg: MatNetConfig):
        super().__init__()
        check_config(cfg)
        if cfg.prior != "normal" or cfg.infer_reg_weight:
            # p(z0 | x^k) comes from the generator's BU network (Eq. 3): no mixture prior, and Eq. 13 needs p(x)
            raise ValueError("a conditional MatNet takes prior='normal' and infer_reg_weight=0")
        self.cfg = cfg
        self.stages = nn.ModuleList(_Stage(cfg, s == cfg.stages - 1) for s in range(cfg.stages))
        self.dist = self.stages[-1].dist
        default = 0.5 if self.dist.binary else 0.0
        self.register_buffer("fill", torch.empty(1, cfg.image_channels, 1, 1))
        self.set_fill(cfg.cond_fill or default)
        self.set_ops(self.default_ops)

    def set_ops(self, name: str) -> None:
        """Route every module's numeric kernels through the 'reference' or the 'fast' ops."""
        for m in [*self.modules(), *(st.dist for st in self.stages)]:
            if isinstance(m, UsesOps):
                m.ops_name = name

    @torch.no_grad()
    def set_fill(self, value: float | tuple[float, ...] | torch.Tensor) -> None:
        """Set the missing pixels' fill value: one number or one per channel (the training set's mean)."""
        v = torch.as_tensor(value, dtype=torch.float64).flatten()
        if v.numel() not in (1, self.cfg.image_channels):
            raise ValueError(f"fill needs 1 or {self.cfg.image_channels} values, got {v.numel()}")
        self.fill.copy_(v.view(1, -1, 1, 1).expand_as(self.fill))

    # ---- inputs ----------------------------------------------------------------------------------
    def check_mask(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The mask as bool [B, 1, H, W] (1 / True = missing); [1, 1, H, W] broadcasts over the batch."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        B, _, H, W = x.shape
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:] or mask.shape[0] not in (1, B):
            raise ValueError(f"mask must have shape [{B}, 1, {H}, {W}] (1 = missing), got {list(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        if mask.dtype != torch.bool:
            # values checked on CPU only, as check_input's range (elsewhere it would sync the device)
            cpu = mask.device.type == "cpu" and mask.numel() and not torch.compiler.is_compiling()
            if cpu and not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask values must be 0 (known) or 1 (missing)")
            mask = mask != 0
        return mask.expand(B, 1, H, W)

    def _known(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x with its missing pixels replaced by the fill, bool mask): all the generator may read. Only the
        known pixels are validated, so x^u may hold anything (NaN included)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            self.check_input(x)  # not an image batch: raises check_input's message before the mask is read
        m = self.check_mask(mask, x)
        xk = torch.where(m, self.fill.to(x.dtype), x)
        self.check_input(xk)
        return xk, m

    # ---- the networks ----------------------------------------------------------------------------
    def _encode(self, stage: _Stage, x: torch.Tensor | None, x_fill: torch.Tensor, m: torch.Tensor):
        """BU states of the generator (reads [x_fill, mask]) and, given x, of the inference net ([x, x_fill, mask])."""
        mf = m.to(x_fill.dtype)
        bu_g = stage.gen.bottom_up(torch.cat([x_fill, mf], dim=1))
        bu_q = None if x is None else stage.inf.bottom_up(torch.cat([x, x_fill, mf], dim=1))
        return bu_g, bu_q

    def _prior_draw(self, mu_p, logvar_p, temperature: float, priors: list | None) -> torch.Tensor:
        if priors is not None:
            priors.append((mu_p, logvar_p))
        return mu_p + temperature * torch.exp(0.5 * logvar_p) * self.noise(mu_p.shape, mu_p.device)

    def _top_down(self, stage: _Stage, bu_g, bu_q, trace: _Trace | None, temperature: float = 1.0,
                  priors: list | None = None) -> torch.Tensor:
        """One stage's TD pass; returns the last TD output at image resolution. With BU states of the inference
        net (bu_q), z ~ q(z | x^k, x^u) (Eq. 4) and p(z | x^k) (Eq. 3) only scores it; without, z ~ p(z | x^k)."""
        sc = stage.latent_scale
        mu_p, logvar_p = scale_latent(sc, *stage.gen.z0(bu_g[0][0]))  # p(z0 | x^k)
        if bu_q is None:
            z = self._prior_draw(mu_p, logvar_p, temperature, priors)
        else:
            z = self._stochastic(*scale_latent(sc, *stage.inf.z0(bu_q[0][0])), mu_p, logvar_p, trace)
        h_t = stage.top(z)
        h_g = torch.zeros_like(h_t)
        h_q = torch.zeros_like(h_t)
        for j, tds in enumerate(stage.td):
            if j > 0:
                h_t, h_g = stage.td_up[j - 1](h_t), stage.gen.merge_up[j - 1](h_g)
                h_q = stage.inf.merge_up[j - 1](h_q) if bu_q is not None else h_q
            for i, td in enumerate(tds):
                h_g, mu_p, logvar_p = stage.gen.merge[j][i](h_g, bu_g[j][i], h_t)  # Eq. 3: p(z_i | h^{m:g}_{i+1})
                mu_p, logvar_p = scale_latent(sc, mu_p, logvar_p)
                if bu_q is None:
                    z = self._prior_draw(mu_p, logvar_p, temperature, priors)
                else:
                    h_q, mu_q, logvar_q = stage.inf.merge[j][i](h_q, bu_q[j][i], h_t)  # Eq. 4: q(z_i | h^{m:i}_{i+1})
                    z = self._stochastic(*scale_latent(sc, mu_q, logvar_q), mu_p, logvar_p, trace)
                h_t = td(h_t, z)  # Eq. 7
        return stage.out_up(h_t)

    def _infer(self, x: torch.Tensor, m: torch.Tensor, trace: _Trace, first_bu=None):
        """All stages with z ~ q: (the last stage's -log p(x^u | z, x^k) [B], the earlier stages' sum [B])."""
        guess, aux = self.fill.to(x.dtype), 0.0
        for s, stage in enumerate(self.stages):
            x_fill = torch.where(m, guess, x)
            bu_g, bu_q = first_bu if s == 0 and first_bu is not None else self._encode(stage, x, x_fill, m)
            h = self._top_down(stage, bu_g, bu_q, trace)
            params = stage.output_params(h, x if stage.ar is not None else None)
            nll = masked_nll(stage.dist, x, params, m)
            if s < len(self.stages) - 1:
                aux = aux + nll
                guess = stage_guess(stage.dist, params)
        return nll, aux

    def _generate(self, xk: torch.Tensor, m: torch.Tensor, temperature: float = 1.0, priors: list | None = None):
        """All stages with z ~ p(z | x^k), reading only xk (x^k and the fill): (last stage, its TD output, its
        filled input)."""
        guess = None
        for s, stage in enumerate(self.stages):
            x_fill = xk if guess is None else torch.where(m, guess, xk)
            h = self._top_down(stage, self._encode(stage, None, x_fill, m)[0], None, None, temperature, priors)
            if s < len(self.stages) - 1:
                guess = stage_guess(stage.dist, stage.output_params(h, None))
        return stage, h, x_fill

    # ---- public API ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor, kl_weight: float | torch.Tensor = 1.0,
                return_log_weight: bool = False) -> MatNetOutput:
        self.check_input(x)
        check_batch(x)
        m = self.check_mask(mask, x)
        trace = _Trace(return_log_weight)
        recon, aux = self._infer(x, m, trace)
        kl = torch.stack(trace.kl, dim=1)
        kl_sum = kl.sum(1)
        nll_bound = recon + kl_sum  # Eq. 6
        loss = (recon + kl_weight * kl_sum + self.cfg.stage_recon_weight * aux).mean()  # aux: 0 for one stage
        log_w = -(recon + trace.log_ratio) if return_log_weight else None
        return MatNetOutput(loss, nll_bound, recon, kl, log_w)

    @staticmethod
    def iwae_chunk(batch: int, device: torch.device) -> int:
        """Default samples per pass of `iwae_nll` for a batch of `batch` images (2048 images per pass)."""
        return max(1, 2048 // max(batch, 1))

    @torch.no_grad()
    def iwae_nll(self, x: torch.Tensor, mask: torch.Tensor, k: int = 1000, chunk: int | None = None) -> torch.Tensor:
        """Importance-sampled bound on -log p(x^u | x^k): -log (1/k) sum_s p(x^u, z_s | x^k) / q(z_s | x),
        z_s ~ q(z | x); [B] nats per image over the missing pixels (fp32 at least). The first stage's BU passes run
        once; the k samples go through the rest `chunk` at a time with a running logsumexp."""
        self.check_input(x)
        m = self.check_mask(mask, x)
        check_iwae_counts(k, chunk)
        B = x.shape[0]
        chunk = max(1, min(k, chunk or self.iwae_chunk(B, x.device)))
        bu = self._encode(self.stages[0], x, torch.where(m, self.fill.to(x.dtype), x), m)
        total = torch.full((B,), -math.inf, device=x.device, dtype=torch.float64)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            bu_c = tuple([[s.repeat(c, 1, 1, 1) for s in g] for g in states] for states in bu)
            trace = _Trace(True)
            recon, _ = self._infer(x.repeat(c, 1, 1, 1), m.repeat(c, 1, 1, 1), trace, bu_c)
            log_w = -(recon.float() + trace.log_ratio)
            total = torch.logaddexp(total, torch.logsumexp(log_w.double().view(c, B), dim=0))
            done += c
        return (math.log(k) - total).to(torch.promote_types(x.dtype, torch.float32))  # no bf16 rounding

    @torch.no_grad()
    def prior_params(self, x: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, log-variance) of every p(z_i | z_<i, x^k) (Eq. 3) along one draw z ~ p(z | x^k), stage by
        stage, z0 first. Reads only the known pixels."""
        xk, m = self._known(x, mask)
        priors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._generate(xk, m, temperature, priors)
        return priors

    @torch.no_grad()
    def impute(self, x: torch.Tensor, mask: torch.Tensor, n: int = 1, temperature: float = 1.0,
               mean: bool = False) -> torch.Tensor:
        """n imputations per image, [B, n, C, H, W] in data space: missing pixels drawn from p(x^u | x^k) (mean=True:
        E[x | z] there, as for `MatNet.sample`), known pixels returned exactly. Reads only the known pixels."""
        check_count("n", n)
        xk, m = self._known(x, mask)
        B = xk.shape[0]
        xk, m = xk.repeat(n, 1, 1, 1), m.repeat(n, 1, 1, 1)  # sample-major: row s * B + b
        stage, h, x_fill = self._generate(xk, m, temperature)
        check_generated(h, temperature)
        pick = self.dist.mean if mean else self.dist.sample
        if stage.ar is None:
            out = pick(stage.output_params(h, None))
        else:
            out = self._impute_ar(stage, h, x_fill, m, pick, mean)
        out = torch.where(m, out, xk)
        return out.view(n, B, *out.shape[1:]).transpose(0, 1)

    def _impute_ar(self, stage: _Stage, h, x_fill, m, pick, mean: bool) -> torch.Tensor:
        """AR decoding of the missing pixels in raster order: each pixel conditions on the known pixels and on
        the missing ones drawn before it (as `MatNet.sample`, visiting only pixels missing somewhere)."""
        x = x_fill.clone()
        shown = x.clone() if mean and self.dist.binary else x  # binary means are not data: condition on draws
        base = stage.out(h)
        reach = max(c.weight.shape[-1] for c in stage.ar.convs) // 2
        size = self.cfg.image_size
        for i, j in m.any(0)[0].nonzero().tolist():
            r = min(size, i + 1 + reach)
            params = clip_logits(self.cfg, base[:, :, :r] + stage.ar(x[:, :, :r], h[:, :, :r]))
            miss = m[:, :, i, j]
            shown[:, :, i, j] = torch.where(miss, pick(params)[:, :, i, j], shown[:, :, i, j])
            if shown is not x:
                x[:, :, i, j] = torch.where(miss, self.dist.sample(params)[:, :, i, j], x[:, :, i, j])
        return shown

    def kl_groups(self) -> list[tuple[str, int]]:
        """(name, number of stochastic modules) per meta module, stage by stage, z0 first (for Fig. 4)."""
        _, _, counts, sizes = _widths(self.cfg)
        names = ["fc"] if self.cfg.fully_connected else [f"{r}x{r}" for r in sizes]
        one = [("z0", 1)] + list(zip(names, counts))
        if len(self.stages) == 1:
            return one
        return [(f"stage{s + 1}/{name}", c) for s in range(len(self.stages)) for name, c in one]


class FastConditionalMatNet(ConditionalMatNet):
    """`ConditionalMatNet` on the fast ops (fused kernels): same parameters, buffers and state_dict keys, noise
    drawn in the same order, so with the same seed and weights both agree within the dtype's tolerance."""

    default_ops = "fast"
