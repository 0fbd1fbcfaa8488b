"""Fused reparametrized Gaussian sample and analytic KL(q || p) (Triton).

Forward, elementwise over n = numel (all inputs one shape; the launchers make them contiguous):

    s  = exp(logvar_q / 2),   d = mu_q - mu_p
    z  = mu_q + s * eps
    kl = (logvar_p - logvar_q + (s^2 + d^2) * exp(-logvar_p) - 1) / 2

Backward, for upstream gradients gz (of z) and gk (of kl), with r = exp(-logvar_p):

    d mu_q     = gz + gk * d * r
    d logvar_q = (gz * s * eps + gk * (s^2 * r - 1)) / 2
    d mu_p     = -gk * d * r
    d logvar_p = gk * (1 - (s^2 + d^2) * r) / 2
    d eps      = gz * s

One pass each way: the forward reads 5 and writes 2 tensors, the backward reads 7 and writes 5.
Math is fp32 for fp16/bf16/fp32 storage (loads are upcast at once, which the interpreter also needs:
its bf16 arithmetic is not exact) and fp64 for fp64; the exponentials go through fp64 (`utils.exact_exp`).
Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_dtype, device_ctx, exact_exp, interpreting


@triton.jit
def _gaussian_sample_kl_fwd_kernel(
    mu_q_ptr, lq_ptr, mu_p_ptr, lp_ptr, eps_ptr, z_ptr, kl_ptr, n,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """z, kl = sample and KL of the formulas above for elements [pid*BLOCK, (pid+1)*BLOCK) of n.

    Every pointer holds n contiguous elements; ACC is the math dtype (tl.float32 or tl.float64).
    Grid: (cdiv(n, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mu_q = tl.load(mu_q_ptr + offs, mask=mask, other=0.0).to(ACC)
    lq = tl.load(lq_ptr + offs, mask=mask, other=0.0).to(ACC)
    mu_p = tl.load(mu_p_ptr + offs, mask=mask, other=0.0).to(ACC)
    lp = tl.load(lp_ptr + offs, mask=mask, other=0.0).to(ACC)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(ACC)

    s = exact_exp(0.5 * lq)
    d = mu_q - mu_p
    z = mu_q + s * eps
    kl = 0.5 * (lp - lq + (s * s + d * d) * exact_exp(-lp) - 1.0)

    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_sample_kl_bwd_kernel(
    gz_ptr, gk_ptr, mu_q_ptr, lq_ptr, mu_p_ptr, lp_ptr, eps_ptr,
    g_mu_q_ptr, g_lq_ptr, g_mu_p_ptr, g_lp_ptr, g_eps_ptr, n,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradients wrt (mu_q, logvar_q, mu_p, logvar_p, eps) from (gz, gk), formulas above.

    Every pointer holds n contiguous elements. Grid: (cdiv(n, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(ACC)
    gk = tl.load(gk_ptr + offs, mask=mask, other=0.0).to(ACC)
    mu_q = tl.load(mu_q_ptr + offs, mask=mask, other=0.0).to(ACC)
    lq = tl.load(lq_ptr + offs, mask=mask, other=0.0).to(ACC)
    mu_p = tl.load(mu_p_ptr + offs, mask=mask, other=0.0).to(ACC)
    lp = tl.load(lp_ptr + offs, mask=mask, other=0.0).to(ACC)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(ACC)

    s = exact_exp(0.5 * lq)
    r = exact_exp(-lp)
    d = mu_q - mu_p
    v_r = s * s * r
    dkl_dmu = d * r
    g_mu_q = gz + gk * dkl_dmu
    g_lq = 0.5 * (gz * s * eps + gk * (v_r - 1.0))
    g_mu_p = -gk * dkl_dmu
    g_lp = 0.5 * gk * (1.0 - v_r - d * dkl_dmu)
    g_eps = gz * s

    out_ty = g_mu_q_ptr.dtype.element_ty
    tl.store(g_mu_q_ptr + offs, g_mu_q.to(out_ty), mask=mask)
    tl.store(g_lq_ptr + offs, g_lq.to(out_ty), mask=mask)
    tl.store(g_mu_p_ptr + offs, g_mu_p.to(out_ty), mask=mask)
    tl.store(g_lp_ptr + offs, g_lp.to(out_ty), mask=mask)
    tl.store(g_eps_ptr + offs, g_eps.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

_GPU_BLOCK = 1024
_GPU_WARPS = 4
# The interpreter runs programs one after another at 1-4 ms each, vectorized inside a block:
# few, large blocks.
_INTERPRETER_MAX_BLOCK = 1 << 16


def _launch_params(n: int, t: torch.Tensor, block_size: int | None) -> tuple[int, dict]:
    if block_size is not None:
        return block_size, {}
    if t.device.type == "cpu" or interpreting():
        return min(max(triton.next_power_of_2(n), 16), _INTERPRETER_MAX_BLOCK), {}
    return _GPU_BLOCK, {"num_warps": _GPU_WARPS}


def gaussian_sample_kl_fwd(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl), each of the inputs' shape and dtype. Inputs: one shape, dtype and device (unchecked).
    block_size (a power of 2) overrides the default, e.g. to test several programs on a small tensor."""
    args = [t.contiguous() for t in (mu_q, logvar_q, mu_p, logvar_p, eps)]
    z = torch.empty_like(args[0])
    kl = torch.empty_like(args[0])
    n = z.numel()
    if n == 0:
        return z, kl
    block, opts = _launch_params(n, z, block_size)
    with device_ctx(z):
        _gaussian_sample_kl_fwd_kernel[(triton.cdiv(n, block),)](
            *args, z, kl, n, ACC=acc_dtype(z.dtype), BLOCK=block, **opts,
        )
    return z, kl


def gaussian_sample_kl_bwd(
    grad_z: torch.Tensor, grad_kl: torch.Tensor, mu_q: torch.Tensor, logvar_q: torch.Tensor,
    mu_p: torch.Tensor, logvar_p: torch.Tensor, eps: torch.Tensor, block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients wrt (mu_q, logvar_q, mu_p, logvar_p, eps); all tensors one shape, dtype and device."""
    args = [t.contiguous() for t in (grad_z, grad_kl, mu_q, logvar_q, mu_p, logvar_p, eps)]
    grads = [torch.empty_like(args[2]) for _ in range(5)]
    n = args[2].numel()
    if n == 0:
        return tuple(grads)
    block, opts = _launch_params(n, args[2], block_size)
    with device_ctx(args[2]):
        _gaussian_sample_kl_bwd_kernel[(triton.cdiv(n, block),)](
            *args, *grads, n, ACC=acc_dtype(args[2].dtype), BLOCK=block, **opts,
        )
    return tuple(grads)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class TritonGaussianSampleKL(torch.autograd.Function):
    """The Triton kernels as an autograd function, for direct use. `matnet.ops.gaussian_sample_kl` is
    the registered op (torch.compile-friendly); its CUDA backend is the two launchers above."""

    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, eps):
        ctx.save_for_backward(mu_q, logvar_q, mu_p, logvar_p, eps)
        return gaussian_sample_kl_fwd(mu_q, logvar_q, mu_p, logvar_p, eps)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        return gaussian_sample_kl_bwd(grad_z, grad_kl, *ctx.saved_tensors)
