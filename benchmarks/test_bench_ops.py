"""Each fast op (`matnet.ops.<name>`) beside its plain-torch reference (`matnet.ops.reference.<name>`),
forward and forward + backward, at the shapes a MatNet really has.

Groups are named '<op>[<case>]-<mode>-<device>-<dtype>' with mode 'fwd' or 'fwdbwd'; inside a group
the parameter `impl` is 'reference' or 'fast', and for the residual block also 'compiled' (torch.compile of the
reference, compiled outside the timed region; skipped in quick mode and with MATNET_BENCH_NO_COMPILE=1).
'fwd' runs under no_grad (inference: sampling, IWAE); 'fwdbwd' runs the forward with autograd and the gradients
of every input that training differentiates (not of data such as x, nor of the noise eps), against a fixed random
incoming gradient.
Case names: dataset-<H>x<W>-c<channels>[-merge|-td]-b<batch>; 'iwae' cases have the batch of one
importance-sampling chunk (images x samples). See benchutil.py for the cost models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest
import torch
from benchutil import (
    NO_COMPILE_ENV,
    Case,
    conv_flops,
    device_params,
    env_flag,
    numel,
    qualname,
    quick_mode,
    record,
    resolve,
    run_benchmark,
    scaled_batch,
    synchronized,
)

import matnet.ops
from matnet.ops import reference

IMPLS = ("reference", "fast")
MODES = ("fwd", "fwdbwd")


def op_impl(name: str, impl: str) -> Callable:
    """The public fast entry point, the reference, or torch.compile of the reference ('compiled'), looked up
    when the benchmark runs."""
    if impl == "compiled":
        torch._dynamo.reset()  # each case compiles afresh: past the recompile limit dynamo would run it eagerly
        return torch.compile(getattr(reference, name), dynamic=False)
    return getattr(reference if impl == "reference" else matnet.ops, name)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def bench_op(benchmark, *, op: str, impl: str, mode: str, case: Case, dev: torch.device, dtype: str,
             batch: int, quick: bool, args: Sequence, grad_args: Sequence[int],
             flops_fwd: float, flops_bwd: float, **info) -> None:
    """Time op(*args) ('fwd') or op(*args) plus the gradients of args[i] for i in grad_args ('fwdbwd').

    Bytes: fwd = inputs + outputs; fwdbwd = fwd + incoming gradients + inputs read again + gradients
    written (see benchutil.py)."""
    if impl == "compiled" and quick:
        pytest.skip("torch.compile is not run in quick mode")
    if impl == "compiled" and env_flag(NO_COMPILE_ENV):
        pytest.skip(f"{NO_COMPILE_ENV}=1")
    t0 = time.perf_counter()
    fn = op_impl(op, impl)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    es = tensors[0].element_size()
    with torch.no_grad():  # one probe call: output shapes for the cost model and the incoming gradients
        probe = _outputs(fn(*args))
    n_in = numel([t.shape for t in tensors])
    n_out = numel([o.shape for o in probe])
    n_grad = numel([args[i].shape for i in grad_args])
    if mode == "fwd":
        bytes_moved = es * (n_in + n_out)
        flops = flops_fwd

        def call():
            with torch.no_grad():
                return fn(*args)
    else:
        bytes_moved = es * (2 * n_in + 2 * n_out + n_grad)
        flops = flops_fwd + flops_bwd
        args = [a.detach().requires_grad_(i in grad_args) if isinstance(a, torch.Tensor) else a
                for i, a in enumerate(args)]
        targets = [args[i] for i in grad_args]
        grad_out = [torch.randn_like(o) for o in probe]

        def call():
            return torch.autograd.grad(_outputs(fn(*args)), targets, grad_out)

    del probe
    if impl == "compiled":  # compile (the probe: no-grad graph; this call: the training graphs) outside the timing
        synchronized(call, dev)()
        info["compile_s"] = round(time.perf_counter() - t0, 2)
    record(benchmark, op=op, case=case, impl=impl, mode=mode, dev=dev, dtype=dtype, batch=batch, images=batch,
           bytes_moved=bytes_moved, flops=flops, quick=quick, fn=qualname(fn), **info)
    run_benchmark(benchmark, call, dev, kernels=True)


def _randn(*shape, dev, dt, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=dev) * scale + shift).to(dt)


def _bins(*shape, dev, dt):
    """Pixel values in data space: the 256 bin centres 2k/255 - 1 on [-1, 1]."""
    return (torch.randint(0, 256, shape, device=dev).float() * (2.0 / 255.0) - 1.0).to(dt)


# ---- residual_conv_block: BU (Eq. 9), TD (Eq. 7, extra = z) and merge (Eq. 10, extra = [h_b; h_t]) ----

def _res(ds: str, size: int, c: int, b: int, variant: str = "", z: int = 4, k: int = 3, cpu: bool = False,
         cl: bool = False) -> Case:
    """cl: activations in channels_last (the NHWC engine on CUDA; cuDNN's NHWC kernels for the reference)."""
    extra = {"": 0, "td": z, "merge": 2 * c}[variant]
    tag = f"-{variant}" if variant else ""
    kt = f"-k{k}" if k != 3 else ""
    name = f"{ds}-{size}x{size}-c{c}{tag}{kt}{'-cl' if cl else ''}-b{b}"
    return Case(name, b, dict(C=c, E=extra, H=size, k=k, cl=cl), cpu=cpu)


RESIDUAL_CASES = [
    # CPU set (batch 100): the modules of the "mnist" and "cifar10" presets
    _res("mnist-fc", 1, 128, 100, k=1, cpu=True),  # the FC top's residual module: [B, 128, 1, 1], 1x1 kernels
    _res("mnist", 7, 32, 100, cpu=True),
    _res("mnist", 14, 32, 100, cpu=True),
    _res("mnist", 14, 32, 100, "merge", cpu=True),
    _res("cifar10", 8, 64, 100, cpu=True),
    _res("cifar10", 16, 64, 100, cpu=True),
    _res("cifar10", 32, 64, 100, cpu=True),
    _res("cifar10", 16, 128, 100, cpu=True),
    # CUDA adds wider models and larger batches
    _res("mnist", 14, 32, 512, "td"),
    _res("mnist", 7, 64, 512),
    _res("mnist", 14, 64, 512),
    _res("mnist", 14, 64, 512, "merge"),
    _res("cifar10", 8, 128, 512),
    _res("cifar10", 16, 128, 512),
    _res("cifar10", 32, 64, 256),
    _res("cifar10", 32, 64, 256, "merge"),
    _res("cifar10", 32, 128, 256),
    _res("cifar10", 32, 128, 512),
    _res("cifar10", 32, 128, 512, "td"),
    _res("mnist", 14, 64, 512, "merge", cl=True),
    _res("cifar10", 16, 128, 512, cl=True),
    _res("cifar10", 32, 64, 256, "merge", cl=True),
    _res("cifar10", 32, 128, 512, cl=True),
    _res("cifar10", 32, 128, 512, "td", cl=True),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(RESIDUAL_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", (*IMPLS, "compiled"))  # issue 10's targets: against eager and compiled
def test_residual_conv_block(benchmark, impl, mode, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    C, E, H, k = case["C"], case["E"], case["H"], case["k"]
    M = C
    fmt = torch.channels_last if case["cl"] else torch.contiguous_format
    h = _randn(B, C, H, H, dev=dev, dt=dt).contiguous(memory_format=fmt)
    extra = _randn(B, E, H, H, dev=dev, dt=dt).contiguous(memory_format=fmt) if E else None
    w1 = _randn(M, C + E, k, k, dev=dev, dt=dt, scale=((C + E) * k * k) ** -0.5)
    b1 = _randn(M, dev=dev, dt=dt, scale=0.1)
    w2 = _randn(C, M, k, k, dev=dev, dt=dt, scale=(M * k * k) ** -0.5)
    b2 = _randn(C, dev=dev, dt=dt, scale=0.1)
    args = [h, w1, b1, w2, b2, extra, 0.1]
    grad_args = [0, 1, 2, 3, 4] + ([5] if E else [])
    convs = conv_flops(B, H, H, C + E, M, k) + conv_flops(B, H, H, M, C, k)
    pointwise = B * H * H * (2 * M + 3 * C)  # bias + lrelu; bias + residual add + lrelu
    bench_op(benchmark, op="residual_conv_block", impl=impl, mode=mode, case=case, dev=dev, dtype=dtype,
             batch=B, quick=quick, args=args, grad_args=grad_args,
             flops_fwd=convs + pointwise, flops_bwd=2 * convs + 2 * pointwise)


# ---- gaussian_sample_kl: one stochastic module's z = mu + sigma * eps and KL(q || p) ----

def _gauss(name: str, b: int, z: int, size: int, cpu: bool = False) -> Case:
    return Case(f"{name}-b{b}", b, dict(Z=z, H=size), cpu=cpu)


GAUSSIAN_CASES = [
    _gauss("mnist-z0-32", 100, 32, 1, cpu=True),  # the top latent z0: [B, 32, 1, 1]
    _gauss("mnist-7x7-z4", 100, 4, 7, cpu=True),
    _gauss("mnist-14x14-z4", 100, 4, 14, cpu=True),
    _gauss("cifar10-32x32-z4", 100, 4, 32, cpu=True),
    _gauss("mnist-iwae-14x14-z4", 2048, 4, 14, cpu=True),  # one IWAE chunk: 2048 images x samples
    _gauss("mnist-14x14-z4", 512, 4, 14),
    _gauss("cifar10-32x32-z4", 512, 4, 32),
    _gauss("cifar10-iwae-32x32-z4", 2048, 4, 32),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(GAUSSIAN_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gaussian_sample_kl(benchmark, impl, mode, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    shape = (B, case["Z"], case["H"], case["H"])
    mu_q, mu_p = _randn(*shape, dev=dev, dt=dt), _randn(*shape, dev=dev, dt=dt)
    logvar_q = _randn(*shape, dev=dev, dt=dt, scale=0.5, shift=-1.0)
    logvar_p = _randn(*shape, dev=dev, dt=dt, scale=0.5)
    eps = _randn(*shape, dev=dev, dt=dt)
    n = numel([shape])
    bench_op(benchmark, op="gaussian_sample_kl", impl=impl, mode=mode, case=case, dev=dev, dtype=dtype,
             batch=B, quick=quick, args=[mu_q, logvar_q, mu_p, logvar_p, eps], grad_args=[0, 1, 2, 3],
             flops_fwd=15 * n, flops_bwd=20 * n)


# ---- discretized_logistic_nll: elementwise, 256 bins on [-1, 1] ("logistic" likelihood, RGB) ----

LOGISTIC_CASES = [
    Case("cifar10-32x32-c3-b100", 100, dict(C=3, H=32), cpu=True),
    Case("cifar10-iwae-32x32-c3-b1024", 1024, dict(C=3, H=32), cpu=True),
    Case("cifar10-32x32-c3-b512", 512, dict(C=3, H=32)),
    Case("cifar10-iwae-32x32-c3-b2048", 2048, dict(C=3, H=32)),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(LOGISTIC_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_discretized_logistic_nll(benchmark, impl, mode, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    shape = (B, case["C"], case["H"], case["H"])
    x = _bins(*shape, dev=dev, dt=dt)
    mean = _randn(*shape, dev=dev, dt=dt, scale=0.5)
    log_scale = (torch.rand(*shape, device=dev) * 4.0 - 4.0).to(dt)
    n = numel([shape])
    bench_op(benchmark, op="discretized_logistic_nll", impl=impl, mode=mode, case=case, dev=dev, dtype=dtype,
             batch=B, quick=quick, args=[x, mean, log_scale], grad_args=[1, 2], flops_fwd=25 * n, flops_bwd=25 * n)


# ---- discretized_logistic_mixture_nll: PixelCNN++ RGB mixture, K = 10 (the "cifar10" preset) ----

MIXTURE_CASES = [
    Case("cifar10-32x32-k10-b100", 100, dict(C=3, K=10, H=32), cpu=True),
    Case("cifar10-32x32-k10-b512", 512, dict(C=3, K=10, H=32)),
    Case("cifar10-iwae-32x32-k10-b2048", 2048, dict(C=3, K=10, H=32)),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(MIXTURE_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_discretized_logistic_mixture_nll(benchmark, impl, mode, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    C, K, H = case["C"], case["K"], case["H"]
    P = C * (C - 1) // 2
    x = _bins(B, C, H, H, dev=dev, dt=dt)
    logit_probs = _randn(B, K, H, H, dev=dev, dt=dt)
    means = _randn(B, K, C, H, H, dev=dev, dt=dt, scale=0.5)
    log_scales = (torch.rand(B, K, C, H, H, device=dev) * 4.0 - 4.0).to(dt)
    coeffs = torch.tanh(torch.randn(B, K, P, H, H, device=dev)).to(dt)
    # per (b, k, pixel): C bin log-probs (~25 each), the channel means (one FMA per pair),
    # the sum over channels and the softmax / logsumexp over components (~10)
    flops = B * H * H * K * (25 * C + 2 * P + C + 10)
    bench_op(benchmark, op="discretized_logistic_mixture_nll", impl=impl, mode=mode, case=case, dev=dev,
             dtype=dtype, batch=B, quick=quick, args=[x, logit_probs, means, log_scales, coeffs],
             grad_args=[1, 2, 3, 4], flops_fwd=flops, flops_bwd=flops)


# ---- masked_conv2d: the autoregressive decoder of section 2.3 (first 'A' 5x5, then 'B' 3x3) ----

def _masked(ds: str, size: int, mask: str, k: int, cx: int, cc: int, co: int, b: int, cpu: bool = False) -> Case:
    return Case(f"{ds}-{size}x{size}-{mask}{k}-x{cx}-cond{cc}-o{co}-b{b}", b,
                dict(H=size, type=mask, k=k, Cx=cx, Cc=cc, Co=co), cpu=cpu)


MASKED_CASES = [
    _masked("mnist", 28, "A", 5, 1, 32, 32, 100, cpu=True),
    _masked("mnist", 28, "B", 3, 32, 32, 32, 100, cpu=True),
    _masked("cifar10", 32, "A", 5, 3, 64, 32, 100, cpu=True),
    _masked("cifar10", 32, "B", 3, 32, 64, 32, 100, cpu=True),
    _masked("cifar10", 32, "B", 3, 32, 64, 100, 100, cpu=True),  # the output layer: 100 mixture parameters
    _masked("mnist", 28, "A", 5, 1, 32, 32, 512),
    _masked("mnist", 28, "B", 3, 32, 32, 32, 512),
    _masked("cifar10", 32, "A", 5, 3, 64, 32, 512),
    _masked("cifar10", 32, "B", 3, 32, 64, 32, 512),
    _masked("cifar10", 32, "B", 3, 32, 64, 100, 512),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(MASKED_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_conv2d(benchmark, impl, mode, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    H, k, cx, cc, co, mask = case["H"], case["k"], case["Cx"], case["Cc"], case["Co"], case["type"]
    # layer 'A' reads the image (data, no gradient); layers 'B' read hidden features
    x = _bins(B, cx, H, H, dev=dev, dt=dt) if mask == "A" else _randn(B, cx, H, H, dev=dev, dt=dt)
    cond = _randn(B, cc, H, H, dev=dev, dt=dt)
    weight = _randn(co, cx + cc, k, k, dev=dev, dt=dt, scale=((cx + cc) * k * k) ** -0.5)
    bias = _randn(co, dev=dev, dt=dt, scale=0.1)
    grad_args = [1, 2, 4] + ([0] if mask == "B" else [])
    # useful work only: the masked taps of the x channels are not counted
    taps = k * k // 2 + (mask == "B")
    flops = conv_flops(B, H, H, cx, co, k, taps) + conv_flops(B, H, H, cc, co, k) + B * H * H * co
    bench_op(benchmark, op="masked_conv2d", impl=impl, mode=mode, case=case, dev=dev, dtype=dtype,
             batch=B, quick=quick, args=[x, weight, bias, mask, cond], grad_args=grad_args,
             flops_fwd=flops, flops_bwd=2 * flops)
