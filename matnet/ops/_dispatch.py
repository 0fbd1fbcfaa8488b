"""Which implementation an op runs: the Triton kernels, the C++/CUDA extension or the reference.

MATNET_FORCE_REFERENCE=1 routes every public op (and FastMatNet) to the plain-torch reference,
for debugging and A/B runs. Load failures are logged once with their reason, never raised.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("matnet.ops")


def force_reference() -> bool:
    return os.environ.get("MATNET_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


@functools.cache
def extension_loaded() -> bool:
    """True when matnet._C (the C++/CUDA kernels) imported and registered its ops."""
    try:
        importlib.import_module("matnet._C")
        return True
    except Exception as e:  # ImportError, undefined symbols, ABI mismatch...
        log.warning("matnet._C not available (%s: %s); using reference paths for the "
                    "likelihood and sampling ops on CPU", type(e).__name__, e)
        return False


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("matnet.kernels")  # absent when running from a tree that was never installed
        return True
    except Exception as e:
        log.warning("triton not available (%s); using reference paths on CUDA", e)
        return False


def extension_has_cuda() -> bool:
    return extension_loaded() and hasattr(torch.ops.matnet, "cuda_enabled") and bool(
        torch.ops.matnet.cuda_enabled())


def check_like(name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Clear errors, before any kernel launch, for inputs whose dtype or device differ from `ref`'s."""
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{name}: expected tensors, got {type(ref).__name__}")
    if not ref.is_floating_point():
        raise TypeError(f"{name}: expected floating-point tensors, got {ref.dtype}")
    for k, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {k} must be a tensor or None, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{name}: {k} is on {t.device} but the first input is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: {k} has dtype {t.dtype} but the first input has {ref.dtype}")


def check_same(name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """`check_like`, and every input must also have `ref`'s shape (elementwise ops)."""
    check_like(name, ref, **tensors)
    for k, t in tensors.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name}: {k} has shape {list(t.shape)} but the first input has {list(ref.shape)}")


def check_4d(name: str, **tensors: torch.Tensor | None) -> None:
    for k, t in tensors.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 4):
            got = f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {k} must be a 4-D tensor, got {got}")


def check_kernel(name: str, k: str, w: torch.Tensor) -> int:
    kh, kw = w.shape[-2:]
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"{name}: {k} must have an odd square kernel, got {kh}x{kw}")
    return kh


def side_channels(name: str, main: str, x: torch.Tensor, side: str, s: torch.Tensor | None) -> int:
    """Channels of an optional input read beside `x` (extra, cond): same batch and spatial size as x."""
    if s is None:
        return 0
    B, _, H, W = x.shape
    if s.shape[0] != B or s.shape[2:] != x.shape[2:]:
        raise ValueError(f"{name}: {side} has shape {list(s.shape)}, expected [{B}, *, {H}, {W}] "
                         f"to match {main} {list(x.shape)}")
    return s.shape[1]
