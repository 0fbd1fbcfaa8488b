"""Helpers shared by matnet's Triton launchers: where kernels run, and in what precision."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from matnet.ops._dispatch import conv_fp32_precision


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the kernels run on CPU tensors, one program after another."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype):
    """Math dtype of the elementwise kernels: fp64 for fp64 storage, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(LOWP, DOT_PREC) for tl.dot: fp16/bf16 operands feed tensor cores directly on a GPU, fp32 ones
    as tf32 or ieee as torch allows cuDNN's fp32 convolutions (`conv_fp32_precision`). Under the
    interpreter everything stays fp32 (its bf16 arithmetic is not exact)."""
    if interpreting():
        return False, "ieee"
    return dtype in (torch.float16, torch.bfloat16), conv_fp32_precision()


@triton.jit
def dlrelu(v, slope):
    # lrelu'(a), from a or from lrelu(a): both carry the sign of a when slope >= 0
    return tl.where(v > 0, 1.0, slope)


def stage_output(y: torch.Tensor | None) -> bool:
    """Whether a kernel should write y through an fp32 copy: the interpreter truncates fp32 -> bf16
    stores (a GPU rounds to nearest even)."""
    return y is not None and y.dtype == torch.bfloat16 and interpreting()


def wgrad_split(P: int, tiles: int, BP: int, device: torch.device, split: int | None) -> int:
    """Programs along the pixel axis of a weight-gradient launch (partial sums reduced by the caller)."""
    p_blocks = triton.cdiv(P, BP)
    if split is None:
        if interpreting() or device.type != "cuda":
            split = 1
        else:
            # enough programs to fill the GPU; each keeps a few pixel blocks to amortize its store
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            split = max(1, min(p_blocks // 4, triton.cdiv(4 * sms, max(tiles, 1))))
    return max(1, min(split, p_blocks))
