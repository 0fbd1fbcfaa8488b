"""Reparametrized Gaussian sample and KL(q || p), fused: `gaussian_sample_kl`.

`matnet::gaussian_sample_kl` returns (z, kl) and `matnet::gaussian_sample_kl_backward` is its backward;
one pass each way. Under autocast both compute and return fp32.
"""

from __future__ import annotations

import torch

from ._dispatch import check_dtype, check_same, elementwise, empty_in_layout, kernels, register_autocast

#         device  backends, preferred first (else matnet.ops.reference)
KERNELS = kernels(op="gaussian_sample_kl", cuda=("triton", "ext"), cpu=("ext",), triton="gaussian_sample_kl")


@torch.library.custom_op("matnet::gaussian_sample_kl", mutates_args=())
def _gaussian_sample_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return elementwise(KERNELS.fwd(mu_q), [mu_q, logvar_q, mu_p, logvar_p, eps], mu_q)


@_gaussian_sample_kl.register_fake
def _(mu_q, logvar_q, mu_p, logvar_p, eps):
    return tuple(empty_in_layout(mu_q) for _ in range(2))


@torch.library.custom_op("matnet::gaussian_sample_kl_backward", mutates_args=())
def _gaussian_sample_kl_backward(
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return elementwise(KERNELS.bwd(mu_q), [grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps], mu_q)


@_gaussian_sample_kl_backward.register_fake
def _(grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps):
    return tuple(empty_in_layout(mu_q) for _ in range(5))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_z, grad_kl):
    return _gaussian_sample_kl_backward(grad_z, grad_kl, *ctx.saved_tensors)


_gaussian_sample_kl.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_gaussian_sample_kl, "fp32")


def gaussian_sample_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparametrized sample z = mu_q + exp(logvar_q / 2) * eps and elementwise KL(q || p).

    kl = 0.5 * (logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) * exp(-logvar_p) - 1), as
    `matnet.ops.reference.gaussian_sample_kl`. All five inputs share one shape, dtype (fp16, bf16, fp32 or
    fp64; under autocast they may differ, and the op computes in fp32) and device; z and kl have that
    shape and dtype. Differentiable wrt every input.
    """
    check_same("gaussian_sample_kl", mu_q, logvar_q=logvar_q, mu_p=mu_p, logvar_p=logvar_p, eps=eps)
    check_dtype("gaussian_sample_kl", mu_q)
    return _gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, eps)
