"""Freed CPU memory kept for reuse: glibc's malloc set so that each step's activations come back from the
heap instead of fresh pages.

By default glibc hands freed blocks above an adaptive threshold back to the kernel and trims the top of the
heap, so every training step maps its large activations afresh and the kernel zero-fills each page again:
17,000-30,000 minor page faults per "mnist" step of batch 100, 7-11% of its time (benchmarks/RESULTS.md).
With the mmap threshold fixed at glibc's maximum (32 MiB; larger blocks are still mapped) and trimming off,
those blocks stay in the heap and the next step reuses them. The cost: the process keeps its peak heap until
it exits. The `matnet` command applies this at start; set MATNET_KEEP_FREED_MEMORY=0 to leave malloc as is.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV", "keep_freed_memory"]

ENV = "MATNET_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound on 64-bit systems
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Set glibc's malloc as above, for the whole process. Returns whether it was applied: False with
    MATNET_KEEP_FREED_MEMORY=0, or where the C library is not glibc (nothing is changed there)."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    if value == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
