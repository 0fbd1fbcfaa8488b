"""Whole-model benchmarks: a training step (forward, backward, gradient clipping, Adam step) of
FastMatNet vs MatNet vs torch.compile(MatNet); sampling throughput (model.sample(n), images/s) and
IWAE evaluation throughput (model.iwae_nll(x, k), images x samples / s) of FastMatNet vs MatNet; the
training data loader (images/s of BatchLoader: uint8 images held on the device, shuffled, flipped or binarized
and converted there), which must outrun any training step.

fp32 on CPU; on CUDA fp32 and bf16 (bf16: weights, optimizer state, activations and inputs all in
bf16; the fast ops take inputs of one dtype, so autocast's mixed fp32 / bf16 arguments are not used).
Models start from the same random weights (seed 0); the inputs are random binary ("mnist") or 8-bit
("cifar10") images. The model steps are slow on a CPU, so they run a fixed number of rounds
(MATNET_BENCH_MODEL_ROUNDS, default 3 on CPU and 20 on CUDA) after untimed warm-up calls;
torch.compile is warmed up (compiled) outside the timed region and is skipped in quick mode and with
MATNET_BENCH_NO_COMPILE=1. FLOPs are counted with torch.utils.flop_counter on the reference
model on the meta device (convolutions and matrix products only) and scaled to the benchmark's batch.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch
from benchutil import (
    NO_COMPILE_ENV,
    QUICK_BATCH,
    WARMUP_CALLS,
    Case,
    device_params,
    env_flag,
    quick_mode,
    record,
    resolve,
    run_benchmark,
    scaled_batch,
)

from matnet import FastMatNet, MatNet, MatNetConfig
from matnet.cuda_graphs import graph_step
from matnet.data import BatchLoader, ImageDataset

MODEL_ROUNDS_ENV = "MATNET_BENCH_MODEL_ROUNDS"


def model_rounds(dev: torch.device) -> int:
    value = os.environ.get(MODEL_ROUNDS_ENV)
    return max(1, int(value)) if value else (3 if dev.type == "cpu" else 20)


def build(preset: str, impl: str, dev: torch.device, dt: torch.dtype = torch.float32) -> MatNet:
    """MatNet ('reference', 'compiled') or FastMatNet ('fast...'), both with the weights of MatNet at seed 0;
    '-cl' variants hold their conv weights (and so every feature map) channels_last."""
    cfg = MatNetConfig.preset(preset)
    torch.manual_seed(0)
    model = MatNet(cfg)
    if impl.startswith("fast"):
        fast = FastMatNet(cfg)
        fast.load_state_dict(model.state_dict())
        model = fast
    model = model.to(device=dev, dtype=dt)
    return model.to(memory_format=torch.channels_last) if "-cl" in impl else model


def make_batch(cfg: MatNetConfig, batch: int, dev: torch.device, dt: torch.dtype = torch.float32) -> torch.Tensor:
    """Random images in data space: {0, 1} for the binary likelihood, 8-bit bin centres on [-1, 1] otherwise."""
    shape = (batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.3)).to(device=dev, dtype=dt)
    return (torch.randint(0, 256, shape).float() * (2.0 / 255.0) - 1.0).to(device=dev, dtype=dt)


def _count_flops(fn) -> int | None:
    """Convolution and matmul FLOPs of fn() (forward and, where fn runs one, backward)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # very old torch
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # an op without a meta kernel: leave the count out rather than fail the benchmark
        return None
    return int(counter.get_total_flops())


META = torch.device("meta")  # shapes only: counting FLOPs costs no arithmetic


def _meta_model(preset: str) -> MatNet:
    return build(preset, "reference", META)


def _meta_batch(cfg: MatNetConfig, batch: int) -> torch.Tensor:
    return torch.empty(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=META)


@functools.cache
def train_flops_per_image(preset: str) -> int | None:
    model = _meta_model(preset).train()
    x = _meta_batch(model.cfg, 2)
    flops = _count_flops(lambda: model(x).loss.backward())
    return None if flops is None else flops // 2


@functools.cache
def sample_flops_per_image(preset: str) -> int | None:
    model = _meta_model(preset).eval()
    flops = _count_flops(lambda: model.sample(2))
    return None if flops is None else flops // 2


@functools.cache
def iwae_flops_parts(preset: str) -> tuple[int, int] | None:
    """(per image: the BU pass, per image and sample: the TD pass and the likelihood)."""
    model = _meta_model(preset).eval()
    x = _meta_batch(model.cfg, 1)
    one = _count_flops(lambda: model.iwae_nll(x, k=1, chunk=1))
    two = _count_flops(lambda: model.iwae_nll(x, k=2, chunk=2))
    if one is None or two is None:
        return None
    per_sample = two - one
    return one - per_sample, per_sample


# ---- training step -------------------------------------------------------------------------------

TRAIN_CASES = [
    Case("mnist-b100", 100, dict(preset="mnist"), cpu=True),
    Case("cifar10-b64", 64, dict(preset="cifar10"), cpu=True, cuda=False),  # kept short on a CPU
    Case("cifar10-b128", 128, dict(preset="cifar10")),
    Case("cifar10-b256", 256, dict(preset="cifar10")),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(TRAIN_CASES))
# fast-cl: channels_last; -bf16: under bf16 autocast (fp32 weights, fp32 likelihood and KL); -graph (CUDA): the
# whole step (Adam included) replayed as one CUDA graph (matnet.cuda_graphs); compiled-ro: torch.compile's
# reduce-overhead mode (CUDA graphs of the compiled forward and backward)
@pytest.mark.parametrize("impl", ("reference", "fast", "fast-cl", "fast-cl-bf16", "fast-cl-graph",
                                  "fast-cl-bf16-graph", "compiled", "compiled-ro"))
def test_train_step(benchmark, impl, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    autocast = "-bf16" in impl
    graphed = impl.endswith("-graph")
    compiled = impl.startswith("compiled")
    if autocast and dt != torch.float32:
        pytest.skip("the autocast variant runs on an fp32 model")
    if (graphed or impl == "compiled-ro") and dev.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if compiled and quick:
        pytest.skip("torch.compile is not benchmarked in quick mode (--benchmark-disable, MATNET_BENCH_QUICK)")
    if compiled and env_flag(NO_COMPILE_ENV):
        pytest.skip(f"{NO_COMPILE_ENV}=1")
    B = scaled_batch(case.batch, quick)
    model = build(case["preset"], impl, dev, dt).train()
    cfg = model.cfg
    x = make_batch(cfg, B, dev, dt)
    params = list(model.parameters())
    # capturable: the step count and bias corrections stay on the GPU, as a graph replay needs
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, capturable=graphed)
    if compiled:
        torch._dynamo.reset()  # a fresh cache: no recompilation limit carried over from earlier models
        forward = torch.compile(model, mode="reduce-overhead" if impl == "compiled-ro" else None)
    else:
        forward = model

    if "-cl" in impl:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(x=x):
        if impl == "compiled-ro":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        # a captured graph must not keep autocast's weight casts from the capture (they would go stale)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=not graphed):
            out = forward(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return out.loss.detach()

    more = {}
    if graphed:  # warm-up steps and the capture outside the timed region
        t0 = time.perf_counter()
        replay = graph_step(step, opt, x)
        torch.cuda.synchronize(dev)
        more["capture_s"] = round(time.perf_counter() - t0, 2)
        step = functools.partial(replay, x)
    if compiled:  # compile the forward and the backward graphs outside the timed region
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        more["compile_s"] = round(time.perf_counter() - t0, 2)
    per_image = train_flops_per_image(case["preset"])
    record(benchmark, op="train_step", case=case, impl=impl, mode="step", dev=dev, dtype=dtype, batch=B,
           images=B, bytes_moved=None, flops=None if per_image is None else per_image * B, quick=quick,
           preset=case["preset"], **more)
    run_benchmark(benchmark, step, dev, warmup=WARMUP_CALLS[dev.type], rounds=model_rounds(dev))


# ---- sampling ------------------------------------------------------------------------------------

SAMPLE_CASES = [
    Case("mnist-n100", 100, dict(preset="mnist"), cpu=True),
    Case("cifar10-n64", 64, dict(preset="cifar10"), cpu=True, cuda=False),
    Case("mnist-n1000", 1000, dict(preset="mnist")),
    Case("cifar10-n1000", 1000, dict(preset="cifar10")),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(SAMPLE_CASES))
@pytest.mark.parametrize("impl", ("reference", "fast"))
def test_sample(benchmark, impl, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    n = scaled_batch(case.batch, quick)
    model = build(case["preset"], impl, dev, dt).eval()

    def call():
        return model.sample(n)

    per_image = sample_flops_per_image(case["preset"])
    record(benchmark, op="sample", case=case, impl=impl, mode="fwd", dev=dev, dtype=dtype, batch=n, images=n,
           bytes_moved=None, flops=None if per_image is None else per_image * n, quick=quick,
           preset=case["preset"])
    run_benchmark(benchmark, call, dev, warmup=1, rounds=model_rounds(dev))


# ---- IWAE evaluation -----------------------------------------------------------------------------

IWAE_CASES = [
    Case("mnist-b10-k20", 10, dict(preset="mnist", k=20), cpu=True),
    Case("cifar10-b4-k8", 4, dict(preset="cifar10", k=8), cpu=True, cuda=False),
    Case("mnist-b100-k100", 100, dict(preset="mnist", k=100)),
    Case("cifar10-b32-k64", 32, dict(preset="cifar10", k=64)),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(IWAE_CASES))
@pytest.mark.parametrize("impl", ("reference", "fast", "fast-cl", "fast-cl-bf16"))
def test_iwae(benchmark, impl, device, dtype, case):
    dev, dt = resolve(device, dtype)
    quick = quick_mode(benchmark)
    autocast = impl.endswith("-bf16")
    if autocast and dt != torch.float32:
        pytest.skip("the autocast variant runs on an fp32 model")
    B = scaled_batch(case.batch, quick)
    k = min(case["k"], 2 * QUICK_BATCH) if quick else case["k"]
    model = build(case["preset"], impl, dev, dt).eval()
    x = make_batch(model.cfg, B, dev, dt)

    def call():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return model.iwae_nll(x, k=k)

    parts = iwae_flops_parts(case["preset"])
    flops = None if parts is None else parts[0] * B + parts[1] * B * k
    record(benchmark, op="iwae_nll", case=case, impl=impl, mode="fwd", dev=dev, dtype=dtype, batch=B,
           images=B * k, bytes_moved=None, flops=flops, quick=quick, preset=case["preset"], k=k)
    run_benchmark(benchmark, call, dev, warmup=1, rounds=model_rounds(dev))


# ---- data loader ---------------------------------------------------------------------------------

LOADER_CASES = [  # random uint8 images of the datasets' sizes, as the trainer's loader sees them
    Case("mnist-b100", 100, dict(shape=(1, 28, 28), n=60000, binarize="dynamic", hflip=False), cpu=True),
    Case("cifar10-b256", 256, dict(shape=(3, 32, 32), n=50000, binarize=None, hflip=True), cpu=True),
    Case("cifar10-b1024", 1024, dict(shape=(3, 32, 32), n=50000, binarize=None, hflip=True)),
]


@pytest.mark.parametrize(("device", "dtype", "case"), device_params(LOADER_CASES))
def test_loader(benchmark, device, dtype, case):
    dev, dt = resolve(device, dtype)
    if dt != torch.float32:
        pytest.skip("the loader's batches are fp32")
    quick = quick_mode(benchmark)
    B = scaled_batch(case.batch, quick)
    n = 4 * B if quick else case["n"]
    images = torch.randint(0, 256, (n, *case["shape"]), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stream = BatchLoader(ImageDataset(images, binarize=case["binarize"]), B, device=dev, hflip=case["hflip"]).forever()
    record(benchmark, op="loader", case=case, impl="fast", mode="batch", dev=dev, dtype=dtype, batch=B, images=B,
           bytes_moved=B * images[0].numel() * 5, flops=None, quick=quick)  # uint8 read, fp32 written
    run_benchmark(benchmark, lambda: next(stream), dev)
