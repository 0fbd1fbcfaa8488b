"""Raster-order causal convolution (PixelCNN masks 'A' / 'B'): `masked_conv2d`.

`matnet::masked_conv2d` and its backward `matnet::masked_conv2d_backward`; the Triton kernels visit only
the unmasked taps of the x channels, and grad weight is zero on the masked taps. Under autocast the
convolution runs in the autocast dtype.
"""

import torch

from . import reference
from ._dispatch import (
    LOW_AND_FP32,
    check_4d,
    check_kernel,
    check_like,
    composite_inputs,
    empty_in_layout,
    kernels,
    register_autocast,
    side_channels,
    to_layout,
)

#         device  backends, preferred first (else matnet.ops.reference: torch's convolution)
KERNELS = kernels(op="masked_conv2d", cuda=("triton",), dtypes=LOW_AND_FP32, triton="masked_conv")


@torch.library.custom_op("matnet::masked_conv2d", mutates_args=())
def _masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_type: str,
    cond: torch.Tensor | None,
) -> torch.Tensor:
    return to_layout(KERNELS.fwd(x)(x, weight, bias, mask_type, cond), x)


@_masked_conv2d.register_fake
def _(x, weight, bias, mask_type, cond):
    B, _, H, W = x.shape
    return empty_in_layout(x, (B, weight.shape[0], H, W))


@torch.library.custom_op("matnet::masked_conv2d_backward", mutates_args=())
def _masked_conv2d_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_type: str,
    cond: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_cond); grad_cond is empty [0] without cond."""
    gx, gw, gb, gcond = KERNELS.bwd(x)(grad_y, x, weight, mask_type, cond)
    return to_layout(gx, x), to_layout(gw, weight), gb, gcond if cond is None else to_layout(gcond, cond)


@_masked_conv2d_backward.register_fake
def _(grad_y, x, weight, mask_type, cond):
    gcond = x.new_empty(0) if cond is None else empty_in_layout(cond)
    return empty_in_layout(x), empty_in_layout(weight), weight.new_empty(weight.shape[0]), gcond


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, cond = inputs
    ctx.save_for_backward(x, weight, cond)
    ctx.mask_type = mask_type
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, cond = ctx.saved_tensors
    gx, gw, gb, gcond = _masked_conv2d_backward(grad_y, x, weight, ctx.mask_type, cond)
    return gx, gw, (gb if ctx.has_bias else None), None, (None if cond is None else gcond)


_masked_conv2d.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_masked_conv2d, "conv")


def _validate(x, weight, bias, mask_type, cond) -> None:
    name = "masked_conv2d"
    if mask_type not in ("A", "B"):
        raise ValueError(f"{name}: mask_type must be 'A' or 'B', got {mask_type!r}")
    check_4d(name, x=x, weight=weight, cond=cond)
    check_like(name, x, weight=weight, bias=bias, cond=cond)
    Cx = x.shape[1]
    Cc = side_channels(name, "x", x, "cond", cond)
    if weight.shape[1] != Cx + Cc:
        raise ValueError(f"{name}: weight has {weight.shape[1]} input channels but x has {Cx} and cond {Cc} "
                         f"(weight must be [Co, {Cx + Cc}, k, k])")
    check_kernel(name, "weight", weight)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias has shape {list(bias.shape)}, expected [{weight.shape[0]}]")


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_type: str = "A",
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raster-order causal conv over x, unrestricted over cond, 'same' padding.

    x: [B, Cx, H, W]; cond: [B, Cc, H, W] or None; weight: [Co, Cx + Cc, k, k] (odd k), its first
    Cx input channels masked by `causal_mask(k, mask_type)`; bias: [Co] or None. Returns [B, Co, H, W].
    """
    _validate(x, weight, bias, mask_type, cond)
    if (args := composite_inputs(KERNELS, (x, weight, bias, cond))) is not None:  # as residual_conv_block
        x, weight, bias, cond = args
        return reference.masked_conv2d(x, weight, bias, mask_type, cond)
    return _masked_conv2d(x, weight, bias, mask_type, cond)
