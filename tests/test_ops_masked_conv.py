"""matnet.ops.masked_conv2d: the Triton kernels (interpreter on CPU, native on CUDA), the registered
op and its backward, causality, validation and dispatch, all against the plain-torch reference."""

import contextlib

import pytest
import torch
from helpers import (
    assert_fn_within_ref_error,
    assert_within_ref_error,
    conv_fp32_precision,
    needs_cuda,
    tf32_reference_convs,
    triton_devices,
)

from matnet.ops import reference
from matnet.ops.masked_conv import masked_conv2d

try:
    from matnet.kernels import masked_conv as K
except ImportError:  # no triton: the kernel tests skip, the op tests still run
    K = None


# (B, Cx, Cc, Co, H, W, k, mask_type, bias)
CASES = {
    "k3_A_cond_bias": (3, 5, 3, 7, 7, 7, 3, "A", True),
    "k3_B_plain": (3, 5, 0, 7, 5, 6, 3, "B", False),
    "k5_A_cond": (2, 3, 2, 6, 5, 6, 5, "A", True),  # the first layer of the AR decoder
    "k5_B_cond": (2, 4, 2, 5, 5, 5, 5, "B", False),
    "k1_B_cond": (3, 5, 3, 7, 5, 6, 1, "B", True),
    "k1_A_cond": (2, 3, 2, 4, 3, 3, 1, "A", True),  # x has no tap at all: only cond and bias
}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PARAMS = [(c, torch.float32) for c in CASES] + [
    ("k3_A_cond_bias", torch.float16), ("k5_A_cond", torch.float16), ("k3_A_cond_bias", torch.bfloat16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(case, dtype=torch.float64, device="cpu", seed=0):
    """fp64 master inputs (weights scaled by 1/sqrt(fan_in)) rounded through `dtype`."""
    B, Cx, Cc, Co, H, W, k, mask_type, bias = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(B, Cx, H, W)
    cond = rnd(B, Cc, H, W) if Cc else None
    weight = rnd(Co, Cx + Cc, k, k, scale=(k * k * (Cx + Cc)) ** -0.5)
    b = rnd(Co, scale=0.5) if bias else None
    grad = rnd(B, Co, H, W)
    return dict(x=x, weight=weight, bias=b, cond=cond), mask_type, grad


def reference_with_grads(inputs, mask_type, grad, dtype):
    t = {k: None if v is None else v.to(dtype).detach().requires_grad_() for k, v in inputs.items()}
    y = reference.masked_conv2d(t["x"], t["weight"], t["bias"], mask_type, t["cond"])
    y.backward(grad.to(dtype))
    return y.detach(), {k: v.grad for k, v in t.items() if v is not None}


def run_kernels(inputs, mask_type, grad, dtype, device, fmt=torch.contiguous_format, **kw):
    """The op's kernels with activations in `fmt` (channels_last: the NHWC engine)."""
    t = {k: None if v is None else v.to(dtype).to(device) for k, v in inputs.items()}
    for k in ("x", "cond"):
        t[k] = None if t[k] is None else t[k].contiguous(memory_format=fmt)
    y = K.masked_conv2d_fwd(t["x"], t["weight"], t["bias"], mask_type, t["cond"],
                            block_sizes=kw.get("block_sizes"))
    gx, gw, gb, gcond = K.masked_conv2d_bwd(grad.to(dtype).to(device).contiguous(memory_format=fmt), t["x"],
                                            t["weight"], mask_type, t["cond"], **kw)
    if fmt is torch.channels_last:
        assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    return y, dict(x=gx, weight=gw, bias=gb, cond=gcond)


def check_against_reference(case, dtype, device, **kw):
    inputs, mask_type, grad = make_inputs(case, dtype, device)
    y, grads = run_kernels(inputs, mask_type, grad, dtype, device, **kw)
    truth_y, truth_grads = reference_with_grads(inputs, mask_type, grad, torch.float64)
    ref_y, ref_grads = reference_with_grads(inputs, mask_type, grad, dtype)
    assert y.dtype == dtype and y.shape == truth_y.shape
    assert_within_ref_error("y", y, ref_y, truth_y)
    for name, truth in truth_grads.items():
        assert grads[name].shape == truth.shape, name
        assert_within_ref_error(f"grad {name}", grads[name], ref_grads[name], truth)
    if inputs["cond"] is None:
        assert grads["cond"].numel() == 0  # the registered op's convention


def masked_taps(k, mask_type, cx, shape, device="cpu"):
    """Boolean [Co, Cx + Cc, k, k]: True where the weight is masked out."""
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    m[:, :cx] = reference.causal_mask(k, mask_type, device=device) == 0
    return m


# ---------------------------------------------------------------------------------------------
# the Triton kernels, called directly
# ---------------------------------------------------------------------------------------------


def test_causal_taps_is_the_mask_prefix():
    for k in (1, 3, 5, 7):
        for mt in "AB":
            flat = reference.causal_mask(k, mt).flatten()
            t = K.causal_taps(k, mt) if K is not None else int(flat.sum())
            assert flat[:t].eq(1).all() and flat[t:].eq(0).all() and int(flat.sum()) == t


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case,dtype", PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_match_reference(case, dtype, layout, device):
    check_against_reference(CASES[case], dtype, device, fmt=LAYOUTS[layout])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_many_tiles(layout, device):
    """Small blocks: several pixel tiles, channel tiles on every axis, a split weight gradient
    (3 pixel blocks over 2 splits)."""
    check_against_reference((2, 17, 3, 9, 4, 5, 3, "B", True), torch.float32, device,
                            block_sizes=(16, 16, 16), wgrad_split=2, fmt=LAYOUTS[layout])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,mask_type", [(3, "A"), (3, "B"), (5, "A"), (5, "B")])
def test_kernels_never_read_masked_weights(k, mask_type, layout, device):
    """NaN on the masked taps must not reach the output or grad x: those taps are never visited;
    grad weight is exactly zero there."""
    inputs, _, grad = make_inputs((2, 3, 2, 4, 4, 5, k, mask_type, True), torch.float32, device)
    masked = masked_taps(k, mask_type, 3, inputs["weight"].shape, device)
    clean = dict(inputs, weight=inputs["weight"].masked_fill(masked, 0.0))
    poisoned = dict(inputs, weight=inputs["weight"].masked_fill(masked, float("nan")))
    y, grads = run_kernels(poisoned, mask_type, grad, torch.float32, device, fmt=LAYOUTS[layout])
    ref_y, ref_grads = reference_with_grads(clean, mask_type, grad, torch.float64)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    for name in ("x", "cond", "bias"):
        torch.testing.assert_close(grads[name].double(), ref_grads[name], atol=1e-4, rtol=1e-5, msg=name)
    assert (grads["weight"][masked] == 0).all()
    assert (grads["weight"][:, 3:] != 0).all()  # the cond taps are all live
    torch.testing.assert_close(grads["weight"].double(), ref_grads["weight"], atol=1e-4, rtol=1e-5)


def _causality_batch(x, mask_type, seed=1):
    """[1 + H*W, C, H, W]: x, then for each pixel j a copy of x with every pixel at raster position
    >= j ('A') or > j ('B') replaced by noise."""
    _, C, H, W = x.shape
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(H * W).view(H, W)
    out = [x]
    for j in range(H * W):
        future = (pos >= j) if mask_type == "A" else (pos > j)
        noise = torch.randn(1, C, H, W, generator=g, dtype=x.dtype).to(x.device) * 3
        out.append(torch.where(future.to(x.device), noise, x))
    return torch.cat(out)


def _assert_causal(y, H, W):
    """Output at pixel j of the j-th perturbed copy equals the unperturbed output at pixel j."""
    base = y[0].flatten(1)  # [Co, H*W]
    got = torch.stack([y[1 + j].flatten(1)[:, j] for j in range(H * W)], dim=1)
    torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,mask_type", [(3, "A"), (3, "B"), (5, "A"), (5, "B")])
def test_kernel_output_is_causal(k, mask_type, layout, device):
    H, W = 4, 5
    inputs, _, _ = make_inputs((1, 2, 2, 3, H, W, k, mask_type, True), torch.float32)
    x = _causality_batch(inputs["x"], mask_type).contiguous(memory_format=LAYOUTS[layout])
    cond = inputs["cond"].expand(x.shape[0], -1, -1, -1).contiguous(memory_format=LAYOUTS[layout])
    y = K.masked_conv2d_fwd(x.to(device), inputs["weight"].to(device), inputs["bias"].to(device), mask_type,
                            cond.to(device))
    _assert_causal(y.cpu(), H, W)


@pytest.mark.parametrize("k,mask_type", [(3, "A"), (3, "B"), (5, "A"), (5, "B")])
def test_op_output_is_causal(k, mask_type):
    """The public op (reference path on CPU): same property, plus it really depends on pixel j for 'B'."""
    H, W = 4, 5
    inputs, _, _ = make_inputs((1, 2, 0, 3, H, W, k, mask_type, True), torch.float32)
    x = _causality_batch(inputs["x"], mask_type)
    y = masked_conv2d(x, inputs["weight"], inputs["bias"], mask_type)
    _assert_causal(y, H, W)
    if mask_type == "B":
        j = 7
        x2 = inputs["x"].clone()
        x2[..., j // W, j % W] += 1.0
        y2 = masked_conv2d(x2, inputs["weight"], inputs["bias"], mask_type)
        assert not torch.allclose(y2[..., j // W, j % W], y[0, :, j // W, j % W])


# ---------------------------------------------------------------------------------------------
# the registered op
# ---------------------------------------------------------------------------------------------


def _leaf(inputs, dtype=torch.float64, device="cpu"):
    return {k: None if v is None else v.to(dtype).to(device).detach().requires_grad_() for k, v in inputs.items()}


# on CPU the public wrapper runs the composite under autograd, the registered op its explicit backward: both
CALLS = {"wrapper": masked_conv2d, "registered": torch.ops.matnet.masked_conv2d}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("case", [(2, 2, 2, 3, 3, 3, 3, "A", True), (2, 2, 0, 2, 3, 4, 3, "B", False),
                                  (2, 2, 1, 2, 2, 3, 1, "B", True)], ids=["k3_A_cond_bias", "k3_B", "k1_B_cond"])
def test_op_gradcheck_fp64(case, call):
    inputs, mask_type, _ = make_inputs(case)
    t = _leaf(inputs)
    args = [t["x"], t["weight"], t["bias"], t["cond"]]
    assert torch.autograd.gradcheck(lambda x, w, b, c: CALLS[call](x, w, b, mask_type, c), args)


@pytest.mark.parametrize("call", list(CALLS))
def test_op_grad_weight_zero_on_masked_taps(call):
    inputs, mask_type, grad = make_inputs(CASES["k5_A_cond"], torch.float32)
    t = _leaf(inputs, torch.float32)
    CALLS[call](t["x"], t["weight"], t["bias"], mask_type, t["cond"]).backward(grad.float())
    masked = masked_taps(5, mask_type, 3, t["weight"].shape)
    assert (t["weight"].grad[masked] == 0).all() and (t["weight"].grad[~masked] != 0).all()


@pytest.mark.parametrize("call", list(CALLS))
def test_op_backward_right_on_cpu(call):
    inputs, mask_type, grad = make_inputs(CASES["k3_A_cond_bias"], torch.float32)
    t = _leaf(inputs, torch.float32)
    y = CALLS[call](t["x"], t["weight"], t["bias"], mask_type, t["cond"])
    y.backward(grad.float())
    ref_y, ref_grads = reference_with_grads(inputs, mask_type, grad, torch.float32)
    truth_y, truth_grads = reference_with_grads(inputs, mask_type, grad, torch.float64)
    assert_within_ref_error("y", y.detach(), ref_y, truth_y)
    for name, g in ref_grads.items():
        assert_within_ref_error(f"grad {name}", t[name].grad, g, truth_grads[name])


def test_opcheck():
    inputs, _, _ = make_inputs((2, 2, 2, 3, 3, 4, 3, "A", True))
    t = _leaf(inputs)
    torch.library.opcheck(torch.ops.matnet.masked_conv2d.default, (t["x"], t["weight"], t["bias"], "A", t["cond"]))
    torch.library.opcheck(torch.ops.matnet.masked_conv2d.default, (t["x"], t["weight"][:, :2], None, "B", None))
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.matnet.masked_conv2d_backward.default,
                          (g, t["x"].detach(), t["weight"].detach(), "A", t["cond"].detach()))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_cuda_op_matches_reference(case, dtype, precision):
    """fp32 judged in full fp32 and with TF32 allowed (then against an exact TF32 reference)."""
    if dtype != torch.float32 and precision == "tf32":
        pytest.skip("TF32 concerns fp32 inputs only")
    inputs, mask_type, grad = make_inputs(CASES[case], dtype, "cuda")
    t = _leaf(inputs, dtype, "cuda")
    with conv_fp32_precision(precision):
        y = masked_conv2d(t["x"], t["weight"], t["bias"], mask_type, t["cond"])
        y.backward(grad)
    with tf32_reference_convs() if precision == "tf32" else contextlib.nullcontext():
        ref_y, ref_grads = reference_with_grads(inputs, mask_type, grad, dtype)
    truth_y, truth_grads = reference_with_grads(inputs, mask_type, grad, torch.float64)
    assert_within_ref_error("y", y.detach(), ref_y, truth_y)
    for name, truth in truth_grads.items():
        assert_within_ref_error(f"grad {name}", t[name].grad, ref_grads[name], truth)


@needs_cuda
def test_cuda_compile_inductor():
    inputs, mask_type, _ = make_inputs(CASES["k5_A_cond"], torch.float32, "cuda")
    t = _leaf(inputs, torch.float32, "cuda")
    args = [t["x"], t["weight"], t["bias"], t["cond"]]

    def f(x, w, b, c):
        return torch.nn.functional.leaky_relu(masked_conv2d(x, w, b, mask_type, c), 0.1).square().sum()

    with conv_fp32_precision("ieee"):
        assert_fn_within_ref_error("compiled masked conv", torch.compile(f, fullgraph=True), f, args)


# ---------------------------------------------------------------------------------------------
# validation, dispatch, torch.compile
# ---------------------------------------------------------------------------------------------


def _valid():
    inputs, mask_type, _ = make_inputs((2, 3, 2, 4, 5, 5, 3, "A", True), torch.float32)
    inputs["mask_type"] = mask_type
    return inputs


@pytest.mark.parametrize("change,err,match", [
    (lambda d: d.update(mask_type="C"), ValueError, "mask_type must be 'A' or 'B', got 'C'"),
    (lambda d: d.update(x=d["x"][0]), ValueError, "x must be a 4-D tensor"),
    (lambda d: d.update(cond=d["cond"][:, :1]), ValueError, "weight has 5 input channels but x has 3 and cond 1"),
    (lambda d: d.update(cond=None), ValueError, "weight has 5 input channels but x has 3 and cond 0"),
    (lambda d: d.update(cond=d["cond"][..., :3]), ValueError, "cond has shape"),
    (lambda d: d.update(weight=d["weight"][..., :2, :2]), ValueError, "odd square kernel, got 2x2"),
    (lambda d: d.update(weight=d["weight"][..., :1]), ValueError, "odd square kernel, got 3x1"),
    (lambda d: d.update(bias=d["bias"][:3]), ValueError, r"bias has shape \[3\], expected \[4\]"),
    (lambda d: d.update(weight=d["weight"].half()), TypeError, "weight has dtype torch.float16"),
    (lambda d: d.update(cond=d["cond"].to("meta")), ValueError, "cond is on meta"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validation(change, err, match):
    d = _valid()
    change(d)
    with pytest.raises(err, match=match):
        masked_conv2d(d["x"], d["weight"], d["bias"], d["mask_type"], d["cond"])


def test_force_reference(monkeypatch):
    """The dispatch table: Triton on CUDA (where triton loads), the reference on CPU and when forced."""
    from matnet.ops._dispatch import triton_available
    from matnet.ops.masked_conv import KERNELS

    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "0")
    assert KERNELS.backend_for("cpu", torch.float32) == "reference"
    assert KERNELS.backend_for("cuda", torch.float16) == ("triton" if triton_available() else "reference")
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    assert KERNELS.backend_for("cuda", torch.float16) == "reference"
    calls = []
    real = reference.masked_conv2d  # the reference backend runs as the composite, through autograd
    monkeypatch.setattr(reference, "masked_conv2d", lambda *a: calls.append(1) or real(*a))
    d = _valid()
    masked_conv2d(d["x"], d["weight"], d["bias"], d["mask_type"], d["cond"])
    assert calls == [1]


def test_torch_compile_fullgraph():
    d = _valid()
    t = _leaf({k: d[k] for k in ("x", "weight", "bias", "cond")}, torch.float32)
    w2 = (torch.randn(3, 6, 3, 3) / 6).requires_grad_()
    args = [t["x"], t["weight"], t["bias"], t["cond"], w2]

    def f(x, w, b, c, w2):  # an 'A' layer, then a 'B' layer without bias, both reading cond
        h = torch.nn.functional.leaky_relu(masked_conv2d(x, w, b, "A", c), 0.1)
        return masked_conv2d(h, w2, None, "B", c).square().sum()

    torch._dynamo.reset()
    assert_fn_within_ref_error("compiled AR layers", torch.compile(f, fullgraph=True, backend="aot_eager"), f, args)


def test_torch_compile_inductor_forward():
    d = _valid()

    def f(x, c, w, b):
        return (masked_conv2d(x, w, b, "B", c) * 2).square().sum()

    torch._dynamo.reset()
    assert_fn_within_ref_error("inductor", torch.compile(f, fullgraph=True), f,
                               [d["x"], d["cond"], d["weight"], d["bias"]])
