"""Output distributions p(x | z): Bernoulli, diagonal Gaussian, discretized logistic and the
PixelCNN++ discretized logistic mixture. Each turns a parameter map [B, P, H, W] into a
per-example NLL [B] (nats) and into samples in data space."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .modules import UsesOps
from .ops import reference


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Snap values to the 256 bin centres 2k/255 - 1 on [-1, 1], in fp32 at least (bf16 cannot hold them)."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


class OutputDistribution(UsesOps):
    """Base class; `ops` is the namespace of numeric kernels (reference or fast)."""

    binary = False

    def __init__(self, channels: int, min_log_scale: float = -7.0):
        self.channels = channels
        self.min_log_scale = min_log_scale

    def n_params(self) -> int:
        raise NotImplementedError

    def nll(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(OutputDistribution):
    binary = True

    def n_params(self) -> int:
        return self.channels

    def nll(self, x, params):
        return reference.bernoulli_nll(x, params).flatten(1).sum(1)

    def sample(self, params):
        return torch.bernoulli(torch.sigmoid(params))

    def mean(self, params):
        return torch.sigmoid(params)


class Gaussian(OutputDistribution):
    def n_params(self) -> int:
        return 2 * self.channels

    def nll(self, x, params):
        mean, logvar = params.chunk(2, dim=1)
        return reference.gaussian_nll(x, mean, logvar).flatten(1).sum(1)

    def sample(self, params):
        mean, logvar = params.chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).clamp(-1, 1)  # data space is [-1, 1]

    def mean(self, params):
        return params.chunk(2, dim=1)[0].clamp(-1, 1)


class DiscretizedLogistic(OutputDistribution):
    """One logistic per channel, integrated over 256 bins on [-1, 1] (IAF paper's 'integrated logistic')."""

    def n_params(self) -> int:
        return 2 * self.channels

    def _split(self, params):
        mean, log_scale = params.chunk(2, dim=1)
        return mean, log_scale.clamp(min=self.min_log_scale)

    def nll(self, x, params):
        mean, log_scale = self._split(params)
        return self.ops.discretized_logistic_nll(x, mean, log_scale).flatten(1).sum(1)

    def sample(self, params):
        mean, log_scale = self._split(params)
        u = torch.rand_like(mean).clamp(1e-5, 1 - 1e-5)
        return quantize(mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u)))

    def mean(self, params):
        return quantize(self._split(params)[0])


class DiscretizedLogisticMixture(OutputDistribution):
    """PixelCNN++ mixture of K discretized logistics over C channels, with channel coefficients.

    Parameter layout along dim 1: K logits, then K*C means, K*C log-scales, K*C(C-1)/2 coefficients.
    """

    def __init__(self, channels: int, n_mixtures: int = 10, min_log_scale: float = -7.0):
        super().__init__(channels, min_log_scale)
        self.k = n_mixtures

    @property
    def n_coeffs(self) -> int:
        return self.channels * (self.channels - 1) // 2

    def n_params(self) -> int:
        return self.k * (1 + 2 * self.channels + self.n_coeffs)

    def split(self, params: torch.Tensor):
        B, _, H, W = params.shape
        K, C = self.k, self.channels
        logits, means, log_scales, coeffs = params.split([K, K * C, K * C, K * self.n_coeffs], dim=1)
        return (
            logits,
            means.reshape(B, K, C, H, W),
            log_scales.reshape(B, K, C, H, W).clamp(min=self.min_log_scale),
            torch.tanh(coeffs.reshape(B, K, self.n_coeffs, H, W)),
        )

    def nll(self, x, params):
        return self.ops.discretized_logistic_mixture_nll(x, *self.split(params))

    def _generate(self, params: torch.Tensor, stochastic: bool) -> torch.Tensor:
        logits, means, log_scales, coeffs = self.split(params)
        if stochastic:  # Gumbel-max component choice
            logits = logits - torch.log(-torch.log(torch.rand_like(logits).clamp(1e-5, 1 - 1e-5)))
        sel = F.one_hot(logits.argmax(dim=1), self.k).permute(0, 3, 1, 2).to(params.dtype).unsqueeze(2)
        v = (means * sel).sum(1)
        coef = (coeffs * sel).sum(1)
        if stochastic:
            u = torch.rand_like(v).clamp(1e-5, 1 - 1e-5)
            v = v + torch.exp((log_scales * sel).sum(1)) * (torch.log(u) - torch.log1p(-u))
        xs: list[torch.Tensor] = []
        for c in range(self.channels):  # channel c conditions on the channels before it
            vc = v[:, c]
            for j in range(c):
                vc = vc + coef[:, reference._pair_index(j, c)] * xs[j]
            xs.append(quantize(vc))
        return torch.stack(xs, dim=1)

    def sample(self, params):
        return self._generate(params, True)

    def mean(self, params):
        """The mode of the most probable component (a sharp, representative image)."""
        return self._generate(params, False)


def make_output_distribution(cfg) -> OutputDistribution:
    C = cfg.image_channels
    if cfg.likelihood == "bernoulli":
        return Bernoulli(C)
    if cfg.likelihood == "gaussian":
        return Gaussian(C)
    if cfg.likelihood == "logistic":
        return DiscretizedLogistic(C, cfg.min_log_scale)
    return DiscretizedLogisticMixture(C, cfg.n_mixtures, cfg.min_log_scale)
