"""Plain-PyTorch reference implementations of matnet's fast ops.

These define the semantics every fast kernel is tested against; the reference
model (`matnet.MatNet`) runs on them. Shapes follow NCHW; a fully-connected
state is a 1x1 map with 1x1 kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BIN_HALF_WIDTH = 1.0 / 255.0  # half the width of one of 256 bins on [-1, 1]
EDGE = 0.999  # x below -EDGE / above EDGE is the first / last bin


def residual_conv_block(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    extra: torch.Tensor | None = None,
    slope: float = 0.1,
) -> torch.Tensor:
    """lrelu(h + conv(lrelu(conv([h; extra], w1) + b1), w2) + b2), shape-preserving convs.

    h: [B, C, H, W]; extra: [B, E, H, W] or None; w1: [M, C+E, k, k]; w2: [C, M, k, k].
    The shared form of Eq. 7 (TD), Eq. 9 (BU) and Eq. 10 (merge).
    """
    inp = h if extra is None else torch.cat([h, extra], dim=1)
    a = F.leaky_relu(F.conv2d(inp, w1, b1, padding=w1.shape[-1] // 2), slope)
    return F.leaky_relu(h + F.conv2d(a, w2, b2, padding=w2.shape[-1] // 2), slope)


def gaussian_sample_kl(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparametrized sample and elementwise analytic KL(q || p) of diagonal Gaussians.

    z = mu_q + exp(logvar_q / 2) * eps
    kl = 0.5 * (logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) * exp(-logvar_p) - 1)
    All inputs share one shape; both outputs have it too.
    """
    z = mu_q + torch.exp(0.5 * logvar_q) * eps
    kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0)
    return z, kl


def _log_bin_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under a logistic(mean, exp(log_scale)), 256 bins on [-1, 1].

    Interior bins use log(sigmoid(a) - sigmoid(b)) = a + log(-expm1(b - a)) - softplus(a) - softplus(b),
    exact without cancellation for any scale; edge bins integrate the tail.
    """
    inv_s = torch.exp(-log_scale)
    c = x - mean
    a = inv_s * (c + BIN_HALF_WIDTH)
    b = inv_s * (c - BIN_HALF_WIDTH)
    tiny = torch.finfo(a.dtype).tiny
    log_delta = a + torch.log(-torch.expm1(torch.clamp(b - a, max=-tiny))) - F.softplus(a) - F.softplus(b)
    log_cdf_plus = a - F.softplus(a)  # first bin: log sigmoid(a)
    log_sf_min = -F.softplus(b)  # last bin: log(1 - sigmoid(b))
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_sf_min, log_delta))


def discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(x) of a discretized logistic over 256 bins on [-1, 1].

    x, mean, log_scale: one shape; x holds bin centres 2k/255 - 1. Returns that shape (nats).
    """
    return -_log_bin_prob(x, mean, log_scale)


def mixture_channel_means(x: torch.Tensor, means: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PixelCNN++ autoregressive channel means: mean_c += sum_{j<c} coeff[pair(j, c)] * x_j.

    x: [B, C, H, W]; means: [B, K, C, H, W]; coeffs: [B, K, C*(C-1)/2, H, W], pairs ordered
    (0,1), (0,2), (1,2), ... i.e. for RGB: c0 (r->g), c1 (r->b), c2 (g->b).
    """
    C = x.shape[1]
    out = [means[:, :, 0]]
    for c in range(1, C):
        m = means[:, :, c]
        for j in range(c):
            m = m + coeffs[:, :, _pair_index(j, c)] * x[:, j].unsqueeze(1)
        out.append(m)
    return torch.stack(out, dim=2)


def _pair_index(j: int, c: int) -> int:
    # index of pair (j, c), j < c, in the order (0,1), (0,2), (1,2), (0,3), ... is c*(c-1)/2 + j
    return c * (c - 1) // 2 + j


def discretized_logistic_mixture_nll(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
) -> torch.Tensor:
    """-log p(x) per example for a PixelCNN++ discretized logistic mixture.

    x: [B, C, H, W] in [-1, 1]; logit_probs: [B, K, H, W]; means, log_scales: [B, K, C, H, W];
    coeffs: [B, K, C*(C-1)/2, H, W] (already squashed, e.g. tanh). Returns [B] nats.
    p(x_ij) = sum_k pi_k prod_c DLogistic(x_cij; mean'_kc, s_kc), mean' from `mixture_channel_means`.
    """
    m = mixture_channel_means(x, means, coeffs)
    lp = _log_bin_prob(x.unsqueeze(1), m, log_scales).sum(dim=2)  # [B, K, H, W]
    lp = lp + torch.log_softmax(logit_probs, dim=1)
    return -torch.logsumexp(lp, dim=1).flatten(1).sum(dim=1)


def causal_mask(kernel_size: int, mask_type: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """[k, k] raster-order mask: rows above the centre, and the centre row left of the centre,
    are 1; the centre itself is 1 for type 'B' and 0 for type 'A'; the rest is 0."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    k = kernel_size
    m = torch.zeros(k, k, dtype=dtype, device=device)
    m[: k // 2] = 1
    m[k // 2, : k // 2 + (mask_type == "B")] = 1
    return m


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_type: str = "A",
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raster-order causal conv over x, unrestricted over cond, 'same' padding.

    x: [B, Cx, H, W]; cond: [B, Cc, H, W] or None; weight: [Co, Cx + Cc, k, k] (odd k), the first
    Cx input channels masked by `causal_mask(k, mask_type)`, the cond channels not; bias: [Co] or None.
    """
    k = weight.shape[-1]
    cx = x.shape[1]
    mask = torch.ones_like(weight)
    mask[:, :cx] = causal_mask(k, mask_type, weight.dtype, weight.device)
    inp = x if cond is None else torch.cat([x, cond], dim=1)
    return F.conv2d(inp, weight * mask, bias, padding=k // 2)


# ---- densities used by the objective and by importance sampling (not fused ops) ----

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, exp(logvar))."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Elementwise -log Bernoulli(x; sigmoid(logits)), x in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise -log N(x; mean, exp(logvar)) (a density, for continuous data)."""
    return -gaussian_log_prob(x, mean, logvar)
