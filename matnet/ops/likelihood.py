"""Discretized logistic likelihoods (256 bins on [-1, 1]): `discretized_logistic_nll` (elementwise) and
`discretized_logistic_mixture_nll` (PixelCNN++ RGB mixture, [B] nats).

`matnet::discretized_logistic_mixture_nll` returns (nll [B], lse [B, H, W]): lse = logsumexp_k(lp_k +
logit_k) per pixel is all its backward keeps (it recomputes the rest). Both ops return fp32 for fp16 and
bf16 inputs (fp64 for fp64): a likelihood sums thousands of terms. x is data (bin centres): it receives
no gradient.
"""

from __future__ import annotations

import torch

from ._dispatch import check_dtype, check_like, check_same, elementwise, empty_in_layout, kernels, register_autocast


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fp32_at_least(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(_acc_dtype(t.dtype)) for t in ts]


# ---- elementwise discretized logistic ----

#         device  backends, preferred first (else matnet.ops.reference)
KERNELS = kernels(op="discretized_logistic_nll", cuda=("ext",), cpu=("ext",))


@torch.library.custom_op("matnet::discretized_logistic_nll", mutates_args=())
def _discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    # the kernels keep one dtype in and out: fp16/bf16 inputs are read as fp32, for an fp32 result
    kernel = KERNELS.fwd(x)
    return elementwise(lambda *a: (kernel(*a),), _fp32_at_least(x, mean, log_scale), x)[0]


@_discretized_logistic_nll.register_fake
def _(x, mean, log_scale):
    return empty_in_layout(x, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("matnet::discretized_logistic_nll_backward", mutates_args=())
def _discretized_logistic_nll_backward(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g_mean, g_ls = elementwise(KERNELS.bwd(x), _fp32_at_least(grad, x, mean, log_scale), mean)
    return g_mean.to(mean.dtype), g_ls.to(log_scale.dtype)


@_discretized_logistic_nll_backward.register_fake
def _(grad, x, mean, log_scale):
    return empty_in_layout(mean), empty_in_layout(mean, dtype=log_scale.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, mean, log_scale = ctx.saved_tensors
    return None, *_discretized_logistic_nll_backward(grad, x, mean, log_scale)  # x is data: no gradient


_discretized_logistic_nll.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_discretized_logistic_nll, "fp32")


def discretized_logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise -log P(x) of a discretized logistic(mean, exp(log_scale)) over 256 bins on [-1, 1].

    x, mean, log_scale: one shape, dtype (fp16, bf16, fp32, fp64; under autocast they may differ) and
    device; x holds bin centres 2k/255 - 1. Returns that shape in nats, fp32 (fp64 for fp64 inputs), as
    `matnet.ops.reference.discretized_logistic_nll`. Gradients flow to mean and log_scale; x gets none.
    """
    check_same("discretized_logistic_nll", x, mean=mean, log_scale=log_scale)
    check_dtype("discretized_logistic_nll", x)
    return _discretized_logistic_nll(x, mean, log_scale)


# ---- PixelCNN++ mixture ----

#             device  backends, preferred first (else matnet.ops.reference)
MIX_KERNELS = kernels(op="discretized_logistic_mixture_nll", cuda=("ext",), cpu=("ext",))


@torch.library.custom_op("matnet::discretized_logistic_mixture_nll", mutates_args=())
def _discretized_logistic_mixture_nll(
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (x, logit_probs, means, log_scales, coeffs)]
    return tuple(MIX_KERNELS.fwd(x)(*args))


@_discretized_logistic_mixture_nll.register_fake
def _(x, logit_probs, means, log_scales, coeffs):
    B, _, H, W = x.shape
    acc = _acc_dtype(x.dtype)
    return x.new_empty((B,), dtype=acc), x.new_empty((B, H, W), dtype=acc)


@torch.library.custom_op("matnet::discretized_logistic_mixture_nll_backward", mutates_args=())
def _discretized_logistic_mixture_nll_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    logit_probs: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    coeffs: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (grad, x, logit_probs, means, log_scales, coeffs, lse)]
    return tuple(MIX_KERNELS.bwd(x)(*args))


@_discretized_logistic_mixture_nll_backward.register_fake
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
    return None, *_discretized_logistic_mixture_nll_backward(grad_nll, x, logit_probs, means, log_scales,
                                                              coeffs, lse)


_discretized_logistic_mixture_nll.register_autograd(_mix_backward, setup_context=_mix_setup_context)
register_autocast(_discretized_logistic_mixture_nll, "fp32")


def _check_mixture(x, logit_probs, means, log_scales, coeffs) -> None:
    name = "discretized_logistic_mixture_nll"
    tensors = {"x": x, "logit_probs": logit_probs, "means": means, "log_scales": log_scales, "coeffs": coeffs}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {k} must be a tensor, got {type(t).__name__}")
    check_dtype(name, x)
    check_like(name, x, **{k: t for k, t in tensors.items() if k != "x"})  # dtype and device
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
    """-log p(x) per example (nats, [B], fp32; fp64 for fp64 inputs) of a PixelCNN++ discretized logistic
    mixture.

    x: [B, C, H, W] bin centres in [-1, 1]; logit_probs: [B, K, H, W]; means, log_scales: [B, K, C, H, W];
    coeffs: [B, K, C*(C-1)/2, H, W] (already squashed), pairs ordered (0,1), (0,2), (1,2), ...
    Any C >= 1 (C = 3, RGB, is the fast path); one dtype (fp16, bf16, fp32, fp64) and device.
    As `matnet.ops.reference.discretized_logistic_mixture_nll`; gradients flow to all but x.
    """
    _check_mixture(x, logit_probs, means, log_scales, coeffs)
    return _discretized_logistic_mixture_nll(x, logit_probs, means, log_scales, coeffs)[0]
