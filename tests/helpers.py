"""What every test of matnet shares: the devices a kernel test runs on, and the accuracy rule.

The accuracy rule (flash-attention's): a fast result is judged against a float64 truth, never against
the reference with a tolerance tuned on one machine. Its error may be at most `factor` (2) times the
reference's own error in the same precision, plus a floor of a few units in the last place at the
truth's scale. This holds on any CPU (oneDNN picks other kernels and summation orders per CPU) and any
thread count.

Skips that a GPU machine must not have are tagged GPU_SKIP; with MATNET_REQUIRE_CUDA=1 (set by
scripts/gpu_check.sh) conftest.py turns them into failures.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _have_kernels() -> bool:
    """matnet.kernels importable (an import, not find_spec: from a checkout on PYTHONPATH the package is mapped
    while matnet imports, which find_spec does not see)."""
    try:
        importlib.import_module("matnet.kernels")
    except ImportError:
        return False
    return True


HAVE_TRITON = importlib.util.find_spec("triton") is not None and _have_kernels()
REQUIRE_CUDA = os.environ.get("MATNET_REQUIRE_CUDA") == "1"
GPU_SKIP = "[gpu] "  # reasons starting with it fail under MATNET_REQUIRE_CUDA=1
LOWP = [torch.float16, torch.bfloat16]

needs_cuda = pytest.mark.skipif(not CUDA, reason=GPU_SKIP + "needs a CUDA GPU")
# A pure-Python install (MATNET_WITH_CPP=0) has no extension; anywhere else a missing one is a failure.
needs_ext = pytest.mark.skipif(os.environ.get("MATNET_WITH_CPP") == "0", reason=GPU_SKIP + "built without matnet._C")
needs_triton = pytest.mark.skipif(not HAVE_TRITON or not (CUDA or INTERPRET),
                                  reason=GPU_SKIP + "needs triton, and a GPU or TRITON_INTERPRET=1")


# Adam's update lr m / (sqrt(v) + eps) is nearly lr sign(g) for |g| >> eps (blind to the gradient's size) and
# jumps by up to 2 lr where g is ~0 +- rounding (eps 1e-8): parameters would differ by chance, or not at all.
# With eps = 100 and lr = 0.1 it is close to SGD with momentum and step lr / eps = 1e-3: a smooth function of
# the gradients, so the parameters differ as the gradients do and the accuracy rule can judge them.
SMOOTH_ADAM = {"lr": 0.1, "adam_eps": 100.0}


def triton_devices() -> list:
    """Where a Triton kernel test runs: CPU tensors under the interpreter, and CUDA tensors."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET or not HAVE_TRITON,
                                                     reason="CPU kernel tests need TRITON_INTERPRET=1 and triton")),
        pytest.param("cuda", marks=pytest.mark.skipif(not CUDA or not HAVE_TRITON,
                                                      reason=GPU_SKIP + "needs a CUDA GPU and triton")),
    ]


def skip_gpu(reason: str) -> None:
    """A skip from inside a test, for a GPU feature that is missing (fails under MATNET_REQUIRE_CUDA=1)."""
    pytest.skip(GPU_SKIP + reason)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def scale_of(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def assert_within_ref_error(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                            factor: float = 2.0, ulps: float = 2.0) -> None:
    """|got - truth| <= factor * |ref - truth| + ulps * eps(got's dtype) * max(1, |truth|) in max norm:
    ref is the reference run in got's precision (and thread count), truth its fp64 value."""
    assert got.shape == truth.shape, f"{name}: shape {list(got.shape)} != {list(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    floor = ulps * torch.finfo(got.dtype).eps * scale_of(truth)
    err, ref_err = max_err(got, truth), max_err(ref, truth)
    assert err <= factor * ref_err + floor, (
        f"{name}: max error {err:.3g} vs the reference's own {ref_err:.3g} in {got.dtype} (floor {floor:.3g})")


def assert_all_within_ref_error(name: str, got: dict, ref: dict, truth: dict, factor: float = 2.0,
                                ulps: float = 2.0) -> None:
    """The rule over a group of tensors (a model's outputs, or all its parameter gradients): each one's error,
    relative to its scale max(1, |truth|), is at most `factor` times the reference's worst relative error
    over the group, plus `ulps`. A single small gradient whose reference happens to be nearly exact does
    not fail a model whose summation order differs."""
    def rel(a, t):
        return max_err(a, t) / scale_of(t)

    ref_rel = max(rel(ref[k], truth[k]) for k in truth)
    for k, t in truth.items():
        g = got[k]
        assert g.shape == t.shape and torch.isfinite(g).all(), f"{name} {k}: shape or non-finite values"
        floor = ulps * torch.finfo(g.dtype).eps
        assert rel(g, t) <= factor * ref_rel + floor, (
            f"{name} {k}: relative error {rel(g, t):.3g} vs the reference's worst {ref_rel:.3g} in {g.dtype}")


def assert_close_to_truth(name: str, got: torch.Tensor, truth: torch.Tensor, rtol: float) -> None:
    """|got - truth| <= rtol * max(1, |truth|) in max norm, for elementwise results with no reduction."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = max_err(got, truth)
    assert err <= rtol * scale_of(truth), f"{name}: max error {err:.3g} > {rtol:g} x {scale_of(truth):.3g}"


def detached_leaves(args: list, dtype: torch.dtype | None = None) -> list:
    """Fresh leaves requiring grad (floating tensors), optionally cast; other arguments as they are."""
    return [a.detach().to(dtype or a.dtype).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in args]


def value_and_grads(f, args: list) -> tuple[torch.Tensor, list]:
    """f(*args) (a scalar) and its gradients wrt the floating tensor arguments."""
    out = f(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out.detach(), [g.detach() for g in torch.autograd.grad(out, leaves)]


def assert_fn_within_ref_error(name: str, fast, ref, args: list) -> None:
    """fast(*args) and its gradients, judged against ref(*args) run in args' dtype (its own error) and in
    fp64 (the truth). fast and ref return a scalar."""
    got, got_g = value_and_grads(fast, detached_leaves(args))
    want, want_g = value_and_grads(ref, detached_leaves(args))
    truth, truth_g = value_and_grads(ref, detached_leaves(args, torch.float64))
    assert_within_ref_error(name, got, want, truth)
    for i, (g, r, t) in enumerate(zip(got_g, want_g, truth_g)):
        assert_within_ref_error(f"{name}: grad of argument {i}", g, r, t)


@contextlib.contextmanager
def conv_fp32_precision(p: str):
    """Sets what fp32 convolutions may use ('ieee' or 'tf32') for cuDNN and matnet's Triton kernels, through
    torch's fp32_precision API where it exists (mixing it with the legacy flag raises), else allow_tf32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old, conv.fp32_precision = conv.fp32_precision, p
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, p == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def tf32_operand(t: torch.Tensor) -> torch.Tensor:
    """t (fp32) as a TF32 matrix unit reads it, in fp64: the low 13 mantissa bits dropped (truncation, the larger
    error of the hardware's two ways to round)."""
    return torch.bitwise_and(t.float().contiguous().view(torch.int32), -(1 << 13)).view(torch.float32).double()


class _TF32Conv2d(torch.autograd.Function):
    """conv2d whose every product (forward, input and weight gradients) has TF32 operands, summed in fp64."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        xr, wr = tf32_operand(x), tf32_operand(w)
        ctx.save_for_backward(xr, wr)
        ctx.conf, ctx.has_bias = (stride, padding, dilation, groups), b is not None
        y = torch.nn.functional.conv2d(xr, wr, None if b is None else b.double(), stride, padding, dilation, groups)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        xr, wr = ctx.saved_tensors
        gr = tf32_operand(gy)
        gx = torch.nn.grad.conv2d_input(xr.shape, wr, gr, *ctx.conf).to(gy.dtype)
        gw = torch.nn.grad.conv2d_weight(xr, wr.shape, gr, *ctx.conf).to(gy.dtype)
        gb = gy.double().sum((0, 2, 3)).to(gy.dtype) if ctx.has_bias else None
        return gx, gw, gb, None, None, None, None


@contextlib.contextmanager
def tf32_reference_convs():
    """torch.nn.functional.conv2d on fp32 tensors as an exact TF32 unit would compute it (`_TF32Conv2d`): the
    reference in TF32 of the tests that allow it. cuDNN's own fp32 convs with TF32 allowed may or may not use
    it (their algorithm choice depends on the shape), so they cannot be that reference."""
    real = torch.nn.functional.conv2d

    def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        if x.dtype != torch.float32:
            return real(x, w, b, stride, padding, dilation, groups)
        return _TF32Conv2d.apply(x, w, b, stride, padding, dilation, groups)

    torch.nn.functional.conv2d = conv2d
    try:
        yield
    finally:
        torch.nn.functional.conv2d = real


def random_data(cfg, b: int, seed: int = 1) -> torch.Tensor:
    """b images in cfg's data space: binary for the Bernoulli likelihood, 8-bit bin centres on [-1, 1] otherwise."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, cfg.image_channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        return torch.bernoulli(torch.rand(shape, generator=g), generator=g)
    return torch.round(torch.rand(shape, generator=g) * 255) / 127.5 - 1
