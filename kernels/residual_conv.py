"""Implicit-GEMM 'same' convolutions and the fused residual conv block.

The residual block (paper Eq. 7, 9, 10):

    a1  = lrelu(conv([h; extra], w1) + b1)          h: [B, C, H, W], extra: [B, E, H, W]
    out = lrelu(h + conv(a1, w2) + b2)              w1: [M, C+E, k1, k1], w2: [C, M, k2, k2]

Every convolution here is stride 1 with 'same' padding (odd k) and runs as an implicit GEMM:
a program owns a tile of output pixels (over B*H*W) x output channels and reduces over
input channels x taps with `tl.dot`, reading the shifted input straight from NCHW memory.
Two input sources are read in place (channel c < C1 from the first, c >= C1 from the second),
so `[h; extra]` is never materialized. The same kernels serve `masked_conv.py`: a source can
restrict its taps to a raster-order prefix, which is exactly the unmasked part of a causal mask.

Backward (s = slope, lrelu'(v) = 1 if v > 0 else s, read off a1 / out since s >= 0):

    g2     = grad_out * lrelu'(out)                         (prologue of every kernel reading grad_out)
    g1     = conv_T(g2, w2) * lrelu'(a1)                    (epilogue)
    [gh; gextra] = conv_T(g1, w1) + [g2; 0]                 (residual epilogue, split store)
    gw2 = sum_{b,p} g2 x shifted a1,   gb2 = sum g2
    gw1 = sum_{b,p} g1 x shifted [h; extra],   gb1 = sum g1

Loads are masked and upcast to fp32 at once; accumulation is fp32. On a GPU, fp16/bf16
operands go to `tl.dot` in their own dtype (tensor cores), fp32 ones as tf32 where torch lets
cuDNN's fp32 convolutions use it (`utils.conv_fp32_precision`). Under TRITON_INTERPRET=1 the same kernels run on CPU
tensors, all in fp32. Offsets within one sample (C*H*W) are 32-bit, the batch term 64-bit.

These are the NCHW kernels. `engine(t)` sends channels_last activations to the NHWC engine of
`conv_nhwc.py` (same launcher contract), so the block and `masked_conv.py` run on either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from matnet.ops._dispatch import layout

from . import conv_nhwc
from .utils import (
    ACT_DLRELU,
    ACT_LRELU,
    ACT_NONE,
    conv_epilogue,
    copy_back,
    device_ctx,
    dlrelu,
    dot_mode,
    interpreting,
    stage_outputs,
    wgrad_split,
)


@triton.jit
def _conv_accumulate(
    acc, x_ptr, gate_ptr, w_ptr, x_base, oy, ox, p_mask, offs_n, n_mask, offs_k,
    H, W, C, c_off, s_wt, s_wc, slope,
    K: tl.constexpr, SGN: tl.constexpr, TAPS: tl.constexpr, GATE: tl.constexpr,
    LOWP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[p, n] += sum_{t < TAPS} sum_{c < C} x[b, c, p + SGN*d_t] * w[t, c_off + c, n].

    x: one NCHW source (C channels); x_base [BLOCK_P]: offset of each output pixel (batch and
    position) in x; d_t = (t // K - K//2, t % K - K//2) is tap t in raster order, so a prefix
    t < TAPS is a causal mask; out-of-image taps read 0.
    With GATE the loaded x is multiplied by lrelu'(gate) (gate has x's layout).
    """
    HW = H * W
    a_cols = offs_k[None, :] * HW  # hoisted: the interpreter pays per op
    w_tile = offs_k[:, None] * s_wc + offs_n[None, :]
    n_cb = tl.cdiv(C, BLOCK_K)
    # one flat runtime loop over (tap, channel block): small code, pipelined across taps
    for r in range(0, TAPS * n_cb):
        t = r // n_cb
        c0 = (r - t * n_cb) * BLOCK_K
        dy = SGN * (t // K - K // 2)
        dx = SGN * (t % K - K // 2)
        iy = oy + dy
        ix = ox + dx
        sp_ok = p_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        c_ok = offs_k < C - c0
        a_off = (x_base + (dy * W + dx + c0 * HW))[:, None] + a_cols
        a_mask = sp_ok[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
        if GATE:
            gv = tl.load(gate_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
            a = a * dlrelu(gv, slope)
        w_ptrs = w_ptr + (t * s_wt + (c_off + c0) * s_wc) + w_tile
        w_mask = c_ok[:, None] & n_mask[None, :]
        if LOWP:
            wv = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc += tl.dot(a.to(wv.dtype), wv)
        else:
            wv = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            acc += tl.dot(a, wv, input_precision=DOT_PREC)
    return acc


@triton.jit
def _conv_same_kernel(
    x1_ptr, x1_gate_ptr, x2_ptr, w_ptr,
    bias_ptr, res_ptr, res_gate_ptr, act_ptr,
    y1_ptr, y2_ptr,
    P, H, W, C1, C2, N, N1,
    s_x1b, s_x2b, s_y1b, s_y2b, s_wt, s_wc,
    slope,
    K: tl.constexpr, SGN: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    HAS_X2: tl.constexpr, GATE_X1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    GATE_RES: tl.constexpr, ACT: tl.constexpr, SPLIT_Y: tl.constexpr,
    LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Direct 'same' convolution of up to two in-place sources with a fused epilogue.

    acc[b, n, p] = sum_{t<T1, c<C1} x1[b, c, p + SGN*d_t] w[t, c, n]
                 + sum_{t<T2, c<C2} x2[b, c, p + SGN*d_t] w[t, C1 + c, n]
    y = act(acc + bias[n] + res[b, n, p]),  res optionally times lrelu'(res_gate),
    act: none | lrelu | times lrelu'(act_ptr[b, n, p]).
    x1, x2: [B, C1|C2, H, W]; w: packed [K*K, C1 + C2, N] (strides s_wt, s_wc, 1);
    y1: [B, N1, H, W] takes channels n < N1, y2: [B, N - N1, H, W] the rest (SPLIT_Y).
    SGN = +1 is a forward conv; SGN = -1 with w packed as [t, c_out, c_in] is its input gradient.
    Grid: (cdiv(B*H*W, BLOCK_P), cdiv(N, BLOCK_N)).
    """
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    p_mask = offs_p < P
    n_mask = offs_n < N
    b = (offs_p // HW).to(tl.int64)
    s = offs_p % HW
    oy = s // W
    ox = s % W

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    acc = _conv_accumulate(acc, x1_ptr, x1_gate_ptr, w_ptr, b * s_x1b + s, oy, ox, p_mask, offs_n, n_mask, offs_k,
                           H, W, C1, 0, s_wt, s_wc, slope, K, SGN, T1, GATE_X1, LOWP, DOT_PREC, BLOCK_K)
    if HAS_X2:
        acc = _conv_accumulate(acc, x2_ptr, x2_ptr, w_ptr, b * s_x2b + s, oy, ox, p_mask, offs_n, n_mask, offs_k,
                               H, W, C2, C1, s_wt, s_wc, slope, K, SGN, T2, False, LOWP, DOT_PREC, BLOCK_K)

    y_off = b[:, None] * s_y1b + offs_n[None, :] * HW + s[:, None]
    y_mask = p_mask[:, None] & (offs_n < N1)[None, :]
    acc = conv_epilogue(acc, bias_ptr, res_ptr, res_gate_ptr, act_ptr, y_off, y_mask, offs_n, n_mask, slope,
                        HAS_BIAS, HAS_RES, GATE_RES, ACT)
    tl.store(y1_ptr + y_off, acc.to(y1_ptr.dtype.element_ty), mask=y_mask)
    if SPLIT_Y:
        y2_off = b[:, None] * s_y2b + (offs_n - N1)[None, :] * HW + s[:, None]
        y2_mask = p_mask[:, None] & ((offs_n >= N1) & n_mask)[None, :]
        tl.store(y2_ptr + y2_off, acc.to(y2_ptr.dtype.element_ty), mask=y2_mask)


@triton.jit
def _conv_wgrad_kernel(
    g_ptr, g_gate_ptr, x_ptr, ws_ptr, wsb_ptr,
    P, H, W, N, C, c_off, n_iter,
    s_gb, s_xb, s_ws_split, s_ws_n, s_ws_c, s_wsb_split,
    slope,
    K: tl.constexpr, GATE_G: tl.constexpr, WITH_BIAS: tl.constexpr,
    LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Weight (and bias) gradient of a 'same' convolution, split over B*H*W.

    ws[split, n, c_off + c, t] = sum_{p in chunk} g[b, n, p] * x[b, c, p + d_t]
    wsb[split, n]              = sum_{p in chunk} g[b, n, p]   (programs with c-tile 0, tap 0)
    g: [B, N, H, W], optionally times lrelu'(g_gate); x: [B, C, H, W]; ws, wsb fp32 partial sums
    (summed over `split` by the caller). Grid: (cdiv(N, BLOCK_N) * cdiv(C, BLOCK_C), taps, split);
    a program reduces n_iter blocks of BLOCK_P pixels.
    """
    pid_nc = tl.program_id(0)
    t = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_n = pid_nc // num_c
    pid_c = pid_nc % num_c
    HW = H * W
    dy = t // K - K // 2
    dx = t % K - K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = offs_n < N
    c_mask = offs_c < C

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p_start = pid_s * n_iter * BLOCK_P
    for i in range(0, n_iter):
        offs_p = p_start + i * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        b = (offs_p // HW).to(tl.int64)
        s = offs_p % HW
        g_off = b[None, :] * s_gb + offs_n[:, None] * HW + s[None, :]
        g_mask = n_mask[:, None] & p_mask[None, :]
        gv = tl.load(g_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        if GATE_G:
            gg = tl.load(g_gate_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            gv = gv * dlrelu(gg, slope)
        iy = s // W + dy
        ix = s % W + dx
        sp_ok = p_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        x_off = (b * s_xb + iy * W + ix)[:, None] + offs_c[None, :] * HW
        x_mask = sp_ok[:, None] & c_mask[None, :]
        if LOWP:
            xv = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
            acc += tl.dot(gv.to(xv.dtype), xv)
        else:
            xv = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            acc += tl.dot(gv, xv, input_precision=DOT_PREC)
        if WITH_BIAS:
            acc_b += tl.sum(gv, axis=1)

    ws_off = pid_s * s_ws_split + offs_n[:, None] * s_ws_n + (c_off + offs_c)[None, :] * s_ws_c + t
    tl.store(ws_ptr + ws_off, acc, mask=n_mask[:, None] & c_mask[None, :])
    if WITH_BIAS:
        tl.store(wsb_ptr + pid_s * s_wsb_split + offs_n, acc_b, mask=n_mask & (pid_c == 0) & (t == 0))


# ----------------------------------------------------------------------------------------------
# launchers (any device: CUDA, or CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------


def _blocks(P: int, N: int, C: int, block_sizes: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_N, BLOCK_K) of both conv kernels. tl.dot needs every dim >= 16. The interpreter
    pays per program, so it takes one large pixel tile. On a GPU, 64-pixel tiles with GPU_WARPS warps
    compile for sm_90 with no spills and at most 123 KB of shared memory for every preset's config
    (benchmarks/kernel_report.py); 128-pixel tiles with 4 warps spilled up to 2.8 KB, and the fp32
    weight gradient with its lrelu' gate needed 240 KB (an H100 has 227 KB). Not tuned for speed."""
    if block_sizes is not None:
        return block_sizes
    bn = min(max(triton.next_power_of_2(N), 16), 64)
    if interpreting():
        return min(max(triton.next_power_of_2(P), 16), 512), bn, min(max(triton.next_power_of_2(C), 16), 64)
    return 64, bn, min(max(triton.next_power_of_2(C), 16), 32)


GPU_WARPS = 8


def engine(t: torch.Tensor) -> tuple[Callable, Callable, torch.memory_format]:
    """(launch_conv, weight_grad, activation layout) of the engine for activation t: the NHWC engine of
    `conv_nhwc.py` for channels_last t, these NCHW kernels otherwise."""
    if layout(t) is torch.channels_last:
        return conv_nhwc.launch_conv, conv_nhwc.weight_grad, torch.channels_last
    return launch_conv, weight_grad, torch.contiguous_format


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, C, k, k] -> [k*k, C, N]: the forward-conv operand, contiguous along N. Packed on every call, not
    cached by w._version: fused optimizers (`Adam(fused=True)`) and writes through `.data` change w in place
    without bumping its version, so such a cache would hand out stale weights."""
    n, c, k, _ = w.shape
    return w.permute(2, 3, 1, 0).reshape(k * k, c, n).contiguous()


def pack_weight_t(w: torch.Tensor) -> torch.Tensor:
    """[N, C, k, k] -> [k*k, N, C]: the operand of the input-gradient conv (SGN = -1)."""
    n, c, k, _ = w.shape
    return w.permute(2, 3, 0, 1).reshape(k * k, n, c).contiguous()


def launch_conv(
    x1: torch.Tensor,
    w_packed: torch.Tensor,
    y1: torch.Tensor,
    *,
    k: int,
    sgn: int = 1,
    taps1: int | None = None,
    x2: torch.Tensor | None = None,
    taps2: int | None = None,
    x1_gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    res_gate: torch.Tensor | None = None,
    act: int = ACT_NONE,
    act_src: torch.Tensor | None = None,
    y2: torch.Tensor | None = None,
    slope: float = 0.0,
    block_sizes: tuple[int, int, int] | None = None,
) -> None:
    """Runs `_conv_same_kernel` into y1 (and y2). All tensors contiguous NCHW, one device;
    w_packed: [k*k, C1 + C2, N] with a unit stride along N (a last-dim slice is fine)."""
    B, C1, H, W = x1.shape
    C2 = 0 if x2 is None else x2.shape[1]
    N1 = y1.shape[1]
    N = N1 + (0 if y2 is None else y2.shape[1])
    kk = k * k
    assert w_packed.shape == (kk, C1 + C2, N) and w_packed.stride(2) == 1, (w_packed.shape, C1, C2, N)
    P = B * H * W
    if P == 0 or N == 0:
        return
    bias = None if bias is None else bias.contiguous()  # read with unit stride
    BP, BN, BK = _blocks(P, N, max(C1, C2), block_sizes)
    lowp, prec = dot_mode(x1.dtype)
    staged = stage_outputs((y1, y2))
    y1, y2 = (tmp for _, tmp in staged)
    dummy = y1
    grid = (triton.cdiv(P, BP), triton.cdiv(N, BN))
    with device_ctx(x1):
        _conv_same_kernel[grid](
            x1, dummy if x1_gate is None else x1_gate, dummy if x2 is None else x2, w_packed,
            dummy if bias is None else bias, dummy if res is None else res,
            dummy if res_gate is None else res_gate, dummy if act_src is None else act_src,
            y1, dummy if y2 is None else y2,
            P, H, W, C1, C2, N, N1,
            x1.stride(0), 0 if x2 is None else x2.stride(0), y1.stride(0), 0 if y2 is None else y2.stride(0),
            w_packed.stride(0), w_packed.stride(1),
            float(slope),
            K=k, SGN=sgn, T1=kk if taps1 is None else taps1, T2=kk if taps2 is None else taps2,
            HAS_X2=x2 is not None and C2 > 0, GATE_X1=x1_gate is not None, HAS_BIAS=bias is not None,
            HAS_RES=res is not None, GATE_RES=res_gate is not None, ACT=act, SPLIT_Y=y2 is not None,
            LOWP=lowp, DOT_PREC=prec, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK,
            num_warps=GPU_WARPS,
        )
    copy_back(staged)


def weight_grad(
    g: torch.Tensor,
    sources: list[tuple[torch.Tensor | None, int]],
    k: int,
    *,
    g_gate: torch.Tensor | None = None,
    slope: float = 0.0,
    block_sizes: tuple[int, int, int] | None = None,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad weight [N, sum C_i, k, k], grad bias [N]) of a 'same' conv whose input channels are the
    concatenation of `sources` (tensor or None, number of raster-order taps it uses); taps a source
    does not use get a zero gradient. g: [B, N, H, W], times lrelu'(g_gate) when given."""
    B, N, H, W = g.shape
    P = B * H * W
    kk = k * k
    c_tot = sum(0 if x is None else x.shape[1] for x, _ in sources)
    c_max = max([0] + [x.shape[1] for x, _ in sources if x is not None])
    BP, BN, BC = _blocks(P, N, c_max, block_sizes)
    if block_sizes is None and not interpreting():
        BN = max(BN, 64)  # N is the dot's M here, and Hopper's wgmma needs M >= 64 (else mma.sync)
    lowp, prec = dot_mode(g.dtype)
    tiles = triton.cdiv(N, BN) * triton.cdiv(max(c_max, 1), BC) * kk
    n_split = wgrad_split(P, tiles, BP, g.device, split)
    n_iter = triton.cdiv(triton.cdiv(P, BP), n_split)
    ws = torch.zeros(n_split, N, c_tot, kk, dtype=torch.float32, device=g.device)
    wsb = torch.zeros(n_split, N, dtype=torch.float32, device=g.device)
    bias_done = False
    c_off = 0
    with device_ctx(g):
        for x, taps in sources:
            C = 0 if x is None else x.shape[1]
            if C > 0 and taps > 0 and P > 0 and N > 0:
                grid = (triton.cdiv(N, BN) * triton.cdiv(C, BC), taps, n_split)
                _conv_wgrad_kernel[grid](
                    g, g if g_gate is None else g_gate, x, ws, wsb,
                    P, H, W, N, C, c_off, n_iter,
                    g.stride(0), x.stride(0), ws.stride(0), ws.stride(1), ws.stride(2), wsb.stride(0),
                    float(slope),
                    K=k, GATE_G=g_gate is not None, WITH_BIAS=not bias_done,
                    LOWP=lowp, DOT_PREC=prec, BLOCK_P=BP, BLOCK_N=BN, BLOCK_C=BC,
                    num_warps=GPU_WARPS,
                )
                bias_done = True
            c_off += C
    gw = ws.sum(0).view(N, c_tot, k, k).to(g.dtype)
    if bias_done:
        gb = wsb.sum(0)
    else:  # no source has any tap (e.g. a 1x1 'A' mask with no cond): the bias is the only term
        gg = g.float() if g_gate is None else g.float() * torch.where(g_gate > 0, 1.0, slope)
        gb = gg.sum((0, 2, 3))
    return gw, gb.to(g.dtype)


def residual_conv_block_fwd(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    extra: torch.Tensor | None = None,
    slope: float = 0.1,
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, a1): out = lrelu(h + conv(a1, w2) + b2), a1 = lrelu(conv([h; extra], w1) + b1).

    Inputs as in `matnet.ops.reference.residual_conv_block` (validated by the caller);
    a1 [B, M, H, W] is the saved activation for the backward pass.
    """
    conv, _, fmt = engine(h)
    if fmt is torch.contiguous_format:
        h = h.contiguous()
        extra = None if extra is None else extra.contiguous()
    B, C, H, W = h.shape
    M, k1, k2 = w1.shape[0], w1.shape[-1], w2.shape[-1]
    a1 = torch.empty(B, M, H, W, dtype=h.dtype, device=h.device, memory_format=fmt)
    out = torch.empty_like(h, memory_format=fmt)
    conv(h, pack_weight(w1), a1, k=k1, x2=extra, bias=b1, act=ACT_LRELU, slope=slope, block_sizes=block_sizes)
    conv(a1, pack_weight(w2), out, k=k2, bias=b2, res=h, act=ACT_LRELU, slope=slope, block_sizes=block_sizes)
    return out, a1


def residual_conv_block_bwd(
    grad_out: torch.Tensor,
    h: torch.Tensor,
    extra: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor,
    a1: torch.Tensor,
    slope: float = 0.1,
    block_sizes: tuple[int, int, int] | None = None,
    wgrad_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, grad_extra, grad_w1, grad_b1, grad_w2, grad_b2) from the forward's saved (h, extra, w1,
    w2, out, a1); grad_extra is empty [0] without extra. Biases always get a gradient (unused when
    absent)."""
    conv, wgrad, fmt = engine(h)
    if fmt is torch.contiguous_format:
        grad_out, h, out, a1 = (t.contiguous() for t in (grad_out, h, out, a1))
        extra = None if extra is None else extra.contiguous()
    k1, k2 = w1.shape[-1], w2.shape[-1]
    # g1 = conv_T(grad_out * lrelu'(out), w2) * lrelu'(a1)
    g1 = torch.empty_like(a1, memory_format=fmt)
    conv(grad_out, pack_weight_t(w2), g1, k=k2, sgn=-1, x1_gate=out, act=ACT_DLRELU, act_src=a1,
         slope=slope, block_sizes=block_sizes)
    # [gh; gextra] = conv_T(g1, w1) + [grad_out * lrelu'(out); 0]
    gh = torch.empty_like(h, memory_format=fmt)
    gextra = None if extra is None else torch.empty_like(extra, memory_format=fmt)
    conv(g1, pack_weight_t(w1), gh, k=k1, sgn=-1, y2=gextra, res=grad_out, res_gate=out,
         slope=slope, block_sizes=block_sizes)
    kk1, kk2 = k1 * k1, k2 * k2
    gw2, gb2 = wgrad(grad_out, [(a1, kk2)], k2, g_gate=out, slope=slope, block_sizes=block_sizes,
                     split=wgrad_split)
    gw1, gb1 = wgrad(g1, [(h, kk1), (extra, kk1)], k1, block_sizes=block_sizes, split=wgrad_split)
    return gh, (h.new_empty(0) if gextra is None else gextra), gw1, gb1, gw2, gb2
