"""The lightweight autoregressive reconstruction of section 2.3.

A few masked convolutions (first 'A', then 'B') over the image, each layer also
reading the last TD output unrestricted: the output distribution of pixel j
depends on pixels before j in raster order and on the MatNet's output only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modules import OpsModule


class MaskedConv2d(OpsModule):
    """Raster-order causal conv over x, unrestricted over a conditioning input.

    weight: [out, in_x + in_cond, k, k]; the first in_x input channels are masked.
    """

    def __init__(self, in_x: int, in_cond: int, out: int, kernel_size: int, mask_type: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, in_x + in_cond, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.mask_type = mask_type

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.masked_conv2d(x, self.weight, self.bias, self.mask_type, cond)


class ARDecoder(nn.Module):
    """PixelCNN-style head: layer 1 masked 'A' (5x5), then 'B' (3x3); the MatNet output `cond`
    is fed into every layer. Returns the output distribution's parameters [B, n_params, H, W]."""

    def __init__(self, image_channels: int, cond_channels: int, n_params: int, layers: int = 5,
                 channels: int = 32, slope: float = 0.1):
        super().__init__()
        if layers < 2:
            raise ValueError(f"the autoregressive decoder needs at least 2 layers, got {layers}")
        convs = [MaskedConv2d(image_channels, cond_channels, channels, 5, "A")]
        convs += [MaskedConv2d(channels, cond_channels, channels, 3, "B") for _ in range(layers - 2)]
        convs.append(MaskedConv2d(channels, cond_channels, n_params, 3, "B"))
        self.convs = nn.ModuleList(convs)
        self.slope = slope

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h, cond)
            if i < len(self.convs) - 1:
                h = F.leaky_relu(h, self.slope)
        return h
