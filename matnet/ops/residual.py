"""The fused residual conv block (paper Eq. 7, 9, 10): `residual_conv_block`.

    out = lrelu(h + conv(a1, w2) + b2),   a1 = lrelu(conv([h; extra], w1) + b1)

`matnet::residual_conv_block` returns (out, a1): a1 is what the backward needs (lrelu' is read off the
sign of a1 and out, slope >= 0); `matnet::residual_conv_block_backward` is the backward, so both
trace under torch.compile. Under autocast the block runs in the autocast dtype.
"""

import math

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

#         device  backends, preferred first (else matnet.ops.reference: torch's convolutions)
KERNELS = kernels(op="residual_conv_block", cuda=("triton",), dtypes=LOW_AND_FP32, triton="residual_conv")


@torch.library.custom_op("matnet::residual_conv_block", mutates_args=())
def _residual_conv_block(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    extra: torch.Tensor | None,
    slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, a1 = KERNELS.fwd(h)(h, w1, b1, w2, b2, extra, slope)
    return to_layout(out, h), to_layout(a1, h)


@_residual_conv_block.register_fake
def _(h, w1, b1, w2, b2, extra, slope):
    B, _, H, W = h.shape
    return empty_in_layout(h), empty_in_layout(h, (B, w1.shape[0], H, W))


@torch.library.custom_op("matnet::residual_conv_block_backward", mutates_args=())
def _residual_conv_block_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    extra: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor,
    a1: torch.Tensor,
    slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, grad_extra, grad_w1, grad_b1, grad_w2, grad_b2); grad_extra is empty [0] without extra."""
    gh, gextra, gw1, gb1, gw2, gb2 = KERNELS.bwd(h)(grad_out, h, extra, w1, w2, out, a1, slope)
    gextra = gextra if extra is None else to_layout(gextra, extra)
    return to_layout(gh, h), gextra, to_layout(gw1, w1), gb1, to_layout(gw2, w2), gb2


@_residual_conv_block_backward.register_fake
def _(grad_out, h, extra, w1, w2, out, a1, slope):
    gextra = h.new_empty(0) if extra is None else empty_in_layout(extra)
    return (empty_in_layout(h), gextra, empty_in_layout(w1), w1.new_empty(w1.shape[0]),
            empty_in_layout(w2), w2.new_empty(w2.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w1, b1, w2, b2, extra, slope = inputs
    out, a1 = output
    ctx.save_for_backward(h, extra, w1, w2, out, a1)
    ctx.slope = slope
    ctx.has_b = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(a1)  # returned only to be saved; the public wrapper drops it


def _backward(ctx, grad_out, _grad_a1):
    h, extra, w1, w2, out, a1 = ctx.saved_tensors
    gh, gextra, gw1, gb1, gw2, gb2 = _residual_conv_block_backward(grad_out, h, extra, w1, w2, out, a1, ctx.slope)
    has_b1, has_b2 = ctx.has_b
    return (gh, gw1, gb1 if has_b1 else None, gw2, gb2 if has_b2 else None,
            None if extra is None else gextra, None)


_residual_conv_block.register_autograd(_backward, setup_context=_setup_context)
register_autocast(_residual_conv_block, "conv")


def _validate(h, w1, b1, w2, b2, extra, slope) -> None:
    name = "residual_conv_block"
    check_4d(name, h=h, w1=w1, w2=w2, extra=extra)
    check_like(name, h, w1=w1, b1=b1, w2=w2, b2=b2, extra=extra)
    C = h.shape[1]
    E = side_channels(name, "h", h, "extra", extra)
    M = w1.shape[0]
    if w1.shape[1] != C + E:
        raise ValueError(f"{name}: w1 has {w1.shape[1]} input channels but h has {C} and extra {E} "
                         f"(w1 must be [M, {C + E}, k, k])")
    if w2.shape[0] != C or w2.shape[1] != M:
        raise ValueError(f"{name}: w2 has shape {list(w2.shape)}, expected [{C}, {M}, k, k] "
                         f"(C from h, M from w1)")
    check_kernel(name, "w1", w1)
    check_kernel(name, "w2", w2)
    for k, b, n in (("b1", b1, M), ("b2", b2, C)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name}: {k} has shape {list(b.shape)}, expected [{n}]")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not 0 <= slope < math.inf:
        raise ValueError(f"{name}: slope must be a finite number >= 0, got {slope!r}")


def residual_conv_block(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    extra: torch.Tensor | None = None,
    slope: float = 0.1,
) -> torch.Tensor:
    """lrelu(h + conv(lrelu(conv([h; extra], w1) + b1), w2) + b2) with 'same' padding.

    h: [B, C, H, W]; extra: [B, E, H, W] or None; w1: [M, C+E, k1, k1]; b1: [M] or None;
    w2: [C, M, k2, k2]; b2: [C] or None; odd k; slope >= 0. Returns [B, C, H, W].
    """
    _validate(h, w1, b1, w2, b2, extra, slope)
    # CPU (and fp64): autograd through torch's convolutions outruns the registered op, whose explicit backward
    # concatenates [h; extra] again and copies the extra's gradient out of the concatenation's
    if (args := composite_inputs(KERNELS, (h, w1, b1, w2, b2, extra))) is not None:
        return reference.residual_conv_block(*args, float(slope))
    return _residual_conv_block(h, w1, b1, w2, b2, extra, float(slope))[0]
