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
def exact_exp(x):
    # exp through fp64: for fp32, tl.exp is ex2.approx on NVIDIA GPUs (several ulps off for |x| > 1), fp64 goes
    # to libdevice; these kernels are memory-bound, so the fp64 math costs nothing measurable
    return tl.exp(x.to(tl.float64)).to(x.dtype)


@triton.jit
def dlrelu(v, slope):
    # lrelu'(a), from a or from lrelu(a): both carry the sign of a when slope >= 0
    return tl.where(v > 0, 1.0, slope)


# the epilogue's activation (conv_epilogue's ACT), one contract for both conv engines
ACT_NONE = 0
ACT_LRELU = 1  # epilogue applies lrelu
ACT_DLRELU = 2  # epilogue multiplies by lrelu'(saved activation)


@triton.jit
def conv_epilogue(acc, bias_ptr, res_ptr, res_gate_ptr, act_ptr, y_off, y_mask, offs_n, n_mask, slope,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATE_RES: tl.constexpr, ACT: tl.constexpr):
    """act(acc + bias[n] + res), res optionally times lrelu'(res_gate); act: 0 none, 1 lrelu, 2 times
    lrelu'(act_ptr). res, res_gate and act_ptr are read at y_off (the output's offsets), in fp32."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
        if GATE_RES:
            rg = tl.load(res_gate_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
            r = r * dlrelu(rg, slope)
        acc += r
    if ACT == 1:
        acc = tl.where(acc > 0, acc, acc * slope)
    if ACT == 2:
        av = tl.load(act_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
        acc = acc * dlrelu(av, slope)
    return acc


def stage_outputs(ys: tuple[torch.Tensor | None, ...]) -> list[tuple]:
    """(output, what the kernel writes) pairs: an fp32 twin (same layout) for a bf16 output under the
    interpreter, which truncates fp32 -> bf16 stores where a GPU rounds to nearest even; else the output."""
    return [(y, torch.empty_like(y, dtype=torch.float32)) if y is not None and y.dtype == torch.bfloat16
            and interpreting() else (y, y) for y in ys]


def copy_back(staged: list[tuple]) -> None:
    """Rounds each fp32 twin of `stage_outputs` into its output."""
    for y, tmp in staged:
        if tmp is not y:
            y.copy_(tmp)


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
