"""The fused residual conv block (paper Eq. 7, 9, 10) as a registered op.

    out = lrelu(h + conv(a1, w2) + b2),   a1 = lrelu(conv([h; extra], w1) + b1)

`residual_conv_block` validates its inputs, honours MATNET_FORCE_REFERENCE and calls
`torch.ops.matnet.residual_conv_block`, which returns (out, a1): a1 is what the backward needs
(lrelu' is read off the sign of a1 and out, slope >= 0). CUDA tensors in fp32/fp16/bf16 run the
Triton kernels of `matnet.kernels.residual_conv`; anything else runs torch's convolutions. The
backward is its own op, `matnet::residual_conv_block_backward`, so both trace under torch.compile.
"""

import torch
import torch.nn.functional as F

from . import reference
from ._dispatch import check_4d, check_kernel, check_like, force_reference, side_channels, triton_available

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _TRITON_DTYPES and triton_available()


@torch.library.custom_op("matnet::residual_conv_block", mutates_args=())
def _residual_conv_block_op(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    extra: torch.Tensor | None,
    slope: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(h):
        from matnet.kernels.residual_conv import residual_conv_block_fwd

        return residual_conv_block_fwd(h, w1, b1, w2, b2, extra, slope)
    inp = h if extra is None else torch.cat([h, extra], dim=1)
    a1 = F.leaky_relu(F.conv2d(inp, w1, b1, padding=w1.shape[-1] // 2), slope)
    out = F.leaky_relu(h + F.conv2d(a1, w2, b2, padding=w2.shape[-1] // 2), slope)
    return out, a1


@_residual_conv_block_op.register_fake
def _(h, w1, b1, w2, b2, extra, slope):
    B, _, H, W = h.shape
    return h.new_empty(h.shape), h.new_empty(B, w1.shape[0], H, W)


@torch.library.custom_op("matnet::residual_conv_block_backward", mutates_args=())
def _residual_conv_block_backward_op(
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
    if _use_triton(h):
        from matnet.kernels.residual_conv import residual_conv_block_bwd

        gh, gextra, gw1, gb1, gw2, gb2 = residual_conv_block_bwd(grad_out, h, extra, w1, w2, out, a1, slope)
        return gh, (h.new_empty(0) if gextra is None else gextra), gw1, gb1, gw2, gb2
    # explicit formulas (not autograd): the registered backward is checked by gradcheck on CPU
    inp = h if extra is None else torch.cat([h, extra], dim=1)
    # lrelu' read off the sign of its output (slope > 0), one fused pass each
    g2 = torch.ops.aten.leaky_relu_backward(grad_out, out, slope, True)
    ga1, gw2, gb2 = _conv_backward(g2, a1, w2)
    g1 = torch.ops.aten.leaky_relu_backward(ga1, a1, slope, True)
    ginp, gw1, gb1 = _conv_backward(g1, inp, w1)
    C = h.shape[1]
    gh = ginp[:, :C] + g2
    gextra = h.new_empty(0) if extra is None else ginp[:, C:].contiguous()
    return gh, gextra, gw1, gb1, gw2, gb2


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """(grad_x, grad_w, grad_b) of a stride-1 'same' conv in one call, as autograd's own backward does."""
    p = w.shape[-1] // 2
    return torch.ops.aten.convolution_backward(
        grad, x, w, [w.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1, [True, True, True])


@_residual_conv_block_backward_op.register_fake
def _(grad_out, h, extra, w1, w2, out, a1, slope):
    gextra = h.new_empty(0) if extra is None else torch.empty_like(extra)
    return (torch.empty_like(h), gextra, torch.empty_like(w1), w1.new_empty(w1.shape[0]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]))


def _setup_context(ctx, inputs, output):
    h, w1, b1, w2, b2, extra, slope = inputs
    out, a1 = output
    ctx.save_for_backward(h, extra, w1, w2, out, a1)
    ctx.slope = slope
    ctx.has_b = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(a1)  # returned only to be saved; the public wrapper drops it


def _backward(ctx, grad_out, _grad_a1):
    h, extra, w1, w2, out, a1 = ctx.saved_tensors
    gh, gextra, gw1, gb1, gw2, gb2 = torch.ops.matnet.residual_conv_block_backward(
        grad_out, h, extra, w1, w2, out, a1, ctx.slope)
    has_b1, has_b2 = ctx.has_b
    return (gh, gw1, gb1 if has_b1 else None, gw2, gb2 if has_b2 else None,
            None if extra is None else gextra, None)


_residual_conv_block_op.register_autograd(_backward, setup_context=_setup_context)


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
    if not isinstance(slope, (int, float)) or slope < 0:
        raise ValueError(f"{name}: slope must be a number >= 0, got {slope!r}")


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
    if force_reference():
        return reference.residual_conv_block(h, w1, b1, w2, b2, extra, slope)
    return torch.ops.matnet.residual_conv_block(h, w1, b1, w2, b2, extra, float(slope))[0]
