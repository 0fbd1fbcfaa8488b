"""Discretized logistic likelihoods (256 bins on [-1, 1]): `discretized_logistic_nll` (elementwise) and
`discretized_logistic_mixture_nll` (PixelCNN++ RGB mixture, [B] nats).

Registered ops: `matnet::discretized_logistic_nll`, `matnet::discretized_logistic_mixture_nll` (returns
(nll [B], lse [B, H, W]); lse = logsumexp_k(lp_k + logit_k) per pixel is saved for the backward, which
recomputes the rest) and their `_backward` ops. Dispatch by device:

- CUDA tensors: the CUDA kernels of matnet._C when it was built with CUDA; else the reference math.
- CPU tensors: the C++ kernels of matnet._C (`torch.ops.matnet.dlogistic_nll_fwd/_bwd`,
  `dlogistic_mix_nll_fwd/_bwd`) when the extension loaded; else the reference math.
- MATNET_FORCE_REFERENCE=1: the reference math (and the wrappers below call the reference directly).

x is data (bin centres): it receives no gradient on these paths (None), also where the reference would
give one through the mixture's autoregressive channel means.
"""

from __future__ import annotations

import torch

from . import _dispatch, reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _use_extension(t: torch.Tensor) -> bool:
    if _dispatch.force_reference():
        return False
    if t.device.type == "cuda":
        return _dispatch.extension_has_cuda()
    return t.device.type == "cpu" and _dispatch.extension_loaded()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # the saved log-sum-exp feeds exp() in the backward: fp32 at least
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _bin_grads(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor):
    """dL/dmean and dL/dlog_scale of L = log P(bin of x) (reference._log_bin_prob), in torch ops.

    interior: dL/dmean = -inv_s * (sigmoid(-a) - sigmoid(b)),
              dL/dlog_scale = -(a*sigmoid(-a) - b*sigmoid(b) + u/expm1(u)),  u = a - b = 2h*inv_s
    first bin: L = log sigmoid(a);  last bin: L = -softplus(b). (Derivation in csrc/matnet_math.h.)
    """
    inv_s = torch.exp(-log_scale)
    c = x - mean
    a = inv_s * (c + reference.BIN_HALF_WIDTH)
    b = inv_s * (c - reference.BIN_HALF_WIDTH)
    u = torch.clamp(2.0 * reference.BIN_HALF_WIDTH * inv_s, min=torch.finfo(inv_s.dtype).tiny)
    em = torch.expm1(-u)
    u_over_expm1 = -u * (1.0 + em) / em
    sig_neg_a = torch.sigmoid(-a)
    sig_b = torch.sigmoid(b)
    lo = x < -reference.EDGE
    hi = x > reference.EDGE
    d_mean = torch.where(lo, -inv_s * sig_neg_a, torch.where(hi, inv_s * sig_b, -inv_s * (sig_neg_a - sig_b)))
    d_ls = torch.where(lo, -a * sig_neg_a, torch.where(hi, b * sig_b, -(a * sig_neg_a - b * sig_b + u_over_expm1)))
    return d_mean, d_ls


# ---- elementwise discretized logistic ----


@torch.library.custom_op("matnet::discretized_logistic_nll", mutates_args=())
def _dlogistic_nll_op(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    x, mean, log_scale = x.contiguous(), mean.contiguous(), log_scale.contiguous()
    if _use_extension(x):
        return torch.ops.matnet.dlogistic_nll_fwd(x, mean, log_scale)
    return reference.discretized_logistic_nll(x, mean, log_scale)


@_dlogistic_nll_op.register_fake
def _(x, mean, log_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("matnet::discretized_logistic_nll_backward", mutates_args=())
def _dlogistic_nll_backward_op(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad, x, mean, log_scale = grad.contiguous(), x.contiguous(), mean.contiguous(), log_scale.contiguous()
    if _use_extension(x):
        return tuple(torch.ops.matnet.dlogistic_nll_bwd(grad, x, mean, log_scale))
    d_mean, d_ls = _bin_grads(x, mean, log_scale)
    return -grad * d_mean, -grad * d_ls  # nll = -L


@_dlogistic_nll_backward_op.register_fake
def _(grad, x, mean, log_scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))


def _dlogistic_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dlogistic_backward(ctx, grad):
    x, mean, log_scale = ctx.saved_tensors
    g_mean, g_ls = _dlogistic_nll_backward_op(grad, x, mean, log_scale)
    return None, g_mean, g_ls  # x is data: no gradient


_dlogistic_nll_op.register_autograd(_dlogistic_backward, setup_context=_dlogistic_setup_context)


def discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(x) of a discretized logistic(mean, exp(log_scale)) over 256 bins on [-1, 1].

    x, mean, log_scale: one shape, dtype (fp16, bf16, fp32, fp64) and device; x holds bin centres
    2k/255 - 1. Returns that shape (nats), as `matnet.ops.reference.discretized_logistic_nll`.
    Gradients flow to mean and log_scale; x gets none (except under MATNET_FORCE_REFERENCE=1).
    """
    _dispatch.check_same("discretized_logistic_nll", x, mean=mean, log_scale=log_scale)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"discretized_logistic_nll: unsupported dtype {x.dtype}, use {SUPPORTED_DTYPES}")
    if _dispatch.force_reference():
        return reference.discretized_logistic_nll(x, mean, log_scale)
    return _dlogistic_nll_op(x, mean, log_scale)


# ---- PixelCNN++ mixture ----


def _reference_mixture_fwd(x, logit_probs, means, log_scales, coeffs):
    """(nll [B], lse [B, H, W]) in torch ops: nll exactly as the reference computes it."""
    m = reference.mixture_channel_means(x, means, coeffs)
    lp = reference._log_bin_prob(x.unsqueeze(1), m, log_scales).sum(dim=2)  # [B, K, H, W]
    nll = -torch.logsumexp(lp + torch.log_softmax(logit_probs, dim=1), dim=1).flatten(1).sum(dim=1)
    lse = torch.logsumexp(lp + logit_probs, dim=1).to(_lse_dtype(x.dtype))
    return nll, lse


def _reference_mixture_bwd(grad, x, logit_probs, means, log_scales, coeffs, lse):
    """Gradients wrt (logit_probs, means, log_scales, coeffs), in torch ops, for upstream grad g [B]:
    w_k = exp(lp_k + logit_k - lse), d/dlogit_k = g*(softmax(logit)_k - w_k),
    d/dmeans_kc = -g*w_k*dL_kc/dmean', d/dlog_scales_kc = -g*w_k*dL_kc/dlog_scale,
    d/dcoeffs_k,pair(j,c) = d/dmeans_kc * x_j."""
    C = x.shape[1]
    xk = x.unsqueeze(1)
    m = reference.mixture_channel_means(x, means, coeffs)
    lp = reference._log_bin_prob(xk, m, log_scales).sum(dim=2)
    d_mean, d_ls = _bin_grads(xk, m, log_scales)
    w = torch.exp(lp + logit_probs - lse.to(lp.dtype).unsqueeze(1))
    g = grad.view(-1, 1, 1, 1)
    g_logit = g * (torch.softmax(logit_probs, dim=1) - w)
    gw = (-g * w).unsqueeze(2)
    g_means = gw * d_mean
    g_ls = gw * d_ls
    g_coeffs = torch.empty_like(coeffs)
    for c in range(1, C):
        for j in range(c):
            g_coeffs[:, :, reference._pair_index(j, c)] = g_means[:, :, c] * x[:, j].unsqueeze(1)
    return g_logit, g_means, g_ls, g_coeffs


@torch.library.custom_op("matnet::discretized_logistic_mixture_nll", mutates_args=())
def _dlogistic_mix_nll_op(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (x, logit_probs, means, log_scales, coeffs)]
    if _use_extension(x):
        return tuple(torch.ops.matnet.dlogistic_mix_nll_fwd(*args))
    return _reference_mixture_fwd(*args)


@_dlogistic_mix_nll_op.register_fake
def _(x, logit_probs, means, log_scales, coeffs):
    B, _, H, W = x.shape
    return x.new_empty((B,)), x.new_empty((B, H, W), dtype=_lse_dtype(x.dtype))


@torch.library.custom_op("matnet::discretized_logistic_mixture_nll_backward", mutates_args=())
def _dlogistic_mix_nll_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (grad, x, logit_probs, means, log_scales, coeffs, lse)]
    if _use_extension(x):
        return tuple(torch.ops.matnet.dlogistic_mix_nll_bwd(*args))
    return _reference_mixture_bwd(*args)


@_dlogistic_mix_nll_backward_op.register_fake
def _(grad, x, logit_probs, means, log_scales, coeffs, lse):
    like = (logit_probs, means, log_scales, coeffs)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in like)


def _mix_setup_context(ctx, inputs, output):
    lse = output[1]
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs, lse)


def _mix_backward(ctx, grad_nll, grad_lse):
    # lse is an auxiliary output (non-differentiable); x is data: no gradient
    x, logit_probs, means, log_scales, coeffs, lse = ctx.saved_tensors
    grads = _dlogistic_mix_nll_backward_op(grad_nll, x, logit_probs, means, log_scales, coeffs, lse)
    return (None, *grads)


_dlogistic_mix_nll_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


def _check_mixture(x, logit_probs, means, log_scales, coeffs) -> None:
    name = "discretized_logistic_mixture_nll"
    tensors = {"x": x, "logit_probs": logit_probs, "means": means, "log_scales": log_scales, "coeffs": coeffs}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {k} must be a tensor, got {type(t).__name__}")
    if not x.is_floating_point() or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {x.dtype}, use one of {SUPPORTED_DTYPES}")
    for k, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name}: {k} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {k} has dtype {t.dtype} but x has {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, C, H, W], got shape {list(x.shape)}")
    if logit_probs.dim() != 4:
        raise ValueError(f"{name}: logit_probs must be [B, K, H, W], got shape {list(logit_probs.shape)}")
    B, C, H, W = x.shape
    K = logit_probs.shape[1]
    if C < 1 or K < 1:
        raise ValueError(f"{name}: need C >= 1 channels and K >= 1 components, got C={C}, K={K}")
    expect = {
        "logit_probs": (B, K, H, W),
        "means": (B, K, C, H, W),
        "log_scales": (B, K, C, H, W),
        "coeffs": (B, K, C * (C - 1) // 2, H, W),
    }
    for k, shape in expect.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(
                f"{name}: {k} must have shape {list(shape)} for x {list(x.shape)} and K={K} components "
                f"(from logit_probs), got {list(tensors[k].shape)}"
            )


def discretized_logistic_mixture_nll(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
) -> torch.Tensor:
    """-log p(x) per example (nats, [B]) of a PixelCNN++ discretized logistic mixture.

    x: [B, C, H, W] bin centres in [-1, 1]; logit_probs: [B, K, H, W]; means, log_scales: [B, K, C, H, W];
    coeffs: [B, K, C*(C-1)/2, H, W] (already squashed), pairs ordered (0,1), (0,2), (1,2), ...
    Any C >= 1 (C = 3, RGB, is the fast path); one dtype (fp16, bf16, fp32, fp64) and device.
    As `matnet.ops.reference.discretized_logistic_mixture_nll`; gradients flow to all but x.
    """
    _check_mixture(x, logit_probs, means, log_scales, coeffs)
    if _dispatch.force_reference():
        return reference.discretized_logistic_mixture_nll(x, logit_probs, means, log_scales, coeffs)
    return _dlogistic_mix_nll_op(x, logit_probs, means, log_scales, coeffs)[0]
