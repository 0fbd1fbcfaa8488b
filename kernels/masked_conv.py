"""Raster-order causal ('PixelCNN') convolution with an unrestricted conditioning input.

    y[b, o, p] = bias[o] + sum_{c < Cx} sum_{t < T} x[b, c, p + d_t] w[o, c, t]
                         + sum_{c < Cc} sum_{t < k*k} cond[b, c, p + d_t] w[o, Cx + c, t]

x: [B, Cx, H, W], cond: [B, Cc, H, W], w: [Co, Cx + Cc, k, k] (odd k), 'same' padding; taps t are
numbered in raster order, d_t = (t // k - k//2, t % k - k//2). The unmasked taps of
`causal_mask(k, mask_type)` are exactly the prefix t < T with T = k*k // 2 (+1 for 'B': the
centre), so the x part iterates only those and masked weights are never read.

Backward reuses the same kernels: grad x is the transposed conv of grad y over the same T taps
(grad cond over all taps); grad w is zero on the masked taps (never written) and the sum over
B*H*W of grad y x shifted input on the others; grad bias the sum of grad y.

The implicit-GEMM kernels live in `residual_conv.py` (NCHW) and `conv_nhwc.py` (channels_last).
"""

from __future__ import annotations

import torch

from .residual_conv import engine, pack_weight, pack_weight_t


def causal_taps(kernel_size: int, mask_type: str) -> int:
    """Number of unmasked raster-order taps of causal_mask(kernel_size, mask_type), a prefix."""
    return kernel_size * kernel_size // 2 + (mask_type == "B")


def masked_conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_type: str = "A",
    cond: torch.Tensor | None = None,
    block_sizes: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """y = masked_conv2d(x, weight, bias, mask_type, cond), shapes as in the module docstring
    (validated by the caller). Returns [B, Co, H, W] in x's dtype."""
    conv, _, fmt = engine(x)
    cond = None if cond is None or cond.shape[1] == 0 else cond
    if fmt is torch.contiguous_format:
        x = x.contiguous()
        cond = None if cond is None else cond.contiguous()
    B, _, H, W = x.shape
    k = weight.shape[-1]
    y = torch.empty(B, weight.shape[0], H, W, dtype=x.dtype, device=x.device, memory_format=fmt)
    conv(x, pack_weight(weight), y, k=k, taps1=causal_taps(k, mask_type), x2=cond, taps2=k * k,
                bias=bias, block_sizes=block_sizes)
    return y


def masked_conv2d_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_type: str = "A",
    cond: torch.Tensor | None = None,
    block_sizes: tuple[int, int, int] | None = None,
    wgrad_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias, grad cond), grad cond empty [0] without cond (the registered
    op's convention). grad weight is exactly zero on the masked taps of the x channels."""
    conv, wgrad, fmt = engine(x)
    if fmt is torch.contiguous_format:
        grad_y, x = grad_y.contiguous(), x.contiguous()
        cond = None if cond is None else cond.contiguous()
    k = weight.shape[-1]
    cx = x.shape[1]
    taps = causal_taps(k, mask_type)
    wt = pack_weight_t(weight)  # [k*k, Co, Cx + Cc]: the input-gradient operand
    gx = torch.empty_like(x, memory_format=fmt)
    conv(grad_y, wt[:, :, :cx], gx, k=k, sgn=-1, taps1=taps, block_sizes=block_sizes)
    gcond = x.new_empty(0)
    if cond is not None:
        gcond = torch.empty_like(cond, memory_format=fmt)
        conv(grad_y, wt[:, :, cx:], gcond, k=k, sgn=-1, block_sizes=block_sizes)
    gw, gb = wgrad(grad_y, [(x, taps), (cond, k * k)], k, block_sizes=block_sizes, split=wgrad_split)
    return gx, gw, gb, gcond
