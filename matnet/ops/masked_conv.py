"""Raster-order causal convolution (PixelCNN masks 'A' / 'B') as a registered op.

`masked_conv2d` validates its inputs, honours MATNET_FORCE_REFERENCE and calls
`torch.ops.matnet.masked_conv2d`. CUDA tensors in fp32/fp16/bf16 run the Triton kernels of
`matnet.kernels.masked_conv` (which visit only the unmasked taps of the x channels); anything
else runs torch's convolution with the masked weight. The backward is its own op,
`matnet::masked_conv2d_backward`; grad weight is zero on the masked taps.
"""

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import reference
from ._dispatch import check_4d, check_kernel, check_like, force_reference, side_channels
from .residual import _use_triton


def _full_mask(weight: torch.Tensor, cx: int, mask_type: str) -> torch.Tensor:
    """[Co, Cx + Cc, k, k] multiplier: causal_mask on the first cx input channels, 1 elsewhere."""
    mask = torch.ones_like(weight)
    mask[:, :cx] = reference.causal_mask(weight.shape[-1], mask_type, weight.dtype, weight.device)
    return mask


@torch.library.custom_op("matnet::masked_conv2d", mutates_args=())
def _masked_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_type: str,
    cond: torch.Tensor | None,
) -> torch.Tensor:
    if _use_triton(x):
        from matnet.kernels.masked_conv import masked_conv2d_fwd

        return masked_conv2d_fwd(x, weight, bias, mask_type, cond)
    inp = x if cond is None else torch.cat([x, cond], dim=1)
    w = weight * _full_mask(weight, x.shape[1], mask_type)
    return F.conv2d(inp, w, bias, padding=weight.shape[-1] // 2)


@_masked_conv2d_op.register_fake
def _(x, weight, bias, mask_type, cond):
    B, _, H, W = x.shape
    return x.new_empty(B, weight.shape[0], H, W)


@torch.library.custom_op("matnet::masked_conv2d_backward", mutates_args=())
def _masked_conv2d_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_type: str,
    cond: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_cond); grad_cond is empty [0] without cond."""
    if _use_triton(x):
        from matnet.kernels.masked_conv import masked_conv2d_bwd

        gx, gw, gb, gcond = masked_conv2d_bwd(grad_y, x, weight, mask_type, cond)
        return gx, gw, gb, (x.new_empty(0) if gcond is None else gcond)
    # explicit formulas (not autograd): the registered backward is checked by gradcheck on CPU
    pad = weight.shape[-1] // 2
    cx = x.shape[1]
    mask = _full_mask(weight, cx, mask_type)
    inp = x if cond is None else torch.cat([x, cond], dim=1)
    ginp = conv2d_input(inp.shape, weight * mask, grad_y, padding=pad)
    gw = conv2d_weight(inp, weight.shape, grad_y, padding=pad) * mask
    gcond = x.new_empty(0) if cond is None else ginp[:, cx:].contiguous()
    return ginp[:, :cx].contiguous(), gw, grad_y.sum((0, 2, 3)), gcond


@_masked_conv2d_backward_op.register_fake
def _(grad_y, x, weight, mask_type, cond):
    gcond = x.new_empty(0) if cond is None else torch.empty_like(cond)
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0]), gcond


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, cond = inputs
    ctx.save_for_backward(x, weight, cond)
    ctx.mask_type = mask_type
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, cond = ctx.saved_tensors
    gx, gw, gb, gcond = torch.ops.matnet.masked_conv2d_backward(grad_y, x, weight, ctx.mask_type, cond)
    return gx, gw, (gb if ctx.has_bias else None), None, (None if cond is None else gcond)


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


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
    if force_reference():
        return reference.masked_conv2d(x, weight, bias, mask_type, cond)
    return torch.ops.matnet.masked_conv2d(x, weight, bias, mask_type, cond)
