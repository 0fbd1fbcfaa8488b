"""Reparametrized Gaussian sample and KL(q || p), fused: `gaussian_sample_kl`.

The registered ops are `matnet::gaussian_sample_kl` (forward, returns (z, kl)) and
`matnet::gaussian_sample_kl_backward`. Both dispatch by device:

- CUDA tensors: the Triton kernels (`matnet.kernels.gaussian_sample_kl`); without triton, the CUDA kernels
  of matnet._C when it was built with CUDA; else the reference math.
- CPU tensors: the C++ kernels of matnet._C (`torch.ops.matnet.gaussian_sample_kl_fwd/_bwd`) when the
  extension loaded; else the reference math.
- MATNET_FORCE_REFERENCE=1: the reference math (and the wrapper below calls the reference directly).
"""

from __future__ import annotations

import torch

from . import _dispatch, reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backend(t: torch.Tensor) -> str:
    """'triton', 'ext' (matnet._C) or 'reference' for tensors like t."""
    if _dispatch.force_reference():
        return "reference"
    if t.device.type == "cuda":
        if _dispatch.triton_available():
            return "triton"
        return "ext" if _dispatch.extension_has_cuda() else "reference"
    if t.device.type == "cpu" and _dispatch.extension_loaded():
        return "ext"
    return "reference"


def _reference_backward(grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps):
    """Chain rule of reference.gaussian_sample_kl in torch ops (formulas: kernels/gaussian_sample_kl.py)."""
    s = torch.exp(0.5 * logvar_q)
    r = torch.exp(-logvar_p)
    d = mu_q - mu_p
    v_r = s * s * r
    dkl_dmu = d * r
    return (
        grad_z + grad_kl * dkl_dmu,
        0.5 * (grad_z * s * eps + grad_kl * (v_r - 1.0)),
        -grad_kl * dkl_dmu,
        0.5 * grad_kl * (1.0 - v_r - d * dkl_dmu),
        grad_z * s,
    )


@torch.library.custom_op("matnet::gaussian_sample_kl", mutates_args=())
def _gaussian_sample_kl_op(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (mu_q, logvar_q, mu_p, logvar_p, eps)]
    backend = _backend(mu_q)
    if backend == "triton":
        from matnet.kernels.gaussian_sample_kl import gaussian_sample_kl_forward

        return gaussian_sample_kl_forward(*args)
    if backend == "ext":
        return tuple(torch.ops.matnet.gaussian_sample_kl_fwd(*args))
    return reference.gaussian_sample_kl(*args)


@_gaussian_sample_kl_op.register_fake
def _(mu_q, logvar_q, mu_p, logvar_p, eps):
    return tuple(torch.empty_like(mu_q, memory_format=torch.contiguous_format) for _ in range(2))


@torch.library.custom_op("matnet::gaussian_sample_kl_backward", mutates_args=())
def _gaussian_sample_kl_backward_op(
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = [t.contiguous() for t in (grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps)]
    backend = _backend(mu_q)
    if backend == "triton":
        from matnet.kernels.gaussian_sample_kl import gaussian_sample_kl_backward

        return gaussian_sample_kl_backward(*args)
    if backend == "ext":
        return tuple(torch.ops.matnet.gaussian_sample_kl_bwd(*args))
    return _reference_backward(*args)


@_gaussian_sample_kl_backward_op.register_fake
def _(grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps):
    return tuple(torch.empty_like(mu_q, memory_format=torch.contiguous_format) for _ in range(5))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_z, grad_kl):
    return _gaussian_sample_kl_backward_op(grad_z, grad_kl, *ctx.saved_tensors)


_gaussian_sample_kl_op.register_autograd(_backward, setup_context=_setup_context)


def gaussian_sample_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparametrized sample z = mu_q + exp(logvar_q / 2) * eps and elementwise KL(q || p).

    kl = 0.5 * (logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) * exp(-logvar_p) - 1), as
    `matnet.ops.reference.gaussian_sample_kl`. All five inputs share one shape, dtype (fp16, bf16, fp32 or
    fp64) and device; z and kl have that shape and dtype. Differentiable wrt every input.
    """
    _dispatch.check_same("gaussian_sample_kl", mu_q, logvar_q=logvar_q, mu_p=mu_p, logvar_p=logvar_p, eps=eps)
    if mu_q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gaussian_sample_kl: unsupported dtype {mu_q.dtype}, use one of {SUPPORTED_DTYPES}")
    if _dispatch.force_reference():
        return reference.gaussian_sample_kl(mu_q, logvar_q, mu_p, logvar_p, eps)
    return _gaussian_sample_kl_op(mu_q, logvar_q, mu_p, logvar_p, eps)
