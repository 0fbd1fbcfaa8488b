"""FastMatNet: the reference MatNet on the fast ops (same parameters and state_dict keys)."""

from __future__ import annotations

from .model import MatNet


class FastMatNet(MatNet):
    """Drop-in for `MatNet` whose modules run `matnet.ops` (fused Triton kernels on CUDA, C++ kernels
    on CPU). Noise is drawn in the same order as in MatNet, so with the same seed, weights and inputs
    both give the same outputs within the dtype's tolerance. MATNET_FORCE_REFERENCE=1 sends every op
    to its reference path."""

    default_ops = "fast"
