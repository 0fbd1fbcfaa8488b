"""matnet.ops.discretized_logistic_nll and discretized_logistic_mixture_nll: the C++ kernels (CPU), the CUDA
kernels (GPU machines) and the reference-path fallback, against an fp64 truth.

The truth is the reference's formula in fp64 with an exact softplus: F.softplus switches to the identity
above 20, which in fp64 drops terms of e^-20 (e.g. -log P ~ 1e-9 of a nearly certain bin becomes 1e-16,
and its gradient vanishes). The reference itself is checked against the truth too."""

import math

import pytest
import torch
from helpers import LOWP, assert_close_to_truth, assert_within_ref_error, max_err, needs_cuda, needs_ext, skip_gpu

from matnet.ops import _dispatch, likelihood, reference
from matnet.ops.likelihood import discretized_logistic_mixture_nll, discretized_logistic_nll

H = reference.BIN_HALF_WIDTH
OUT_NAMES = ("nll", "grad mean", "grad log_scale")
MIX_NAMES = ("nll", "grad logit_probs", "grad means", "grad log_scales", "grad coeffs")


def nll_dtype(dtype):
    """Likelihoods are always returned in fp32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fp64 truth ----


def _softplus(t):
    return t.clamp(min=0) + torch.log1p(torch.exp(-t.abs()))


def truth_log_bin_prob(x, mean, log_scale):
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_s = torch.exp(-log_scale)
    a = inv_s * (x - mean + H)
    b = inv_s * (x - mean - H)
    log_delta = a + torch.log(-torch.expm1(-2 * H * inv_s)) - _softplus(a) - _softplus(b)
    return torch.where(x < -reference.EDGE, a - _softplus(a), torch.where(x > reference.EDGE, -_softplus(b), log_delta))


def truth_nll(x, mean, log_scale):
    return -truth_log_bin_prob(x, mean, log_scale)


def truth_mixture_nll(x, logit_probs, means, log_scales, coeffs):
    x, logit_probs, means, log_scales, coeffs = (t.double() for t in (x, logit_probs, means, log_scales, coeffs))
    m = reference.mixture_channel_means(x, means, coeffs)
    lp = truth_log_bin_prob(x.unsqueeze(1), m, log_scales).sum(dim=2) + torch.log_softmax(logit_probs, dim=1)
    return -torch.logsumexp(lp, dim=1).flatten(1).sum(dim=1)


def value_and_grads(fn, inputs, grad_out, wrt, dtype=None):
    """fn(*inputs) and its gradients wrt inputs[i] for i in wrt (inputs cast to dtype if given)."""
    xs = [t.detach().to(dtype) if dtype is not None else t.detach().clone() for t in inputs]
    for i in wrt:
        xs[i].requires_grad_()
    out = fn(*xs)
    grads = torch.autograd.grad(out, [xs[i] for i in wrt], grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(xs[i]) if g is None else g for i, g in zip(wrt, grads)]  # C=1: no coeffs
    return out.detach(), grads


def rounded(inputs, dtype):
    """The inputs as a kernel in `dtype` sees them, back in fp64: the truth for absolute-accuracy checks."""
    return [t.to(dtype).double() for t in inputs]


@pytest.fixture
def ext():
    assert _dispatch.extension_loaded(), "matnet._C did not load (see the logged reason)"


# ---- inputs ----


def bins(shape, g, device="cpu"):
    """Bin centres 2k/255 - 1 with both edge bins present."""
    k = torch.randint(0, 256, shape, generator=g)
    k.view(-1)[:4] = torch.tensor([0, 255, 1, 254])[: k.numel()]
    return (k.double() * 2 / 255 - 1).to(device)


def elementwise_inputs(shape, seed=0, ls_range=(-7.0, 0.5), device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = bins(shape, g)
    mean = x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    lo, hi = ls_range
    log_scale = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, mean, log_scale)]


def mixture_inputs(B=2, C=3, H_=5, W=7, K=4, seed=0, device="cpu", dtype=torch.float64, ls_range=(-5.0, 0.0)):
    g = torch.Generator().manual_seed(seed)
    x = bins((B, C, H_, W), g)
    logit_probs = 2 * torch.randn(B, K, H_, W, generator=g, dtype=torch.float64)
    means = x.unsqueeze(1) + 0.4 * torch.randn(B, K, C, H_, W, generator=g, dtype=torch.float64)
    lo, hi = ls_range
    log_scales = lo + (hi - lo) * torch.rand(B, K, C, H_, W, generator=g, dtype=torch.float64)
    coeffs = torch.tanh(torch.randn(B, K, C * (C - 1) // 2, H_, W, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype) for t in (x, logit_probs, means, log_scales, coeffs)]


MIX_WRT = (1, 2, 3, 4)
ELEM_SHAPES = [(3, 5, 7, 11), (2, 1, 13), (4,)]
MIX_SHAPES = [dict(B=2, C=3, H_=5, W=7, K=4), dict(B=3, C=1, H_=3, W=9, K=1), dict(B=1, C=4, H_=9, W=9, K=3)]


def test_reference_is_close_to_truth():
    inputs = elementwise_inputs((50, 50), ls_range=(-5, 0))
    assert max_err(reference.discretized_logistic_nll(*inputs), truth_nll(*inputs)) < 1e-6


# ---- elementwise: C++ path ----


@needs_ext
@pytest.mark.parametrize("shape", ELEM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_dlogistic_matches_truth(ext, shape, dtype):
    inputs = elementwise_inputs(shape)
    grad = torch.randn(shape, dtype=torch.float64)
    out, grads = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_t, grads_t = value_and_grads(truth_nll, rounded(inputs, dtype), grad, (1, 2))
    assert out.dtype == dtype and out.shape == torch.Size(shape)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, o, t in zip(OUT_NAMES, [out, *grads], [out_t, *grads_t]):
        assert_close_to_truth(name, o, t, rtol)


@needs_ext
@pytest.mark.parametrize("dtype", LOWP)
def test_cpu_dlogistic_low_precision_error(ext, dtype):
    shape = (3, 5, 7, 11)
    inputs = elementwise_inputs(shape)
    grad = torch.rand(shape, dtype=torch.float64)
    out, grads = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_r, grads_r = value_and_grads(reference.discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_t, grads_t = value_and_grads(truth_nll, inputs, grad, (1, 2))
    assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    for name, fast, ref, truth in zip(OUT_NAMES, [out, *grads], [out_r, *grads_r], [out_t, *grads_t]):
        assert_within_ref_error(name, fast, ref, truth)


@needs_ext
def test_cpu_dlogistic_gradcheck_fp64(ext):
    x, mean, log_scale = elementwise_inputs((2, 3, 5), ls_range=(-4, 0))
    assert torch.autograd.gradcheck(
        lambda m, s: discretized_logistic_nll(x, m, s), (mean.requires_grad_(), log_scale.requires_grad_())
    )


def test_reference_path_dlogistic_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    x, mean, log_scale = elementwise_inputs((2, 3, 5), ls_range=(-4, 0))
    assert torch.autograd.gradcheck(
        lambda m, s: discretized_logistic_nll(x, m, s), (mean.requires_grad_(), log_scale.requires_grad_())
    )


@needs_ext
def test_cpu_and_reference_path_agree(ext, monkeypatch):
    inputs = elementwise_inputs((6, 7), ls_range=(-9, 1))
    grad = torch.randn(6, 7, dtype=torch.float64)
    fast = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2))
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    slow = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2))
    # the fallback's forward is the reference (softplus threshold); its backward uses the exact formulas
    assert max_err(fast[0], slow[0]) < 1e-6
    for name, a, b in zip(OUT_NAMES[1:], fast[1], slow[1]):
        assert_close_to_truth(name, a, b, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_dlogistic_edges_and_tiny_scales(ext, dtype):
    """x = -1, 1 (edge bins) and next to them, means far off and on the bin, log_scale down to -12."""
    xs = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 1 - 2 / 255, 1.0], dtype=torch.float64)
    offsets = torch.tensor([-2.0, -0.3, -H / 2, 0.0, H / 3, 0.3, 2.0], dtype=torch.float64)
    scales = torch.tensor([-12.0, -9.0, -7.0, -3.0, 0.0, 2.0], dtype=torch.float64)
    x, off, ls = torch.meshgrid(xs, offsets, scales, indexing="ij")
    inputs = [x, x + off, ls]
    grad = torch.ones_like(x)
    out, grads = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_t, grads_t = value_and_grads(truth_nll, rounded(inputs, dtype), grad, (1, 2))
    for o, t in [(out, out_t), *zip(grads, grads_t)]:
        assert torch.isfinite(o).all()
        rel = ((o.double() - t).abs() / (1 + t.abs())).max().item()
        assert rel <= (1e-9 if dtype == torch.float64 else 5e-5), rel


# ---- mixture: C++ path ----


@needs_ext
@pytest.mark.parametrize("dims", MIX_SHAPES, ids=lambda d: f"C{d['C']}K{d['K']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mixture_matches_truth(ext, dims, dtype):
    inputs = mixture_inputs(**dims)
    grad = torch.randn(dims["B"], dtype=torch.float64)
    out, grads = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_t, grads_t = value_and_grads(truth_mixture_nll, rounded(inputs, dtype), grad, MIX_WRT)
    assert out.dtype == dtype and out.shape == (dims["B"],)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, o, t in zip(MIX_NAMES, [out, *grads], [out_t, *grads_t]):
        assert o.dtype == dtype
        assert_close_to_truth(name, o, t, rtol)


@needs_ext
@pytest.mark.parametrize("dtype", LOWP)
def test_cpu_mixture_low_precision_error(ext, dtype):
    inputs = mixture_inputs(B=2, C=3, H_=5, W=7, K=5)
    grad = torch.ones(2, dtype=torch.float64)
    out, grads = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_r, grads_r = value_and_grads(reference.discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_t, grads_t = value_and_grads(truth_mixture_nll, inputs, grad, MIX_WRT)
    assert out.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    for name, fast, ref, truth in zip(MIX_NAMES, [out, *grads], [out_r, *grads_r], [out_t, *grads_t]):
        assert_within_ref_error(name, fast, ref, truth)


@needs_ext
def test_cpu_mixture_gradcheck_fp64(ext):
    x, *params = mixture_inputs(B=2, C=3, H_=2, W=3, K=2)
    params = [p.requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *p: discretized_logistic_mixture_nll(x, *p), params)


def test_reference_path_mixture_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    x, *params = mixture_inputs(B=2, C=3, H_=2, W=3, K=2)
    params = [p.requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *p: discretized_logistic_mixture_nll(x, *p), params)


@needs_ext
def test_cpu_mixture_and_reference_path_agree(ext, monkeypatch):
    inputs = mixture_inputs(B=3, C=3, H_=4, W=5, K=3)
    grad = torch.randn(3, dtype=torch.float64)
    fast = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT)
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    slow = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT)
    for name, a, b in zip(MIX_NAMES, [fast[0], *fast[1]], [slow[0], *slow[1]]):
        assert_close_to_truth(name, a, b, 1e-9)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mixture_extreme_logits_and_tiny_scales(ext, dtype):
    B, C, H_, W, K = 2, 3, 4, 4, 3
    x, logit_probs, means, log_scales, coeffs = mixture_inputs(B, C, H_, W, K, ls_range=(-9.0, -7.0))
    logit_probs[:, 0] = 80.0
    logit_probs[:, 1] = -80.0
    logit_probs[0, 2] = 80.0  # a tie at 80 in example 0
    means[:, 0] += 0.5  # the dominant component misses x: its weight is still ~1 but lp is very negative
    inputs = [x, logit_probs, means, log_scales, coeffs]
    grad = torch.ones(B, dtype=torch.float64)
    out, grads = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_t, grads_t = value_and_grads(truth_mixture_nll, rounded(inputs, dtype), grad, MIX_WRT)
    rtol = 1e-9 if dtype == torch.float64 else 5e-5
    for name, o, t in zip(MIX_NAMES, [out, *grads], [out_t, *grads_t]):
        assert_close_to_truth(name, o, t, rtol)


@needs_ext
def test_cpu_mixture_saves_per_pixel_lse(ext):
    x, logit_probs, means, log_scales, coeffs = mixture_inputs(B=2, C=3, H_=3, W=4, K=2)
    nll, lse = torch.ops.matnet.discretized_logistic_mixture_nll_fwd(x, logit_probs, means, log_scales, coeffs)
    m = reference.mixture_channel_means(x, means, coeffs)
    lp = truth_log_bin_prob(x.unsqueeze(1), m, log_scales).sum(2)
    assert lse.shape == (2, 3, 4)
    assert max_err(lse, torch.logsumexp(lp + logit_probs, dim=1)) < 1e-10
    halves = (t.half() for t in (x, logit_probs, means, log_scales, coeffs))
    half = torch.ops.matnet.discretized_logistic_mixture_nll_fwd(*halves)
    assert half[0].dtype == torch.float32 and half[1].dtype == torch.float32  # never a bf16/fp16 total


# ---- registration ----


@needs_ext
def test_opcheck_public_ops(ext):
    x, mean, log_scale = elementwise_inputs((3, 5))
    torch.library.opcheck(
        torch.ops.matnet.discretized_logistic_nll.default, (x, mean.requires_grad_(), log_scale.requires_grad_())
    )
    torch.library.opcheck(  # inputs without grad: the backward ops have no autograd (no double backward)
        torch.ops.matnet.discretized_logistic_nll_backward.default,
        (torch.ones_like(x), x, mean.detach(), log_scale.detach()),
    )
    x, *params = mixture_inputs(B=2, C=3, H_=2, W=3, K=2)
    torch.library.opcheck(
        torch.ops.matnet.discretized_logistic_mixture_nll.default, (x, *[p.requires_grad_() for p in params])
    )
    params = [p.detach() for p in params]
    _, lse = torch.ops.matnet.discretized_logistic_mixture_nll(x, *params)
    torch.library.opcheck(
        torch.ops.matnet.discretized_logistic_mixture_nll_backward.default, (torch.ones(2).double(), x, *params, lse)
    )


@needs_ext
def test_opcheck_raw_cpp_ops(ext):
    x, mean, log_scale = elementwise_inputs((3, 5), dtype=torch.float32)
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_nll_fwd.default, (x, mean, log_scale))
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_nll_bwd.default,
                          (torch.ones_like(x), x, mean, log_scale))
    args = mixture_inputs(B=2, C=3, H_=2, W=3, K=2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_mixture_nll_fwd.default, args)
    _, lse = torch.ops.matnet.discretized_logistic_mixture_nll_fwd(*args)
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_mixture_nll_bwd.default, (torch.ones(2), *args, lse))


def test_x_gets_no_gradient():
    x, mean, log_scale = elementwise_inputs((3, 4))
    x.requires_grad_()
    out = discretized_logistic_nll(x, mean.requires_grad_(), log_scale)
    out.sum().backward()
    assert x.grad is None and mean.grad is not None


# ---- dispatch, fallback, validation ----


def test_force_reference_env_calls_reference(monkeypatch):
    calls = []
    for name in ("discretized_logistic_nll_fwd", "discretized_logistic_mixture_nll_fwd"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    discretized_logistic_nll(*elementwise_inputs((3, 4)))
    discretized_logistic_mixture_nll(*mixture_inputs(B=1, C=3, H_=2, W=2, K=2))
    assert calls == ["discretized_logistic_nll_fwd", "discretized_logistic_mixture_nll_fwd"]
    assert likelihood.KERNELS.backend(torch.zeros(1)) == "reference"


def test_without_extension_uses_reference(monkeypatch):
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    monkeypatch.setattr(_dispatch, "extension_has_cuda", lambda: False)
    inputs = elementwise_inputs((4, 6), dtype=torch.float32)
    assert torch.equal(discretized_logistic_nll(*inputs), reference.discretized_logistic_nll(*inputs))
    mix = mixture_inputs(B=2, C=3, H_=3, W=3, K=2, dtype=torch.float32)
    out = discretized_logistic_mixture_nll(*mix)
    assert max_err(out, reference.discretized_logistic_mixture_nll(*mix)) < 1e-4


def test_elementwise_input_validation():
    x, mean, log_scale = elementwise_inputs((3, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        discretized_logistic_nll(x, mean, log_scale[:2])
    with pytest.raises(TypeError, match="dtype"):
        discretized_logistic_nll(x, mean.double(), log_scale)
    with pytest.raises(TypeError):
        discretized_logistic_nll(x.long(), mean.long(), log_scale.long())
    with pytest.raises(ValueError, match="meta"):
        discretized_logistic_nll(x, mean.to("meta"), log_scale)


def test_mixture_input_validation():
    x, logit_probs, means, log_scales, coeffs = mixture_inputs(B=2, C=3, H_=3, W=4, K=5)
    f = discretized_logistic_mixture_nll
    with pytest.raises(ValueError, match="means must have shape"):
        f(x, logit_probs, means[:, :4], log_scales, coeffs)  # K mismatch with logit_probs
    with pytest.raises(ValueError, match="log_scales must have shape"):
        f(x, logit_probs, means, log_scales[:, :, :2], coeffs)  # C mismatch with x
    with pytest.raises(ValueError, match="coeffs must have shape"):
        f(x, logit_probs, means, log_scales, coeffs[:, :, :2])  # C*(C-1)/2 coefficients
    with pytest.raises(ValueError, match="logit_probs must have shape"):
        f(x, logit_probs[:, :, :2], means, log_scales, coeffs)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        f(x[0], logit_probs, means, log_scales, coeffs)
    with pytest.raises(TypeError, match="dtype"):
        f(x, logit_probs.float(), means, log_scales, coeffs)
    with pytest.raises(ValueError, match="meta"):
        f(x, logit_probs, means.to("meta"), log_scales, coeffs)
    with pytest.raises(TypeError, match="tensor"):
        f(x, logit_probs, means, log_scales, None)


# ---- CUDA (a GPU machine runs these) ----


def _cuda_ext():
    if not _dispatch.extension_has_cuda():
        skip_gpu("matnet._C was built without CUDA")


@needs_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWP])
def test_cuda_dlogistic_matches_truth(dtype):
    _cuda_ext()
    inputs = elementwise_inputs((3, 5, 7, 11), device="cuda")
    grad = torch.rand(3, 5, 7, 11, dtype=torch.float64, device="cuda")
    out, grads = value_and_grads(discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_r, grads_r = value_and_grads(reference.discretized_logistic_nll, inputs, grad, (1, 2), dtype)
    out_t, grads_t = value_and_grads(truth_nll, inputs, grad, (1, 2))
    assert out.is_cuda and out.dtype == nll_dtype(dtype) and all(g.dtype == dtype for g in grads)
    for name, fast, ref, truth in zip(OUT_NAMES, [out, *grads], [out_r, *grads_r], [out_t, *grads_t]):
        assert_within_ref_error(name, fast, ref, truth)


@needs_cuda
@needs_ext
@pytest.mark.parametrize("dims", MIX_SHAPES, ids=lambda d: f"C{d['C']}K{d['K']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOWP])
def test_cuda_mixture_matches_truth(dims, dtype):
    _cuda_ext()
    inputs = mixture_inputs(**dims, device="cuda")
    grad = torch.ones(dims["B"], dtype=torch.float64, device="cuda")
    out, grads = value_and_grads(discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_r, grads_r = value_and_grads(reference.discretized_logistic_mixture_nll, inputs, grad, MIX_WRT, dtype)
    out_t, grads_t = value_and_grads(truth_mixture_nll, inputs, grad, MIX_WRT)
    assert out.is_cuda and out.dtype == nll_dtype(dtype) and all(g.dtype == dtype for g in grads)
    for name, fast, ref, truth in zip(OUT_NAMES, [out, *grads], [out_r, *grads_r], [out_t, *grads_t]):
        assert_within_ref_error(name, fast, ref, truth)


@needs_cuda
@needs_ext
def test_cuda_gradcheck_opcheck_and_stability():
    _cuda_ext()
    x, mean, log_scale = elementwise_inputs((2, 3, 5), ls_range=(-4, 0), device="cuda")
    params = (mean.requires_grad_(), log_scale.requires_grad_())
    assert torch.autograd.gradcheck(lambda m, s: discretized_logistic_nll(x, m, s), params)
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_nll.default, (x, *params))
    mx, *mp = mixture_inputs(B=2, C=3, H_=2, W=3, K=2, device="cuda")
    mp = [p.requires_grad_() for p in mp]
    assert torch.autograd.gradcheck(lambda *p: discretized_logistic_mixture_nll(mx, *p), mp)
    torch.library.opcheck(torch.ops.matnet.discretized_logistic_mixture_nll.default, (mx, *mp))
    # edge bins, tiny scales, extreme logits in fp32
    mx, lg, mm, ls, cc = mixture_inputs(B=2, C=3, H_=4, W=4, K=3, ls_range=(-9.0, -7.0), device="cuda")
    lg[:, 0], lg[:, 1] = 80.0, -80.0
    inputs = [mx, lg, mm, ls, cc]
    ones = torch.ones(2, device="cuda")
    out, grads = value_and_grads(discretized_logistic_mixture_nll, inputs, ones, MIX_WRT, torch.float32)
    out_t, grads_t = value_and_grads(truth_mixture_nll, rounded(inputs, torch.float32), ones, MIX_WRT)
    for name, o, t in zip(MIX_NAMES, [out, *grads], [out_t, *grads_t]):
        assert_close_to_truth(name, o, t, 5e-5)


def test_module_constants_match_reference():
    assert math.isclose(H, 1 / 255) and reference.EDGE == 0.999
