"""The one dispatch rule of matnet's ops: which backend runs an op for tensors of a device and dtype.

Backends, by name:

- "triton": `matnet.kernels.<module>.<op>_fwd / <op>_bwd` (CUDA tensors; needs triton);
- "ext": `torch.ops.matnet.<op>_fwd / <op>_bwd`, the C++/CUDA kernels of matnet._C;
- "reference": `matnet.ops.reference.<op>_fwd / <op>_bwd`, plain torch, for everything else. In eager mode
  the public wrappers of the convolution ops (`residual_conv_block`, `masked_conv2d`) run their reference
  backend as the composite `reference.<op>` under autograd instead: it is torch's own convolutions either way,
  and autograd's backward was 5-10% faster than the explicit one (no second concatenation, no gradient copies).
  Under torch.compile they call the registered op, so the table is never traced (`composite_inputs`).

Each op's module declares a `Kernels` table: for each device the backends it has, in order of
preference. `Kernels.backend(t)` takes the first one that supports t's dtype and is loaded, else the
reference. MATNET_FORCE_REFERENCE=1 (read here and nowhere else) routes every op to its reference,
public wrappers and FastMatNet included. Load failures are logged once with their reason, never raised.

Autocast: `register_autocast` gives each registered op its rule. Convolution-like ops run in the
autocast dtype; likelihoods and KL ("fp32" ops) compute and return fp32.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference

log = logging.getLogger("matnet.ops")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_AND_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def force_reference() -> bool:
    return os.environ.get("MATNET_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


@functools.cache
def extension_loaded() -> bool:
    """True when matnet._C (the C++/CUDA kernels) imported and registered its ops."""
    try:
        importlib.import_module("matnet._C")
        return True
    except Exception as e:  # ImportError, undefined symbols, ABI mismatch...
        log.warning("matnet._C not available (%s: %s); its ops run their reference", type(e).__name__, e)
        return False


def extension_has_cuda() -> bool:
    return extension_loaded() and bool(torch.ops.matnet.cuda_enabled())


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("matnet.kernels")
        return True
    except Exception as e:
        log.warning("triton kernels not available (%s); CUDA ops use the extension or the reference", e)
        return False


def _loaded(backend: str, device: str) -> bool:
    if backend == "triton":
        return device == "cuda" and triton_available()
    if backend == "ext":
        return extension_loaded() and (device != "cuda" or extension_has_cuda())
    raise ValueError(f"unknown backend {backend!r}")


@dataclass(frozen=True)
class Kernels:
    """An op's backends per device, in order of preference (the reference is always the last resort).

    op: the registered name (`matnet::<op>`); its launchers are `<op>_fwd` and `<op>_bwd` in every
    backend. triton: the module under `matnet.kernels` that holds the Triton launchers.
    """

    op: str
    cuda: tuple[str, ...] = ()
    cpu: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOATS
    triton: str | None = None

    def backend(self, t: torch.Tensor) -> str:
        return self.backend_for(t.device.type, t.dtype)

    def backend_for(self, device: str, dtype: torch.dtype) -> str:
        if force_reference() or dtype not in self.dtypes or device not in ("cuda", "cpu"):
            return "reference"
        return next((name for name in getattr(self, device) if _loaded(name, device)), "reference")

    def _launcher(self, t: torch.Tensor, which: str) -> Callable:
        name = f"{self.op}_{which}"
        backend = self.backend(t)
        if backend == "triton":
            return getattr(importlib.import_module(f"matnet.kernels.{self.triton}"), name)
        if backend == "ext":
            return getattr(torch.ops.matnet, name)
        return getattr(reference, name)

    def fwd(self, t: torch.Tensor) -> Callable:
        """The forward launcher for tensors like t."""
        return self._launcher(t, "fwd")

    def bwd(self, t: torch.Tensor) -> Callable:
        """The backward launcher for tensors like t."""
        return self._launcher(t, "bwd")


_TABLES: dict[str, Kernels] = {}


def kernels(**table) -> Kernels:
    """Declares (and records, for `backends`) an op's table."""
    k = Kernels(**table)
    _TABLES[k.op] = k
    return k


def backends(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """{op: backend} that runs for tensors of this device type and dtype (for logs and scripts)."""
    return {op: k.backend_for(device, dtype) for op, k in _TABLES.items()}


def conv_fp32_precision() -> str:
    """'tf32' or 'ieee': what torch allows fp32 convolutions to use, so matnet's fp32 convs follow the same
    setting as cuDNN's. Read through the fp32_precision API where it exists (reading the legacy flag raises
    once a program has set the new one), else through cudnn.allow_tf32."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    # "none" inherits from the enclosing level: cudnn, then the global setting
    for p in (conv, getattr(torch.backends.cudnn, "fp32_precision", "none"), torch.backends.fp32_precision):
        if p != "none":
            return "tf32" if p == "tf32" else "ieee"
    return "ieee"


# ---- memory layout --------------------------------------------------------------------------------
# Every op keeps the layout of its first input: channels_last in, channels_last out (so a channels_last
# model never converts between modules), anything else in, contiguous NCHW out. Fake kernels use the
# same rule, so torch.compile sees the real strides.


def layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor whose channels are innermost (a channels_last map, or a view of one such
    as a channel chunk) unless it is also plain contiguous; else contiguous."""
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last) or (t.shape[1] > 1 and t.stride(1) == 1):
        return torch.channels_last
    return torch.contiguous_format


def empty_in_layout(like: torch.Tensor, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of `shape` (default: like's) in like's layout (see `layout`)."""
    shape = like.shape if shape is None else shape
    fmt = layout(like) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def to_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's layout (a no-op when it already is): what every op returns for an output shaped like `like`."""
    fmt = layout(like) if t.dim() == 4 else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def elementwise(kernel, ts: list[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Runs an elementwise kernel that wants contiguous inputs on `ts`, in the layout of `like`: for
    channels_last, the inputs go in as contiguous NHWC views and the outputs come back channels_last."""
    if layout(like) is torch.channels_last:
        views = [t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) for t in ts]
        return tuple(o.permute(0, 3, 1, 2) if o.dim() == 4 else o for o in kernel(*views))
    return tuple(kernel(*(t.contiguous() for t in ts)))


# ---- autocast -------------------------------------------------------------------------------------


def _cast(v, dtype: torch.dtype, device_type: str):
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type == device_type \
            and v.dtype != torch.float64:
        return v.to(dtype)
    return v


def composite_inputs(table: Kernels, args: tuple) -> tuple | None:
    """For a convolution op whose reference backend is torch's own convolutions: its inputs (args[0] picks the
    backend), cast as its autocast rule casts them, when the wrapper should run the composite `reference.<op>`
    under autograd (eager mode, reference backend), else None. None while compiling, so the table, whose checks
    import modules on CUDA, is never traced."""
    if torch.compiler.is_compiling() or table.backend(args[0]) != "reference":
        return None
    return autocast_inputs("conv", args[0].device.type, args)


def autocast_inputs(rule: str, device_type: str, args: tuple) -> tuple:
    """args as the registered ops' autocast rule casts them: while autocast is on for device_type, floating
    tensors of that device in the autocast dtype (rule "conv") or fp32 ("fp32"), fp64 left alone."""
    if not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type) if rule == "conv" else torch.float32
    return tuple(_cast(a, dtype, device_type) for a in args)


def register_autocast(op, rule: str) -> None:
    """Autocast kernels of a `torch.library.custom_op` for CPU and CUDA. rule "conv": floating inputs
    are cast to the autocast dtype (bf16/fp16); "fp32": to fp32. fp64 inputs are left alone, and the
    op then runs with autocast off, so direct `torch.ops.matnet.*` calls follow the same rule."""
    if rule not in ("conv", "fp32"):
        raise ValueError(f"rule must be 'conv' or 'fp32', got {rule!r}")
    lib = torch.library.Library("matnet", "FRAGMENT")
    _LIBS.append(lib)  # a registration lives as long as its Library object
    name = op._name  # a CustomOpDef's name within the "matnet" namespace
    for device_type in ("cpu", "cuda"):
        def kernel(_keyset, *args, _dev=device_type):
            args = autocast_inputs(rule, _dev, args)
            with torch.autocast(_dev, enabled=False):
                return op(*args)

        lib.impl(name, kernel, "Autocast" + torch._C._dispatch_key_for_device(device_type), with_keyset=True)


_LIBS: list[torch.library.Library] = []


def autocasting(t: torch.Tensor) -> bool:
    dev = t.device.type
    return dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)


# ---- input checks shared by every op's public wrapper ---------------------------------------------


def check_like(name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Clear errors, before any kernel launch, for inputs whose dtype or device differ from `ref`'s.
    Under autocast dtypes may differ: the op casts them."""
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{name}: expected tensors, got {type(ref).__name__}")
    if not ref.is_floating_point():
        raise TypeError(f"{name}: expected floating-point tensors, got {ref.dtype}")
    mixed_ok = autocasting(ref)
    for k, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {k} must be a tensor or None, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{name}: {k} is on {t.device} but the first input is on {ref.device}")
        if t.dtype != ref.dtype and not (mixed_ok and t.is_floating_point()):
            raise TypeError(f"{name}: {k} has dtype {t.dtype} but the first input has {ref.dtype}")


def check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOATS) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}, use one of {dtypes}")


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
