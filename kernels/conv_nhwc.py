"""The channels-last (NHWC) convolution engine: implicit-GEMM 'same' convolutions for Hopper.

Same contract as the NCHW kernels of `residual_conv.py` (`launch_conv`, `weight_grad`: two in-place
sources, raster-order tap prefixes, lrelu / lrelu' gates, bias + residual epilogue, split store), so
`residual_conv_block` and `masked_conv2d` run on either engine unchanged; `engine(t)` picks this one
for channels_last activations. What the layout buys on a GPU:

- Channels are the contiguous reduction dimension. A source whose pixel strides are multiples of
  16 bytes is read through a 4-d TMA descriptor over [B, H, W, C]: one bulk copy per (tap, channel
  block), pipelined by `num_stages`, and the descriptor's out-of-bounds zero fill is the 'same'
  padding (no masks, no index math). Other sources (3 or 5 channels, odd views) fall back to
  masked pointer loads, as wide as their alignment allows. Channel chunks of a channels_last tensor
  are read in place.
- A program owns a spatial tile TB x TH x TW (batch x rows x columns, BLOCK_P pixels) of the
  output. The k x k taps of one channel block are k x k shifted boxes of the same haloed region, so
  after the first tap the halo comes from L1/L2, not HBM. (Triton's language has no sub-views of
  shared memory, which a single explicit halo load feeding all taps would need.)
- The weight gradient covers all taps of a k <= 3 kernel in one program: one MMA of
  [BLOCK_N, BLOCK_P] x [BLOCK_P, taps x channels], so the incoming gradient is read once per
  channel block, not once per tap (larger kernels take taps in groups).
- Configs are autotuned on a GPU (block sizes, warps, stages); the interpreter runs one pinned
  config. Weights are packed on every call (`residual_conv.pack_weight` says why not cached).

The block-level launchers (`residual_conv_block_fwd` / `_bwd`, `masked_conv2d_fwd` / `_bwd`) pick an
engine with `residual_conv.engine`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
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

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: pointer loads only
    TensorDescriptor = None


def tile_shape(block_p: int, h_p2: int, w_p2: int) -> tuple[int, int, int]:
    """(TB, TH, TW) of a BLOCK_P-pixel output tile: whole (power-of-2 padded) rows first, then rows,
    then images, so 7x7 maps take 8x8 tiles and 1x1 (FC) maps take 64 images. `_conv_nhwc_kernel`
    computes the same from its constexprs."""
    tw = min(w_p2, block_p)
    th = min(h_p2, block_p // tw)
    return block_p // (th * tw), th, tw


@triton.jit
def _nhwc_accumulate(
    acc, x, gate, w_ptr, b0, y0, x0, bi, yi, xi, p_ok, offs_n, n_mask, offs_k,
    B, H, W, C, sb, sy, sx, c_off, s_wt, s_wc, slope,
    K: tl.constexpr, SGN: tl.constexpr, TAPS: tl.constexpr, GATE: tl.constexpr, TMA: tl.constexpr,
    LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    TB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[p, n] += sum_{t < TAPS, c < C} x[b, y + SGN*dy_t, x + SGN*dx_t, c] * w[t, c_off + c, n].

    x (and gate): a TMA descriptor over [B, H, W, C] with block [TB, TH, TW, BLOCK_K] (TMA), else a
    pointer with pixel strides sb, sy, sx and unit channel stride. Out-of-image taps read 0.
    """
    BLOCK_P: tl.constexpr = TB * TH * TW
    w_tile = offs_k[:, None] * s_wc + offs_n[None, :]
    n_cb = tl.cdiv(C, BLOCK_K)
    for r in range(0, TAPS * n_cb):
        t = r // n_cb
        c0 = (r - t * n_cb) * BLOCK_K
        dy = SGN * (t // K - K // 2)
        dx = SGN * (t % K - K // 2)
        if TMA:
            a = tl.reshape(x.load([b0, y0 + dy, x0 + dx, c0]), (BLOCK_P, BLOCK_K))
            if GATE:
                gv = tl.reshape(gate.load([b0, y0 + dy, x0 + dx, c0]), (BLOCK_P, BLOCK_K))
                a = a.to(tl.float32) * dlrelu(gv.to(tl.float32), slope)
        else:
            iy = yi + dy
            ix = xi + dx
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a_off = (bi * sb + iy * sy + ix * sx + c0)[:, None] + offs_k[None, :]
            a_mask = ok[:, None] & (offs_k < C - c0)[None, :]
            a = tl.load(x + a_off, mask=a_mask, other=0.0)
            if GATE:
                gv = tl.load(gate + a_off, mask=a_mask, other=0.0)
                a = a.to(tl.float32) * dlrelu(gv.to(tl.float32), slope)
        w_ptrs = w_ptr + (t * s_wt + (c_off + c0) * s_wc) + w_tile
        w_mask = (offs_k < C - c0)[:, None] & n_mask[None, :]
        wv = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if LOWP:
            acc += tl.dot(a.to(wv.dtype), wv)
        else:
            acc += tl.dot(a.to(tl.float32), wv.to(tl.float32), input_precision=DOT_PREC)
    return acc


@triton.jit
def _conv_nhwc_kernel(
    x1, x1_gate, x2, w_ptr,
    bias_ptr, res_ptr, res_gate_ptr, act_ptr,
    y1_ptr, y2_ptr,
    B, H, W, C1, C2, N, N1,
    s1b, s1y, s1x, s2b, s2y, s2x, s_wt, s_wc,
    slope,
    K: tl.constexpr, SGN: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    HAS_X2: tl.constexpr, GATE_X1: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    GATE_RES: tl.constexpr, ACT: tl.constexpr, SPLIT_Y: tl.constexpr,
    TMA1: tl.constexpr, TMA2: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    H_P2: tl.constexpr, W_P2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`residual_conv._conv_same_kernel` on NHWC: y = act(conv(x1) + conv(x2) + bias + res), with
    y1 [B, H, W, N1] and y2 [B, H, W, N - N1] contiguous NHWC, res / res_gate / act shaped like y1.
    Grid: (cdiv(B, TB) * cdiv(H, TH) * cdiv(W, TW), cdiv(N, BLOCK_N))."""
    # the tile of `tile_shape`
    TW: tl.constexpr = W_P2 if W_P2 < BLOCK_P else BLOCK_P
    TH: tl.constexpr = H_P2 if H_P2 < BLOCK_P // TW else BLOCK_P // TW
    TB: tl.constexpr = BLOCK_P // (TH * TW)
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tx = tl.cdiv(W, TW)
    n_ty = tl.cdiv(H, TH)
    x0 = (pid_t % n_tx) * TW
    y0 = ((pid_t // n_tx) % n_ty) * TH
    b0 = (pid_t // (n_tx * n_ty)) * TB
    i = tl.arange(0, BLOCK_P)
    bi = (b0 + i // (TH * TW)).to(tl.int64)
    yi = y0 + (i // TW) % TH
    xi = x0 + i % TW
    p_ok = (bi < B) & (yi < H) & (xi < W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    acc = _nhwc_accumulate(acc, x1, x1_gate, w_ptr, b0, y0, x0, bi, yi, xi, p_ok, offs_n, n_mask, offs_k,
                           B, H, W, C1, s1b, s1y, s1x, 0, s_wt, s_wc, slope,
                           K, SGN, T1, GATE_X1, TMA1, LOWP, DOT_PREC, TB, TH, TW, BLOCK_K)
    if HAS_X2:
        acc = _nhwc_accumulate(acc, x2, x2, w_ptr, b0, y0, x0, bi, yi, xi, p_ok, offs_n, n_mask, offs_k,
                               B, H, W, C2, s2b, s2y, s2x, C1, s_wt, s_wc, slope,
                               K, SGN, T2, False, TMA2, LOWP, DOT_PREC, TB, TH, TW, BLOCK_K)

    pix = (bi * H + yi) * W + xi
    y_off = pix[:, None] * N1 + offs_n[None, :]
    y_mask = p_ok[:, None] & (offs_n < N1)[None, :]
    acc = conv_epilogue(acc, bias_ptr, res_ptr, res_gate_ptr, act_ptr, y_off, y_mask, offs_n, n_mask, slope,
                        HAS_BIAS, HAS_RES, GATE_RES, ACT)
    tl.store(y1_ptr + y_off, acc.to(y1_ptr.dtype.element_ty), mask=y_mask)
    if SPLIT_Y:
        y2_off = pix[:, None] * (N - N1) + (offs_n - N1)[None, :]
        y2_mask = p_ok[:, None] & ((offs_n >= N1) & n_mask)[None, :]
        tl.store(y2_ptr + y2_off, acc.to(y2_ptr.dtype.element_ty), mask=y2_mask)


@triton.jit
def _conv_wgrad_nhwc_kernel(
    g_ptr, g_gate_ptr, x_ptr, ws_ptr, wsb_ptr,
    P, H, W, N, C, n_iter, TAPS,
    sxb, sxy, sxx, s_ws_split, s_ws_n, s_ws_c, s_wsb_split,
    slope,
    K: tl.constexpr, GATE_G: tl.constexpr, WITH_BIAS: tl.constexpr,
    LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TG: tl.constexpr, BIG: tl.constexpr,
):
    """Weight (and bias) gradient of a 'same' conv on NHWC, TG taps per program in one MMA.

    ws[split, n, c, t] = sum_{p in chunk} g[p, n] * x[b, y + dy_t, x + dx_t, c]   (t < TAPS)
    wsb[split, n]              = sum_{p in chunk} g[p, n]   (programs of channel block 0, tap group 0)
    g: contiguous [B*H*W, N] (times lrelu'(g_gate)); x: pixel strides sxb, sxy, sxx, unit channel
    stride. The columns of the MMA are (tap, channel) pairs: j = tap * BLOCK_C + channel.
    Offsets are 32-bit unless BIG (g or x has 2**31 elements or more): fewer registers per element.
    Grid: (cdiv(N, BLOCK_N) * cdiv(C, BLOCK_C), cdiv(TAPS, TG), split).
    """
    pid_nc = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_n = pid_nc // num_c
    c0 = (pid_nc % num_c) * BLOCK_C
    HW = H * W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    j = tl.arange(0, TG * BLOCK_C)
    t = pid_t * TG + j // BLOCK_C
    c = c0 + j % BLOCK_C
    dy = t // K - K // 2
    dx = t % K - K // 2
    col_ok = (t < TAPS) & (c < C)
    col_off = dy * sxy + dx * sxx + c

    acc = tl.zeros((BLOCK_N, TG * BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p_start = pid_s * n_iter * BLOCK_P
    for it in range(0, n_iter):
        offs_p = p_start + it * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        if BIG:
            g_off = offs_p.to(tl.int64)[:, None] * N + offs_n[None, :]
        else:
            g_off = offs_p[:, None] * N + offs_n[None, :]
        g_mask = p_mask[:, None] & n_mask[None, :]
        gv = tl.load(g_ptr + g_off, mask=g_mask, other=0.0)
        if GATE_G:
            gg = tl.load(g_gate_ptr + g_off, mask=g_mask, other=0.0)
            gv = gv.to(tl.float32) * dlrelu(gg.to(tl.float32), slope)
        b = offs_p // HW
        if BIG:
            b = b.to(tl.int64)
        s = offs_p % HW
        iy = (s // W)[:, None] + dy[None, :]
        ix = (s % W)[:, None] + dx[None, :]
        ok = p_mask[:, None] & col_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        x_off = (b * sxb + (s // W) * sxy + (s % W) * sxx)[:, None] + col_off[None, :]
        xv = tl.load(x_ptr + x_off, mask=ok, other=0.0)
        if LOWP:
            acc += tl.dot(tl.trans(gv.to(xv.dtype)), xv)
        else:
            acc += tl.dot(tl.trans(gv.to(tl.float32)), xv.to(tl.float32), input_precision=DOT_PREC)
        if WITH_BIAS:
            acc_b += tl.sum(gv.to(tl.float32), axis=0)

    ws_off = pid_s * s_ws_split + offs_n[:, None] * s_ws_n + (c * s_ws_c + t)[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=n_mask[:, None] & col_ok[None, :])
    if WITH_BIAS:
        tl.store(wsb_ptr + pid_s * s_wsb_split + offs_n, acc_b, mask=n_mask & (c0 == 0) & (pid_t == 0))


# ----------------------------------------------------------------------------------------------
# configs: autotuned on a GPU, one pinned config under the interpreter
# ----------------------------------------------------------------------------------------------


def _set_boxes(nargs: dict) -> None:
    """Autotune pre-hook: the TMA descriptors' box is the config's tile x channel block."""
    tb, th, tw = tile_shape(nargs["BLOCK_P"], nargs["H_P2"], nargs["W_P2"])
    for name in ("x1", "x1_gate", "x2"):
        d = nargs[name]
        if TensorDescriptor is not None and isinstance(d, TensorDescriptor):
            d.block_shape = [tb, th, tw, nargs["BLOCK_K"]]


def _fwd_configs() -> list[triton.Config]:
    """BLOCK_P x BLOCK_N x BLOCK_K, warps, stages. wgmma wants 64 rows per warpgroup: BLOCK_P >= 64."""
    out = []
    for bp, bn, bk, warps, stages in [(64, 32, 32, 4, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3),
                                      (128, 32, 64, 8, 2), (64, 64, 64, 4, 2)]:
        out.append(triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                 num_stages=stages, pre_hook=_set_boxes))
    return out


def _prune_fwd(configs, nargs, **kw):
    """Drop configs whose blocks are far wider than the channels they cover (all-masked MMA work). The cap of
    32 accumulators per thread keeps out tiles that spill on sm_90 (a 128x128 tile with the split store of
    the input gradient did, benchmarks/kernel_report.py); today's configs are all within it."""
    n_p2 = triton.next_power_of_2(max(nargs["N"], 16))
    c_p2 = triton.next_power_of_2(max(nargs["C1"], nargs["C2"], 16))
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(n_p2, 32) and c.kwargs["BLOCK_K"] <= max(c_p2, 32)
            and c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps]
    return kept or configs[:1]


# shapes and every constexpr the launcher sets: a forward conv and an input-gradient conv of one shape
# have different epilogues (and prunings), so they are tuned apart
FWD_KEY = ["B", "H", "W", "C1", "C2", "N", "N1", "K", "SGN", "T1", "T2", "HAS_X2", "GATE_X1", "HAS_BIAS", "HAS_RES",
           "GATE_RES", "ACT", "SPLIT_Y", "TMA1", "TMA2", "LOWP", "DOT_PREC"]
_conv_nhwc_tuned = triton.autotune(_fwd_configs(), key=FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd})(
    _conv_nhwc_kernel)


def _pinned(block_sizes: tuple[int, int, int] | triton.Config | None) -> tuple[tuple[int, int, int] | None, dict]:
    """(BLOCK_P, BLOCK_N, BLOCK_K) and launch options of a pinned launch: a Config's blocks, warps and stages,
    else 4 warps."""
    if isinstance(block_sizes, triton.Config):
        kw = block_sizes.kwargs
        return ((kw["BLOCK_P"], kw["BLOCK_N"], kw["BLOCK_K"]),
                dict(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages))
    return block_sizes, dict(num_warps=4)


def _pinned_fwd(N: int, C: int) -> dict:
    """The interpreter's config: few, large programs (it pays per program, not per FLOP)."""
    return {"BLOCK_P": 256, "BLOCK_N": min(max(triton.next_power_of_2(N), 16), 64),
            "BLOCK_K": min(max(triton.next_power_of_2(C), 16), 64)}


# ----------------------------------------------------------------------------------------------
# launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """t with channels innermost (stride(1) == 1): t itself when it already is (channels_last, or a
    channel chunk of one), else a channels_last copy."""
    return t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def _sources(ts: list[torch.Tensor], use_tma: bool | None) -> tuple[list, bool, tuple[int, int, int]]:
    """(kernel arguments, TMA?, pixel strides) of NHWC sources read with the same offsets (x and its
    gate): TMA descriptors when the Triton has them, TMA is not refused and every pixel stride and base
    is 16-byte aligned; else the tensors, given one set of strides."""
    ts = [nhwc(t) for t in ts]
    if len({t.stride() for t in ts}) > 1:
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    sb, _, sy, sx = ts[0].stride()
    es = ts[0].element_size()
    aligned = all((s * es) % 16 == 0 for s in (sb, sy, sx)) and all(t.data_ptr() % 16 == 0 for t in ts)
    if TensorDescriptor is None or not aligned or use_tma is False or ts[0].numel() == 0:
        return ts, False, (sb, sy, sx)
    views = [t.permute(0, 2, 3, 1) for t in ts]  # [B, H, W, C], unit channel stride
    return [TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, 1, 16]) for v in views], True, (sb, sy, sx)


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
    block_sizes: tuple[int, int, int] | triton.Config | None = None,
    use_tma: bool | None = None,
) -> None:
    """`residual_conv.launch_conv` for channels_last tensors: y1 (and y2) must be contiguous
    channels_last; sources may be any view with unit channel stride; res, res_gate and act_src are
    made contiguous channels_last. use_tma=False forces pointer loads (tests). block_sizes may be one of
    the autotune configs, launched with its own warps and stages (tests)."""
    B, C1, H, W = x1.shape
    C2 = 0 if x2 is None else x2.shape[1]
    N1 = y1.shape[1]
    N = N1 + (0 if y2 is None else y2.shape[1])
    kk = k * k
    assert w_packed.shape == (kk, C1 + C2, N) and w_packed.stride(2) == 1, (w_packed.shape, C1, C2, N)
    for y in (y1, y2):
        assert y is None or y.is_contiguous(memory_format=torch.channels_last), "outputs must be NHWC"
    if B * H * W == 0 or N == 0:
        return
    cl = torch.channels_last
    res, res_gate, act_src = (None if t is None else t.contiguous(memory_format=cl) for t in (res, res_gate, act_src))
    bias = None if bias is None else bias.contiguous()
    (a1, *g1), tma1, s1 = _sources([x1] + ([] if x1_gate is None else [x1_gate]), use_tma)
    g1 = g1[0] if g1 else None
    has_x2 = x2 is not None and C2 > 0
    (a2,), tma2, s2 = _sources([x2], use_tma) if has_x2 else ((None,), False, (0, 0, 0))
    staged = stage_outputs((y1, y2))
    y1s, y2s = (tmp for _, tmp in staged)
    dummy = y1s
    lowp, prec = dot_mode(x1.dtype)
    h_p2, w_p2 = triton.next_power_of_2(H), triton.next_power_of_2(W)
    args = (a1, dummy if g1 is None else g1, dummy if a2 is None else a2, w_packed,
            dummy if bias is None else bias, dummy if res is None else res,
            dummy if res_gate is None else res_gate, dummy if act_src is None else act_src,
            y1s, dummy if y2s is None else y2s,
            B, H, W, C1, C2, N, N1, *s1, *s2, w_packed.stride(0), w_packed.stride(1), float(slope))
    consts = dict(K=k, SGN=sgn, T1=kk if taps1 is None else taps1, T2=kk if taps2 is None else taps2,
                  HAS_X2=has_x2, GATE_X1=x1_gate is not None, HAS_BIAS=bias is not None,
                  HAS_RES=res is not None, GATE_RES=res_gate is not None, ACT=act, SPLIT_Y=y2 is not None,
                  TMA1=tma1, TMA2=tma2, LOWP=lowp, DOT_PREC=prec, H_P2=h_p2, W_P2=w_p2)

    def grid(meta):
        tb, th, tw = tile_shape(meta["BLOCK_P"], h_p2, w_p2)
        return triton.cdiv(B, tb) * triton.cdiv(H, th) * triton.cdiv(W, tw), triton.cdiv(N, meta["BLOCK_N"])

    with device_ctx(x1):
        if block_sizes is not None or interpreting():
            blocks, launch = _pinned(block_sizes)
            bp, bn, bk = blocks or tuple(_pinned_fwd(N, max(C1, C2)).values())
            meta = dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk)
            _set_boxes(dict(x1=args[0], x1_gate=args[1], x2=args[2], H_P2=h_p2, W_P2=w_p2, **meta))
            _conv_nhwc_kernel[grid(meta)](*args, **consts, **meta, **launch)
        else:
            _conv_nhwc_tuned[grid](*args, **consts)
    copy_back(staged)


def _extent(x: torch.Tensor) -> int:
    """One more than the largest element offset of x (its strides may leave gaps)."""
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))


def _wgrad_blocks(N: int, C: int, taps: int, dtype: torch.dtype, block_sizes,
                  vector: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_N, BLOCK_C, TG): all taps of a k <= 3 kernel in one program (TG = 16 >= 9 with
    16-channel blocks: 256 MMA columns), fewer per program for larger kernels. On sm_90, with 8 warps, the
    [64, 256] accumulator and a gathered [32, 256] bf16 tile read by cp.async take 128-149 registers. A
    source that is not 16-aligned (`vector` False: channel count, strides or base address) is gathered
    element by element, and with 32-pixel blocks its address registers spill, so it gets 16-pixel blocks.
    fp32 always uses 16-pixel blocks; larger blocks spill (benchmarks/kernel_report.py). A forward Config pins
    the forward alone: its blocks would spill here (fp32 128 x 64 x 32: 41 KB on sm_90)."""
    if block_sizes is not None and not isinstance(block_sizes, triton.Config):
        bp, bn, bc = block_sizes
    else:
        bp = 256 if interpreting() else 32 if dtype != torch.float32 and vector else 16
        bn = max(min(max(triton.next_power_of_2(N), 16), 64), 16 if interpreting() else 64)  # wgmma: M >= 64
        bc = min(max(triton.next_power_of_2(C), 16), 64 if taps == 1 else 16)
    tg = min(triton.next_power_of_2(taps), max(256 // bc, 1))
    return bp, bn, bc, tg


def weight_grad(
    g: torch.Tensor,
    sources: list[tuple[torch.Tensor | None, int]],
    k: int,
    *,
    g_gate: torch.Tensor | None = None,
    slope: float = 0.0,
    block_sizes: tuple[int, int, int] | triton.Config | None = None,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_conv.weight_grad` for channels_last tensors: (grad weight [N, sum C_i, k, k], grad bias
    [N]); taps a source does not use get a zero gradient."""
    cl = torch.channels_last
    g = g.contiguous(memory_format=cl)
    g_gate = None if g_gate is None else g_gate.contiguous(memory_format=cl)
    B, N, H, W = g.shape
    P = B * H * W
    kk = k * k
    lowp, prec = dot_mode(g.dtype)
    parts, gb = [], None
    with device_ctx(g):
        for x, taps in sources:
            C = 0 if x is None else x.shape[1]
            if C == 0 or taps == 0 or P == 0 or N == 0:
                parts.append(torch.zeros(N, C, kk, dtype=torch.float32, device=g.device))
                continue
            x = nhwc(x)
            # what the launcher's divisibility hints need for 16-byte loads of the gathered source
            vector = C % 16 == 0 and all(x.stride(d) % 16 == 0 for d in (0, 2, 3)) and x.data_ptr() % 16 == 0
            bp, bn, bc, tg = _wgrad_blocks(N, C, taps, g.dtype, block_sizes, vector)
            tiles = triton.cdiv(N, bn) * triton.cdiv(C, bc) * triton.cdiv(taps, tg)
            n_split = wgrad_split(P, tiles, bp, g.device, split)
            n_iter = triton.cdiv(triton.cdiv(P, bp), n_split)
            ws = torch.zeros(n_split, N, C, kk, dtype=torch.float32, device=g.device)
            wsb = torch.zeros(n_split, N, dtype=torch.float32, device=g.device)
            grid = (triton.cdiv(N, bn) * triton.cdiv(C, bc), triton.cdiv(taps, tg), n_split)
            _conv_wgrad_nhwc_kernel[grid](
                g, g if g_gate is None else g_gate, x, ws, wsb,
                P, H, W, N, C, n_iter, taps,
                x.stride(0), x.stride(2), x.stride(3), ws.stride(0), ws.stride(1), ws.stride(2), wsb.stride(0),
                float(slope),
                K=k, GATE_G=g_gate is not None, WITH_BIAS=gb is None, LOWP=lowp, DOT_PREC=prec,
                BLOCK_P=bp, BLOCK_N=bn, BLOCK_C=bc, TG=tg, BIG=max(g.numel(), _extent(x)) >= 2**31,
                num_warps=4 if interpreting() else 8,
            )
            parts.append(ws.sum(0))
            gb = wsb.sum(0) if gb is None else gb
    gw = torch.cat(parts, 1).view(N, -1, k, k).to(g.dtype)
    if gb is None:  # no source has any tap (a 1x1 'A' mask with no cond): the bias is the only term
        gg = g.float() if g_gate is None else g.float() * torch.where(g_gate > 0, 1.0, slope)
        gb = gg.sum((0, 2, 3))
    return gw, gb.to(g.dtype)
