"""The modules of a MatNet (paper section 2.2), one class per equation.

Every module calls its numeric kernels through `self.ops`, a namespace with the
signatures of `matnet.ops.reference`; `FastMatNet` swaps in the fast ops, so both
models share parameters and state_dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .ops import reference


def ops_namespace(name: str) -> ModuleType:
    """'reference': plain torch (matnet.ops.reference); 'fast': the dispatching fast ops (matnet.ops)."""
    if name == "reference":
        return reference
    if name == "fast":
        from . import ops

        return ops
    raise ValueError(f"ops must be 'reference' or 'fast', got {name!r}")


class UsesOps:
    """Numeric kernels from a swappable namespace, stored by name so models deepcopy and pickle."""

    ops_name: str = "reference"

    @property
    def ops(self) -> ModuleType:
        return ops_namespace(self.ops_name)


class OpsModule(UsesOps, nn.Module):
    """A module whose numeric kernels come from a swappable ops namespace."""


class ResidualBlock(OpsModule):
    """lrelu(h + conv(lrelu(conv([h; extra], w1)), w2)): the shared form of Eq. 7, 9 and 10.

    A fully-connected state is a [B, C, 1, 1] map with kernel_size=1.
    """

    def __init__(self, channels: int, extra_channels: int = 0, kernel_size: int = 3, slope: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + extra_channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.slope = slope

    def forward(self, h: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        c1, c2 = self.conv1, self.conv2
        return self.ops.residual_conv_block(h, c1.weight, c1.bias, c2.weight, c2.bias, extra, self.slope)


class BUModule(ResidualBlock):
    """Eq. 9: h_b(i) = lrelu(h_b(i+1) + conv(lrelu(conv(h_b(i+1)))))."""

    def __init__(self, channels: int, kernel_size: int = 3, slope: float = 0.1):
        super().__init__(channels, 0, kernel_size, slope)


class PriorHead(nn.Module):
    """Eq. 8: [mu_bar; logvar_bar] = conv(lrelu(conv(h_t(i))))."""

    def __init__(self, channels: int, z_channels: int, kernel_size: int = 3, slope: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, 2 * z_channels, kernel_size, padding=kernel_size // 2)
        self.slope = slope

    def forward(self, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv2(F.leaky_relu(self.conv1(h_t), self.slope)).chunk(2, dim=1)


class TDModule(nn.Module):
    """Eq. 7 + Eq. 8: a prior p(z_i | h_t(i)) and h_t(i+1) = lrelu(h_t + conv(lrelu(conv([h_t; z_i]))))."""

    def __init__(self, channels: int, z_channels: int, kernel_size: int = 3, slope: float = 0.1):
        super().__init__()
        self.prior = PriorHead(channels, z_channels, kernel_size, slope)
        self.update = ResidualBlock(channels, z_channels, kernel_size, slope)

    def forward(self, h_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.update(h_t, z)


class GRUUpdate(nn.GRUCell):
    """The TD update of a fully-connected MatNet: h_t(i+1) = GRU(z_i, h_t(i)) on [B, W, 1, 1] states."""

    def forward(self, h_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(z.flatten(1), h_t.flatten(1))[:, :, None, None]


class GRUTDModule(nn.Module):
    """TD module of a fully-connected MatNet: a prior head (Eq. 8 with 1x1 kernels) and a `GRUUpdate`."""

    def __init__(self, width: int, z_channels: int, slope: float = 0.1):
        super().__init__()
        self.prior = PriorHead(width, z_channels, 1, slope)
        self.update = GRUUpdate(z_channels, width)

    def forward(self, h_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.update(h_t, z)


class MergeModule(nn.Module):
    """Eq. 10 + 11: h_m(i+1) = lrelu(h_m + conv(lrelu(conv([h_m; h_b; h_t])))); [mu; logvar] = conv(h_m(i+1))."""

    def __init__(self, channels: int, z_channels: int, kernel_size: int = 3, slope: float = 0.1):
        super().__init__()
        self.update = ResidualBlock(channels, 2 * channels, kernel_size, slope)
        self.head = nn.Conv2d(channels, 2 * z_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, h_m: torch.Tensor, h_b: torch.Tensor, h_t: torch.Tensor):
        h_m = self.update(h_m, torch.cat([h_b, h_t], dim=1))
        mu, logvar = self.head(h_m).chunk(2, dim=1)
        return h_m, mu, logvar


class GRUMergeModule(nn.Module):
    """Merge module of a fully-connected MatNet: h_m(i+1) = GRU([h_b; h_t], h_m); [mu; logvar] = W h_m(i+1)."""

    def __init__(self, width: int, z_channels: int):
        super().__init__()
        self.update = nn.GRUCell(2 * width, width)
        self.head = nn.Conv2d(width, 2 * z_channels, 1)

    def forward(self, h_m: torch.Tensor, h_b: torch.Tensor, h_t: torch.Tensor):
        h_m = self.update(torch.cat([h_b, h_t], dim=1).flatten(1), h_m.flatten(1))[:, :, None, None]
        mu, logvar = self.head(h_m).chunk(2, dim=1)
        return h_m, mu, logvar


class FCTop(nn.Module):
    """The fully-connected top of a MatNet.

    Inference (`encode`): the last BU state -> FC -> residual FC module -> [mu0; logvar0] of q(z0 | x).
    Generation (`decode`): z0 -> FC -> residual FC module -> FC -> the first TD state [C, r, r].
    """

    def __init__(self, channels: int, size: int, nz0: int, width: int, slope: float = 0.1):
        super().__init__()
        flat = channels * size * size
        self.shape = (channels, size, size)
        self.slope = slope
        self.bu_in = nn.Linear(flat, width)
        self.bu_module = BUModule(width, 1, slope)
        self.bu_out = nn.Linear(width, 2 * nz0)
        self.td_in = nn.Linear(nz0, width)
        self.td_module = BUModule(width, 1, slope)  # same residual form, deterministic
        self.td_out = nn.Linear(width, flat)

    def encode(self, h_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fc_encode(h_b, self.bu_in, self.bu_module, self.bu_out, self.slope)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return fc_decode(z0, self.td_in, self.td_module, self.td_out, self.shape, self.slope)


def fc_encode(h_b: torch.Tensor, fc_in: nn.Linear, module: BUModule, fc_out: nn.Linear,
              slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """f_0^b: the last BU state -> FC -> residual FC module -> [mu0; logvar0] (FCTop.encode; the z0 heads of
    a conditional MatNet)."""
    h = F.leaky_relu(fc_in(h_b.flatten(1)), slope)[:, :, None, None]
    return fc_out(module(h).flatten(1)).chunk(2, dim=1)


def fc_decode(z0: torch.Tensor, fc_in: nn.Linear, module: BUModule, fc_out: nn.Linear, shape: tuple[int, ...],
              slope: float) -> torch.Tensor:
    """The TD network's input layer: z0 -> FC -> residual FC module -> FC -> the first TD state [B, *shape]
    (FCTop.decode; the TD top of a conditional MatNet)."""
    h = F.leaky_relu(fc_in(z0), slope)[:, :, None, None]
    h = F.leaky_relu(fc_out(module(h).flatten(1)), slope)
    return h.view(-1, *shape)


class MixturePrior(nn.Module):
    """Sec. 2.3: p(z0) = (1/K) sum_k N(z0; m_k, diag(exp(lv_k))), a Gaussian mixture with uniform weights learned
    with the model. Computed in at least fp32 (half-precision activations are upcast), as the ops return KL."""

    def __init__(self, n_components: int, nz0: int):
        super().__init__()
        self.means = nn.Parameter(torch.randn(n_components, nz0))  # spread like N(0, I), so components differ
        self.logvars = nn.Parameter(torch.zeros(n_components, nz0))

    def _params(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = torch.promote_types(torch.promote_types(t.dtype, self.means.dtype), torch.float32)
        return t.to(dt)[:, None], self.means.to(dt), self.logvars.to(dt)

    def component_kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """[B, K]: KL(N(mu, exp(logvar)) || p_k), summed over the latent dimensions."""
        mu, m, lv = self._params(mu)
        logvar = logvar.to(mu.dtype)[:, None]
        return 0.5 * (lv - logvar + (logvar.exp() + (mu - m) ** 2) * torch.exp(-lv) - 1).sum(-1)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 12 with the uniform weights written out: KL(q || p) <= -log sum_k (1/K) exp(-KL(q || p_k)), [B];
        and log r [B, K], the posterior over components r_k = softmax_k(-KL(q || p_k)) that attains this bound
        (Eq. 12 = sum_k r_k KL(q || p_k) + KL(r || uniform))."""
        neg = -self.component_kl(mu, logvar)
        return math.log(neg.shape[1]) - torch.logsumexp(neg, 1), torch.log_softmax(neg, 1)

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """[B, K]: log N(z; m_k, exp(lv_k)), summed over the latent dimensions."""
        z, m, lv = self._params(z)
        return -0.5 * (reference.LOG_2PI + lv + (z - m) ** 2 * torch.exp(-lv)).sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """[B]: the exact log p(z0) of the mixture (for importance weights, which Eq. 12 would not keep a bound)."""
        lp = self.component_log_prob(z)
        return torch.logsumexp(lp, 1) - math.log(lp.shape[1])

    @torch.no_grad()
    def refit_(self, mu: torch.Tensor, logvar: torch.Tensor, seed: int = 0,
               stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """Place the components where q puts z0 (not in the paper; VaDE initialises its mixture the same way):
        the means become the k-means centroids of the posterior means mu [N, nz0], the variances those of each
        cluster's aggregate posterior, var(mu) + mean(exp(logvar)) over its members. Eq. 12 gives a component
        far from every posterior no gradient, so most components drawn from N(0, I) never move; a refit after
        some training revives them. A component whose cluster has fewer than two members keeps its values.
        Returns the cluster sizes [K] (CPU int64). `stop` as for `kmeans`: the prior is then left as it was."""
        from .clustering import kmeans

        centres, assign = kmeans(mu, self.means.shape[0], seed, stop=stop)
        mu, var = mu.detach().cpu().double(), logvar.detach().cpu().double().exp()
        counts = torch.bincount(assign, minlength=len(centres))
        n = counts.clamp(min=1)[:, None].double()
        spread = torch.zeros_like(centres).index_add_(0, assign, (mu - centres[assign]).square()) / n
        mean_var = torch.zeros_like(centres).index_add_(0, assign, var) / n
        ok = (counts >= 2)[:, None].to(self.means.device)
        self.means.copy_(torch.where(ok, centres.to(self.means), self.means))
        self.logvars.copy_(torch.where(ok, (spread + mean_var).log().to(self.logvars), self.logvars))
        return counts

    def sample(self, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z0 ~ p(z0) from N(0, I) noise eps [n, nz0]: a uniform component per row, then its Gaussian."""
        k = torch.randint(self.means.shape[0], (eps.shape[0],), device=eps.device)
        return self.means[k].to(eps.dtype) + temperature * torch.exp(0.5 * self.logvars[k]).to(eps.dtype) * eps


def downsample(channels: int, slope: float, out: int | None = None) -> nn.Module:
    """Joins two meta modules going up (BU): a stride-2 conv halves the spatial size (channels -> out)."""
    return nn.Sequential(nn.Conv2d(channels, out or channels, 3, stride=2, padding=1), nn.LeakyReLU(slope))


def upsample(channels: int, slope: float, out: int | None = None) -> nn.Module:
    """Joins two meta modules going down (TD, merge): a stride-2 transposed conv doubles the size."""
    return nn.Sequential(nn.ConvTranspose2d(channels, out or channels, 4, stride=2, padding=1), nn.LeakyReLU(slope))


def make_stem(in_channels: int, width: int, out: int, n_down: int, kernel_size: int, slope: float) -> nn.Sequential:
    """Image -> the finest meta module: conv (in_channels -> width) + lrelu, then n_down stride-2 stages, the
    last ending at `out` channels (with n_down = 0 the conv goes straight to `out`)."""
    k = kernel_size
    width = width if n_down else out
    layers = [nn.Conv2d(in_channels, width, k, padding=k // 2), nn.LeakyReLU(slope)]
    layers += [downsample(width, slope, out if i == n_down - 1 else width) for i in range(n_down)]
    return nn.Sequential(*layers)


def make_out_up(channels: int, width: int, n_up: int, slope: float) -> nn.Sequential:
    """The finest meta module -> image resolution: n_up stride-2 transposed convs (channels -> width)."""
    return nn.Sequential(*[upsample(channels if i == 0 else width, slope, width) for i in range(n_up)])


def orthogonal_init_(model: nn.Module, gain: float) -> None:
    """The original code's init: every conv, transposed-conv, linear and GRU weight orthogonal (torch's
    `orthogonal_` on the weight flattened to [size(0), -1]) times `gain`, every bias of those layers 0. Other
    parameters (latent scale, mixture prior) keep their own init."""
    from .autoregressive import MaskedConv2d

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, MaskedConv2d)):
                weights, biases = [m.weight], [m.bias]
            elif isinstance(m, nn.GRUCell):
                weights, biases = [m.weight_ih, m.weight_hh], [m.bias_ih, m.bias_hh]
            else:
                continue
            for w in weights:
                nn.init.orthogonal_(w, gain)
            for b in biases:
                if b is not None:
                    b.zero_()


def scale_latent(scale: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's latent scaling: a head's mean and log-variance times the model's trainable scalar."""
    return (mu, logvar) if scale is None else (scale * mu, scale * logvar)
