"""Helpers shared by matnet's benchmark modules.

- device / dtype parameters: fp32 on CPU; fp32 and bf16 on CUDA (skipped cleanly without CUDA);
- quick mode: with `--benchmark-disable` (each benchmark runs once, as in the test command) or with
  MATNET_BENCH_QUICK=1, batch sizes shrink so that every benchmark finishes in about a second;
- timing: CUDA work is synchronized inside the timed function, warm-up calls run outside it; the ops'
  benchmarks add on CUDA the kernels' own time from CUDA events (`kernel_time`), which the bandwidth and
  FLOP rates of benchmarks/report.py use;
- `record`: the `extra_info` every benchmark stores for `benchmarks/report.py` (bytes, FLOPs,
  images per call, device name, dtype, ...).

Cost models (analytic, per call):
- bytes: the compulsory traffic of an ideal fused implementation: every input read once and every
  output written once. Forward + backward adds the backward's inputs (incoming gradients, the saved
  inputs read again) and the gradients written. Intermediates (e.g. the hidden activation of a residual
  block) are not counted: an ideal kernel keeps or recomputes them on chip.
- FLOPs: a convolution costs 2*B*H*W*Cin*Cout*k*k (multiply + add) in the forward pass and twice that
  again in the backward (input and weight gradients), so fwd+bwd = 3x fwd. Elementwise ops count about
  one FLOP per arithmetic operation, a transcendental function as one.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from matnet.ops._dispatch import conv_fp32_precision

QUICK_ENV = "MATNET_BENCH_QUICK"  # 1: shrink every shape (also on for --benchmark-disable)
NO_COMPILE_ENV = "MATNET_BENCH_NO_COMPILE"  # 1: skip the torch.compile(MatNet) benchmarks
THREADS_ENV = "MATNET_BENCH_THREADS"  # N: torch CPU threads (default: torch's own; 1 in quick mode)
QUICK_BATCH = 2  # batch size of every benchmark in quick mode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ELEMENT_SIZE = {"fp32": 4, "bf16": 2}
# what runs where: fp32 on CPU; fp32 and bf16 on CUDA
DEVICE_DTYPES = (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"))
WARMUP_CALLS = {"cpu": 1, "cuda": 3}  # untimed calls before measuring (Triton autotuning, caches)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def quick_mode(benchmark) -> bool:
    """True with --benchmark-disable (the benchmark runs once, untimed) or MATNET_BENCH_QUICK=1."""
    return env_flag(QUICK_ENV) or bool(getattr(benchmark, "disabled", False))


def scaled_batch(batch: int, quick: bool) -> int:
    return min(batch, QUICK_BATCH) if quick else batch


@dataclass
class Case:
    """One shape of an op or a model, named like 'mnist-14x14-c32-b100'. `cpu`: run on the CPU (the CPU
    set is kept small so that a full CPU run stays near ten minutes); `cuda`: run on CUDA."""

    name: str
    batch: int
    dims: dict[str, Any] = field(default_factory=dict)
    cpu: bool = False
    cuda: bool = True

    def __getitem__(self, key: str) -> Any:
        return self.dims[key]


def device_params(cases: Iterable[Case]) -> list:
    """pytest params (device, dtype, case) for `@pytest.mark.parametrize(("device", "dtype", "case"), ...)`."""
    cases = list(cases)
    out = []
    for device, dtype in DEVICE_DTYPES:
        for c in cases:
            if not (c.cpu if device == "cpu" else c.cuda):
                continue
            out.append(pytest.param(device, dtype, c, id=f"{device}-{dtype}-{c.name}"))
    return out


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype of a parameter pair; skips when the device cannot run it."""
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA is not available")
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bf16 support")
    elif dtype != "fp32":
        pytest.skip(f"{dtype} is benchmarked on CUDA only")
    return torch.device(device), DTYPES[dtype]


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def synchronized(fn: Callable[[], Any], dev: torch.device) -> Callable[[], Any]:
    """fn, followed by a device synchronization on CUDA, so that the timer sees the whole GPU work."""
    if dev.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(dev)
        return out

    return run


def kernel_time(fn: Callable[[], Any], dev: torch.device, reps: int = 20) -> float:
    """The median GPU time of fn in seconds, from CUDA events, without the host's launch overhead: before each
    call the stream is kept busy (an L2 flush by a read, then a sleep kernel) while fn's kernels are enqueued
    behind it, so the events time the kernels back to back. A sleep that ran out before fn was enqueued (the
    start event already passed) is doubled and the measurement repeated. fn must not synchronize."""
    flush = torch.ones(64 * 2**20, device=dev)  # 256 MB, larger than any L2: inputs come from HBM
    for cycles in (2_000_000, 8_000_000, 32_000_000):  # ~1, 4, 16 ms at 2 GHz
        events, late = [], False
        for _ in range(reps):
            flush.sum()
            torch.cuda._sleep(cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            late |= start.query()  # the GPU reached fn's start before all of fn was enqueued
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(dev)
        if not late:
            times = sorted(s.elapsed_time(e) for s, e in events)
            return times[len(times) // 2] / 1e3
    raise RuntimeError("fn takes the host longer to enqueue than a 16 ms sleep: its kernels cannot be timed alone")


def run_benchmark(benchmark, fn: Callable[[], Any], dev: torch.device, warmup: int | None = None,
                  rounds: int | None = None, kernels: bool = False) -> Any:
    """Warm up outside the timed region (skipped when the benchmark is disabled: it runs once anyway),
    then measure. rounds=None: pytest-benchmark's calibrated rounds (--benchmark-min-rounds,
    --benchmark-max-time); an int: exactly that many rounds of one call (for the slow model steps).
    kernels (CUDA): also the kernels' own time (`kernel_time`) as extra_info["kernel_s"]."""
    timed = synchronized(fn, dev)
    if warmup is None:
        warmup = WARMUP_CALLS[dev.type]
    if benchmark.disabled:
        return benchmark(timed)
    for _ in range(warmup):
        timed()
    if rounds is None:
        result = benchmark(timed)
    else:
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    if kernels and dev.type == "cuda":
        try:
            benchmark.extra_info["kernel_s"] = kernel_time(fn, dev)
        except Exception as e:  # never lose the measurement above to this extra one (report.py shows it)
            benchmark.extra_info["kernel_error"] = f"{type(e).__name__}: {e}"
    return result


def group_name(op: str, case: str, mode: str, device: str, dtype: str) -> str:
    """e.g. 'residual_conv_block[mnist-14x14-c32-b100]-fwd-cpu-fp32': the implementations of one
    measurement (reference, fast, compiled) share a group, so they sit side by side."""
    return f"{op}[{case}]-{mode}-{device}-{dtype}"


def record(benchmark, *, op: str, case: Case | str, impl: str, mode: str, dev: torch.device, dtype: str,
           batch: int, images: int, bytes_moved: float | None, flops: float | None, quick: bool,
           **more: Any) -> None:
    """Set the benchmark's group and the extra_info that benchmarks/report.py reads."""
    case_name = case.name if isinstance(case, Case) else case
    benchmark.group = group_name(op, case_name, mode, dev.type, dtype)
    info = {
        "op": op,
        "case": case_name,
        "impl": impl,
        "mode": mode,
        "device": dev.type,
        "device_name": device_name(dev),
        "dtype": dtype,
        "batch": batch,
        "images": images,
        "bytes": None if bytes_moved is None else int(bytes_moved),
        "flops": None if flops is None else int(flops),
        "quick": quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "force_reference": env_flag("MATNET_FORCE_REFERENCE"),
    }
    if dev.type == "cuda":
        info["tf32"] = conv_fp32_precision() == "tf32"  # what fp32 convolutions (cuDNN and matnet's) may use
        info["cuda"] = torch.version.cuda
    info.update(more)
    benchmark.extra_info.update(info)


def qualname(fn: Callable) -> str:
    """'module.function' of a callable: shows in the results whether a fast entry point is still the reference."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def numel(shapes: Sequence[Sequence[int]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= int(d)
        total += n
    return total


def conv_flops(batch: int, h: int, w: int, cin: int, cout: int, k: int, taps: int | None = None) -> int:
    """Forward FLOPs of a 'same' stride-1 convolution; `taps` replaces k*k for masked kernels."""
    return 2 * batch * h * w * cin * cout * (k * k if taps is None else taps)
