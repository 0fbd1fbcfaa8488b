"""matnet.ops.gaussian_sample_kl: the C++ kernel (CPU), the Triton kernel (interpreter on CPU, compiled on
CUDA) and the reference-path fallback, all against matnet.ops.reference in fp64."""

import pytest
import torch
from helpers import (
    CUDA,
    LOWP,
    assert_close_to_truth,
    assert_within_ref_error,
    needs_cuda,
    needs_ext,
    needs_triton,
    skip_gpu,
)

from matnet.ops import _dispatch, gaussian, reference
from matnet.ops.gaussian import gaussian_sample_kl

ODD_SHAPES = [(3, 5, 7, 11), (2, 1, 13), (1,)]  # 1155, 26 and 1 elements: no multiple of any block size


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5)]
    t[1] = t[1] * spread  # logvar_q
    t[3] = t[3] * spread  # logvar_p
    return [x.to(device=device, dtype=dtype) for x in t]


def reference_grads(inputs, gz, gk):
    """(z, kl) and the five input gradients of the reference, computed in fp64."""
    xs = [x.detach().double().requires_grad_() for x in inputs]
    z, kl = reference.gaussian_sample_kl(*xs)
    grads = torch.autograd.grad((z, kl), xs, (gz.double(), gk.double()))
    return z.detach(), kl.detach(), grads


def op_grads(fn, inputs, gz, gk):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    z, kl = fn(*xs)
    grads = torch.autograd.grad((z, kl), xs, (gz, gk))
    return z.detach(), kl.detach(), grads


NAMES = ("z", "kl", "grad mu_q", "grad logvar_q", "grad mu_p", "grad logvar_p", "grad eps")


@pytest.fixture
def ext():
    assert _dispatch.extension_loaded(), "matnet._C did not load (see the logged reason)"


# ---- C++ path (CPU tensors) ----


@needs_ext
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_forward_backward_match_reference(ext, shape, dtype):
    inputs = make_inputs(shape, dtype)
    gz, gk = make_inputs(shape, dtype, seed=1)[:2]
    z, kl, grads = op_grads(gaussian_sample_kl, inputs, gz, gk)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    assert z.dtype == dtype and kl.dtype == dtype and z.shape == torch.Size(shape)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, out, truth in zip(NAMES, [z, kl, *grads], [z_t, kl_t, *grads_t]):
        assert out.dtype == dtype
        assert_close_to_truth(name, out, truth, tol)


@needs_ext
@pytest.mark.parametrize("dtype", LOWP)
def test_cpu_low_precision_error_within_2x_reference(ext, dtype):
    """err(kernel in dtype - fp64 truth) <= 2 * err(reference in dtype - fp64 truth) + atol, outputs and grads."""
    shape = (3, 5, 7, 11)
    inputs = make_inputs(shape, dtype, spread=1.5)
    gz, gk = make_inputs(shape, dtype, seed=1)[:2]
    z, kl, grads = op_grads(gaussian_sample_kl, inputs, gz, gk)
    z_r, kl_r, grads_r = op_grads(reference.gaussian_sample_kl, inputs, gz, gk)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    for name, fast, ref, truth in zip(NAMES, [z, kl, *grads], [z_r, kl_r, *grads_r], [z_t, kl_t, *grads_t]):
        assert fast.dtype == dtype
        assert_within_ref_error(name, fast, ref, truth)


@pytest.mark.parametrize("dtype", LOWP)
def test_reference_computes_in_fp32(dtype):
    """MatNet's own op on low-precision inputs computes in fp32, as the fused op does: under autocast it returns
    fp32 equal to the fp64 formula on the same inputs up to fp32 rounding (in bf16 arithmetic the KL's terms
    near 1 cancel to errors of thousandths per element, nats over a model); without autocast, that value
    rounded once to the inputs' dtype."""
    inputs = make_inputs((3, 5, 7, 11), dtype, spread=1.5)
    z_t, kl_t = reference.gaussian_sample_kl(*(x.double() for x in inputs))
    with torch.autocast("cpu", dtype=dtype):
        z, kl = reference.gaussian_sample_kl(*inputs)
    assert z.dtype == kl.dtype == torch.float32
    assert_close_to_truth("z", z.double(), z_t, 1e-5)
    assert_close_to_truth("kl", kl.double(), kl_t, 1e-5)
    fi = torch.finfo(dtype)

    def rounded_once(name, got, truth):  # one rounding of each element: half an ulp, plus fp32's own error
        assert got.dtype == dtype
        err = (got.double() - truth).abs()
        fp32_err = 1e-5 * max(1.0, truth.abs().max().item())  # as under autocast above
        assert (err <= fi.eps * truth.abs() + fp32_err).all(), f"{name}: max error {err.max():.3g}"

    z, kl = reference.gaussian_sample_kl(*inputs)
    rounded_once("z", z, z_t)
    rounded_once("kl", kl, kl_t)
    gz, gk = make_inputs((3, 5, 7, 11), dtype, seed=1)[:2]
    grads = reference.gaussian_sample_kl_bwd(gz, gk, *inputs)  # the op's reference backward: the same rule
    truth = reference.gaussian_sample_kl_bwd(gz.double(), gk.double(), *(x.double() for x in inputs))
    for name, g, t in zip(NAMES[2:], grads, truth):
        rounded_once(name, g, t)


@needs_ext
def test_cpu_gradcheck_fp64(ext):
    inputs = [x.requires_grad_() for x in make_inputs((2, 3, 5), torch.float64, spread=1.0)]
    assert torch.autograd.gradcheck(gaussian_sample_kl, inputs)


def test_reference_path_gradcheck_fp64(monkeypatch):
    """The op's fallback (reference forward, torch backward formulas) when the extension is unavailable."""
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    inputs = [x.requires_grad_() for x in make_inputs((2, 3, 5), torch.float64, spread=1.0)]
    assert torch.autograd.gradcheck(gaussian_sample_kl, inputs)
    gz, gk = make_inputs((2, 3, 5), torch.float64, seed=1)[:2]
    _, _, grads = op_grads(gaussian_sample_kl, inputs, gz, gk)
    _, _, grads_t = reference_grads(inputs, gz, gk)
    for name, g, g_t in zip(NAMES[2:], grads, grads_t):
        assert_close_to_truth(name, g, g_t, 1e-12)


@needs_ext
def test_cpu_and_reference_path_agree(ext, monkeypatch):
    inputs = make_inputs((4, 9), torch.float64)
    gz, gk = make_inputs((4, 9), torch.float64, seed=1)[:2]
    fast = op_grads(gaussian_sample_kl, inputs, gz, gk)
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    slow = op_grads(gaussian_sample_kl, inputs, gz, gk)
    for name, a, b in zip(NAMES, [fast[0], fast[1], *fast[2]], [slow[0], slow[1], *slow[2]]):
        assert_close_to_truth(name, a, b, 1e-12)


@needs_ext
def test_cpu_extreme_logvars_finite_and_accurate(ext):
    vals = torch.tensor([-30.0, -12.0, 0.0, 12.0, 30.0], dtype=torch.float64)
    lq, lp = torch.meshgrid(vals, vals, indexing="ij")
    mu_q = torch.linspace(-3, 3, lq.numel(), dtype=torch.float64).view_as(lq)
    mu_p = torch.zeros_like(lq)
    eps = torch.linspace(-2, 2, lq.numel(), dtype=torch.float64).view_as(lq)
    inputs = [mu_q, lq, mu_p, lp, eps]
    gz, gk = torch.ones_like(lq), torch.ones_like(lq)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    for dtype in (torch.float32, torch.float64):
        z, kl, grads = op_grads(gaussian_sample_kl, [x.to(dtype) for x in inputs], gz.to(dtype), gk.to(dtype))
        for out, truth in [(z, z_t), (kl, kl_t), *zip(grads, grads_t)]:
            assert torch.isfinite(out).all()
            rel = ((out.double() - truth).abs() / (1 + truth.abs())).max().item()
            assert rel <= (1e-12 if dtype == torch.float64 else 1e-5)


@needs_ext
def test_cpu_non_contiguous_and_empty(ext):
    base = make_inputs((6, 8), torch.float32)
    inputs = [x.t() for x in base]  # non-contiguous views
    z, kl = gaussian_sample_kl(*inputs)
    z_r, kl_r = reference.gaussian_sample_kl(*inputs)
    assert_close_to_truth("z", z, z_r, 1e-5)
    assert_close_to_truth("kl", kl, kl_r, 1e-5)
    empty = [torch.empty(0, 3) for _ in range(5)]
    z, kl = gaussian_sample_kl(*empty)
    assert z.shape == (0, 3) and kl.shape == (0, 3)


# ---- registration ----


@needs_ext
def test_opcheck_public_ops(ext):
    inputs = [x.requires_grad_() for x in make_inputs((3, 5), torch.float64)]
    torch.library.opcheck(torch.ops.matnet.gaussian_sample_kl.default, inputs)
    grads = make_inputs((3, 5), torch.float32, seed=1)[:2]
    torch.library.opcheck(
        torch.ops.matnet.gaussian_sample_kl_backward.default, [*grads, *make_inputs((3, 5), torch.float32)]
    )


@needs_ext
def test_opcheck_raw_cpp_ops(ext):
    inputs = make_inputs((3, 5), torch.float32)
    torch.library.opcheck(torch.ops.matnet.gaussian_sample_kl_fwd.default, inputs)
    torch.library.opcheck(torch.ops.matnet.gaussian_sample_kl_bwd.default, [*make_inputs((3, 5), seed=1)[:2], *inputs])


@needs_ext
def test_raw_cpp_op_checks_arguments(ext):
    a = make_inputs((3, 5))
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.matnet.gaussian_sample_kl_fwd(a[0], a[1], a[2], a[3], torch.zeros(5, 3))


# ---- Triton kernel, called directly (interpreter on CPU) ----

TRITON_DEVICE = "cuda" if CUDA else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWP])
@pytest.mark.parametrize("block_size", [None, 256])
def test_triton_kernel_matches_reference(dtype, block_size):
    from matnet.kernels.gaussian_sample_kl import gaussian_sample_kl_bwd, gaussian_sample_kl_fwd

    shape = (3, 5, 7, 11)
    inputs = make_inputs(shape, dtype, device=TRITON_DEVICE, spread=1.5)
    gz, gk = make_inputs(shape, dtype, device=TRITON_DEVICE, seed=1)[:2]
    z, kl = gaussian_sample_kl_fwd(*inputs, block_size=block_size)
    grads = gaussian_sample_kl_bwd(gz, gk, *inputs, block_size=block_size)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    outs, truths = [z, kl, *grads], [z_t, kl_t, *grads_t]
    if dtype in LOWP:
        _, _, ref_grads = op_grads(reference.gaussian_sample_kl, inputs, gz, gk)
        refs = [*reference.gaussian_sample_kl(*inputs), *ref_grads]
        for name, out, ref, truth in zip(NAMES, outs, refs, truths):
            assert out.dtype == dtype
            assert_within_ref_error(name, out, ref, truth)
    else:
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        for name, out, truth in zip(NAMES, outs, truths):
            assert out.dtype == dtype
            assert_close_to_truth(name, out, truth, tol)


@needs_triton
def test_triton_autograd_function_and_masking():
    from matnet.kernels.gaussian_sample_kl import TritonGaussianSampleKL

    n = 70001  # two programs of the interpreter's largest block, the second one masked
    inputs = make_inputs((n,), torch.float32, device=TRITON_DEVICE)
    gz, gk = make_inputs((n,), torch.float32, device=TRITON_DEVICE, seed=1)[:2]
    z, kl, grads = op_grads(TritonGaussianSampleKL.apply, inputs, gz, gk)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    for name, out, truth in zip(NAMES, [z, kl, *grads], [z_t, kl_t, *grads_t]):
        assert_close_to_truth(name, out, truth, 2e-5)


# ---- dispatch, fallback, validation ----


def test_force_reference_env_calls_reference(monkeypatch):
    calls = []
    real = reference.gaussian_sample_kl_fwd

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(reference, "gaussian_sample_kl_fwd", spy)
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    inputs = make_inputs((4, 3))
    z, kl = gaussian_sample_kl(*inputs)
    assert calls == [1]
    torch.ops.matnet.gaussian_sample_kl(*inputs)  # the registered op honours it too
    assert calls == [1, 1]
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "0")
    gaussian_sample_kl(*inputs)
    assert len(calls) == 2 + (not _dispatch.extension_loaded())


def test_without_extension_uses_reference(monkeypatch):
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    monkeypatch.setattr(_dispatch, "extension_has_cuda", lambda: False)
    assert gaussian.KERNELS.backend(torch.zeros(1)) == "reference"
    inputs = make_inputs((5, 7))
    z, kl = gaussian_sample_kl(*inputs)
    z_r, kl_r = reference.gaussian_sample_kl(*inputs)
    assert torch.equal(z, z_r) and torch.equal(kl, kl_r)


def test_input_validation():
    a = make_inputs((3, 4))
    with pytest.raises(ValueError, match="shape"):
        gaussian_sample_kl(a[0], a[1], a[2], a[3], torch.zeros(4, 3))
    with pytest.raises(TypeError, match="dtype"):
        gaussian_sample_kl(a[0], a[1].double(), a[2], a[3], a[4])
    with pytest.raises(TypeError):
        gaussian_sample_kl(*[x.long() for x in a])
    with pytest.raises(TypeError):
        gaussian_sample_kl(a[0].tolist(), *a[1:])
    with pytest.raises(ValueError, match="meta"):
        gaussian_sample_kl(a[0], a[1], a[2].to("meta"), a[3], a[4])


# ---- CUDA (a GPU machine runs these; Triton path and the CUDA extension kernels) ----


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_cuda_public_op_matches_reference(dtype):
    shape = (3, 5, 7, 11)
    inputs = make_inputs(shape, dtype, device="cuda", spread=1.5)
    gz, gk = make_inputs(shape, dtype, device="cuda", seed=1)[:2]
    z, kl, grads = op_grads(gaussian_sample_kl, inputs, gz, gk)
    z_r, kl_r, grads_r = op_grads(reference.gaussian_sample_kl, inputs, gz, gk)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    for name, fast, ref, truth in zip(NAMES, [z, kl, *grads], [z_r, kl_r, *grads_r], [z_t, kl_t, *grads_t]):
        assert fast.dtype == dtype and fast.is_cuda
        assert_within_ref_error(name, fast, ref, truth)


@needs_cuda
def test_cuda_gradcheck_and_opcheck():
    inputs = [x.requires_grad_() for x in make_inputs((2, 3, 5), torch.float64, device="cuda", spread=1.0)]
    assert torch.autograd.gradcheck(gaussian_sample_kl, inputs)
    torch.library.opcheck(torch.ops.matnet.gaussian_sample_kl.default, inputs)


@needs_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWP])
def test_cuda_extension_kernels_match_reference(dtype):
    if not _dispatch.extension_has_cuda():
        skip_gpu("matnet._C was built without CUDA")
    shape = (3, 5, 7, 11)
    inputs = make_inputs(shape, dtype, device="cuda", spread=1.5)
    gz, gk = make_inputs(shape, dtype, device="cuda", seed=1)[:2]
    z, kl = torch.ops.matnet.gaussian_sample_kl_fwd(*inputs)
    grads = torch.ops.matnet.gaussian_sample_kl_bwd(gz, gk, *inputs)
    z_t, kl_t, grads_t = reference_grads(inputs, gz, gk)
    _, _, grads_r = op_grads(reference.gaussian_sample_kl, inputs, gz, gk)
    refs = [*reference.gaussian_sample_kl(*inputs), *grads_r]
    for name, out, ref, truth in zip(NAMES, [z, kl, *grads], refs, [z_t, kl_t, *grads_t]):
        assert_within_ref_error(name, out, ref, truth)
