"""Helpers shared by matnet's Triton launchers: where kernels run, and in what precision."""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: the kernels run on CPU tensors, one program after another."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype):
    """Math dtype of the elementwise kernels: fp64 for fp64 storage, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def conv_fp32_precision() -> str:
    """'tf32' or 'ieee': what torch allows fp32 convolutions to use, so matnet's fp32 convs follow the
    same setting as cuDNN's. Read through the fp32_precision API where it exists (reading the legacy
    flag raises once a program has set the new one), else through cudnn.allow_tf32."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is None:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    # "none" inherits from the enclosing level: cudnn, then the global setting
    for p in (conv, getattr(torch.backends.cudnn, "fp32_precision", "none"), torch.backends.fp32_precision):
        if p != "none":
            return "tf32" if p == "tf32" else "ieee"
    return "ieee"


def dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(LOWP, DOT_PREC) for tl.dot: fp16/bf16 operands feed tensor cores directly on a GPU, fp32 ones
    as tf32 or ieee per `conv_fp32_precision`. Under the interpreter everything stays fp32 (its bf16
    arithmetic is not exact)."""
    if interpreting():
        return False, "ieee"
    return dtype in (torch.float16, torch.bfloat16), conv_fp32_precision()
