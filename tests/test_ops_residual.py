"""matnet.ops.residual_conv_block: the Triton kernels (interpreter on CPU, native on CUDA), the
registered op and its backward, validation and dispatch, all against the plain-torch reference."""

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
from matnet.ops.residual import residual_conv_block

try:
    from matnet.kernels import residual_conv as K
except ImportError:  # no triton: the kernel tests skip, the op tests still run
    K = None


# (B, C, E, M, H, W, k, bias): odd shapes, with/without extra and bias, 3x3 and 1x1, an FC state
CASES = {
    "k3_extra": (3, 5, 3, 7, 7, 7, 3, True),
    "k3_noextra_nobias": (3, 5, 0, 7, 5, 6, 3, False),
    "k1_extra": (3, 5, 3, 7, 5, 6, 1, True),
    "fc_1x1": (4, 6, 0, 9, 1, 1, 1, True),
}
# every case in fp32; low precision on a subset (interpreter time)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PARAMS = [(c, torch.float32) for c in CASES] + [
    ("k3_extra", torch.float16), ("k1_extra", torch.float16), ("k3_extra", torch.bfloat16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(case, dtype=torch.float64, device="cpu", seed=0):
    """fp64 master inputs of a case (weights scaled by 1/sqrt(fan_in)), rounded through `dtype`
    so the fp64 truth and the low-precision runs see the same values."""
    B, C, E, M, H, W, k, bias = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(dtype).to(device)

    h = rnd(B, C, H, W)
    extra = rnd(B, E, H, W) if E else None
    w1 = rnd(M, C + E, k, k, scale=(k * k * (C + E)) ** -0.5)
    w2 = rnd(C, M, k, k, scale=(k * k * M) ** -0.5)
    b1 = rnd(M, scale=0.5) if bias else None
    b2 = rnd(C, scale=0.5) if bias else None
    grad = rnd(B, C, H, W)
    return dict(h=h, w1=w1, b1=b1, w2=w2, b2=b2, extra=extra), grad


NAMES = ("h", "w1", "b1", "w2", "b2", "extra")


def reference_with_grads(inputs, grad, dtype, slope=0.1):
    """out and {name: grad} of the reference's autograd in `dtype`."""
    x = {k: None if v is None else v.to(dtype).detach().requires_grad_() for k, v in inputs.items()}
    out = reference.residual_conv_block(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"], slope)
    out.backward(grad.to(dtype))
    return out.detach(), {k: x[k].grad for k in NAMES if x[k] is not None}


def run_kernels(inputs, grad, dtype, device, slope=0.1, fmt=torch.contiguous_format, **kw):
    """The block's kernels with activations in `fmt`: channels_last runs the NHWC engine (whose outputs
    must come back channels_last), contiguous the NCHW one."""
    x = {k: None if v is None else v.to(dtype).to(device) for k, v in inputs.items()}
    for k in ("h", "extra"):
        x[k] = None if x[k] is None else x[k].contiguous(memory_format=fmt)
    out, a1 = K.residual_conv_block_fwd(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"], slope,
                                        block_sizes=kw.get("block_sizes"))
    gh, gextra, gw1, gb1, gw2, gb2 = K.residual_conv_block_bwd(
        grad.to(dtype).to(device).contiguous(memory_format=fmt), x["h"], x["extra"], x["w1"], x["w2"], out, a1,
        slope, **kw)
    if K.engine(x["h"])[2] is torch.channels_last:
        for t in (out, a1, gh) + (() if x["extra"] is None else (gextra,)):
            assert t.is_contiguous(memory_format=torch.channels_last)
    grads = dict(h=gh, w1=gw1, b1=gb1, w2=gw2, b2=gb2, extra=gextra)
    return out, a1, grads


def check_against_reference(case, dtype, device, **kw):
    inputs, grad = make_inputs(case, dtype, device)
    out, a1, grads = run_kernels(inputs, grad, dtype, device, **kw)
    truth_out, truth_grads = reference_with_grads(inputs, grad, torch.float64)
    if dtype == torch.float64:
        ref_out, ref_grads = truth_out, truth_grads
    else:
        ref_out, ref_grads = reference_with_grads(inputs, grad, dtype)
    assert out.dtype == dtype and out.shape == truth_out.shape
    assert_within_ref_error("out", out, ref_out, truth_out)
    for name, truth in truth_grads.items():
        assert grads[name].shape == truth.shape, name
        assert_within_ref_error(f"grad {name}", grads[name], ref_grads[name], truth)
    if inputs["extra"] is None:
        assert grads["extra"].numel() == 0  # the registered op's convention
    return a1


# ---------------------------------------------------------------------------------------------
# the Triton kernels, called directly (CPU tensors under the interpreter, or CUDA tensors)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case,dtype", PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_match_reference(case, dtype, layout, device):
    a1 = check_against_reference(CASES[case], dtype, device, fmt=LAYOUTS[layout])
    inputs, _ = make_inputs(CASES[case], dtype, device)
    inp = inputs["h"] if inputs["extra"] is None else torch.cat([inputs["h"], inputs["extra"]], 1)
    k = inputs["w1"].shape[-1]
    a1_ref = torch.nn.functional.leaky_relu(
        torch.nn.functional.conv2d(inp.double(), inputs["w1"].double(),
                                   None if inputs["b1"] is None else inputs["b1"].double(), padding=k // 2), 0.1)
    torch.testing.assert_close(a1.double(), a1_ref, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_many_tiles(layout, device):
    """Small blocks: several pixel tiles, channel tiles on every axis, batch straddling tiles, and a
    split weight-gradient reduction (3 pixel blocks over 2 splits: 2 blocks each, the last partly empty)."""
    check_against_reference((2, 17, 2, 9, 4, 5, 3, True), torch.float32, device,
                            block_sizes=(16, 16, 16), wgrad_split=2, fmt=LAYOUTS[layout])


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_mixed_kernel_sizes_and_slope(layout, device):
    """w1 and w2 may have different odd sizes; slope 0 (ReLU) also has its derivative read off signs."""
    inputs, grad = make_inputs((2, 3, 2, 4, 5, 5, 3, True), torch.float32, device)
    inputs["w2"] = torch.randn(3, 4, 1, 1, dtype=torch.float64).to(device) * 0.5
    for slope in (0.0, 0.3):
        out, _, grads = run_kernels(inputs, grad, torch.float32, device, slope=slope, fmt=LAYOUTS[layout])
        ref_out, ref_grads = reference_with_grads(inputs, grad, torch.float64, slope)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name].double(), g, atol=1e-4, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# the registered op: CPU (reference math, explicit backward) and CUDA (Triton)
# ---------------------------------------------------------------------------------------------


def _leaf(inputs, dtype=torch.float64, device="cpu"):
    return {k: None if v is None else v.to(dtype).to(device).detach().requires_grad_() for k, v in inputs.items()}


# on CPU the public wrapper runs the composite under autograd, the registered op its explicit backward: both
CALLS = {"wrapper": residual_conv_block,
         "registered": lambda h, w1, b1, w2, b2, extra=None: torch.ops.matnet.residual_conv_block(
             h, w1, b1, w2, b2, extra, 0.1)[0]}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("case", [(2, 2, 1, 2, 3, 3, 3, True), (2, 3, 0, 2, 3, 2, 1, False)],
                         ids=["k3_extra_bias", "k1_plain"])
def test_op_gradcheck_fp64(case, call):
    x = _leaf(make_inputs(case)[0])
    args = [x[k] for k in ("h", "w1", "b1", "w2", "b2", "extra")]
    assert torch.autograd.gradcheck(lambda *a: CALLS[call](*a), args)


@pytest.mark.parametrize("call", list(CALLS))
def test_op_backward_right_on_cpu(call):
    """Both CPU backwards (autograd through the composite, the registered op's explicit formulas) against the
    reference's autograd, fp32, bigger shape."""
    inputs, grad = make_inputs(CASES["k3_extra"], torch.float32)
    x = _leaf(inputs, torch.float32)
    out = CALLS[call](x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"])
    out.backward(grad.float())
    ref_out, ref_grads = reference_with_grads(inputs, grad, torch.float32)
    truth_out, truth_grads = reference_with_grads(inputs, grad, torch.float64)
    assert_within_ref_error("out", out.detach(), ref_out, truth_out)
    for name, g in ref_grads.items():
        assert_within_ref_error(f"grad {name}", x[name].grad, g, truth_grads[name])


def test_wrapper_and_registered_op_agree_in_channels_last():
    """The eager CPU wrapper (composite) and the registered op: the same values, layouts and gradient layouts."""
    inputs, grad = make_inputs(CASES["k3_extra"], torch.float32)
    runs = []
    for call in CALLS.values():
        x = {k: v.contiguous(memory_format=torch.channels_last).detach().requires_grad_() if v.dim() == 4
             else v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
        out = call(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"])
        out.backward(grad.contiguous(memory_format=torch.channels_last))
        runs.append((out, {k: v.grad for k, v in x.items()}))
    (out_a, g_a), (out_b, g_b) = runs
    assert out_a.stride() == out_b.stride() and out_a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_a, out_b)
    for k in g_a:
        assert g_a[k].stride() == g_b[k].stride(), k
        torch.testing.assert_close(g_a[k], g_b[k])


def test_opcheck():
    x = _leaf(make_inputs((2, 2, 1, 3, 3, 4, 3, True))[0])
    torch.library.opcheck(torch.ops.matnet.residual_conv_block.default,
                          (x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"], 0.1))
    y = _leaf(make_inputs((2, 2, 0, 3, 3, 3, 1, False))[0])
    torch.library.opcheck(torch.ops.matnet.residual_conv_block.default,
                          (y["h"], y["w1"], None, y["w2"], None, None, 0.2))
    out, a1 = torch.ops.matnet.residual_conv_block(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"], 0.1)
    g = torch.randn_like(out)
    d = {k: v.detach() for k, v in x.items()}
    torch.library.opcheck(torch.ops.matnet.residual_conv_block_backward.default,
                          (g, d["h"], d["extra"], d["w1"], d["w2"], out.detach(), a1.detach(), 0.1))


def test_op_returns_saved_activation():
    x = _leaf(make_inputs((2, 2, 1, 3, 3, 4, 3, True))[0])
    out, a1 = torch.ops.matnet.residual_conv_block(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"], 0.1)
    assert out.requires_grad and not a1.requires_grad
    torch.testing.assert_close(out, reference.residual_conv_block(x["h"], x["w1"], x["b1"], x["w2"], x["b2"],
                                                                  x["extra"]))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["k3_extra", "k3_noextra_nobias", "k1_extra", "fc_1x1"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_cuda_op_matches_reference(case, dtype, precision):
    """fp32 judged in full fp32 and with TF32 allowed (then against an exact TF32 reference)."""
    if dtype != torch.float32 and precision == "tf32":
        pytest.skip("TF32 concerns fp32 inputs only")
    inputs, grad = make_inputs(CASES[case], dtype, "cuda")
    x = _leaf(inputs, dtype, "cuda")
    with conv_fp32_precision(precision):
        out = residual_conv_block(x["h"], x["w1"], x["b1"], x["w2"], x["b2"], x["extra"])
        out.backward(grad)
    with tf32_reference_convs() if precision == "tf32" else contextlib.nullcontext():
        ref_out, ref_grads = reference_with_grads(inputs, grad, dtype)
    truth_out, truth_grads = reference_with_grads(inputs, grad, torch.float64)
    assert_within_ref_error("out", out.detach(), ref_out, truth_out)
    for name, truth in truth_grads.items():
        assert_within_ref_error(f"grad {name}", x[name].grad, ref_grads[name], truth)


@needs_cuda
def test_cuda_tf32_bigger_block():
    """The kernels under TF32 on a realistic block, judged by the error of an exact TF32 reference."""
    inputs, grad = make_inputs((8, 32, 16, 32, 12, 12, 3, True), torch.float32, "cuda")
    with conv_fp32_precision("tf32"):
        out, _, grads = run_kernels(inputs, grad, torch.float32, "cuda")
    with tf32_reference_convs():
        ref_out, ref_grads = reference_with_grads(inputs, grad, torch.float32)
    truth_out, truth_grads = reference_with_grads(inputs, grad, torch.float64)
    assert_within_ref_error("out", out, ref_out, truth_out)
    for name, truth in truth_grads.items():
        assert_within_ref_error(f"grad {name}", grads[name], ref_grads[name], truth)


@needs_cuda
def test_cuda_compile_inductor():
    x = _leaf(make_inputs(CASES["k3_extra"])[0], torch.float32, "cuda")

    def f(h, w1, b1, w2, b2, extra):
        return (residual_conv_block(h, w1, b1, w2, b2, extra) * 2).sum()

    args = [x[k] for k in ("h", "w1", "b1", "w2", "b2", "extra")]
    with conv_fp32_precision("ieee"):
        assert_fn_within_ref_error("compiled block", torch.compile(f, fullgraph=True), f, args)


# ---------------------------------------------------------------------------------------------
# validation, dispatch, torch.compile
# ---------------------------------------------------------------------------------------------


def _valid():
    inputs, _ = make_inputs((2, 3, 2, 4, 5, 5, 3, True), torch.float32)
    return inputs


@pytest.mark.parametrize("change,err,match", [
    (lambda d: d.update(h=d["h"][0]), ValueError, "h must be a 4-D tensor"),
    (lambda d: d.update(w2=d["w2"].flatten(1)), ValueError, "w2 must be a 4-D tensor"),
    (lambda d: d.update(extra=d["extra"][:, :1]), ValueError, "w1 has 5 input channels but h has 3 and extra 1"),
    (lambda d: d.update(extra=None), ValueError, "w1 has 5 input channels"),
    (lambda d: d.update(extra=d["extra"][:1]), ValueError, "extra has shape"),
    (lambda d: d.update(extra=d["extra"][..., :4]), ValueError, "extra has shape"),
    (lambda d: d.update(w2=d["w2"][:, :3]), ValueError, r"w2 has shape \[3, 3, 3, 3\], expected \[3, 4, k, k\]"),
    (lambda d: d.update(w1=d["w1"][..., :2, :2], w2=d["w2"][..., :2, :2]), ValueError, "odd square kernel"),
    (lambda d: d.update(w2=d["w2"][..., :1]), ValueError, "odd square kernel, got 3x1"),
    (lambda d: d.update(b1=d["b1"][:2]), ValueError, r"b1 has shape \[2\], expected \[4\]"),
    (lambda d: d.update(b2=d["b2"].double()), TypeError, "b2 has dtype torch.float64"),
    (lambda d: d.update(w1=d["w1"].to("meta")), ValueError, "w1 is on meta"),
    (lambda d: d.update(h=d["h"].long()), TypeError, "floating-point"),
    (lambda d: d.update(slope=-0.1), ValueError, "slope must be a finite number >= 0"),
    (lambda d: d.update(slope=float("nan")), ValueError, "slope must be a finite number >= 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validation(change, err, match):
    d = _valid()
    d["slope"] = 0.1
    change(d)
    with pytest.raises(err, match=match):
        residual_conv_block(d["h"], d["w1"], d["b1"], d["w2"], d["b2"], d["extra"], d["slope"])


def test_force_reference(monkeypatch):
    """The dispatch table: Triton on CUDA (where triton loads), the reference on CPU and when forced."""
    from matnet.ops._dispatch import triton_available
    from matnet.ops.residual import KERNELS

    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "0")
    assert KERNELS.backend_for("cpu", torch.float32) == "reference"
    assert KERNELS.backend_for("cuda", torch.float64) == "reference"
    assert KERNELS.backend_for("cuda", torch.bfloat16) == ("triton" if triton_available() else "reference")
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    assert KERNELS.backend_for("cuda", torch.bfloat16) == "reference"
    calls = []
    real = reference.residual_conv_block_fwd
    monkeypatch.setattr(reference, "residual_conv_block_fwd", lambda *a: calls.append(1) or real(*a))
    d = _valid()
    residual_conv_block(d["h"], d["w1"], d["b1"], d["w2"], d["b2"], d["extra"])
    assert calls == [1]


def test_torch_compile_fullgraph():
    x = _leaf(make_inputs((2, 3, 2, 4, 5, 5, 3, True))[0], torch.float32)
    args = [x[k] for k in ("h", "w1", "b1", "w2", "b2", "extra")]

    def f(h, w1, b1, w2, b2, extra):
        return residual_conv_block(h, w1, b1, w2, b2, extra, 0.2).square().sum()

    torch._dynamo.reset()
    assert_fn_within_ref_error("compiled block", torch.compile(f, fullgraph=True, backend="aot_eager"), f, args)


def test_compiled_wrapper_never_consults_the_table(monkeypatch):
    """Compiled, the wrapper calls the registered op without tracing the dispatch table (on CUDA its backend check
    imports modules, which dynamo refuses); eager, it asks the table."""
    from matnet.ops import residual

    real = residual.KERNELS

    class Untraceable:
        fwd, bwd = real.fwd, real.bwd

        def backend(self, t):
            raise RuntimeError("the table was consulted")

    monkeypatch.setattr(residual, "KERNELS", Untraceable())
    x = _leaf(make_inputs((2, 3, 2, 4, 5, 5, 3, True))[0], torch.float32)
    args = [x[k] for k in ("h", "w1", "b1", "w2", "b2", "extra")]
    torch._dynamo.reset()
    torch.compile(lambda *a: residual_conv_block(*a).sum(), fullgraph=True, backend="aot_eager")(*args).backward()
    assert x["h"].grad is not None
    with pytest.raises(RuntimeError, match="consulted"):
        residual_conv_block(*args)


def test_torch_compile_inductor_forward():
    d = _valid()

    def f(h, e, w1, b1, w2, b2):
        return (residual_conv_block(h, w1, b1, w2, b2, e) + 1).square().sum()

    torch._dynamo.reset()
    assert_fn_within_ref_error("inductor", torch.compile(f, fullgraph=True), f,
                               [d["h"], d["extra"], d["w1"], d["b1"], d["w2"], d["b2"]])

